"""FluxKit: FLUX.1 for ComfyUI. ComfyUI imports this file from custom_nodes/<any folder name>/; the pack imports its
own parts relatively, and the library by its name, `flux_core`, as user code does, so that one copy serves both:
this folder's copy in a clone, the installed package after `pip install .` (this folder is then `fluxkit`)."""
import importlib.util
import sys
from pathlib import Path


def _register_flux_core() -> None:
    """This folder's flux_core as `flux_core` (ComfyUI puts no pack folder on sys.path), unless one is imported
    already or this is the pip-installed pack, which has no copy beside it."""
    folder = Path(__file__).resolve().parent / "flux_core"
    if "flux_core" in sys.modules or not folder.is_dir():
        return
    spec = importlib.util.spec_from_file_location("flux_core", folder / "__init__.py", submodule_search_locations=[str(folder)])
    sys.modules["flux_core"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["flux_core"])


_register_flux_core()
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
