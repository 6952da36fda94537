"""T5 prompt encoding: flux_core.conditioning vs diffusers' FluxPipeline path, on one set of random weights.

Both read one diffusers text_encoder_2/ folder (2 shards + config.json) and the shared T5 tokenizer. Ours:
load_t5 + TextEncoders.encode_t5. Peer: T5EncoderModel.from_pretrained + FluxPipeline._get_t5_prompt_embeds (tokenize,
re-tokenize untruncated for its warning, encode), under no_grad as FluxPipeline.__call__ runs it. Structure: T5-XXL's
(width 4096, 64 heads, d_ff 10240) with fewer blocks, 512 tokens. One process, the two calls alternating, median of
--repeats after --warmup. Also printed: load times, weight bytes, and with --fp8 an fp8 file's bytes and encode time.

    python bench/text_encoders.py --layers 2 --dtype fp32 [--device cuda] [--fp8]
"""
import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from diffusers import FluxPipeline  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_text import t5_weights, tiny_t5_config, to_fp8, write_clip_l, write_component  # noqa: E402
from transformers import CLIPTokenizer, T5EncoderModel, T5TokenizerFast  # noqa: E402

from flux_core.conditioning import BUNDLED_TOKENIZERS, TextEncoders, load_clip, load_t5  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPT = "A cinematic photo of a red fox reading a newspaper in a cafe in Paris, morning light, shallow depth of field"


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.nbytes for p in model.parameters())  # parameters() lists tied weights once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--ff", type=int, default=10240)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--fp8", action="store_true", help="also an fp8 (e4m3fn) single file: bytes and encode time")
    parser.add_argument("--tokenizers", type=Path, default=BUNDLED_TOKENIZERS)
    args = parser.parse_args()
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    prompts = [PROMPT] * args.batch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = tiny_t5_config(args.width, args.heads, args.layers, args.ff)
        folder = tmp / "text_encoder_2"
        write_component(folder, t5_weights(config), config, dtype, shards=2)
        write_clip_l(tmp / "clip_l.safetensors")  # tiny: TextEncoders holds a CLIP beside the T5
        clip_tokenizer = CLIPTokenizer.from_pretrained(args.tokenizers / "clip_l")
        tokenizer = T5TokenizerFast.from_pretrained(args.tokenizers / "t5_xxl")

        t5, ours_load = timed(lambda: load_t5(folder, dtype), device)
        ours = TextEncoders(load_clip(tmp / "clip_l.safetensors", dtype), t5, clip_tokenizer, tokenizer)
        _, ours_move = timed(lambda: ours.to(device), device)
        peer_model, peer_load = timed(lambda: T5EncoderModel.from_pretrained(folder, dtype=dtype), device)
        _, peer_move = timed(lambda: peer_model.to(device), device)
        pipe = types.SimpleNamespace(  # what _get_t5_prompt_embeds reads off the pipeline
            tokenizer_2=tokenizer, text_encoder_2=peer_model, _execution_device=device, tokenizer_max_length=77
        )

        def run_ours():
            return ours.encode_t5(prompts, args.tokens)

        def run_peer():
            with torch.no_grad():
                return FluxPipeline._get_t5_prompt_embeds(pipe, prompts, 1, args.tokens, device, dtype)

        diff = (run_ours().float() - run_peer().float()).abs().max().item()
        times = {"ours": [], "peer": []}
        pair = (("ours", run_ours), ("peer", run_peer))
        for i in range(args.warmup + args.repeats):
            for name, fn in pair if i % 2 else pair[::-1]:
                seconds = timed(fn, device)[1]
                if i >= args.warmup:
                    times[name].append(seconds)
        ours_ms, peer_ms = (1000 * statistics.median(times[k]) for k in ("ours", "peer"))

        print(f"T5 encode: {args.layers} blocks x width {args.width} ({args.heads} heads, d_ff {args.ff}), "
              f"{args.batch} x {args.tokens} tokens, {args.dtype}, {device}; attention ours "
              f"{t5.config._attn_implementation}, peer {peer_model.config._attn_implementation}")  # fmt: skip
        print(f"  max |ours - peer| = {diff:.3g}")
        print(f"  encode  ours {ours_ms:9.1f} ms   peer {peer_ms:9.1f} ms   ratio ours/peer {ours_ms / peer_ms:.3f}")
        print(f"  load    ours {1000 * ours_load:9.1f} ms   peer {1000 * peer_load:9.1f} ms   (+ to {device}: "
              f"{1000 * ours_move:.1f} / {1000 * peer_move:.1f} ms)")  # fmt: skip
        print(f"  weights ours {weight_bytes(t5) / 2**20:9.1f} MiB   peer {weight_bytes(peer_model) / 2**20:9.1f} MiB")
        del peer_model, pipe
        if args.fp8:
            stored, _ = to_fp8(t5_weights(config), scaled=False)
            save_file(stored, str(tmp / "t5xxl_fp8_e4m3fn.safetensors"))
            del stored
            ours.offload()
            fp8_t5 = load_t5(tmp / "t5xxl_fp8_e4m3fn.safetensors", dtype)
            fp8 = TextEncoders(ours.clip, fp8_t5, clip_tokenizer, tokenizer).to(device)
            run_fp8 = lambda: fp8.encode_t5(prompts, args.tokens)  # noqa: E731
            for _ in range(args.warmup):
                run_fp8()
            fp8_ms = 1000 * statistics.median(timed(run_fp8, device)[1] for _ in range(args.repeats))
            print(f"  fp8 file: weights {weight_bytes(fp8.t5) / 2**20:.1f} MiB, encode {fp8_ms:.1f} ms "
                  f"({fp8_ms / ours_ms:.2f} x ours at {args.dtype})")  # fmt: skip


if __name__ == "__main__":
    main()
