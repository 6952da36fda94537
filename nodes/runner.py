"""Headless runner: `python <pack folder> run WORKFLOW.json [options]` runs a ComfyUI workflow (editor or API
format, or a PNG saved by ComfyUI) without ComfyUI, with this pack's nodes and the core stand-ins of `standins`;
with --server it submits the workflow to a running ComfyUI instead (see `remote`).
"""
import argparse
import contextlib
import copy
import importlib
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass

import torch.distributed as dist

from flux_core import parallel

from . import distributed, host, remote, standins
from .workflow import NodeDefs, ValidationError, WorkflowError, dependency_order, is_link, is_ui, read_workflow
from .workflow import set_inputs, to_api, unwrap, validate

HIDDEN_VALUES = {
    "PROMPT": lambda run, node_id: run.prompt,
    "EXTRA_PNGINFO": lambda run, node_id: run.extra_pnginfo,
    "UNIQUE_ID": lambda run, node_id: node_id,
}


@dataclass
class RunResult:
    prompt: dict
    extra_pnginfo: dict
    outputs: dict  # node id -> one list of values per output slot (ComfyUI's list semantics)
    ui: dict  # node id -> the "ui" part an output node returned (e.g. {"images": [{filename, subfolder, type}]})

    def value(self, node_id, slot: int = 0):
        """The (first) value a node produced on an output."""
        return self.outputs[str(node_id)][slot][0]


class _Progress:
    """One line per node on stderr: a bar of the whole run, then the node about to run."""

    def __init__(self, total: int):
        self.total, self.start = total, time.monotonic()

    def node(self, done: int, node_id: str, class_type: str) -> None:
        bar = "#" * (20 * done // max(self.total, 1))
        print(f"[{bar:<20}] {done + 1}/{self.total} node {node_id} {class_type}", file=sys.stderr, flush=True)

    def finish(self) -> None:
        print(f"[{'#' * 20}] done in {time.monotonic() - self.start:.1f}s", file=sys.stderr, flush=True)


def _call(defn, instance, node_id: str, kwargs: dict):
    """Calls a node's FUNCTION over its input lists as ComfyUI does: once per item unless INPUT_IS_LIST."""
    function = getattr(instance, defn.cls.FUNCTION)
    if getattr(defn.cls, "INPUT_IS_LIST", False):
        calls = [kwargs]
    else:
        count = max((len(v) for v in kwargs.values()), default=1) if all(kwargs.values()) else 0
        calls = [{k: v[min(i, len(v) - 1)] for k, v in kwargs.items()} for i in range(count)]
    is_list = getattr(defn.cls, "OUTPUT_IS_LIST", None) or (False,) * len(defn.outputs)
    outputs, ui = [[] for _ in defn.outputs], {}
    for call in calls:
        result = function(**call)
        if isinstance(result, dict):
            for key, value in (result.get("ui") or {}).items():
                ui.setdefault(key, []).extend(value if isinstance(value, list) else [value])
            result = result.get("result", ())
        result = () if result is None else result
        if len(result) != len(defn.outputs):
            raise WorkflowError(
                f"node {node_id} ({defn.class_type}) returned {len(result)} values; RETURN_TYPES declares {len(defn.outputs)}"
            )
        for slot, value in enumerate(result):
            if is_list[slot]:
                outputs[slot].extend(value)
            else:
                outputs[slot].append(value)
    return outputs, ui


def run_prompt(
    prompt: dict, defs: NodeDefs, extra_pnginfo: dict | None = None, progress: bool = True, shown: dict | None = None
) -> RunResult:
    """Validates the whole API-format prompt, then runs the nodes its output nodes need, each once, in order.
    Nodes asking for the hidden PROMPT get `shown`, default `prompt` as given; they run on a validated (normalised)
    copy."""
    run = RunResult(shown or prompt, extra_pnginfo if extra_pnginfo is not None else {}, {}, {})
    prompt = copy.deepcopy(prompt)
    error, node_errors = validate(prompt, defs)
    if error or node_errors:
        raise ValidationError(error, node_errors)
    needed, stack = set(), [i for i, n in prompt.items() if defs.get(n["class_type"]).output_node]
    while stack:
        node_id = stack.pop()
        if node_id not in needed:
            needed.add(node_id)
            stack += [v[0] for v in prompt[node_id]["inputs"].values() if is_link(v)]
    order, _ = dependency_order(prompt, [i for i in prompt if i in needed])
    bar = _Progress(len(order)) if progress else None
    for done, node_id in enumerate(order):
        node = prompt[node_id]
        defn = defs.get(node["class_type"])
        if bar:
            bar.node(done, node_id, defn.class_type)
        kwargs = {
            name: run.outputs[value[0]][value[1]] if is_link(value) else [unwrap(value)]
            for name, value in node["inputs"].items() if name in defn.inputs
        }  # fmt: skip
        for name, kind in defn.hidden.items():
            if kind in HIDDEN_VALUES:
                kwargs[name] = [HIDDEN_VALUES[kind](run, node_id)]
        try:
            run.outputs[node_id], ui = _call(defn, defn.cls(), node_id, kwargs)
        except WorkflowError:
            raise
        except Exception as e:  # any failure inside a node becomes one clear message naming the node
            raise WorkflowError(f"node {node_id} ({defn.class_type}) failed: {type(e).__name__}: {e}") from e
        if ui:
            run.ui[node_id] = ui
    if bar:
        bar.finish()
    return run


def saved_files(run: RunResult) -> list:
    """Paths of the images the output nodes wrote, from their "ui" results."""
    folders = {"output": host.output_dir(), "temp": standins.preview_dir()}
    return [
        folders[item["type"]] / item.get("subfolder", "") / item["filename"]
        for ui in run.ui.values() for item in ui.get("images", []) if item.get("type") in folders
    ]  # fmt: skip


def _pack_nodes() -> tuple[dict, dict]:
    """NODE_CLASS_MAPPINGS of the pack this module belongs to (loaded as a package by the pack's __main__.py)."""
    root = (__package__ or "").rpartition(".")[0]
    if not root:
        raise WorkflowError("start the runner as `python <pack folder> run ...` so the pack's nodes load as a package")
    pack = importlib.import_module(root)
    return pack.NODE_CLASS_MAPPINGS, getattr(pack, "NODE_DISPLAY_NAME_MAPPINGS", {})


def _select_device(device: str | None) -> None:
    """--device: hides other devices from torch (host.torch_device picks CUDA when it sees one)."""
    if device in (None, "cuda"):
        return
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif device.startswith("cuda:") and device[5:].isdigit():
        os.environ["CUDA_VISIBLE_DEVICES"] = device[5:]
    else:
        raise WorkflowError(f"--device {device!r}: expected cpu, cuda or cuda:N")


def _parser() -> argparse.ArgumentParser:
    prog = "fluxkit" if __package__.startswith("fluxkit.") else "python <pack folder>"  # pip-installed, or a clone
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a workflow headless, or on a ComfyUI server with --server")
    convert = commands.add_parser("convert", help="print the API-format prompt of an editor-format workflow")
    for command in (run, convert):
        command.add_argument("workflow", help="workflow .json (editor or API format) or a PNG saved by ComfyUI")
        command.add_argument("--models", help="ComfyUI-style models folder (diffusion_models, text_encoders, vae, ...) or a ComfyUI install")
        command.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                             help="override an input; NODE is an id or a title; VALUE is JSON or text (repeatable)")  # fmt: skip
        command.add_argument("--server", metavar="URL", help="a running ComfyUI, e.g. http://127.0.0.1:8188")
        command.add_argument("--traceback", action="store_true", help="print the full traceback of a failure")
    run.add_argument("--output", help="folder for the images (default ./output)")
    run.add_argument("--input", help="folder Load Image reads from (default ./input)")
    run.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    run.add_argument("--timeout", type=float, default=3600, help="server mode: seconds to wait for the result")
    run.add_argument("--sweep", action="append", default=[], metavar="NODE.INPUT[,NODE.INPUT]=VALUES",
                     help="run once per value (a,b,c | 1..8 | JSON list | @file of lines | @folder of input images); "
                     "repeatable: every combination. Under torchrun the ranks share the runs")  # fmt: skip
    run.add_argument("--batch-split", action="store_true",
                     help="run a batch as one job per image (item i: seed + i, the batch's own noise), the PNGs as the "
                     "batch's; under torchrun the ranks share the images")  # fmt: skip
    run.add_argument("--sequence-parallel", action="store_true",
                     help="under torchrun: every rank works on each image (its tokens split across the GPUs)")  # fmt: skip
    return parser


def _prepare(args, defs: NodeDefs) -> tuple[dict, dict]:
    """The API prompt to run (converted, --set applied) and the extra PNG info (the editor workflow)."""
    workflow = read_workflow(args.workflow)
    ui = workflow if is_ui(workflow) else None
    prompt = to_api(ui, defs) if ui is not None else workflow
    set_inputs(prompt, args.set, defs, ui)
    return prompt, ({"workflow": ui} if ui is not None else {})


def main(argv=None, classes: dict | None = None, display_names: dict | None = None) -> int:
    """CLI entry. `classes`/`display_names` default to the pack's NODE_CLASS_MAPPINGS; the stand-ins are added."""
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` cleans up (temporary files) as Ctrl+C does
    ranks = args.command == "run" and not args.server and distributed.launched()  # under torchrun
    started = False
    try:
        if args.command == "run":
            if ranks:
                started = distributed.setup(args.device)
            else:
                _select_device(args.device)
            host.configure(args.models, args.output, args.input)
        else:
            host.configure(args.models)
        if args.server:
            server = remote.Server(args.server)
            defs = server.node_defs()
        else:
            if classes is None:
                classes, display_names = _pack_nodes()
            names = {**standins.NODE_DISPLAY_NAME_MAPPINGS, **(display_names or {})}
            defs = NodeDefs({**standins.NODE_CLASS_MAPPINGS, **classes}, names)
        prompt, extra = _prepare(args, defs)
        if args.command == "convert":
            print(json.dumps(prompt, indent=2))
            return 0
        if args.sequence_parallel and not ranks:
            raise WorkflowError("--sequence-parallel splits each image across torchrun's processes: start the "
                                "runner with torchrun --nproc-per-node N (and without --server)")  # fmt: skip
        if args.batch_split and args.server:
            raise WorkflowError("--batch-split runs here, not on a server: drop --server, or --batch-split")
        jobs = distributed.jobs(prompt, extra, args.sweep, defs, args.batch_split)

        def run_job(job: distributed.Job, progress: bool = True) -> list:
            return saved_files(run_prompt(job.prompt, defs, job.extra, progress, job.shown))

        if args.server:
            paths = [p for job in jobs for p in server.run(job.prompt, job.extra, host.output_dir(), args.timeout)]
        elif ranks:
            with parallel.sequence_parallel() if args.sequence_parallel else contextlib.nullcontext():
                paths = distributed.run_distributed(jobs, lambda job: run_job(job, False), args.sequence_parallel)
            paths = paths if dist.get_rank() == 0 else []  # rank 0 lists every rank's files
        else:
            paths = [p for job in jobs for p in run_job(job)]
    except (WorkflowError, OSError) as e:
        if isinstance(e, (distributed.JobsFailed, ValidationError)) and dist.is_initialized() and dist.get_rank() > 0:
            return 1  # rank 0 says it: every rank finds the same
        if args.traceback:
            traceback.print_exception(e)
        print(f"error: {e}", file=sys.stderr)
        note = host.models_folder_note()
        if note and str(host.models_root()) in str(e):  # the errors are about files in that folder
            print(f"  {note}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if started:
            dist.destroy_process_group()
    for path in paths:
        print(path)
    return 0
