"""The one module that touches ComfyUI: model folders, progress, interrupt, devices, output folder.

Inside ComfyUI these forward to `folder_paths`, `comfy.utils` and `comfy.model_management`; elsewhere (tests, the
headless runner) they fall back to folders set with `configure()`, a terminal progress bar and the CPU/CUDA device.
"""
import importlib
import os
import sys
from pathlib import Path

import torch

# ComfyUI folder names and the subfolders of a models directory that hold them (as in ComfyUI's folder_paths).
MODEL_FOLDERS = {
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "checkpoints": ("checkpoints",),
    "fluxkit_seq2seq": ("fluxkit_seq2seq",),
    "clip_vision": ("clip_vision",),
    "style_models": ("style_models",),
    "loras": ("loras",),
}
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".gguf")
_fallback = {"models_dir": None, "output_dir": None, "input_dir": None, "comfy_root": None}


def _comfy(module: str):
    """A ComfyUI module when running inside ComfyUI (which imports folder_paths first), else None."""
    if "folder_paths" not in sys.modules:
        return None
    return importlib.import_module(module)


def in_comfyui() -> bool:
    return _comfy("folder_paths") is not None


def configure(models_dir=None, output_dir=None, input_dir=None) -> None:
    """Folders used outside ComfyUI. `models_dir` may be a models folder or a ComfyUI install (its models/)."""
    if models_dir is not None:
        models_dir = Path(models_dir).expanduser()
        if (models_dir / "models").is_dir() and (models_dir / "main.py").is_file():
            _fallback["comfy_root"] = models_dir
            models_dir = models_dir / "models"
        _fallback["models_dir"] = models_dir
    if output_dir is not None:
        _fallback["output_dir"] = Path(output_dir).expanduser()
    if input_dir is not None:
        _fallback["input_dir"] = Path(input_dir).expanduser()


def _folders(kind: str) -> list[Path]:
    if kind not in MODEL_FOLDERS:
        raise KeyError(f"unknown model folder kind {kind!r}; known: {', '.join(MODEL_FOLDERS)}")
    root = _fallback["models_dir"] or Path(os.environ.get("FLUXKIT_MODELS", "models"))
    return [root / sub for sub in MODEL_FOLDERS[kind]]


def model_list(kind: str) -> list[str]:
    """Weight files, and diffusers folders (with a model_index.json or config.json), under a model kind."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None and kind in folder_paths.folder_names_and_paths:
        names = set(folder_paths.get_filename_list(kind))
        for folder in folder_paths.get_folder_paths(kind):  # ComfyUI's extension filter has no .gguf
            names.update(folder_paths.filter_files_extensions(folder_paths.recursive_search(folder)[0], {".gguf"}))
        return sorted(names)
    names = set()
    for folder in _folders(kind):
        for dirpath, dirnames, filenames in os.walk(folder):
            here = Path(dirpath)
            if here != folder and ({"model_index.json", "config.json", "params.json"} & set(filenames)):
                names.add(here.relative_to(folder).as_posix())
                dirnames.clear()  # a diffusers folder is one model: do not list its shards
                continue
            names.update((here / f).relative_to(folder).as_posix() for f in filenames if f.endswith(WEIGHT_SUFFIXES))
    return sorted(names)


def model_path(kind: str, name: str) -> Path:
    """The file or folder `name` of a model kind; only names inside the configured folders resolve."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise ValueError(f"model name {name!r} must be a plain name inside the {kind} folder (no absolute path, no '..')")
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None and kind in folder_paths.folder_names_and_paths:
        return Path(folder_paths.get_full_path_or_raise(kind, name))
    folders = _folders(kind)
    for folder in folders:
        candidate = (folder / name).resolve()
        if candidate.exists() and candidate.is_relative_to(folder.resolve()):
            return candidate
    looked = ", ".join(str(f) for f in folders)
    raise FileNotFoundError(f"{kind} model {name!r} not found; looked in {looked}")


def output_dir() -> Path:
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        return Path(folder_paths.get_output_directory())
    return _fallback["output_dir"] or Path("output")


def input_dir() -> Path:
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        return Path(folder_paths.get_input_directory())
    return _fallback["input_dir"] or Path("input")


def comfy_root() -> Path | None:
    """ComfyUI's source folder when running inside it (for its bundled tokenizers)."""
    folder_paths = _comfy("folder_paths")  # `comfy` is a namespace package without __file__: ask folder_paths
    return Path(folder_paths.base_path) if folder_paths is not None else None


def torch_device() -> torch.device:
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    mm = _comfy("comfy.model_management")
    return mm.text_encoder_offload_device() if mm is not None else torch.device("cpu")


def free_memory() -> None:
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_interrupt() -> None:
    """Raises ComfyUI's interrupt exception when the user pressed stop (no-op outside ComfyUI)."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


class _TerminalProgress:
    def __init__(self, total: int):
        self.total = total

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        total = total or self.total
        width = 30
        done = int(width * value / max(total, 1))
        end = "\n" if value >= total else ""
        print(f"\r[{'#' * done}{'.' * (width - done)}] {value}/{total}", end=end, file=sys.stderr, flush=True)


def progress_bar(total: int):
    """An object with update_absolute(value, total): ComfyUI's ProgressBar inside ComfyUI, a terminal bar outside."""
    utils = _comfy("comfy.utils")
    return utils.ProgressBar(total) if utils is not None else _TerminalProgress(total)


def tokenizer_dirs() -> list[Path]:
    """Folders that may hold the CLIP-L and T5 tokenizers, most specific first: ComfyUI's bundled ones, then
    `tokenizers/` in the models folder, then $FLUXKIT_TOKENIZERS."""
    dirs = []
    root = comfy_root() or _fallback["comfy_root"]
    if root is not None:
        dirs += [root / "comfy" / "sd1_tokenizer", root / "comfy" / "text_encoders" / "t5_tokenizer"]
    models = _fallback["models_dir"] or Path(os.environ.get("FLUXKIT_MODELS", "models"))
    dirs += [models / "tokenizers"]
    if os.environ.get("FLUXKIT_TOKENIZERS"):
        dirs.append(Path(os.environ["FLUXKIT_TOKENIZERS"]))
    return dirs


def step_callback(steps: int):
    """A sampler callback(step, total, x) that honours ComfyUI's Stop and advances the progress bar each step."""
    bar = progress_bar(steps)

    def on_step(step: int, total: int, _x) -> None:
        check_interrupt()
        bar.update_absolute(step, total)

    return on_step
