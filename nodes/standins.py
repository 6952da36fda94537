"""Headless stand-ins for the core ComfyUI nodes our workflows use: SaveImage, PreviewImage, LoadImage,
EmptySD3LatentImage. Same names, inputs, defaults and ranges as ComfyUI's own, so workflows saved in the editor run
unchanged; only the headless runner uses them (inside ComfyUI the real nodes run, and the pack never exports these).

Also the file rules both the runner and server mode follow: names stay inside their folder, and new files get
ComfyUI's `prefix_00001_.png` names, are written atomically and never replace an existing file.
"""
import contextlib
import json
import os
import re
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from . import host

MAX_RESOLUTION = 16384
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
NAME_MAX = 255  # bytes in one file name, on every common file system
PART = re.compile(r"\.fluxkit-[0-9a-f]{32}\.part")  # our temporary files
STALE_PART_SECONDS = 15 * 60  # a part file untouched this long was left by a killed run


def inside(folder: Path, name: str, what: str) -> Path:
    """folder/name, refusing absolute names and names that lead out of the folder (also through symlinks)."""
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor:
        raise ValueError(f"{what} {name!r} must be relative to {folder}, not an absolute path")
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{what} {name!r} leads outside {folder}")
    return path


def next_counter(folder: Path, prefix: str, names: list[str] | None = None) -> int:
    """1 + the highest counter of `prefix_NNNNN_...` files in folder, or among `names` (ComfyUI's numbering)."""
    highest = 0
    if names is None:
        names = [entry.name for entry in os.scandir(folder)] if folder.is_dir() else []
    for name in names:
        head, sep, rest = name[: len(prefix)], name[len(prefix) : len(prefix) + 1], name[len(prefix) + 1 :]
        digits = rest.split("_")[0]
        if sep == "_" and os.path.normcase(head) == os.path.normcase(prefix) and digits.isdigit():
            highest = max(highest, int(digits))
    return highest + 1


def _new_part(folder: Path) -> tuple[Path, int]:
    """A new temporary file of ours in folder, open for writing."""
    tmp = folder / f".fluxkit-{uuid.uuid4().hex}.part"
    return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies


def sweep_parts(folder: Path) -> None:
    """Removes temporary files of ours that a killed run left (untouched for STALE_PART_SECONDS)."""
    old = time.time() - STALE_PART_SECONDS
    for entry in os.scandir(folder):
        if PART.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):  # another run may sweep it first
                if entry.stat(follow_symlinks=False).st_mtime < old:
                    os.unlink(entry.path)


hold = None  # set by the distributed runner (nodes.distributed): hold(folder, prefix, write, suffix) numbers later


def write_new(folder: Path, prefix: str, write, suffix: str = ".png", counter: int | None = None) -> Path:
    """Writes `prefix_NNNNN_<suffix>` with write(file): to a temporary file first, then hard-linked into place,
    which fails rather than replace a file that appeared meanwhile (then the next counter is taken). `counter`:
    the first number to try (default: after the highest taken)."""
    if hold is not None and counter is None:
        return hold(folder, prefix, write, suffix)
    folder.mkdir(parents=True, exist_ok=True)
    sweep_parts(folder)
    tmp, fd = _new_part(folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        counter = next_counter(folder, prefix) if counter is None else counter
        while True:
            path = folder / f"{prefix}_{counter:05}_{suffix}"
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                counter += 1
    finally:
        os.unlink(tmp)


_DATE_PART = re.compile(r"dd?|MM?|hh?|mm?|ss?|yyy?y?")


def _format_date(fmt: str, now: time.struct_time) -> str:
    """The editor's %date:FORMAT%: yyyy, yy, MM, M, dd, d, hh, h (0-23), mm, m, ss, s; other text stays."""
    values = {"d": now.tm_mday, "M": now.tm_mon, "h": now.tm_hour, "m": now.tm_min, "s": now.tm_sec}

    def part(match: re.Match) -> str:
        text = match.group()
        if text in ("yyyy", "yy"):
            return str(now.tm_year)[-len(text) :]
        return str(values[text[0]]).zfill(len(text)) if text[0] in values else text

    return _DATE_PART.sub(part, fmt)


def expand_dates(prefix: str, now: time.struct_time | None = None) -> str:
    """%date:FORMAT% expanded, as ComfyUI's editor does before queueing (its server does not)."""
    now = now or time.localtime()
    return re.sub(r"%date:([^%]*)%", lambda m: _format_date(m.group(1), now), prefix)


def _expand(prefix: str, width: int, height: int) -> str:
    """ComfyUI's filename variables: the server's %width%, %height%, %year% ... %second%, and the editor's
    %date:FORMAT% (headless runs have no editor to expand it)."""
    now = time.localtime()
    prefix = expand_dates(prefix, now)
    values = {"width": width, "height": height, "year": now.tm_year, "month": f"{now.tm_mon:02}", "day": f"{now.tm_mday:02}",
              "hour": f"{now.tm_hour:02}", "minute": f"{now.tm_min:02}", "second": f"{now.tm_sec:02}"}  # fmt: skip
    for key, value in values.items():
        prefix = prefix.replace(f"%{key}%", str(value))
    return prefix


def check_writable(folder: Path) -> None:
    """Raises OSError unless a file can be made in folder, or in the nearest existing folder above it (where it will
    be created). A real probe: permission bits tell neither root's nor a read-only mount's truth."""
    base = next(p for p in (folder, *folder.parents) if p.exists())
    if not base.is_dir():
        raise NotADirectoryError(f"cannot save in {folder}: {base} is a file, not a folder")
    try:
        tmp, fd = _new_part(base)
    except OSError as e:
        raise PermissionError(f"cannot save in {folder}: {base} is not writable ({e.strerror}); use another folder") from None
    os.close(fd)
    tmp.unlink()


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

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix="ComfyUI"):
        """The output target, checked before any model loads: a file name inside a folder we can write."""
        try:
            prefix = "ComfyUI" if filename_prefix is None else filename_prefix  # None: linked, known at run time
            _, folder, _ = cls.target(prefix, MAX_RESOLUTION, MAX_RESOLUTION)  # the longest %width%, %height%
            check_writable(folder)
        except (ValueError, OSError) as e:
            return str(e)
        return True

    @classmethod
    def folder(cls) -> Path:
        return host.output_dir()

    @classmethod
    def target(cls, filename_prefix: str, width: int, height: int) -> tuple[Path, Path, str]:
        """(root, folder, name) a prefix saves to: refuses names that leave the root, name no file, hold a NUL, or
        do not fit the file system's 255-byte names once numbered."""
        prefix = os.path.normpath(_expand(filename_prefix + cls.prefix_append, width, height))
        if "\0" in prefix:
            raise ValueError(f"filename_prefix {filename_prefix!r} holds a NUL character")
        root = cls.folder()
        folder = inside(root, os.path.dirname(prefix) or ".", "filename_prefix")
        name = os.path.basename(prefix)
        if name in ("", ".", ".."):
            raise ValueError(f"filename_prefix {filename_prefix!r} names no file: end it with a name, e.g. ComfyUI")
        for part in (*Path(os.path.dirname(prefix)).parts, f"{name}_00001_.png"):
            if len(os.fsencode(part)) > NAME_MAX:
                raise ValueError(f"filename_prefix makes the name {part[:24]!r}... of {len(os.fsencode(part))} bytes; "
                                 f"file names hold at most {NAME_MAX}: shorten it")  # fmt: skip
        return root, folder, name

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        root, folder, name = self.target(filename_prefix, images.shape[2], images.shape[1])
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

    @classmethod
    def folder(cls) -> Path:
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

    @classmethod
    def VALIDATE_INPUTS(cls, width, height):
        """Core floors any size to 1/8 of the pixels (20x36 gives a 16x32 image) and lets 40x40 through to fail in a
        Flux sampler after the models load. Headless, every latent goes to Flux, which needs multiples of 16 (the
        editor's widget step): other sizes are refused here, before anything loads."""
        for name, value in (("width", width), ("height", height)):
            if value is not None and not (16 <= value <= MAX_RESOLUTION and value % 16 == 0):
                fit = min(MAX_RESOLUTION, max(16, round(value / 16) * 16))
                return (f"{name} {value} is not a multiple of 16 from 16 to {MAX_RESOLUTION}: Flux latents are 1/8 of "
                        f"the pixels, packed in 2x2 patches. Use {fit}.")  # fmt: skip
        return True

    def generate(self, width, height, batch_size=1):  # as core: any size floored to 1/8
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
