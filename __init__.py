"""FluxKit: FLUX.1 for ComfyUI. ComfyUI imports this file; everything inside the pack is imported relatively,
so the folder may have any name under custom_nodes/."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
