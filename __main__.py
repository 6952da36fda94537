"""`python <pack folder> run WORKFLOW.json [options]`: loads this folder as a package under a fixed name (as ComfyUI
loads custom node packs, so the pack's relative imports work) and starts the headless runner (nodes/runner.py)."""
import importlib
import importlib.util
import sys
from pathlib import Path

PACKAGE = "fluxkit_pack"


def load_pack():
    """This folder as the package `fluxkit_pack` (its __init__.py exports NODE_CLASS_MAPPINGS)."""
    if PACKAGE not in sys.modules:
        root = Path(__file__).resolve().parent
        spec = importlib.util.spec_from_file_location(PACKAGE, root / "__init__.py", submodule_search_locations=[str(root)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = pack
        spec.loader.exec_module(pack)
    return sys.modules[PACKAGE]


if __name__ == "__main__":
    if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        del sys.path[0]  # the pack's folders are reached through the package only, never as top-level modules
    load_pack()
    sys.exit(importlib.import_module(f"{PACKAGE}.nodes.runner").main(sys.argv[1:]))
