"""The learning-rate sweep behind the CLI defaults: every method × data set × rank × lr, fine-tuned
on real weights and scored by held-out improvement over the frozen model.

Why its own runner (not one ``paca bench`` worker process per run): a sweep is tens of runs, and
on a small CPU loading torch, transformers and the model again for each costs minutes. Here each
worker process loads the model once and deep-copies it per run; runs use the accuracy-mode
training loop of :mod:`.worker` unchanged. Results are appended to ``results.jsonl`` as each run
ends, so an interrupted sweep keeps what finished and a rerun with the same output folder only
runs what is missing.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable

from ..errors import PacaConfigError

logger = logging.getLogger(__name__)

#: Data sets shipped in paca_core/data/ (see its README for sources and licences), by sweep name.
SHIPPED_DATASETS = {
    "macbeth": "shakespeare_macbeth.txt",
    "stdlib-functions": "python_stdlib_functions.jsonl",
    "reference-topics": "python_reference_topics.jsonl",
}
RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class SweepJob:
    """One fine-tuning run. ``rank`` None: the method has none (meft); ``alpha`` None: the CLI default."""

    method: str
    dataset: str
    rank: int | None
    lr: float
    alpha: float | None = None

    @property
    def key(self) -> str:
        """Identifies the run in results.jsonl (what a resumed sweep skips)."""
        alpha = "default" if self.alpha is None else f"{self.alpha:g}"
        return f"{self.method}|{self.dataset}|r={self.rank}|alpha={alpha}|lr={self.lr:g}"


@dataclass(frozen=True)
class SweepSettings:
    """What every run shares. The held-out split is the same as ``paca train``'s (10 %, seed 0),
    cut to its first ``eval_examples`` examples to bound evaluation time."""

    model: str = "default"
    steps: int = 40
    seq_len: int = 128
    batch_size: int = 4
    warmup_steps: int = 5
    eval_fraction: float = 0.1
    eval_examples: int = 32
    seed: int = 0
    device: str = "cpu"


def dataset_path(name: str) -> Path:
    """A shipped data set by sweep name, or a local .txt/.jsonl path."""
    if name in SHIPPED_DATASETS:
        path = Path(__file__).resolve().parents[1] / "data" / SHIPPED_DATASETS[name]
    else:
        path = Path(name)
    if not path.is_file():
        raise PacaConfigError(f"Sweep data {name!r}: {path} does not exist; use one of {sorted(SHIPPED_DATASETS)} or a local file.")
    return path


def parse_lr_grid(entries: Iterable[str]) -> dict[str, list[float]]:
    """``["1e-3,2e-3", "paca=1e-3,5e-3"]`` → ``{"*": [1e-3, 2e-3], "paca": [1e-3, 5e-3]}`` ("*": every other method)."""
    grid: dict[str, list[float]] = {}
    for entry in entries:
        method, _, values = entry.rpartition("=")
        try:
            lrs = sorted({float(v) for v in values.split(",") if v.strip()})
        except ValueError:
            lrs = []
        if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
            raise PacaConfigError(f"--lr-grid {entry!r}: give positive learning rates, comma-separated, optionally after METHOD=.")
        grid[method.strip().lower() or "*"] = lrs
    return grid


def expand_jobs(
    methods: list[str], datasets: list[str], lr_grid: dict[str, list[float]], rank_of: Callable[[str], int | None]
) -> list[SweepJob]:
    """Every method × data set × lr of its grid (``lr_grid[method]``, else ``lr_grid["*"]``) at
    ``rank_of(method)``, in that order: one method's whole grid on one data set runs together, so a
    sweep stopped early leaves complete grids."""
    jobs = []
    for method in methods:
        lrs = lr_grid.get(method.lower(), lr_grid.get("*"))
        if not lrs:
            raise PacaConfigError(f"--lr-grid has no learning rates for {method!r} (give a default grid or {method}=...).")
        for dataset in datasets:
            jobs += [SweepJob(method, dataset, rank_of(method), lr) for lr in lrs]
    return jobs


#: 1-2-5 steps: the lr an edge extension tries next, and the range it stays in.
_LADDER = (1.0, 2.0, 5.0)
LR_RANGE = (1e-4, 5e-2)


def ladder_step(lr: float, up: bool) -> float:
    """The next lr on the 1-2-5 ladder above (or below) ``lr``."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10**exponent
    position = min(range(3), key=lambda i: abs(_LADDER[i] - mantissa))
    position += 1 if up else -1
    exponent += position // 3
    return float(f"{_LADDER[position % 3] * 10**exponent:.3g}")


def edge_extensions(jobs: list[SweepJob], records: list[dict]) -> list[SweepJob]:
    """Runs that bracket each (method, rank, data set)'s best lr: when all its runs so far are done
    and the best is the largest (smallest) lr tried, the next lr up (down) on the 1-2-5 ladder, within
    :data:`LR_RANGE`. Without them a data set's best, the denominator of every share, could lie
    outside the grid. Extensions are run on that data set only; the rule's candidates stay the lrs
    run on every data set."""
    results = {r["key"]: r for r in records if r.get("status") in ("ok", "diverged")}
    groups: dict[tuple, list[SweepJob]] = {}
    for job in jobs:
        groups.setdefault((job.method, job.rank, job.alpha, job.dataset), []).append(job)
    planned = {job.key for job in jobs}
    extra = []
    for (method, rank, alpha, dataset), group in groups.items():
        if any(job.key not in results for job in group):
            continue
        scored = {job.lr: results[job.key].get("improvement") for job in group}
        lrs = sorted(scored)
        finite = {lr: v for lr, v in scored.items() if v is not None and math.isfinite(v)}
        if not finite:
            continue
        best = max(finite, key=finite.get)
        for edge, up in ((lrs[-1], True), (lrs[0], False)):
            candidate = ladder_step(edge, up)
            if best == edge and LR_RANGE[0] <= candidate <= LR_RANGE[1]:
                job = SweepJob(method, dataset, rank, candidate, alpha)
                if job.key not in planned:
                    extra.append(job)
    return extra


def _extensions(jobs: list[SweepJob], records: list[dict]) -> list[SweepJob]:
    return edge_extensions(jobs, records) or candidate_completions(jobs, records)


def candidate_completions(jobs: list[SweepJob], records: list[dict]) -> list[SweepJob]:
    """Runs that let the rule look one step past its pick: the rule only chooses among lrs run on
    every data set, so when its pick is the largest (smallest) of those and some data set already
    ran a larger (smaller) lr (an edge extension), that lr is added on the data sets missing it."""
    from .lr_rule import LrRuleError, choose_lr

    results = {r["key"]: r for r in records if r.get("status") in ("ok", "diverged")}
    groups: dict[tuple, list[SweepJob]] = {}
    for job in jobs:
        groups.setdefault((job.method, job.rank, job.alpha), []).append(job)
    planned = {job.key for job in jobs}
    extra = []
    for (method, rank, alpha), group in groups.items():
        if any(job.key not in results for job in group):
            continue
        table: dict[str, dict[float, float]] = {}
        for job in group:
            value = results[job.key].get("improvement")
            table.setdefault(job.dataset, {})[job.lr] = value if value is not None else float("-inf")
        try:
            pick = choose_lr(table).lr
        except LrRuleError:
            continue
        common = set.intersection(*(set(v) for v in table.values()))
        tried = {lr for v in table.values() for lr in v}
        for beyond in (sorted(lr for lr in tried if lr > pick)[:1] if pick == max(common) else []) + (
            sorted(lr for lr in tried if lr < pick)[-1:] if pick == min(common) else []
        ):
            for dataset, by_lr in table.items():
                job = SweepJob(method, dataset, rank, beyond, alpha)
                if beyond not in by_lr and job.key not in planned:
                    extra.append(job)
    return extra


# --------------------------------------------------------------------------------------------
# Running: one model per worker process, a deep copy per run.


@dataclass
class _WorkerState:
    settings: SweepSettings
    model: object = None
    tokenizer: object = None
    device: object = None
    data: dict = field(default_factory=dict)  # dataset name -> (train, held-out, frozen loss)


_STATE: _WorkerState | None = None


def _init_worker(settings: SweepSettings, threads: int) -> None:
    """Load the model once per process; ``threads`` per process (1 avoids oversubscribing a busy CPU)."""
    global _STATE
    import torch

    import devices

    from ..workloads.models import build_model, parse_model

    if threads > 0:
        torch.set_num_threads(threads)
    device = devices.resolve_device(settings.device)
    model, tokenizer = build_model(parse_model(settings.model), torch.float32, device, seed=settings.seed)
    if tokenizer is None:
        raise PacaConfigError("The sweep needs real weights and a tokenizer: --model default or a local model folder.")
    model.requires_grad_(False)
    _STATE = _WorkerState(settings, model, tokenizer, device)


def _dataset(name: str):
    """Training and held-out examples of a data set and the frozen model's held-out loss (cached)."""
    from ..data.dataset import load_dataset, split_held_out
    from ..train.steps import evaluate

    if name not in _STATE.data:
        s = _STATE.settings
        data = load_dataset(dataset_path(name), _STATE.tokenizer, s.seq_len)
        train, held_out = split_held_out(data, s.eval_fraction, s.seed)
        held_out = held_out.subset(slice(0, s.eval_examples))
        _STATE.data[name] = (train, held_out, evaluate(_STATE.model, held_out, _STATE.device))
    return _STATE.data[name]


def _run_job(job: SweepJob) -> dict:
    """Fine-tune a copy of the model for one job; failures become a ``status``, never an exception."""
    import torch

    from ..workloads.prepare import prepare
    from ..workloads.specs import parse_method_spec
    from .worker import fine_tune

    s = _STATE.settings
    started = time.perf_counter()
    try:
        train, held_out, frozen = _dataset(job.dataset)
        spec = parse_method_spec(job.method)
        torch.manual_seed(s.seed)
        options = {} if job.alpha is None else {"alpha": job.alpha}
        prepared = prepare(spec, copy.deepcopy(_STATE.model), job.rank, options, _STATE.device, job.lr)
        run = {"steps": s.steps, "batch_size": s.batch_size, "lr": job.lr, "seed": s.seed,
               "accuracy": {"eval_every": s.steps, "warmup_steps": s.warmup_steps}}
        result = fine_tune(prepared, train, held_out, run, _STATE.device, loss_before=frozen)
        result["improvement"] = frozen - result["held_out_loss"]
    except FloatingPointError as error:  # the lr is too large for this method: a result, not a failure
        result = {"status": "diverged", "reason": str(error), "improvement": None}
    except Exception as error:  # noqa: BLE001 - reported per run; the sweep goes on
        logger.debug("sweep run failed", exc_info=True)
        result = {"status": "error", "reason": f"{type(error).__name__}: {error}", "improvement": None}
    return {**asdict(job), "key": job.key, **result, "wall_s": time.perf_counter() - started}


def read_results(out: Path) -> list[dict]:
    """Every record in ``out/results.jsonl`` (a cut-off last line from a killed run is skipped)."""
    path = out / RESULTS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("Skipping an unreadable line in %s (a run cut off while writing?)", path)
    return records


def run_sweep(
    jobs: list[SweepJob],
    settings: SweepSettings,
    out: Path,
    workers: int = 1,
    threads: int = 1,
    on_result: Callable[[list[dict]], None] | None = None,
    deadline: float | None = None,
    extend_edges: bool = True,
) -> list[dict]:
    """Run the jobs not yet in ``out/results.jsonl`` (``workers`` 0: in this process), appending each
    result as it ends; ``on_result`` gets all records after each one (to rewrite reports). No run
    starts after ``deadline`` (a ``time.time()`` value); runs already going finish. ``extend_edges``:
    add :func:`edge_extensions` and then :func:`candidate_completions` as grids complete."""
    out.mkdir(parents=True, exist_ok=True)
    records = read_results(out)
    jobs, extensions = list(jobs), []
    while extend_edges and (extra := _extensions(jobs + extensions, records)):
        extensions += extra
    jobs = extensions + jobs  # an extension completes a data set's grid: it goes first
    done = {r["key"] for r in records if r.get("status") in ("ok", "diverged")}
    todo = [job for job in jobs if job.key not in done]
    logger.info("Sweep: %d runs, %d already in %s, %d to run", len(jobs), len(jobs) - len(todo), out / RESULTS_FILE, len(todo))

    def record(result: dict) -> None:
        with open(out / RESULTS_FILE, "a") as handle:
            handle.write(json.dumps(result, default=str) + "\n")
        records.append(result)
        imp = result.get("improvement")
        logger.info("%s: %s%s (%.0f s)", result["key"], result["status"], "" if imp is None else f", improvement {imp:.4f}", result["wall_s"])
        if extend_edges:
            for job in _extensions(jobs, records):
                logger.info("Grid of %s r=%s on %s extended: adding lr %g", job.method, job.rank, job.dataset, job.lr)
                jobs.append(job)
                pending.insert(0, job)  # first: it completes a data set's grid
        if on_result is not None:
            try:
                on_result(records)
            except Exception:  # noqa: BLE001 - a report bug must not stop an hour-long sweep; results.jsonl has it all
                logger.exception("Writing the sweep report failed (results are kept in %s)", out / RESULTS_FILE)

    pending = list(todo)

    def budget_left() -> bool:
        """False (once, with a warning, dropping what is pending) when the deadline has passed."""
        if deadline is not None and pending and time.time() >= deadline:
            logger.warning("Sweep budget reached: %d runs not started (rerun with the same --out to go on)", len(pending))
            pending.clear()
        return bool(pending)

    if workers <= 0:
        _init_worker(settings, threads)
        while budget_left():
            record(_run_job(pending.pop(0)))
        return records
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(settings, threads))
    with pool:
        running: set = set()
        while budget_left() or running:
            while pending and len(running) < workers:
                running.add(pool.submit(_run_job, pending.pop(0)))
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                record(future.result())
    return records
