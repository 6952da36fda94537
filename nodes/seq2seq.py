"""Seq2seq flow-matching nodes: load a trained run, describe a demo shape, sample its point set. Glue over
flux_core.seq2seq; runs live in models/fluxkit_seq2seq/<run>/ as `python -m flux_core.seq2seq` writes them."""

from flux_core.seq2seq import load_run, sample
from flux_core.seq2seq.demo import SHAPES, render, shape_condition

from . import host
from .common import CATEGORY, LOADED, file_fingerprint

RUN, TOKENS = "FLUXKIT_SEQ2SEQ", "FLUXKIT_TOKENS"


class FluxKitSeq2SeqLoader:
    DESCRIPTION = "Loads a seq2seq flow-matching run (EMA weights + params.json) from models/fluxkit_seq2seq."
    CATEGORY = f"{CATEGORY}/seq2seq"
    RETURN_TYPES = (RUN,)
    RETURN_NAMES = ("run",)
    OUTPUT_TOOLTIPS = ("The trained seq2seq Flux model.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"run_name": (host.model_list("fluxkit_seq2seq"), {"tooltip": "A run folder written by `python -m flux_core.seq2seq train` or `demo`."})}}

    def load(self, run_name):
        path = host.model_path("fluxkit_seq2seq", run_name)
        return (LOADED.get(("seq2seq", file_fingerprint(path)), lambda: load_run(path)),)


class FluxKitShapeCondition:
    DESCRIPTION = "Condition tokens of the built-in demo task: a shape kind stretched to fill a box."
    CATEGORY = f"{CATEGORY}/seq2seq"
    RETURN_TYPES = (TOKENS,)
    RETURN_NAMES = ("condition",)
    OUTPUT_TOOLTIPS = ("Two 4-D condition tokens (kind one-hot; box centre and half-size).",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        coord = {"min": -1.0, "max": 1.0, "step": 0.01}
        half = {"min": 0.05, "max": 1.0, "step": 0.01}
        return {
            "required": {
                "shape": (list(SHAPES), {"default": SHAPES[0], "tooltip": "Which outline to draw."}),
                "centre_x": ("FLOAT", {**coord, "default": 0.0, "tooltip": "Box centre, x."}),
                "centre_y": ("FLOAT", {**coord, "default": 0.0, "tooltip": "Box centre, y."}),
                "half_width": ("FLOAT", {**half, "default": 0.4, "tooltip": "Half the box width (trained on 0.2-0.6)."}),
                "half_height": ("FLOAT", {**half, "default": 0.4, "tooltip": "Half the box height (trained on 0.2-0.6)."}),
            }
        }

    def make(self, shape, centre_x, centre_y, half_width, half_height):
        return (shape_condition(shape, (centre_x, centre_y), (half_width, half_height)),)


class FluxKitSeq2SeqSample:
    DESCRIPTION = "Samples data tokens (here: a 2-D point set) from condition tokens with Euler flow matching; renders them."
    CATEGORY = f"{CATEGORY}/seq2seq"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The sampled point sets drawn black on white, one panel per batch item.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "run": (RUN, {"tooltip": "From Load Seq2Seq Run."}),
                "condition": (TOKENS, {"tooltip": "Condition tokens, e.g. from Shape Condition."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True, "tooltip": "Noise seed; item i uses seed + i."}),
                "steps": ("INT", {"default": 16, "min": 1, "max": 1000, "tooltip": "Euler steps."}),
                "points": ("INT", {"default": 1024, "min": 32, "max": 16384, "step": 32, "tooltip": "Data tokens to sample."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Samples of the same condition."}),
            }
        }  # fmt: skip

    def sample(self, run, condition, seed, steps, points, batch_size):
        tokens = sample(run, condition.expand(batch_size, -1, -1), seed, steps, data_len=points, callback=host.step_callback(steps))
        canvas = render(tokens).float() / 255  # (H, W)
        return (canvas[None, :, :, None].expand(-1, -1, -1, 3).contiguous(),)


NODE_CLASS_MAPPINGS = {
    "FluxKitSeq2SeqLoader": FluxKitSeq2SeqLoader,
    "FluxKitShapeCondition": FluxKitShapeCondition,
    "FluxKitSeq2SeqSample": FluxKitSeq2SeqSample,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxKitSeq2SeqLoader": "Load Seq2Seq Run (FluxKit)",
    "FluxKitShapeCondition": "Shape Condition (FluxKit)",
    "FluxKitSeq2SeqSample": "Seq2Seq Sample (FluxKit)",
}
