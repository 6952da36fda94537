"""The headless runner's command line (nodes/runner.py): `fluxkit run WORKFLOW.json [options]` once pip-installed,
or `python <pack folder> run ...` from a clone, which loads this folder as a package under a fixed name (as ComfyUI
loads custom node packs, so the pack's relative imports work)."""
import importlib
import importlib.util
import sys
from pathlib import Path

PACKAGE = "fluxkit_pack"
WORKFLOWS = Path(__file__).resolve().parent / "workflows"


def load_pack():
    """This folder as the package `fluxkit_pack` (its __init__.py exports NODE_CLASS_MAPPINGS)."""
    if PACKAGE not in sys.modules:
        root = Path(__file__).resolve().parent
        spec = importlib.util.spec_from_file_location(PACKAGE, root / "__init__.py", submodule_search_locations=[str(root)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = pack
        spec.loader.exec_module(pack)
    return sys.modules[PACKAGE]


def shipped_workflow(argv: list[str]) -> list[str]:
    """`run NAME` / `convert NAME` where NAME is no file here but a shipped workflow (flux_dev_txt2img, api/...): its
    path, so the installed runner reaches workflows/ from any folder."""
    if len(argv) < 2 or argv[0] not in ("run", "convert") or Path(argv[1]).exists():
        return argv
    shipped = (WORKFLOWS / argv[1]).with_suffix(".json").resolve()
    return [argv[0], str(shipped), *argv[2:]] if shipped.is_relative_to(WORKFLOWS) and shipped.is_file() else argv


def main(argv: list[str] | None = None) -> int:
    """The `fluxkit` console script, and `python <pack folder>`."""
    package = __package__ or load_pack().__name__
    runner = importlib.import_module(f"{package}.nodes.runner")
    return runner.main(shipped_workflow(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        del sys.path[0]  # the pack's folders are reached through the package only, never as top-level modules
    sys.exit(main())
