"""Writes each workflow's template thumbnail, NAME.jpg beside NAME.json (ComfyUI's template browser shows it): the
graph as laid out in the editor, nodes coloured by origin (FluxKit, core). Run after changing a workflow:
    python workflows/thumbnails.py
"""
import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE, MARGIN = (512, 384), 24
COLOURS = {"FluxKit": (64, 112, 200), "core": (92, 92, 100)}


def short_name(node_type: str) -> str:
    return node_type.removeprefix("FluxKit") or node_type


def thumbnail(workflow: dict, title: str) -> Image.Image:
    image = Image.new("RGB", SIZE, (24, 24, 28))
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 8), title, fill=(235, 235, 235))
    nodes = {n["id"]: n for n in workflow["nodes"]}
    xs = [n["pos"][0] for n in nodes.values()] + [n["pos"][0] + n["size"][0] for n in nodes.values()]
    ys = [n["pos"][1] for n in nodes.values()] + [n["pos"][1] + n["size"][1] for n in nodes.values()]
    scale = min((SIZE[0] - 2 * MARGIN) / (max(xs) - min(xs)), (SIZE[1] - 3 * MARGIN) / (max(ys) - min(ys)))

    def box(n) -> tuple[float, float, float, float]:
        x, y = (n["pos"][0] - min(xs)) * scale + MARGIN, (n["pos"][1] - min(ys)) * scale + 2 * MARGIN
        return x, y, x + n["size"][0] * scale, y + n["size"][1] * scale

    for _, src, _, dst, _, _ in workflow["links"]:
        a, b = box(nodes[src]), box(nodes[dst])
        draw.line((a[2], (a[1] + a[3]) / 2, b[0], (b[1] + b[3]) / 2), fill=(200, 170, 80), width=2)
    for n in nodes.values():
        colour = COLOURS["FluxKit" if n["type"].startswith("FluxKit") else "core"]
        draw.rounded_rectangle(box(n), radius=4, fill=colour, outline=(220, 220, 220))
        x0, y0, x1, _ = box(n)
        draw.text((x0 + 4, y0 + 3), short_name(n["type"])[: int((x1 - x0 - 8) / 6)], fill=(255, 255, 255))  # 6 px a glyph
    return image


if __name__ == "__main__":
    for path in sorted(HERE.glob("*.json")):
        title = path.stem.replace("_", " ")
        thumbnail(json.loads(path.read_text()), title).save(path.with_suffix(".jpg"), quality=85)
        print("wrote", path.with_suffix(".jpg").name)
