"""Headless stand-ins for the core ComfyUI nodes our workflows use: SaveImage, PreviewImage, LoadImage,
EmptySD3LatentImage. Same names, inputs, defaults and ranges as ComfyUI's own, so workflows saved in the editor run
unchanged; only the headless runner uses them (inside ComfyUI the real nodes run, and the pack never exports these).

Also the file rules both the runner and server mode follow: names stay inside their folder, and new files get
ComfyUI's `prefix_00001_.png` names, are written atomically and never replace an existing file.
"""
import json
import os
import tempfile
import uuid
import time
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from . import host

MAX_RESOLUTION = 16384
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def inside(folder: Path, name: str, what: str) -> Path:
    """folder/name, refusing absolute names and names that lead out of the folder (also through symlinks)."""
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor:
        raise ValueError(f"{what} {name!r} must be relative to {folder}, not an absolute path")
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{what} {name!r} leads outside {folder}")
    return path


def next_counter(folder: Path, prefix: str) -> int:
    """1 + the highest counter of `prefix_NNNNN_...` files in folder (ComfyUI's numbering)."""
    highest = 0
    if folder.is_dir():
        for entry in os.scandir(folder):
            head, sep, rest = entry.name[: len(prefix)], entry.name[len(prefix) : len(prefix) + 1], entry.name[len(prefix) + 1 :]
            digits = rest.split("_")[0]
            if sep == "_" and os.path.normcase(head) == os.path.normcase(prefix) and digits.isdigit():
                highest = max(highest, int(digits))
    return highest + 1


def write_new(folder: Path, prefix: str, write, suffix: str = ".png") -> Path:
    """Writes `prefix_NNNNN_<suffix>` with write(file): to a temporary file first, then hard-linked into place,
    which fails rather than replace a file that appeared meanwhile (then the next counter is taken)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".fluxkit-{uuid.uuid4().hex}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        counter = next_counter(folder, prefix)
        while True:
            path = folder / f"{prefix}_{counter:05}_{suffix}"
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                counter += 1
    finally:
        os.unlink(tmp)


def _expand(prefix: str, width: int, height: int) -> str:
    """ComfyUI's filename variables (%width%, %height%, %year% ... %second%)."""
    now = time.localtime()
    values = {"width": width, "height": height, "year": now.tm_year, "month": f"{now.tm_mon:02}", "day": f"{now.tm_mday:02}",
              "hour": f"{now.tm_hour:02}", "minute": f"{now.tm_min:02}", "second": f"{now.tm_sec:02}"}  # fmt: skip
    for key, value in values.items():
        prefix = prefix.replace(f"%{key}%", str(value))
    return prefix


class SaveImage:
    """Headless stand-in for ComfyUI's Save Image: PNGs carrying the prompt and workflow chunks."""

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."
    kind, compress_level, prefix_append = "output", 4, ""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }  # fmt: skip

    def folder(self) -> Path:
        return host.output_dir()

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        prefix = _expand(filename_prefix + self.prefix_append, images.shape[2], images.shape[1])
        root = self.folder()
        folder = inside(root, os.path.dirname(os.path.normpath(prefix)) or ".", "filename_prefix")
        name = os.path.basename(os.path.normpath(prefix))
        metadata = PngInfo()
        if prompt is not None:
            metadata.add_text("prompt", json.dumps(prompt))
        for key, value in (extra_pnginfo or {}).items():
            metadata.add_text(key, json.dumps(value))
        results = []
        for batch_number, image in enumerate(images):  # (H, W, C) in 0..1
            pixels = np.clip(255.0 * image.float().cpu().numpy(), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels)
            write = lambda f: img.save(f, format="PNG", pnginfo=metadata, compress_level=self.compress_level)  # noqa: E731
            path = write_new(folder, name.replace("%batch_num%", str(batch_number)), write)
            subfolder = path.parent.relative_to(root.resolve()).as_posix()
            results.append({"filename": path.name, "subfolder": "" if subfolder == "." else subfolder, "type": self.kind})
        return {"ui": {"images": results}}


def preview_dir() -> Path:
    """Where headless previews go (ComfyUI keeps them in its temp folder)."""
    return Path(tempfile.gettempdir()) / "fluxkit-preview"


class PreviewImage(SaveImage):
    """Headless stand-in for ComfyUI's Preview Image: quick PNGs in a temporary folder (see preview_dir)."""

    kind, compress_level, prefix_append = "temp", 1, "_temp_"
    DESCRIPTION = "Saves the input images to a temporary folder."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def folder(self) -> Path:
        return preview_dir()


class LoadImage:
    """Headless stand-in for ComfyUI's Load Image: an image from the input folder as IMAGE and MASK."""

    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"

    @classmethod
    def INPUT_TYPES(cls):
        folder = host.input_dir()
        files = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES] if folder.is_dir() else []
        return {"required": {"image": (sorted(files), {"image_upload": True})}}

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        try:
            path = inside(host.input_dir(), image, "image")
        except ValueError as e:
            return str(e)
        return True if path.is_file() else f"Invalid image file: {image}"

    def load_image(self, image):
        images, masks = [], []
        with Image.open(inside(host.input_dir(), image, "image")) as img:
            for frame in ImageSequence.Iterator(img):
                frame = ImageOps.exif_transpose(frame)
                if frame.mode == "I":  # 16-bit greyscale
                    frame = frame.point(lambda v: v * (1 / 255))
                rgb = frame.convert("RGB")
                if images and rgb.size != (images[0].shape[2], images[0].shape[1]):
                    continue  # ComfyUI keeps only the frames of the first frame's size
                images.append(torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None])  # (1, H, W, 3)
                if "A" in frame.getbands() or (frame.mode == "P" and "transparency" in frame.info):
                    alpha = np.array(frame.convert("RGBA").getchannel("A")).astype(np.float32) / 255.0
                    mask = 1.0 - torch.from_numpy(alpha)
                else:
                    mask = torch.zeros((64, 64), dtype=torch.float32)
                masks.append(mask[None])  # (1, H, W)
                if img.format == "MPO":
                    break  # ComfyUI reads only the first picture of an MPO
        return torch.cat(images), torch.cat(masks)


class EmptySD3LatentImage:
    """Headless stand-in for ComfyUI's EmptySD3LatentImage: zeros of shape (B, 16, H/8, W/8), Flux's latent."""

    CATEGORY = "latent/sd3"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16}
        return {"required": {"width": ("INT", size), "height": ("INT", size), "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}}

    def generate(self, width, height, batch_size=1):
        return ({"samples": torch.zeros([batch_size, 16, height // 8, width // 8])},)


NODE_CLASS_MAPPINGS = {
    "SaveImage": SaveImage,
    "PreviewImage": PreviewImage,
    "LoadImage": LoadImage,
    "EmptySD3LatentImage": EmptySD3LatentImage,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SaveImage": "Save Image",
    "PreviewImage": "Preview Image",
    "LoadImage": "Load Image",
    "EmptySD3LatentImage": "EmptySD3LatentImage",
}
