"""FluxKit's ComfyUI nodes: thin glue over flux_core (no math here), classic node contract."""
from . import compiling, loaders, lora, sampling, seq2seq, tools, vae

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (loaders, lora, compiling, sampling, seq2seq, tools, vae):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
