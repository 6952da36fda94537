"""FLUX.1-dev text-to-image on one GPU: flux_core vs diffusers' FluxPipeline, the SAME random weights, one process.

A flux-dev-shaped transformer (3072 wide, 19 + 38 blocks, guidance) and the full AE are built on the meta device and
filled with random bf16 values on the GPU (no download); diffusers' FluxTransformer2DModel and AutoencoderKL get
the same values through diffusers' own converters (assigned, no init; the JSON says what fraction shares our storage:
its q/k/v splits come back as copies). peak_own_gb = peak - resident + the phase's own transformer + AE bytes;
sampling_peak_own_gb the same up to the last step, before the decode. Random text embeddings (512 T5 tokens,
pooled 768) stand in for the encoders: encode is excluded, decode included. Each phase prints the
median ms per step (CUDA events between step callbacks), the median end-to-end seconds and the peak GPU memory
(everything resident counts: weights, both AEs, embeddings). Phases: eager and torch.compile (transformer only,
default mode, warm-up timed apart; ours per block with Flux.compile_blocks, diffusers' with its
compile_repeated_blocks), bf16, then our fp8 weights (Linear weights kept float8_e4m3fn as
load_flux(weight_dtype=...) keeps them: upcast per call, or with fp8-fast fed to the fp8 matrix units as
load_flux(fp8_matmul=True) does), after diffusers' models are freed. parity-f32 runs both pipelines in float32
(4 steps) on float32 copies of the same weights: how far apart they are without bf16 rounding.

    python bench/gpu_flux_dev.py                        # 1024 px, 28 steps, cuda; JSON to bench/results/
    python bench/gpu_flux_dev.py --tiny --device cpu    # small width and image, 3 steps: proves the script
"""
import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from tiny_ae import bfl_to_diffusers_vae, diffusers_vae_config  # noqa: E402
from tiny_flux import bfl_to_diffusers, diffusers_config  # noqa: E402

from flux_core.autoencoder import AutoEncoder, AutoEncoderParams  # noqa: E402
from flux_core.checkpoint import load_weights  # noqa: E402
from flux_core.model import Flux, preset  # noqa: E402
from flux_core.ops import Linear, enable_fp8_matmul  # noqa: E402
from flux_core.pipeline import Conditioning, empty_latent, sample, seeded_noise, to_unit_images  # noqa: E402
from flux_core.sampling import pack  # noqa: E402

PHASES = (
    "ours", "diffusers", "ours-compiled", "diffusers-compiled", "ours-fp8", "ours-fp8-compiled", "ours-fp8-fast",
    "ours-fp8-fast-compiled", "parity-f32",
)  # fmt: skip
GB = 1e9
GUIDANCE = 3.5


def random_fill_(module: torch.nn.Module, seed: int) -> None:
    """Variance-preserving random values in place: matrices/convs N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2),
    other vectors (biases) N(0, 0.02^2). Drawn on the module's device, in its dtype."""
    gen = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, p[0].numel() ** -0.5, generator=gen)
            elif "norm" in name and name.endswith(("weight", "scale")):
                p.normal_(1, 0.1, generator=gen)
            else:
                p.normal_(0, 0.02, generator=gen)


def build_random(cls, params, device: str, dtype: torch.dtype, seed: int):
    """cls(params) built on meta, allocated once on `device` in `dtype` (no float32 copy), randomly filled."""
    with torch.device("meta"):
        module = cls(params).to(dtype)
    module.to_empty(device=device)
    random_fill_(module, seed)
    return module.eval().requires_grad_(False)


def on_meta_with(cls, config: dict, state_dict: dict):
    """A diffusers model built on meta and handed `state_dict`'s tensors (views of ours, not copies)."""
    with torch.device("meta"):
        model = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
    model.load_state_dict(state_dict, strict=True, assign=True)
    if left := [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]:
        raise RuntimeError(f"{cls.__name__} tensors left on meta: {left[:5]}")
    return model.eval().requires_grad_(False)


def shared_fraction(theirs: torch.nn.Module, ours: torch.nn.Module) -> float:
    """Fraction of `theirs`' parameter bytes living in `ours`' storages (1.0 = no second copy)."""
    storages = {p.untyped_storage().data_ptr() for p in ours.parameters()}
    sizes = [(p.nbytes, p.untyped_storage().data_ptr() in storages) for p in theirs.parameters()]
    return sum(n for n, shared in sizes if shared) / sum(n for n, _ in sizes)


def param_bytes(*modules: torch.nn.Module) -> int:
    return sum(p.nbytes for m in modules for p in m.parameters())


def float32_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of `module`, built on meta and assigned the upcast tensors (no random init)."""
    with torch.device("meta"):
        copy = type(module)(module.params)
    copy.load_state_dict({k: v.float() for k, v in module.state_dict().items()}, assign=True)
    return copy.eval().requires_grad_(False)


def fp8_copy_of(model: Flux) -> Flux:
    """`model` with every Linear weight stored as float8_e4m3fn, through the loader's own assignment (load_weights
    with weight_dtype), as load_flux(..., weight_dtype=torch.float8_e4m3fn) keeps a bf16 file's weights."""
    fp8 = torch.float8_e4m3fn
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Linear)}
    state_dict = {k: v.to(fp8) if k in linear_weights else v for k, v in model.state_dict().items()}
    with torch.device("meta"):
        quantised = Flux(model.params)
    load_weights(quantised, state_dict, model.compute_dtype, "random weights", weight_dtype=fp8)
    return quantised.eval().requires_grad_(False)


class StepClock:
    """Marks at each step callback; CUDA events on a GPU (no sync inside the loop), wall time on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []
        self.sampling_peak = None  # max_memory_allocated at the last step: the denoising loop's peak, decode apart

    def mark(self, *_) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
            self.sampling_peak = torch.cuda.max_memory_allocated()
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self) -> list[float]:
        """Durations of steps 2..N: between consecutive callbacks, so setup before step 1 is not counted."""
        pairs = zip(self.marks, self.marks[1:])
        return [a.elapsed_time(b) if self.cuda else 1000 * (b - a) for a, b in pairs]


def measure(run, device: torch.device, steps: int, warm_steps: int, repeats: int) -> tuple[dict, torch.Tensor]:
    """One warm-up run of `warm_steps` (timed: holds compilation), then `repeats` full runs."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    run(warm_steps, lambda *_: None)
    sync()
    warmup_s = time.perf_counter() - start
    e2e, step_ms, peaks, sampling_peaks = [], [], [0], [0]
    for _ in range(repeats):  # peaks of the timed runs only: a compiling warm-up may allocate more
        clock = StepClock(device)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        image = run(steps, clock.mark)
        sync()
        e2e.append(time.perf_counter() - start)
        step_ms += clock.step_ms()
        if cuda:
            peaks.append(torch.cuda.max_memory_allocated())
            sampling_peaks.append(clock.sampling_peak)
    result = {
        "ms_per_step": statistics.median(step_ms), "e2e_s": statistics.median(e2e), "e2e_runs_s": e2e,
        "warmup_s": warmup_s, "warmup_steps": warm_steps, "repeats": repeats, "resident_gb": resident / GB,
        "peak_gb": max(peaks) / GB if cuda else None, "sampling_peak_gb": max(sampling_peaks) / GB if cuda else None,
    }  # fmt: skip
    return result, image.float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="256 wide, 1 + 1 blocks, tiny AE, 64 px, 3 steps")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, help="image side in px (default 1024, tiny 64)")
    parser.add_argument("--steps", type=int, help="default 28, tiny 3")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per eager phase")
    parser.add_argument("--compiled-repeats", type=int, default=1, help="timed runs per compiled phase")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)}")
    parser.add_argument("--compile-backend", default="inductor", help="'eager' checks the compile plumbing fast")
    parser.add_argument("--json", default=str(REPO / "bench/results/gpu_flux_dev.json"))
    args = parser.parse_args()
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    phases = args.phases.split(",")
    if unknown := set(phases) - set(PHASES):
        parser.error(f"unknown phases {sorted(unknown)}; known: {', '.join(PHASES)}")
    device, dtype = torch.device(args.device), torch.bfloat16
    size, steps = args.size or (64 if args.tiny else 1024), args.steps or (3 if args.tiny else 28)
    text_tokens = 16 if args.tiny else 512
    tiny = dict(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1)
    params = preset("flux-dev", **(tiny if args.tiny else {}))
    ae_params = AutoEncoderParams.flux(**(dict(ch=32, ch_mult=[1, 2, 2, 2]) if args.tiny else {}))

    model = build_random(Flux, params, device, dtype, seed=0)
    ae = build_random(AutoEncoder, ae_params, device, dtype, seed=1)
    theirs = on_meta_with(FluxTransformer2DModel, diffusers_config(params), bfl_to_diffusers(model.state_dict()))
    vae_state = bfl_to_diffusers_vae(ae.state_dict(), ae_params)
    vae = on_meta_with(AutoencoderKL, diffusers_vae_config(ae_params), vae_state)
    del vae_state
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15, use_dynamic_shifting=True
    )  # FLUX.1-dev's scheduler_config
    pipe = FluxPipeline(scheduler, vae, None, None, None, None, theirs)
    pipe.set_progress_bar_config(disable=True)

    gen = torch.Generator().manual_seed(2)
    txt = torch.randn(1, text_tokens, params.context_in_dim, generator=gen).to(device, dtype)  # (1, Lt, 4096)
    y = torch.randn(1, params.vec_in_dim, generator=gen).to(device, dtype)  # (1, 768)
    start_latent = empty_latent(size, size)
    noise = seeded_noise(tuple(start_latent.shape), seed=0)  # float32 CPU, both pipelines start from it
    packed_noise = pack(noise).to(device, dtype)  # (1, L, 64): at t = 1 the noised latent is the noise itself

    def run_ours(flux):
        def run(n_steps, mark):
            latent = sample(flux, Conditioning(txt, y), start_latent, 0, n_steps, GUIDANCE, noise=noise, callback=mark)
            with torch.inference_mode():
                return to_unit_images(ae.decode(latent.to(device, dtype)))  # (1, H, W, 3) in [0, 1]

        return run

    def run_diffusers(n_steps, mark):
        image = pipe(
            prompt_embeds=txt, pooled_prompt_embeds=y, latents=packed_noise, height=size, width=size,
            num_inference_steps=n_steps, guidance_scale=GUIDANCE, output_type="pt", return_dict=False,
            callback_on_step_end=lambda *a: mark() or {},
        )[0]  # fmt: skip
        return image.permute(0, 2, 3, 1)  # (1, H, W, 3) in [0, 1]

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    report = {
        "device": where, "torch": torch.__version__, "diffusers": diffusers.__version__, "size": size,
        "steps": steps, "text_tokens": text_tokens, "guidance": GUIDANCE, "tiny": args.tiny,
        "compile": f"torch.compile(transformer, backend={args.compile_backend!r}, mode default)",
        "diffusers_weights_shared": {"transformer": shared_fraction(theirs, model), "vae": shared_fraction(vae, ae)},
        "gb": "1e9 bytes; peak = torch.cuda.max_memory_allocated over the phase, resident = allocated at its start",
        "phases": {},
    }  # fmt: skip
    print(f"{where}, torch {torch.__version__}, diffusers {diffusers.__version__}; {size} px, {steps} steps, "
          f"{text_tokens} text tokens; diffusers shares {report['diffusers_weights_shared']}")  # fmt: skip
    images = {}

    def phase(name: str, run, compiled: bool, own: tuple[torch.nn.Module, ...]) -> None:
        if name not in phases:
            return
        repeats = args.compiled_repeats if compiled else args.repeats
        result, images[name] = measure(run, device, steps, 2 if compiled else 1, repeats)
        if result["peak_gb"] is not None:  # as if only this pipeline's weights were resident
            own_gb = param_bytes(*own) / GB - result["resident_gb"]
            result["peak_own_gb"] = result["peak_gb"] + own_gb
            result["sampling_peak_own_gb"] = result["sampling_peak_gb"] + own_gb
        if name != "ours" and "ours" in images:  # same weights, noise and schedule: bf16 rounding apart
            result["max_abs_diff_vs_ours"] = (images[name] - images["ours"]).abs().max().item()
        report["phases"][name] = result
        peak = "" if result["peak_gb"] is None else (
            f", peak {result['peak_gb']:.2f} GB (resident {result['resident_gb']:.2f}; own {result['peak_own_gb']:.2f}, "
            f"sampling {result['sampling_peak_own_gb']:.2f})"
        )  # fmt: skip
        print(f"{name:19s} {result['ms_per_step']:8.1f} ms/step, {result['e2e_s']:6.2f} s end to end{peak}, "
              f"warm-up {result['warmup_s']:.1f} s", flush=True)  # fmt: skip
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))  # after every phase: a timeout keeps the rest

    phase("ours", run_ours(model), compiled=False, own=(model, ae))
    phase("diffusers", run_diffusers, compiled=False, own=(theirs, vae))
    if "parity-f32" in phases:  # float32 copies of the same weights, 4 steps: the pipelines' distance sans bf16
        model32, ae32 = float32_copy(model), float32_copy(ae)
        theirs32 = on_meta_with(FluxTransformer2DModel, diffusers_config(params), bfl_to_diffusers(model32.state_dict()))
        vae_state = bfl_to_diffusers_vae(ae32.state_dict(), ae_params)
        pipe32 = FluxPipeline(scheduler, on_meta_with(AutoencoderKL, diffusers_vae_config(ae_params), vae_state), None, None, None, None, theirs32)
        pipe32.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            latent = sample(model32, Conditioning(txt.float(), y.float()), start_latent, 0, 4, GUIDANCE, noise=noise)
            ours32 = to_unit_images(ae32.decode(latent.to(device))).cpu()
        theirs_image = pipe32(
            prompt_embeds=txt.float(), pooled_prompt_embeds=y.float(), latents=pack(noise).to(device), height=size,
            width=size, num_inference_steps=4, guidance_scale=GUIDANCE, output_type="pt", return_dict=False,
        )[0].permute(0, 2, 3, 1).float().cpu()  # fmt: skip
        diff = (ours32 - theirs_image).abs()
        report["parity_f32"] = {"steps": 4, "max_abs_image_diff": diff.max().item(), "mean_abs_image_diff": diff.mean().item()}
        print(f"parity-f32 (4 steps): images differ by max {diff.max().item():.2e}, mean {diff.mean().item():.2e}")
        del model32, ae32, theirs32, vae_state, pipe32
        gc.collect()
    if "ours-compiled" in phases:
        model.compile_blocks(backend=args.compile_backend)
    phase("ours-compiled", run_ours(model), compiled=True, own=(model, ae))
    if "diffusers-compiled" in phases:
        getattr(theirs, "compile_repeated_blocks", theirs.compile)(backend=args.compile_backend)
    phase("diffusers-compiled", run_diffusers, compiled=True, own=(theirs, vae))
    if not any(name.startswith("ours-fp8") for name in phases):
        return
    del pipe, theirs, vae  # the shared weights stay with `model` until the fp8 copy exists
    torch._dynamo.reset()
    fp8_model = fp8_copy_of(model)
    del model
    phase("ours-fp8", run_ours(fp8_model), compiled=False, own=(fp8_model, ae))
    if "ours-fp8-compiled" in phases:
        fp8_model.compile_blocks(backend=args.compile_backend)
    phase("ours-fp8-compiled", run_ours(fp8_model), compiled=True, own=(fp8_model, ae))
    torch._dynamo.reset()
    fast_model = fp8_copy_of(fp8_model)  # fresh, uncompiled blocks
    del fp8_model
    enable_fp8_matmul(fast_model)
    phase("ours-fp8-fast", run_ours(fast_model), compiled=False, own=(fast_model, ae))
    if "ours-fp8-fast-compiled" in phases:
        fast_model.compile_blocks(backend=args.compile_backend)
    phase("ours-fp8-fast-compiled", run_ours(fast_model), compiled=True, own=(fast_model, ae))

    done = report["phases"]
    if not args.tiny and {"ours", "diffusers", "ours-compiled"} <= set(done):
        print(f"targets: ours eager {done['ours']['e2e_s']:.2f} s <= diffusers eager {done['diffusers']['e2e_s']:.2f} s; "
              f"compiled {done['ours-compiled']['e2e_s']:.2f} s <= 3.1 s, {done['ours-compiled']['ms_per_step']:.1f} "
              f"<= 110 ms/step; bf16 peak {done['ours']['peak_own_gb']:.2f} "
              f"(sampling {done['ours']['sampling_peak_own_gb']:.2f}) <= 26 GB")  # fmt: skip


if __name__ == "__main__":
    main()
