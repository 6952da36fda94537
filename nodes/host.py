"""The one module that touches ComfyUI: model folders, progress, interrupt, devices, output folder.

Inside ComfyUI these forward to `folder_paths`, `comfy.utils` and `comfy.model_management`; elsewhere (tests, the
headless runner) they fall back to folders set with `configure()`, a terminal progress bar and the CPU/CUDA device.
"""
import importlib
import os
import sys
import weakref
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
RUN_FOLDER_KINDS = ("fluxkit_seq2seq",)  # ours: each model is a folder, registered with ComfyUI under its models dir
PACK_DIR = Path(__file__).absolute().parents[1]  # not resolved: the folder name ComfyUI knows the pack by
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


def models_root() -> Path:
    """The models folder outside ComfyUI: configure()'s, else $FLUXKIT_MODELS, else ./models."""
    return (_fallback["models_dir"] or Path(os.environ.get("FLUXKIT_MODELS", "models"))).absolute()


def register_model_folders() -> None:
    """Inside ComfyUI: our own kinds as ComfyUI model folders (models/fluxkit_seq2seq beside models/vae, plus any
    extra_model_paths.yaml adds), so they are found wherever the server was started."""
    folder_paths = _comfy("folder_paths")
    for kind in RUN_FOLDER_KINDS if folder_paths is not None else ():
        folder_paths.add_model_folder_path(kind, os.path.join(folder_paths.models_dir, kind))


def register_template_route() -> None:
    """Inside ComfyUI: serve workflows/ at /api/workflow_templates/<pack folder>/<file> when that folder's name has a
    space. ComfyUI 0.8.0 mounts each pack's templates with aiohttp's web.static under the raw folder name, and
    aiohttp matches that prefix percent-encoded ("Flux%20Kit") against the decoded request path, so every file 404s
    and clicking a template does nothing. This route (looked up after ComfyUI's own) serves our folder only."""
    server, pack = sys.modules.get("server"), PACK_DIR  # ComfyUI's server module, only when it is running
    if server is None or getattr(server.PromptServer, "instance", None) is None or " " not in pack.name:
        return
    from aiohttp import web  # ComfyUI's web server

    @server.PromptServer.instance.routes.get("/workflow_templates/{pack}/{name}")
    async def template(request):
        path = pack / "workflows" / request.match_info["name"]
        if request.match_info["pack"] != pack.name or path.parent.name != "workflows" or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)


def _comfy_files(kind: str):
    """folder_paths when ComfyUI lists and finds this kind's files itself (not for folder models), else None."""
    folder_paths = _comfy("folder_paths")
    known = folder_paths is not None and kind in folder_paths.folder_names_and_paths and kind not in RUN_FOLDER_KINDS
    return folder_paths if known else None


def _folders(kind: str) -> list[Path]:
    if kind not in MODEL_FOLDERS:
        raise KeyError(f"unknown model folder kind {kind!r}; known: {', '.join(MODEL_FOLDERS)}")
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None and kind in folder_paths.folder_names_and_paths:
        return [Path(p) for p in folder_paths.get_folder_paths(kind)]
    return [models_root() / sub for sub in MODEL_FOLDERS[kind]]


def model_list(kind: str) -> list[str]:
    """Weight files, and diffusers folders (with a model_index.json or config.json), under a model kind."""
    folder_paths = _comfy_files(kind)
    if folder_paths is not None:
        names = set(folder_paths.get_filename_list(kind))
        for folder in folder_paths.get_folder_paths(kind):  # ComfyUI's extension filter has no .gguf
            names.update(folder_paths.filter_files_extensions(folder_paths.recursive_search(folder)[0], {".gguf"}))
        return sorted(names)
    names, seen = set(), set()
    for folder in _folders(kind):
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):  # symlinks followed, as ComfyUI does
            here = Path(dirpath)
            if here.resolve() in seen:  # a symlink loop, or a folder reached twice
                dirnames.clear()
                continue
            seen.add(here.resolve())
            if here != folder and ({"model_index.json", "config.json", "params.json"} & set(filenames)):
                names.add(here.relative_to(folder).as_posix())
                dirnames.clear()  # a diffusers folder is one model: do not list its shards
                continue
            names.update(
                (here / f).relative_to(folder).as_posix() for f in filenames
                if f.endswith(WEIGHT_SUFFIXES) and (here / f).exists()  # not a dangling symlink
            )  # fmt: skip
    return sorted(names)


def model_path(kind: str, name: str) -> Path:
    """The file or folder `name` of a model kind. The name must lie inside one of the kind's folders (no absolute
    path, no '..'); symlinks in the folder are followed wherever they lead, as ComfyUI users link model files."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
        raise ValueError(f"model name {name!r} must be a plain name inside the {kind} folder (no absolute path, no '..')")
    folder_paths = _comfy_files(kind)
    if folder_paths is not None:
        return Path(folder_paths.get_full_path_or_raise(kind, name))
    folders = _folders(kind)
    for folder in folders:
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(_not_found(kind, [name], folders))


def _not_found(kind: str, names: list, folders: list) -> str:
    files = " and ".join(map(repr, names))
    where = " or ".join(map(str, folders))
    return f"{kind} {files} not found in {where}: put {'it' if len(names) == 1 else 'them'} in {folders[0]}"


def missing_models(kind: str, *names) -> str | None:
    """One line on those of `names` that cannot be loaded (for VALIDATE_INPUTS): where they were looked for and where
    they go; None when all are there. A None name comes through a link: it is checked when it runs."""
    folder_paths = _comfy_files(kind)
    in_comfy = folder_paths is not None
    missing = []
    for name in (n for n in names if n is not None):
        if in_comfy:
            missing += [name] if folder_paths.get_full_path(kind, name) is None else []
            continue
        try:
            model_path(kind, name)
        except ValueError as e:
            return str(e)
        except FileNotFoundError:
            missing.append(name)
    if not missing:
        return None
    return _not_found(kind, missing, folder_paths.get_folder_paths(kind) if in_comfy else _folders(kind))


def models_folder_note() -> str | None:
    """Outside ComfyUI, when the models folder does not exist: a line saying so and how to give it."""
    root = models_root()
    if in_comfyui() or root.is_dir():
        return None
    return f"the models folder {root} does not exist: give yours with --models or $FLUXKIT_MODELS"


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


def free_memory(nbytes: int = 0, keep=(), transformers: bool = False) -> None:
    """Room on the GPU: inside ComfyUI it unloads what it holds (models of other packs, its own, ours listed with
    share_with_comfyui except those in `keep`) until `nbytes` are free; then the caches are emptied. `transformers`:
    ComfyUI's loaded Flux models (core's, other packs') go whole first, so that switching to ours never leaves two
    on the GPU (asked for bytes only, ComfyUI offloads part of one and keeps the rest)."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        device = mm.get_torch_device()
        model_base = sys.modules.get("comfy.model_base")  # imported once ComfyUI has loaded a diffusion model
        if transformers and model_base is not None:
            others = [e for e in mm.current_loaded_models if not isinstance(e.real_model(), model_base.Flux)]
            mm.free_memory(1e30, device, keep_loaded=others)  # as unload_all_models, sparing the others
        if nbytes:
            kept = [e for e in mm.current_loaded_models if isinstance(e, ComfyEntry) and e.real_model() in keep]
            mm.free_memory(nbytes, device, keep_loaded=kept)
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


class ComfyEntry:
    """One of our models with weights on the GPU, as ComfyUI's model management sees its loaded models (the duck
    type of comfy.model_management.LoadedModel that free_memory, unload_all_models and cleanup_models use): so
    ComfyUI's "Unload Models", POST /free and its own loads release it, through `release()`."""

    def __init__(self, owner, device: torch.device, loaded_bytes, release):
        self.device, self.currently_used, self.real_model = device, True, weakref.ref(owner)  # ComfyUI's names
        self.loaded_bytes, self.release = loaded_bytes, release
        self.model = self  # ComfyUI logs entry.model.model's class name and compares entries by .model

    def model_memory(self) -> int:
        owner = self.real_model()
        return 0 if owner is None else self.loaded_bytes(owner)

    model_loaded_memory = model_memory

    def model_offloaded_memory(self) -> int:
        return 0

    def model_memory_required(self, device) -> int:
        return 0

    def model_use_more_vram(self, extra_memory, force_patch_weights=False) -> int:
        return 0

    def model_unload(self, memory_to_free=None, unpatch_weights=True) -> bool:
        if (owner := self.real_model()) is not None:
            self.release(owner)
        return True  # ComfyUI drops the entry; the next placement lists the model again

    def is_dead(self) -> bool:
        return False


def share_with_comfyui(owner, loaded_bytes, release) -> None:
    """List `owner` (on ComfyUI's device: loaded_bytes(owner) its bytes there now, release(owner) takes them off)
    among ComfyUI's loaded models, once; held weakly. No-op outside ComfyUI."""
    mm = _comfy("comfy.model_management")
    if mm is not None and not any(isinstance(e, ComfyEntry) and e.real_model() is owner for e in mm.current_loaded_models):
        mm.current_loaded_models.insert(0, ComfyEntry(owner, mm.get_torch_device(), loaded_bytes, release))


def check_interrupt() -> None:
    """Raises ComfyUI's interrupt exception when the user pressed stop (no-op outside ComfyUI)."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


class _TerminalProgress:
    """A step bar on stderr; under torchrun only rank 0's (the runner prints one combined report)."""

    def __init__(self, total: int):
        self.total, self.shown = total, os.environ.get("RANK", "0") == "0"

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        if not self.shown:
            return
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
    `tokenizers/` in the models folder, then $FLUXKIT_TOKENIZERS; flux_core's own copy is the last fallback
    (conditioning.tokenizer_places), so the headless runner needs none of these."""
    dirs = []
    root = comfy_root() or _fallback["comfy_root"]
    if root is not None:
        dirs += [root / "comfy" / "sd1_tokenizer", root / "comfy" / "text_encoders" / "t5_tokenizer"]
    models = _fallback["models_dir"] or Path(os.environ.get("FLUXKIT_MODELS", "models"))
    dirs += [models / "tokenizers"]
    if os.environ.get("FLUXKIT_TOKENIZERS"):
        dirs.append(Path(os.environ["FLUXKIT_TOKENIZERS"]))
    return dirs


def step_callback(steps: int, preview=None):
    """A sampler callback(step, total, x) that honours ComfyUI's Stop and advances the progress bar each step. With
    `preview(x)` giving the (B, 16, h, w) model-space Flux latent, the bar carries ComfyUI's latent preview when its
    preview method is on (latent_preview with comfy.latent_formats.Flux's latent-to-RGB factors)."""
    bar = progress_bar(steps)
    latent_preview, formats = _comfy("latent_preview"), _comfy("comfy.latent_formats")
    previewer = latent_preview.get_previewer(torch_device(), formats.Flux()) if preview and latent_preview else None

    def on_step(step: int, total: int, x) -> None:
        check_interrupt()
        image = previewer.decode_latent_to_preview_image("JPEG", preview(x)) if previewer is not None else None
        bar.update_absolute(step, total, image)

    return on_step


register_model_folders()
register_template_route()
