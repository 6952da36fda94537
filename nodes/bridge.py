"""Bridges between FluxKit's objects and ComfyUI's core MODEL / CLIP / VAE, sharing weights (nothing is copied).

Ours -> core: `core_model(flux)` is a ComfyUI MODEL (a ModelPatcher over comfy.model_base.Flux) whose diffusion model
is a twin of our Flux (Flux.twin(): the very same tensors) that speaks ComfyUI's forward signature. So KSampler,
ModelSamplingFlux, LoraLoaderModelOnly (by key: our parameter names are BFL's, as core's) and ComfyUI's memory
management work on it; ComfyUI's moves and LoRA patches replace the twin's tensors only, never those of the model our
own nodes hold (which streaming and placement manage).
`core_clip(encoders, device)` and `core_vae(ae)` are core's CLIP (comfy.text_encoders.flux) and VAE built on the meta
device and then assigned our tensors (new Parameter objects, the same memory): core's CLIPTextEncodeFlux, VAEDecode...
run core's code on our weights. Where core's modules cannot take our tensors (scaled fp8 / GGUF text encoders, an AE
of another size) the output is an `Unavailable`, which says so when a core node uses it.
Core -> ours: `token_model` gives our sampler any Flux MODEL (ours, or core's comfy.ldm.flux Flux) after ComfyUI loads
it with its patches; `encode` and `decode`/`encode_image` run core CLIP / VAE objects as core's own nodes do.
ComfyUI is imported here lazily: these functions are reached only with ComfyUI objects, i.e. inside ComfyUI.
"""
import importlib
import json
import weakref
from dataclasses import replace
from pathlib import Path

import flux_core.autoencoder
import flux_core.gguf
import flux_core.model
import flux_core.sampling
import flux_core.tools
import torch
from torch import nn

Flux = flux_core.model.Flux
_patchers = weakref.WeakKeyDictionary()  # our Flux -> its ModelPatcher: one per loaded model


def _comfy(name: str):
    return importlib.import_module(name)


class ComfyFlux(Flux):
    """Our Flux with the forward comfy.model_base.Flux calls: (B, C, H, W) latents in and velocities out."""

    patch_size = 2  # read by model_base.Flux.concat_cond (Fill / Canny / Depth channels)

    @property
    def dtype(self) -> torch.dtype:  # BaseModel.get_dtype: what ComfyUI casts inputs to
        return self.compute_dtype

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None, transformer_options={}, **kwargs):  # noqa: B006 (ComfyUI's signature)
        if control is not None:
            raise ValueError("ControlNets do not run on FluxKit's transformer: load the model with core's Load Diffusion Model")
        if kwargs.get("attention_mask") is not None or kwargs.get("ref_latents_method") not in (None, "offset"):
            raise ValueError("attention masks and reference methods other than 'offset' need core's Flux model")
        height, width = x.shape[-2:]
        x = _comfy("comfy.ldm.common_dit").pad_to_patch_size(x, (2, 2))  # (B, C, H', W') even, as core pads
        sampling = flux_core.sampling
        img, img_ids = sampling.pack(x), sampling.image_ids(*x.shape[-2:]).to(x.device)  # (B, L, C*4), (1, L, 3)
        if ref_latents:  # Kontext references from core's ReferenceLatent, already in model space
            refs = flux_core.tools.kontext_cond(list(ref_latents))
            img, img_ids = replace(refs, token_ids=refs.token_ids.to(x.device)).model_input(img, img_ids)
        if self.params.guidance_embed and guidance is None:
            raise ValueError("this Flux model is guidance-distilled but the conditioning holds guidance None: use FluxGuidance")
        txt_ids = sampling.text_ids(context.shape[1]).to(x.device)
        v = Flux.forward(self, img, img_ids, context, txt_ids, timestep, y=y if self.vector_in is not None else None,
                         guidance=guidance if self.params.guidance_embed else None)  # fmt: skip
        v = sampling.unpack(v[:, : (x.shape[-2] // 2) * (x.shape[-1] // 2)], *x.shape[-2:])
        return v[..., :height, :width]


def core_model(flux: Flux):
    """ComfyUI's MODEL over our Flux (built once per model; the weights are shared, not copied)."""
    if flux in _patchers:
        return _patchers[flux]
    mm, supported = _comfy("comfy.model_management"), _comfy("comfy.supported_models")
    p = flux.params
    unet_config = {
        "image_model": "flux", "in_channels": p.in_channels // 4, "out_channels": p.out_channels // 4,
        "patch_size": 2, "vec_in_dim": p.vec_in_dim, "context_in_dim": p.context_in_dim, "hidden_size": p.hidden_size,
        "mlp_ratio": p.mlp_ratio, "num_heads": p.num_heads, "depth": p.depth, "depth_single_blocks": p.depth_single_blocks,
        "axes_dim": p.axes_dim, "theta": p.theta, "qkv_bias": p.qkv_bias, "guidance_embed": p.guidance_embed,
        "disable_unet_model_creation": True,  # the diffusion model is ours
    }  # fmt: skip
    config = (supported.Flux if p.guidance_embed else supported.FluxSchnell)(unet_config)  # schnell: linear flow
    config.set_inference_dtype(flux.compute_dtype, None)
    base = config.get_model({})
    twin = flux.twin()
    twin.__class__ = ComfyFlux  # the same tensors, with ComfyUI's forward
    for module in twin.modules():  # own Parameter objects on the same memory: ComfyUI moves or patches the twin's
        for name, p in module._parameters.items():  # weights by replacing them, never our model's
            module._parameters[name] = None if p is None else nn.Parameter(p.data, requires_grad=p.requires_grad)
    base.diffusion_model = twin
    patcher = _comfy("comfy.model_patcher").ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    _patchers[flux] = patcher
    return patcher


class TokenModel(nn.Module):
    """What flux_core.pipeline.sample needs of a transformer: params, out_channels, compute_dtype, parameters() and
    forward(img, img_ids, txt, txt_ids, timesteps, y, guidance) on packed tokens."""

    def __init__(self, net: nn.Module, params, dtype: torch.dtype, forward):
        super().__init__()
        self.net, self.params, self.out_channels = net, params, params.out_channels
        self._dtype, self._forward = dtype, forward

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._dtype

    def forward(self, *args, **kwargs):
        return self._forward(*args, **kwargs)


class Unavailable:
    """A core output that cannot share our weights: using it (any attribute) names the reason and the fix."""

    def __init__(self, reason: str):
        self._reason = reason

    def __getattr__(self, name):
        raise AttributeError(self._reason)


def _misfit(module: nn.Module, state: dict) -> str | None:
    """The first parameter of core's (meta) `module` that `state` lacks or shapes otherwise, or None."""
    own = module.state_dict()
    wrong = [k for k in own if k not in state or state[k].shape != own[k].shape] + [k for k in state if k not in own]
    return wrong[0] if wrong else None


def _unshareable(encoder: nn.Module) -> str | None:
    """Why core's ops cannot run `encoder`'s weights as they are, or None."""
    for module in encoder.modules():
        if isinstance(module, flux_core.gguf.GGUFLinear):
            return "GGUF"
        if getattr(module, "weight_scale", None) is not None:
            return "scaled fp8"
    return None


def core_clip(encoders, device: torch.device):
    """ComfyUI's Flux CLIP (comfy.text_encoders.flux, sized from our configs) over our CLIP-L and T5, running on
    `device`: built on the meta device, then assigned our tensors. An Unavailable for scaled fp8 / GGUF encoders."""
    kind = _unshareable(encoders.clip) or _unshareable(encoders.t5)
    if kind is not None:
        return Unavailable(f"{kind} text encoders have no core CLIP in FluxKit: for core nodes, load them with "
                           "DualCLIPLoader (type flux)")
    mm, sd, flux = _comfy("comfy.model_management"), _comfy("comfy.sd"), _comfy("comfy.text_encoders.flux")
    configs = {}
    jsons = {"clip_l": (encoders.clip, "sd1_clip_config.json"), "t5xxl": (encoders.t5, "text_encoders/t5_config_xxl.json")}
    for name, (model, core_json) in jsons.items():
        core_keys = json.loads((Path(sd.__file__).parent / core_json).read_text())  # the sizes core's config fixes
        configs[f"{name}_model_config"] = {k: v for k, v in model.config.to_dict().items() if k in core_keys}
    dtype = encoders.t5.shared.weight.dtype  # our compute dtype (core's ops upcast fp8 T5 linears per call too)
    target = _comfy("comfy.supported_models_base").ClipTarget(flux.FluxTokenizer, flux.flux_clip(dtype_t5=dtype))
    options = {"dtype": dtype, "load_device": device, "offload_device": mm.text_encoder_offload_device(),
               "initial_device": torch.device("meta"), **configs}  # fmt: skip
    clip = sd.CLIP(target, model_options=options)
    net = clip.cond_stage_model
    width = net.clip_l.transformer.text_projection.in_features
    state = {
        **{"clip_l.transformer.text_model." + k.removeprefix("text_model."): v for k, v in encoders.clip.state_dict().items()},
        **{"t5xxl.transformer." + k: v for k, v in encoders.t5.state_dict().items() if k != "encoder.embed_tokens.weight"},  # = shared
        # core's parameters that Flux does not use (CLIP-L's pooled output is taken unprojected): small, real values
        "clip_l.logit_scale": torch.tensor(4.6055), "t5xxl.logit_scale": torch.tensor(4.6055),
        "clip_l.transformer.text_projection.weight": torch.eye(width, dtype=dtype),
    }  # fmt: skip
    misfit = _misfit(net, state)
    if misfit is not None:
        return Unavailable(f"core's Flux CLIP does not fit these text encoders ({misfit}): for core nodes, load them with "
                           "DualCLIPLoader")
    net.load_state_dict(state, assign=True)  # new Parameter objects on our memory: core's moves and patches stay core's
    return clip


def core_vae(ae):
    """ComfyUI's VAE over our AE (the same BFL parameter names): built on the meta device, then assigned our tensors.
    An Unavailable for AEs of other sizes (core's VAE fixes the Flux AE's)."""
    if ae.params != flux_core.autoencoder.AutoEncoderParams.flux():
        return Unavailable("core's VAE takes the full-size Flux AE only: decode this one with Flux VAE Decode (FluxKit)")
    state = ae.state_dict()
    with torch.device("meta"):  # core picks its architecture from the keys and shapes
        vae = _comfy("comfy.sd").VAE(sd={k: v.to("meta") for k, v in state.items()}, device=ae.device, dtype=ae.dtype)
    vae.first_stage_model.load_state_dict(state, assign=True)
    return vae


def token_model(model):
    """Our sampler's transformer from a MODEL input: our Flux as it is; a ComfyUI MODEL loaded by ComfyUI's memory
    management first (its LoRA patches applied), whether its Flux is ours (core_model) or core's own."""
    if not is_core(model):
        return model  # ours
    patcher = _comfy("comfy.model_patcher")
    if not isinstance(model, patcher.ModelPatcher):
        raise ValueError(f"model is a {type(model).__name__}, not a Flux model: connect a Flux loader's model")
    _comfy("comfy.model_management").load_models_gpu([model])
    net = model.model.diffusion_model
    if isinstance(net, ComfyFlux):
        return TokenModel(net, net.params, net.compute_dtype, lambda *a, **k: Flux.forward(net, *a, **k))
    core_flux = _comfy("comfy.ldm.flux.model").Flux
    if type(net) is not core_flux:
        raise ValueError(f"the MODEL holds a {type(net).__module__}.{type(net).__name__}, not FLUX.1: the FluxKit sampler runs Flux models only")
    dtype = model.model.manual_cast_dtype or model.model.get_dtype()
    c = net.params
    params = flux_core.model.FluxParams(
        in_channels=net.in_channels, out_channels=net.out_channels, vec_in_dim=c.vec_in_dim or 0,
        context_in_dim=c.context_in_dim, hidden_size=c.hidden_size, mlp_ratio=c.mlp_ratio, num_heads=c.num_heads,
        depth=c.depth, depth_single_blocks=c.depth_single_blocks, axes_dim=c.axes_dim, theta=c.theta,
        qkv_bias=c.qkv_bias, guidance_embed=c.guidance_embed,
    )  # fmt: skip

    def forward(img, img_ids, txt, txt_ids, timesteps, y=None, guidance=None):
        y = y if y is not None else torch.zeros(img.shape[0], c.vec_in_dim or 0, device=img.device)
        return net.forward_orig(img.to(dtype), img_ids, txt.to(dtype), txt_ids, timesteps, y.to(dtype), guidance, transformer_options={})

    return TokenModel(net, params, dtype, forward)


def is_core(obj) -> bool:
    """A ComfyUI object (core CLIP / VAE / MODEL) rather than one of ours."""
    return type(obj).__module__.startswith("comfy.")


def encode(clip, clip_l: str, t5xxl: str, guidance: float):
    """CONDITIONING from a core CLIP, as core's CLIPTextEncodeFlux makes it."""
    tokens = clip.tokenize(clip_l)
    tokens["t5xxl"] = clip.tokenize(t5xxl)["t5xxl"]
    return clip.encode_from_tokens_scheduled(tokens, add_dict={"guidance": guidance})


def decode(vae, raw: torch.Tensor, tiled: bool, tile_size: int, overlap: int) -> torch.Tensor:
    """(B, H, W, 3) images in [0, 1] from a core VAE, as core's VAEDecode / VAEDecodeTiled."""
    if tiled:
        return vae.decode_tiled(raw, tile_x=tile_size // 8, tile_y=tile_size // 8, overlap=overlap // 8)
    return vae.decode(raw)


def encode_image(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The raw latent of (B, H, W, C) images from a core VAE, as core's VAEEncode."""
    return vae.encode(pixels[..., :3])
