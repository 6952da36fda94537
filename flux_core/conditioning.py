"""Text conditioning: CLIP-L's pooled vector `y` (B, 768) and T5's token states `txt` (B, L, 4096), as BFL's HFEmbedder.

Weights come as users have them: ComfyUI single files (clip_l.safetensors, t5xxl_fp16.safetensors, fp8 and scaled
fp8), ComfyUI all-in-one checkpoints (`text_encoders.clip_l.transformer.`, `text_encoders.t5xxl.transformer.`) and
diffusers folders (text_encoder/, sharded text_encoder_2/, or the pipeline root). transformers' CLIPTextModel and
T5EncoderModel are built on the meta device from a config read off the tensor shapes and assigned the mmap'd tensors;
their nn.Linear layers become flux_core Linear, so fp8 weights stay fp8 and are upcast per layer when used.
"""
import importlib.util
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast
from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense

from .checkpoint import (
    CheckpointError,
    identify,
    load_safetensors,
    load_weights,
    strip_prefix,
    weight_files,
    wrong_file_error,
)
from .gguf import GGUFLinear, is_gguf, read_t5_gguf, use_blocks
from .loading import _split_quantisation, count_blocks
from .ops import FP8_DTYPES, Linear

log = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH_DEV, T5_MAX_LENGTH_SCHNELL = 512, 256  # BFL cli.py: 256 for schnell, 512 for every other model
HEAD_DIM = 64  # CLIP-L's: its shapes give only heads * head_dim (T5's relative position bias tells its heads)
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_CLIP_TOKENS = "embeddings.token_embedding.weight"  # text towers only: vision towers embed patches
_CLIP_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
_CLIP_OTHERS = {"clip_g": "a CLIP-G text encoder (SDXL / SD3)", "clip_h": "a CLIP-H text encoder (SD 2.x)"}
_T5_QUERY = "encoder.block.0.layer.0.SelfAttention.q.weight"
_T5_FF = "encoder.block.0.layer.1.DenseReluDense."

# Tokenizers: the files that make one, the class that reads it, where diffusers and ComfyUI keep it.
_TOKENIZER_FILES = {
    "clip": (("vocab.json", "merges.txt"), ("tokenizer.json",)),
    "t5": (("spiece.model",), ("tokenizer.json",)),
}
_TOKENIZER_CLASSES = {"clip": CLIPTokenizer, "t5": T5TokenizerFast}
_TOKENIZER_SUBDIRS = {"clip": ("tokenizer", "clip_l", "sd1_tokenizer"), "t5": ("tokenizer_2", "t5_xxl", "t5_tokenizer")}
_COMFY_TOKENIZERS = {"clip": "sd1_tokenizer", "t5": "text_encoders/t5_tokenizer"}
BUNDLED_TOKENIZERS = Path(__file__).parent / "tokenizers"  # clip_l/, t5_xxl/: ComfyUI's files, shipped (NOTICE.md)
_NAMES = {"clip": "CLIP-L", "t5": "T5"}


# --- configs from tensor shapes ---------------------------------------------------------------------------------


def clip_config(state: dict[str, Tensor], overrides: dict | None = None) -> CLIPTextConfig:
    """CLIP-L's text config with the sizes of `state` (tower keys without prefix: embeddings.*, encoder.*, ...).

    The head count is width / 64 unless `overrides` (a diffusers config.json) says otherwise.
    """
    vocab, width = state[_CLIP_TOKENS].shape
    fields = dict(
        vocab_size=vocab, hidden_size=width, intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=count_blocks(state, "encoder.layers."), num_attention_heads=width // HEAD_DIM,
        max_position_embeddings=state["embeddings.position_embedding.weight"].shape[0], hidden_act="quick_gelu",
        layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=49407, pad_token_id=1, projection_dim=768,
    )  # fmt: skip
    keep = ("num_attention_heads", "hidden_act", "layer_norm_eps")
    fields.update({k: v for k, v in (overrides or {}).items() if k in keep})
    return CLIPTextConfig(**fields)


def t5_config(state: dict[str, Tensor], overrides: dict | None = None) -> T5Config:
    """A T5 encoder config with the sizes of `state` (keys shared.*, encoder.*): T5 v1.1 (gated-GELU, `wi_0`/`wi_1`)
    or the original T5 (ReLU, `wi`). The relative position bias has one column per head, so heads are known too;
    `overrides` (a config.json) may set the activation, norm epsilon and bias distance."""
    embedding = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    if embedding is None:
        raise KeyError("shared.weight")
    buckets, heads = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    gated = _T5_FF + "wi_0.weight" in state
    fields = dict(
        vocab_size=embedding.shape[0], d_model=embedding.shape[1], d_kv=state[_T5_QUERY].shape[0] // heads,
        num_heads=heads, num_layers=count_blocks(state, "encoder.block."), relative_attention_num_buckets=buckets,
        d_ff=state[_T5_FF + ("wi_0" if gated else "wi") + ".weight"].shape[0],
        feed_forward_proj="gated-gelu" if gated else "relu", dense_act_fn="gelu_pytorch_tanh" if gated else "relu",
        is_gated_act=gated,
    )  # fmt: skip
    keep = ("dense_act_fn", "layer_norm_epsilon", "relative_attention_max_distance")
    fields.update({k: v for k, v in (overrides or {}).items() if k in keep})
    return T5Config(**fields)


# --- loading ------------------------------------------------------------------------------------------------------


def load_clip(path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> CLIPTextModel:
    """CLIP-L's text tower from clip_l.safetensors, an all-in-one checkpoint or a diffusers text_encoder/ folder
    (or pipeline root), computing in `dtype`. Full CLIP models (vision tower, text_projection) load their text tower."""
    _check_dtype(dtype)
    path = Path(path)
    state, files, _ = _read(path, "text_encoder", dtype)
    towers = {p: _clip_variant(state, p) for p in _prefixes(state, _CLIP_TOKENS)}
    prefix = next((p for p, variant in towers.items() if variant == "clip_l"), None)
    if prefix is None:
        raise _wrong_file(path, state, "clip")
    tower = {k: v for k, v in strip_prefix(state, prefix).items() if k.startswith(_CLIP_PARTS)}
    tower.pop("embeddings.position_ids", None)  # old exports store this buffer, sometimes as rounded floats
    weights, scales = _split_quantisation(tower, path.name)
    config = _infer(clip_config, weights, _folder_config(files, "clip_text_model"), path, "CLIP-L")
    with torch.device("meta"):
        model = CLIPTextModel(config)
        _swap_linears(model)
    nest = "text_model." if hasattr(model, "text_model") else ""  # transformers 4 nests the tower, 5 does not
    load_weights(model, {nest + k: v for k, v in weights.items()}, dtype, path.name)
    _apply_scales(model, {nest + k: v for k, v in scales.items()}, path.name)
    getattr(model, "text_model", model).embeddings.position_ids = torch.arange(config.max_position_embeddings)[None]
    return _ready(model, path, files, prefix.removesuffix("text_model."), "CLIP-L text encoder", device)


def load_t5(path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> T5EncoderModel:
    """The T5 encoder from t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn(_scaled).safetensors, an all-in-one checkpoint or a
    diffusers text_encoder_2/ folder (or pipeline root), or a GGUF (t5-v1_1-xxl-encoder-Q8_0.gguf ...), computing in
    `dtype`; fp8 weights stay fp8, GGUF linears stay quantised (dequantised per layer when used)."""
    _check_dtype(dtype)
    path = Path(path)
    state, files, qtypes = _read(path, "text_encoder_2", dtype)
    prefixes = _prefixes(state, _T5_QUERY)
    if not prefixes:
        raise _wrong_file(path, state, "t5")
    encoder = {k: v for k, v in strip_prefix(state, prefixes[0]).items() if k.startswith(("shared.", "encoder."))}
    weights, scales = _split_quantisation(encoder, path.name)
    config = _infer(t5_config, weights, _folder_config(files, "t5"), path, "T5")
    if not config.is_gated_act:
        log.warning("%s is an original (non-gated) T5; Flux was trained with T5 v1.1 XXL (t5xxl_fp16)", path.name)
    # One embedding table, cast once: transformers ties encoder.embed_tokens to shared (ComfyUI reads shared).
    shared, embed_tokens = weights.pop("shared.weight", None), weights.pop("encoder.embed_tokens.weight", None)
    table = shared if shared is not None else embed_tokens
    if table is not None:
        weights["shared.weight"] = weights["encoder.embed_tokens.weight"] = table.to(dtype)
    with torch.device("meta"):
        model = T5EncoderModel(config)
        _swap_linears(model)
        use_blocks(model, qtypes)
    for module in model.modules():
        if type(module) in _FEED_FORWARDS:
            module.__class__ = _FEED_FORWARDS[type(module)]
            module.out_dtype = torch.float32 if dtype == torch.float16 else dtype
    load_weights(model, weights, dtype, path.name)
    model.encoder.embed_tokens.weight = model.shared.weight  # assigning untied them
    _apply_scales(model, scales, path.name)
    return _ready(model, path, files, prefixes[0], "T5 encoder", device)


class _GatedFeedForward(T5DenseGatedActDense):
    """transformers' T5 v1.1 feed-forward with `wo` run in `out_dtype` whatever dtype stores it.

    transformers casts wo's input to wo's stored dtype (float32 under fp16: its `_keep_in_fp32_modules`); for an fp8
    weight that would make fp8 activations. Here the activations go to `out_dtype` and the weight is upcast instead.
    """

    out_dtype = torch.float32

    def forward(self, x: Tensor) -> Tensor:
        return self.wo((self.act(self.wi_0(x)) * self.wi_1(x)).to(self.out_dtype))


class _FeedForward(T5DenseActDense):
    """The original T5's ReLU feed-forward, `wo` run in `out_dtype` (see _GatedFeedForward)."""

    out_dtype = torch.float32

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(self.act(self.wi(x)).to(self.out_dtype))


_FEED_FORWARDS = {T5DenseGatedActDense: _GatedFeedForward, T5DenseActDense: _FeedForward}


def _infer(config_of, weights: dict[str, Tensor], overrides: dict, path: Path, what: str):
    try:
        return config_of(weights, overrides)
    except KeyError as err:
        raise CheckpointError(f"{path.name}: the {what} weights lack {err.args[0]}: the file is incomplete") from None


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype is the compute dtype: torch.float32, torch.bfloat16 or torch.float16, got {dtype}")


def _read(path: Path, component: str, dtype: torch.dtype) -> tuple[dict[str, Tensor], list[Path], dict]:
    """Tensors, files, and the GGUF types of tensors stored as quantised blocks (a GGUF is read as a T5 encoder)."""
    if is_gguf(path):
        state, qtypes = read_t5_gguf(path, dtype)
        return state, [path], qtypes
    files = weight_files(path, component)
    state = {}
    for file in files:
        state.update(load_safetensors(file))
    return state, files, {}


def _prefixes(keys: Iterable[str], signature: str) -> list[str]:
    """What precedes `signature` in the keys that end with it, e.g. "text_encoders.t5xxl.transformer."."""
    found = {k[: -len(signature)] for k in keys if k.endswith(signature)}
    return sorted(p for p in found if p == "" or p.endswith("."))


def _clip_variant(keys, prefix: str) -> str:
    """ComfyUI's rule: a text tower with a 31st layer is CLIP-G, with a 23rd CLIP-H, else CLIP-L."""
    if f"{prefix}encoder.layers.30.mlp.fc1.weight" in keys:
        return "clip_g"
    return "clip_h" if f"{prefix}encoder.layers.22.mlp.fc1.weight" in keys else "clip_l"


def _folder_config(files: list[Path], model_type: str) -> dict:
    """The config.json beside diffusers weights (it knows the head count, shapes do not), if it is this model's."""
    config = files[0].parent / "config.json"
    try:
        data = json.loads(config.read_text()) if config.is_file() else {}
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) and data.get("model_type") == model_type else {}


def _swap_linears(model: nn.Module) -> None:
    """nn.Linear -> flux_core Linear (still on meta), which upcasts narrower (fp8) weights per call."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, Linear(child.in_features, child.out_features, bias=child.bias is not None))


def _apply_scales(model: nn.Module, scales: dict[str, Tensor], source: str) -> None:
    """Scaled fp8: each layer's float32 scale; a scale beside a non-fp8 weight is folded into it."""
    for layer, scale in scales.items():
        try:
            linear = model.get_submodule(layer)
        except AttributeError:
            linear = None
        if not isinstance(linear, Linear):
            raise CheckpointError(f"{source} has a weight scale for {layer}, which is not a linear layer of the model")
        if linear.weight.dtype in FP8_DTYPES:
            linear.set_weight_scale(scale)
        else:
            linear.weight = nn.Parameter(linear.weight * scale, requires_grad=False)


def _ready(model: nn.Module, path: Path, files: list[Path], prefix: str, what: str, device) -> nn.Module:
    names = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.ndim == 2}
    names = names - {"uint8"} | {m.qtype.name for m in model.modules() if isinstance(m, GGUFLinear)}  # GGUF blocks
    storage = "/".join(sorted(names))
    where = f"{len(files)} shards" if len(files) > 1 else "folder" if path.is_dir() else "file"
    model.description = f"{path.name}: {what} ({where}{', under ' + prefix if prefix else ''}), {storage} weights"
    log.info(model.description)
    return model.eval().requires_grad_(False).to(device)


def _wrong_file(path: Path, state: dict[str, Tensor], wanted: str) -> CheckpointError:
    """Swapped CLIP/T5 files and CLIP-G/H get advice for the text encoder slots; anything else checkpoint's error."""
    name = path.name
    clips = [_clip_variant(state, p) for p in _prefixes(state, _CLIP_TOKENS)]
    if wanted == "t5" and clips:
        return CheckpointError(
            f"{name} is a CLIP text encoder, not T5: give it as the CLIP file, and for T5 pick t5xxl_fp16.safetensors "
            "(or t5xxl_fp8_e4m3fn.safetensors for less memory)"
        )
    if clips:
        return CheckpointError(f"{name} is {_CLIP_OTHERS[clips[0]]}, not the CLIP-L Flux uses: pick clip_l.safetensors")
    if wanted == "clip" and _prefixes(state, _T5_QUERY):
        return CheckpointError(
            f"{name} is a T5 text encoder, not CLIP-L: give it as the T5 file, and for CLIP pick clip_l.safetensors"
        )
    return wrong_file_error(path, identify(state), f"a {_NAMES[wanted]} text encoder")


# --- tokenizers -----------------------------------------------------------------------------------------------------


def comfy_package_dir(comfy_root=None) -> Path | None:
    """ComfyUI's `comfy` package folder: under `comfy_root`, else that of a loaded or importable `comfy` (located, not
    imported)."""
    if comfy_root is not None:
        return Path(comfy_root) / "comfy"
    module = sys.modules.get("comfy")
    try:
        spec = module.__spec__ if module is not None else importlib.util.find_spec("comfy")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def tokenizer_places(which: str, tokenizer_dirs: Sequence = (), model_path=None, comfy_root=None) -> list[Path]:
    """Where the `which` ("clip" / "t5") tokenizer is looked for, in order: each of `tokenizer_dirs` and its
    tokenizer/ (tokenizer_2/), clip_l/ (t5_xxl/), sd1_tokenizer/ (t5_tokenizer/) subfolders; beside a diffusers model
    folder; ComfyUI's bundled copy; last, the copy shipped with flux_core (`BUNDLED_TOKENIZERS`)."""
    subdirs = _TOKENIZER_SUBDIRS[which]
    places = [p for d in map(Path, tokenizer_dirs) for p in (d, *(d / s for s in subdirs))]
    if model_path is not None:
        model_path = Path(model_path)
        folder = model_path if model_path.is_dir() else model_path.parent
        places += [folder / subdirs[0], folder.parent / subdirs[0]]  # pipeline root, or text_encoder/ in one
    comfy = comfy_package_dir(comfy_root)
    if comfy is not None:
        places.append(comfy / _COMFY_TOKENIZERS[which])
    places.append(BUNDLED_TOKENIZERS / subdirs[1])
    return list(dict.fromkeys(places))


def is_tokenizer_dir(folder: Path, which: str) -> bool:
    """Holds the `which` tokenizer's files, and its tokenizer_config.json (if any) does not name the other's class."""
    if not any(all((folder / f).is_file() for f in group) for group in _TOKENIZER_FILES[which]):
        return False
    config = folder / "tokenizer_config.json"
    try:
        named = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        named = None
    return not isinstance(named, str) or not named.startswith("T5" if which == "clip" else "CLIP")


def find_tokenizer(which: str, tokenizer_dirs: Sequence = (), model_path=None, comfy_root=None) -> Path:
    """The first folder of `tokenizer_places` holding the tokenizer; else an error naming every place and the fixes."""
    places = tokenizer_places(which, tokenizer_dirs, model_path, comfy_root)
    for place in places:
        if is_tokenizer_dir(place, which):
            return place
    looked = "\n".join(f"  {p}{'' if p.is_dir() else ' (no such folder)'}" for p in places) or "  nowhere"
    comfy = "" if comfy_package_dir(comfy_root) else "\n  (no ComfyUI: no comfy_root, no importable `comfy` package)"
    files = " or ".join("+".join(group) for group in _TOKENIZER_FILES[which])
    raise FileNotFoundError(
        f"No {_NAMES[which]} tokenizer found (a folder with {files}). Looked in:\n{looked}{comfy}\n"
        f"flux_core's own copy is missing from {BUNDLED_TOKENIZERS}: reinstall FluxKit, or pass "
        f"tokenizer_dirs=[folder], e.g. the {_TOKENIZER_SUBDIRS[which][0]}/ folder of a FLUX.1 diffusers repo or "
        f"ComfyUI's comfy/{_COMFY_TOKENIZERS[which]}; or load from a diffusers pipeline folder that has "
        f"{_TOKENIZER_SUBDIRS[which][0]}/; or pass comfy_root=<your ComfyUI folder>."
    )


def load_tokenizer(which: str, tokenizer_dirs: Sequence = (), model_path=None, comfy_root=None):
    """CLIPTokenizer ("clip") or T5TokenizerFast ("t5") from the folder `find_tokenizer` finds."""
    return _TOKENIZER_CLASSES[which].from_pretrained(find_tokenizer(which, tokenizer_dirs, model_path, comfy_root))


def tokenize(tokenizer, prompts: list[str], max_length: int) -> Tensor:  # (B, max_length) int64
    """Token ids as BFL's HFEmbedder makes them: truncated, padded to exactly `max_length`; truncation is logged."""
    ids = tokenizer(
        prompts, truncation=True, max_length=max_length, padding="max_length", return_length=False,
        return_overflowing_tokens=False, return_tensors="pt",
    )["input_ids"]  # fmt: skip
    for i, full in enumerate(tokenizer(prompts, verbose=False)["input_ids"]):
        if len(full) > max_length:  # the last id is the end token, which truncation keeps
            log.warning(
                "prompt %d is %d tokens, %d over the %d this encoder reads; dropped: %r",
                i, len(full), len(full) - max_length, max_length, tokenizer.decode(full[max_length - 1 : -1]),
            )  # fmt: skip
    return ids


# --- the pair -------------------------------------------------------------------------------------------------------


class TextEncoders:
    """CLIP-L and T5 with their tokenizers: prompts in, Flux conditioning (txt, y) out.

    `to(device)` moves the models to run there; `offload()` returns them to where they were built (their loaded CPU
    tensors are kept, so this is free); `on(device)` does both around a block.
    """

    def __init__(self, clip: CLIPTextModel, t5: T5EncoderModel, clip_tokenizer, t5_tokenizer):
        for name, model, tokenizer in (("CLIP-L", clip, clip_tokenizer), ("T5", t5, t5_tokenizer)):
            if len(tokenizer) > model.config.vocab_size:
                raise ValueError(
                    f"the {name} tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
                    f"{model.config.vocab_size}: tokenizer and weights do not belong together"
                )
        self.clip, self.t5 = clip, t5
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        self.home = self.device
        # Each distinct tensor as loaded (tied ones once), and every module slot that holds it: moves start from these,
        # so offloading back home costs no copy and keeps the memory-mapped weights.
        self._home_tensors, self._slots = {}, []
        for module in (*clip.modules(), *t5.modules()):
            for name, tensor in (*module._parameters.items(), *module._buffers.items()):
                if tensor is not None:
                    self._home_tensors.setdefault(id(tensor), tensor.detach())
                    self._slots.append((module, name, id(tensor)))

    @property
    def device(self) -> torch.device:
        return self.t5.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the final norm is never stored in fp8)."""
        return self.t5.encoder.final_layer_norm.weight.dtype

    def to(self, device: torch.device | str) -> "TextEncoders":
        device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", to compare
        if device == self.device:
            return self
        moved = {key: tensor.to(device) for key, tensor in self._home_tensors.items()}
        parameters = {}
        for module, name, key in self._slots:
            if name in module._parameters:
                if key not in parameters:
                    parameters[key] = nn.Parameter(moved[key], requires_grad=False)
                module._parameters[name] = parameters[key]
            else:
                module._buffers[name] = moved[key]
        return self

    def offload(self) -> "TextEncoders":
        return self.to(self.home)

    @contextmanager
    def on(self, device: torch.device | str):
        self.to(device)
        try:
            yield self
        finally:
            self.offload()

    @torch.no_grad()
    def encode_clip(self, prompts: str | list[str]) -> Tensor:  # (B, 768) pooled, not projected
        ids = tokenize(self.clip_tokenizer, _prompt_list(prompts), CLIP_MAX_LENGTH).to(self.device)
        return self.clip(input_ids=ids, attention_mask=None, output_hidden_states=False).pooler_output

    @torch.no_grad()
    def encode_t5(self, prompts: str | list[str], max_length: int = T5_MAX_LENGTH_DEV) -> Tensor:
        """(B, max_length, 4096). No attention mask, as BFL: pads are attended to; the pad length moves every state."""
        ids = tokenize(self.t5_tokenizer, _prompt_list(prompts), max_length).to(self.device)
        return self.t5(input_ids=ids, attention_mask=None, output_hidden_states=False).last_hidden_state

    def encode(
        self,
        prompts_clip: str | list[str],
        prompts_t5: str | list[str] | None = None,
        t5_max_length: int = T5_MAX_LENGTH_DEV,
    ) -> tuple[Tensor, Tensor]:
        """(txt (B, t5_max_length, 4096), y (B, 768)); T5 reads `prompts_clip` too when `prompts_t5` is None."""
        prompts_clip = _prompt_list(prompts_clip)
        prompts_t5 = prompts_clip if prompts_t5 is None else _prompt_list(prompts_t5)
        if len(prompts_t5) != len(prompts_clip):
            raise ValueError(f"{len(prompts_clip)} CLIP prompts but {len(prompts_t5)} T5 prompts: one each per image")
        return self.encode_t5(prompts_t5, t5_max_length), self.encode_clip(prompts_clip)


def _prompt_list(prompts: str | list[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a string or a non-empty list of strings, got {prompts!r:.80}")
    return prompts


def load_text_encoders(
    clip_path,
    t5_path,
    tokenizer_dirs: Sequence = (),
    comfy_root=None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> TextEncoders:
    """CLIP-L + T5 weights (files, all-in-one checkpoints or diffusers folders) and their tokenizers, built on the CPU
    and moved to `device`. Tokenizers: see `tokenizer_places`; they are found before any weights are read."""
    clip_tokenizer = load_tokenizer("clip", tokenizer_dirs, clip_path, comfy_root)
    t5_tokenizer = load_tokenizer("t5", tokenizer_dirs, t5_path, comfy_root)
    encoders = TextEncoders(load_clip(clip_path, dtype), load_t5(t5_path, dtype), clip_tokenizer, t5_tokenizer)
    return encoders.to(device)
