"""The headless runner's jobs: `--sweep` turns one workflow into many, and under `torchrun` the ranks share them
(job j on rank j mod N, each rank on its own GPU) or, with --sequence-parallel, every rank works on each image.

Files are named exactly as one process running the jobs in order names them: each image is held in memory until
its job is done, then saved with the number a single run would give it, counted from the folder as it was when
the run started (which every rank reads before any rank writes). That assumes every job saves the same number of
images per file prefix (one workflow, one batch size); the run checks it and says when it did not hold.
"""
import copy
import datetime
import io
import itertools
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import host, standins
from .workflow import SEED_NAMES, ValidationError, WorkflowError, set_inputs, validate

POLL_SECONDS = 2.0  # rank 0's progress report
RANK_WAIT = datetime.timedelta(hours=24)  # ranks done (or failed) wait for the slowest at the end of a sweep
_RUNS = itertools.count()  # run_distributed calls (the same on every rank): each counts its jobs under its own keys


def sweep_values(text: str, input_dir: Path) -> tuple[str, list[str]]:
    """--sweep NODE.INPUT[,NODE.INPUT...]=VALUES -> (the targets, [value texts for --set]); several targets take the
    same value in each job (e.g. a prompt for both text encoders). VALUES: a,b,c | A..B (whole numbers, inclusive) |
    a JSON list | @FILE (one value a line) | @FOLDER (its image files, a folder inside --input)."""
    target, sep, raw = text.partition("=")
    if not (sep and "." in target and raw):
        raise WorkflowError(f"--sweep {text!r}: expected NODE.INPUT=VALUES, e.g. 3.seed=1..8 or 6.text=@prompts.txt")
    if raw.startswith("@"):
        path = Path(raw[1:]).expanduser()
        if path.is_dir():
            root = host.input_dir().resolve()
            if not path.resolve().is_relative_to(root):
                raise WorkflowError(f"--sweep {text!r}: {path} is not inside the input folder {root}: pass --input")
            names = sorted(p for p in path.resolve().iterdir() if p.suffix.lower() in standins.IMAGE_SUFFIXES)
            values = [p.relative_to(root).as_posix() for p in names]
        elif path.is_file():
            values = [line for line in path.read_text().splitlines() if line.strip()]
        else:
            raise WorkflowError(f"--sweep {text!r}: {path} is neither a file of values nor a folder of images")
    elif raw.startswith("["):
        try:
            items = json.loads(raw)
        except ValueError as e:
            raise WorkflowError(f"--sweep {text!r}: not a JSON list ({e})") from None
        values = [item if isinstance(item, str) else json.dumps(item) for item in items]
    elif ".." in raw and all(part.strip().lstrip("-").isdigit() for part in raw.split("..")):
        first, last = (int(part) for part in raw.split(".."))
        values = [str(n) for n in range(first, last + 1)]
    else:
        values = raw.split(",")
    if not values:
        raise WorkflowError(f"--sweep {text!r} gives no values")
    return target, values


class JobsFailed(WorkflowError):
    """Jobs failed on some ranks; every rank raises the same message."""


@dataclass
class Job:
    prompt: dict  # what runs
    extra: dict  # extra PNG info (the editor workflow)
    label: str  # what sets it apart, for messages
    shown: dict | None = None  # the prompt its PNGs carry when not `prompt`: a batch item carries its batch's


def jobs(prompt: dict, extra: dict, sweeps: list[str], defs, batch_split: bool = False) -> list[Job]:
    """One job per combination of the sweeps (the last varying fastest); with batch_split, one per batch item."""
    axes = [sweep_values(text, host.input_dir()) for text in sweeps]
    out = []
    for combination in itertools.product(*(values for _, values in axes)):
        assignments = [f"{t}={value}" for (targets, _), value in zip(axes, combination) for t in targets.split(",")]
        job = Job(copy.deepcopy(prompt), copy.deepcopy(extra), " ".join(assignments))
        set_inputs(job.prompt, assignments, defs, job.extra.get("workflow"))
        if assignments:  # every job checked before the first runs
            error, node_errors = validate(copy.deepcopy(job.prompt), defs)
            if error or node_errors:
                raise ValidationError(error, node_errors, f"the job with {job.label} is not valid")
        out += batch_items(job) if batch_split else [job]
    return out


def batch_items(job: Job) -> list[Job]:
    """--batch-split: a job's batch of B as B one-image jobs, item i with every seed + i. FluxKit's sampler draws
    batch item i from seed + i, so these are the batch's images (up to the float rounding of batched GEMMs), and
    their PNGs carry the batch's prompt, as one process running the batch writes them."""
    sizes = {i: n["inputs"]["batch_size"] for i, n in job.prompt.items() if type(n["inputs"].get("batch_size")) is int}
    if len(sizes) != 1:
        found = f"nodes {', '.join(sizes)} have" if sizes else "no node has"
        raise WorkflowError(f"--batch-split splits one batch_size: {found} a batch_size value; use --sweep instead")
    (latent, batch), seeds = next(iter(sizes.items())), []
    for node_id, node in job.prompt.items():
        seeds += [(node_id, name) for name in SEED_NAMES if type(node["inputs"].get(name)) is int]
    if not seeds:
        raise WorkflowError("--batch-split: no node has a seed value to give each image its own (item i: seed + i)")
    items = []
    for i in range(batch):
        item = copy.deepcopy(job.prompt)
        item[latent]["inputs"]["batch_size"] = 1
        for node_id, name in seeds:
            item[node_id]["inputs"][name] = (job.prompt[node_id]["inputs"][name] + i) % 2**64
        items.append(Job(item, job.extra, f"{job.label} image {i + 1}/{batch}".lstrip(), job.shown or job.prompt))
    return items


def launched() -> bool:
    """Started by torchrun (or inside an initialised process group) with more than one process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str | None) -> bool:
    """Joins torchrun's process group (NCCL on GPUs, gloo with --device cpu) and takes this rank's GPU,
    cuda:LOCAL_RANK; True when this process started the group (and should end it)."""
    if dist.is_initialized():
        return False
    cpu = device == "cpu" or not torch.cuda.is_available()
    if not cpu:
        if device not in (None, "cuda"):
            raise WorkflowError(f"--device {device}: under torchrun each rank takes cuda:LOCAL_RANK; pass cuda or cpu")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("gloo" if cpu else "nccl", timeout=RANK_WAIT)
    return True


class _Held:
    """standins.hold: the files of the running job, kept as bytes until its numbers are known."""

    def __init__(self):
        self.files: list[tuple[Path, str, str, bytes]] = []  # folder, prefix, suffix, contents

    def __call__(self, folder: Path, prefix: str, write, suffix: str) -> Path:
        buffer = io.BytesIO()
        write(buffer)
        self.files.append((folder, prefix, suffix, buffer.getvalue()))
        return folder / f"{prefix}_pending_{suffix}"


def _snapshot(folders: list[Path]) -> dict[Path, list[str]]:
    """The file names under each folder (recursively), by resolved folder."""
    names = {}
    for root in folders:
        for folder, _, files in os.walk(root):
            names[Path(folder).resolve()] = files
    return names


class _Numbering:
    """Job j's k-th image of a prefix gets base + j * n + k, n = images per job of that prefix (one run's order)."""

    def __init__(self):
        self.existing = _snapshot([host.output_dir(), standins.preview_dir()])
        self.per_job: dict[tuple[str, str], dict[int, int]] = {}  # (folder, prefix) -> {job: images}

    def save(self, job: int, held: _Held) -> list[Path]:
        groups: dict[tuple[Path, str, str], list[bytes]] = {}
        for folder, prefix, suffix, data in held.files:
            groups.setdefault((folder, prefix, suffix), []).append(data)
        paths = []
        for (folder, prefix, suffix), files in groups.items():
            self.per_job.setdefault((str(folder), prefix), {})[job] = len(files)
            base = standins.next_counter(folder, prefix, self.existing.get(folder.resolve(), []))
            for k, data in enumerate(files):
                write = lambda f, data=data: f.write(data)  # noqa: E731
                paths.append(standins.write_new(folder, prefix, write, suffix, counter=base + job * len(files) + k))
        return paths


class _Progress:
    """Rank 0 prints one line whenever the ranks' count of finished jobs changes (through torchrun's store)."""

    def __init__(self, store, key: str, total: int, show: bool):
        self.store, self.key, self.total, self.start, self.stop = store, key, total, time.monotonic(), threading.Event()
        self.thread = threading.Thread(target=self._report, daemon=True) if show else None
        if self.thread:
            self.thread.start()

    def _report(self) -> None:
        seen = None
        while not self.stop.wait(POLL_SECONDS):
            seen = self._line(seen)
        self._line(seen, final=True)

    def _line(self, seen: tuple | None, final: bool = False) -> tuple:
        done, failed = self.store.add(self.key + "done", 0), self.store.add(self.key + "failed", 0)
        if (done, failed) != seen or final:
            bar = "#" * (20 * done // max(self.total, 1))
            note = f", {failed} failed" if failed else ""
            print(f"[{bar:<20}] {done}/{self.total} jobs{note}, {time.monotonic() - self.start:.0f}s",
                  file=sys.stderr, flush=True)  # fmt: skip
        return done, failed

    def finish(self) -> None:
        if self.thread:
            self.stop.set()
            self.thread.join()


def run_distributed(jobs_: list, run_job, sequence_parallel: bool) -> list[Path]:
    """Runs jobs_ over the process group with run_job(job) -> saved paths.
    Returns (on every rank) the saved paths of all jobs in job order; raises WorkflowError after every rank is done
    when a job failed (the files of the jobs that finished stay)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    numbering = None if sequence_parallel else _Numbering()
    dist.barrier()  # every rank has read the folders before any writes
    store, key = dist.distributed_c10d._get_default_store(), f"fluxkit/jobs/{next(_RUNS)}/"
    progress = _Progress(store, key, len(jobs_), rank == 0)
    mine = range(len(jobs_)) if sequence_parallel else range(rank, len(jobs_), world)
    saved, error = {}, None
    try:
        for job in mine:
            held = _Held()
            writes = numbering is None and rank == 0  # sequence parallel: rank 0 saves, the others drop theirs
            standins.hold = None if writes else held
            try:
                paths = run_job(jobs_[job])
                if numbering is not None:
                    paths = numbering.save(job, held)
            except (WorkflowError, OSError) as e:
                if sequence_parallel:  # the other ranks wait in this image's collectives: end the run (torchrun does)
                    raise
                error = f"job {job + 1}/{len(jobs_)} ({jobs_[job].label or 'the workflow'}) failed on rank {rank}: {e}"
                store.add(key + "failed", 1)
                break
            finally:
                standins.hold = None
            if numbering is not None or writes:
                saved[job] = [str(p) for p in paths]
                store.add(key + "done", 1)
        results = [None] * world
        dist.all_gather_object(results, (saved, error, numbering.per_job if numbering else {}))  # waits for all
    finally:
        progress.finish()
    errors = [e for _, e, _ in results if e]
    errors += _uneven([counts for _, _, counts in results])
    paths = [Path(p) for job in range(len(jobs_)) for result in results for p in result[0].get(job, [])]
    if errors:
        raise JobsFailed("\n  ".join([f"{len(errors)} problem(s); the finished jobs' files are kept", *errors]))
    return paths


def _uneven(counts_by_rank: list[dict]) -> list[str]:
    """Prefixes whose jobs saved different numbers of images (then the numbering differs from one process's)."""
    merged: dict = {}
    for counts in counts_by_rank:
        for key, per_job in counts.items():
            merged.setdefault(key, {}).update(per_job)
    return [f"jobs saved {sorted(set(per_job.values()))} images to {prefix!r} in {folder}: files are numbered as "
            "if each saved the same number (none overwritten), not as one process numbers them"
            for (folder, prefix), per_job in merged.items() if len(set(per_job.values())) > 1]  # fmt: skip
