"""What each ``paca doctor`` stage does. A stage returns its result (plain JSON), or raises :class:`StageSkipped`
(a dependency is missing: the reason says which) or :class:`StageFailed` (something it checked is wrong; the
result so far goes with it). :mod:`.run` times them, gives each its budget and records every outcome.

Real runs put every measurement in its own process (a clean allocator, a peak that is its own, a hard
timeout); the dry run keeps the same code paths in this process with tiny shapes, so it checks the doctor in
seconds and measures nothing.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import devices

from ..errors import PacaConfigError

logger = logging.getLogger(__name__)

#: The folder holding ``paca_core/``, ``devices/``, ``backends/`` and, in a checkout, ``tests/`` and ``scripts/``.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]

#: Stage 3's model: Llama-3.2-1B's shapes with random weights (no download).
BENCH_MODEL = "llama-3.2-1b-shape"
BENCH_SEQ_LEN, BENCH_BATCH, LORA_RANK = 2048, 1, 8
#: Stage 3's entries, the pair the paper's claim is about first (a run cut by its budget still has them).
BENCH_ENTRIES = ("paca", "peft-lora", "lora", "qpaca", "peft-qlora", "lorafa", "velora", "meft", "peft-paca")
#: The PaCA paper (ICLR 2025) against LoRA: -22 % step time, -16 % memory (LLaMA3-8B, A100/Gaudi2; its setup differs).
PAPER_CLAIM = {"time_reduction": 0.22, "memory_reduction": 0.16}
#: How many percentage points short of the paper's reduction still count as reproducing it.
CLAIM_SLACK = 0.05
#: Stage 5: PaCA with every lever against PEFT LoRA with gradient checkpointing.
CONTEXT_ENTRIES = ("paca@all", "peft-lora@gc")


class StageSkipped(Exception):
    """The stage cannot run here; the message says what is missing."""


class StageFailed(Exception):
    """Something the stage checked is wrong; ``result`` is what it found."""

    def __init__(self, reason: str, result: dict | None = None):
        super().__init__(reason)
        self.result = result or {}


@dataclass
class Context:
    """What every stage sees: the device, the run's mode, where logs go, when it must end, earlier results."""

    device: torch.device
    mode: str  # full, quick or dry-run
    logs: Path
    stage_end: float = math.inf  # time.monotonic() by which this stage must be done
    deadline: float = math.inf  # time.monotonic() after which nothing starts
    earlier: dict[str, dict] = field(default_factory=dict)
    progress: bool = True

    @property
    def dry_run(self) -> bool:
        return self.mode == "dry-run"

    def remaining(self) -> float:
        """Seconds left to the stage (never past the run's deadline)."""
        return max(0.0, min(self.stage_end, self.deadline) - time.monotonic())


# --- 1. the device -------------------------------------------------------------------------------------


def stage_device(ctx: Context) -> dict:
    """Name, memory, driver and software versions, graph modes, dtype, and one GEMM and round trip checked on it."""
    from backends import get_backend

    device = ctx.device
    runtime = devices.runtime_for(device)
    modes = []
    for mode in runtime.graph_modes:
        try:
            devices.resolve_graph_mode(device, mode.name)
            modes.append({"name": mode.name, "available": True, "reason": None})
        except (devices.DeviceUnavailableError, devices.InvalidDeviceError) as error:
            modes.append({"name": mode.name, "available": False, "reason": str(error)})
    choice = devices.default_dtype_choice(device)
    result = {
        "device": str(device), "device_type": device.type, "describe": runtime.describe(device),
        "memory": devices.memory_stats(device).as_dict(), "free_bytes": devices.free_memory_bytes(device),
        "available_device_types": list(devices.available_device_types()), "graph_modes": modes,
        "default_graph_mode": runtime.default_graph_mode(), "default_dtype": choice.name, "dtype_reason": choice.reason,
        "distributed_backend": runtime.distributed_backend, "backend": get_backend(device).name,
        "shares_host_memory": runtime.shares_host_memory,
    }
    result["smoke"] = _smoke(device, choice.dtype)
    problems = [f"{k}: {v['error']:.3g} > {v['tolerance']:.3g}" for k, v in result["smoke"].items() if v["error"] > v["tolerance"]]
    if problems:
        raise StageFailed("the device computes wrong results: " + "; ".join(problems), result)
    return result


def _smoke(device: torch.device, dtype: torch.dtype) -> dict:
    """A GEMM in the device's dtype against the CPU in float64, and a host->device->host round trip (bit-exact)."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=generator), torch.randn(512, 128, generator=generator)
    expected = a.double() @ b.double()
    got = (a.to(device, dtype) @ b.to(device, dtype)).double().cpu()
    tolerance = 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    gemm_error = float((got - expected).abs().max() / expected.abs().max())
    host = torch.randn(1 << 16, generator=generator)
    back = devices.copy_to_host(devices.copy_to_device(host, device).wait()).wait()
    return {"gemm": {"dtype": str(dtype).replace("torch.", ""), "error": gemm_error, "tolerance": tolerance},
            "round_trip": {"bytes": host.numel() * host.element_size(), "error": float((back - host).abs().max()), "tolerance": 0.0}}


# --- 2. the accelerator test tier ----------------------------------------------------------------------


def stage_tests(ctx: Context) -> dict:
    """``pytest -m accelerator`` in a subprocess on this device (``PACA_TEST_DEVICE``); the fast part in quick and dry runs."""
    tests = PACKAGE_ROOT / "tests"
    if not (tests / "conftest.py").is_file():
        raise StageSkipped(f"the test suite is not in this installation ({tests}): run paca doctor from a paca-hal checkout")
    if importlib.util.find_spec("pytest") is None:
        raise StageSkipped("pytest is not installed (pip install pytest; scripts/device_wheels.sh ships it for lent machines)")
    expression = "accelerator" if ctx.mode == "full" else "accelerator and not slow"
    # The dry run keeps to the tier's own module: on a CPU every other accelerator test (gpu/hpu marks, the backend
    # conformance suite's device cases) skips, so collecting the whole suite would prove nothing more.
    where = tests / "test_accelerator.py" if ctx.dry_run else tests
    junit = ctx.logs / "accelerator-tier.xml"
    log = ctx.logs / "accelerator-tier.log"
    command = [sys.executable, "-m", "pytest", str(where), "-m", expression, "-v", "-ra", "-p", "no:cacheprovider", "--continue-on-collection-errors",
               f"--junitxml={junit}"]
    env = _child_env({"PACA_TEST_DEVICE": str(ctx.device)})
    timeout = ctx.remaining()
    started = time.perf_counter()
    with open(log, "w") as out:
        try:
            done = subprocess.run(command, cwd=PACKAGE_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = None
    result = {"command": " ".join(command[1:]).replace(str(PACKAGE_ROOT) + os.sep, ""), "marker": expression,
              "device": str(ctx.device), "exit_code": code, "seconds": round(time.perf_counter() - started, 1), "log": log.name}
    result.update(_junit_summary(junit) if code is not None else _log_summary(log))
    if code is None:
        raise StageFailed(f"the accelerator tier ran past its {timeout:.0f} s budget (see {log.name})", result)
    if code == 5:
        raise StageFailed("no accelerator test was collected (is the accelerator marker registered?)", result)
    if code != 0:
        names = ", ".join(f["test"] for f in result.get("failures", [])[:5])
        raise StageFailed(f"{result.get('failed', '?')} failed, {result.get('errors', '?')} errors: {names or 'see ' + log.name}", result)
    if not result.get("passed"):
        raise StageFailed("every accelerator test was skipped: nothing was proven on this device", result)
    return result


def _junit_summary(path: Path) -> dict:
    """Counts, failures (test and first line) and skip reasons from pytest's JUnit XML."""
    if not path.is_file():
        return {}
    root = ElementTree.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failures, skips = [], {}
    for case in cases:
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                failures.append({"test": test, "kind": kind, "message": (node.get("message") or "").splitlines()[0][:300] if node.get("message") else ""})
        node = case.find("skipped")
        if node is not None:
            reason = (node.get("message") or "").strip()[:200]
            skips[reason] = skips.get(reason, 0) + 1
    failed = sum(1 for f in failures if f["kind"] == "failure")
    errors = sum(1 for f in failures if f["kind"] == "error")
    skipped = sum(skips.values())
    return {"tests": len(cases), "passed": len(cases) - failed - errors - skipped, "failed": failed, "errors": errors,
            "skipped": skipped, "failures": failures, "skip_reasons": skips}


def _log_summary(path: Path) -> dict:
    """Counts from pytest's ``-v`` lines, for a run stopped before it wrote its JUnit XML (the budget ran out)."""
    counts = {"PASSED": 0, "FAILED": 0, "ERROR": 0, "SKIPPED": 0}
    failures = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        if "::" not in line:
            continue
        for word in counts:
            if f" {word}" in line:
                counts[word] += 1
                if word in ("FAILED", "ERROR"):
                    failures.append({"test": line.split(" ", 1)[0], "kind": word.lower(), "message": ""})
                break
    return {"tests": sum(counts.values()), "passed": counts["PASSED"], "failed": counts["FAILED"], "errors": counts["ERROR"],
            "skipped": counts["SKIPPED"], "failures": failures, "skip_reasons": {}, "partial": True}


# --- 3. bench at Llama-3.2-1B's shapes -----------------------------------------------------------------


def _bench_shape(ctx: Context) -> dict:
    if ctx.dry_run:
        return {"model": "tiny", "seq_len": 32, "batch_size": 1, "dtype": "fp32", "steps": 1, "warmup_steps": 0}
    return {"model": BENCH_MODEL, "seq_len": BENCH_SEQ_LEN, "batch_size": BENCH_BATCH, "dtype": "bf16", "steps": 3, "warmup_steps": 1}


def _spec_or_reason(entry: str):
    """(spec, None) for an entry this installation can run, else (None, why not)."""
    from .. import extras
    from ..workloads.specs import parse_method_spec, required_packages

    try:
        spec = parse_method_spec(entry)
    except PacaConfigError as error:
        return None, f"not a paca bench entry in this version ({error})"
    missing = {m: hint for m, hint in required_packages([spec]).items() if not extras.installed(m)}
    if missing:
        return None, "needs " + ", ".join(f"{m} ({hint})" for m, hint in missing.items())
    return spec, None


def _job(ctx: Context, spec, shape: dict, mode: str, **extra) -> dict:
    rank = spec.rank(LORA_RANK, True)
    job = {"mode": mode, "method": spec.name, "model": shape["model"], "seq_len": shape["seq_len"], "batch_size": shape["batch_size"],
           "rank": rank, "lr": spec.default_lr(rank), "steps": shape.get("steps", 1), "warmup_steps": shape.get("warmup_steps", 0),
           "device": str(ctx.device), "graph_mode": "auto", "dtype": shape["dtype"], "seed": 0, "options": {"target_modules": None}}
    job.update(extra)
    return job


def run_measurement(ctx: Context, job: dict, log_name: str, timeout: float) -> dict:
    """One bench job: in its own process on real runs (``python -m paca_core.doctor.worker``), here in the dry run."""
    from .worker import run_job_with_reserved

    if ctx.dry_run:
        return run_job_with_reserved(dict(job))
    if timeout < 5:
        return {"status": "skipped", "reason": "no time left in the stage's budget"}
    with tempfile.TemporaryDirectory(prefix="paca-doctor-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        log = ctx.logs / log_name
        with open(log, "w") as out:
            try:
                done = subprocess.run([sys.executable, "-m", "paca_core.doctor.worker", str(job_path), str(result_path)], cwd=PACKAGE_ROOT,
                                      env=_child_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                return {"status": "timeout", "reason": f"over {timeout:.0f} s (log: {log.name})"}
        if result_path.is_file():
            return json.loads(result_path.read_text())
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-4:])
        if done.returncode in (-9, 137):
            return {"status": "oom", "reason": f"worker killed by the OS (out of host memory?); log: {log.name}"}
        return {"status": "error", "reason": f"worker exited with {done.returncode}: {tail[-500:]}"}


def stage_bench(ctx: Context) -> dict:
    """Every method and PEFT peer at Llama-3.2-1B's shapes, bf16, seq 2048: step time, tokens/s, peak allocated and reserved."""
    from tqdm.auto import tqdm

    shape = _bench_shape(ctx)
    records = []
    for entry in tqdm(BENCH_ENTRIES, desc="doctor bench", unit="entry", disable=not ctx.progress, leave=False):
        spec, why_not = _spec_or_reason(entry)
        record: dict[str, Any] = {"entry": entry}
        if spec is None:
            records.append({**record, "status": "skipped", "reason": why_not})
            continue
        remaining = ctx.remaining()
        if remaining < 5:
            records.append({**record, "status": "skipped", "reason": "the stage's time budget was spent before it started"})
            continue
        started = time.perf_counter()
        result = run_measurement(ctx, _job(ctx, spec, shape, "speed"), f"bench-{entry.replace('@', '_').replace('+', '_')}.log",
                                 timeout=min(remaining, 120.0))
        status = result.get("status")
        if status == "unavailable":
            status = "skipped"
        record.update(status=status, reason=result.get("reason"), rank=spec.rank(LORA_RANK, True), wall_s=round(time.perf_counter() - started, 1))
        if status == "ok":
            record.update(median_step_s=result["median_step_s"], step_times_s=result["step_times_s"], tokens_per_s=result["tokens_per_s"],
                          peak_allocated_bytes=result["peak_memory_bytes"], reserved_peak_bytes=result.get("reserved_peak_bytes"),
                          memory_source=result.get("memory_source"), trainable_parameters=result.get("trainable_parameters"),
                          dtype=result.get("dtype"), graph_mode=result.get("graph_mode"))
        records.append(record)
        logger.info("bench %s: %s", entry, record.get("median_step_s") or record.get("reason"))
    result = {**shape, "lora_rank": LORA_RANK, "entries": records, "claim": paper_claim(records, ctx.dry_run)}
    errors = [r for r in records if r["status"] in ("error", "timeout")]
    if errors:
        raise StageFailed("; ".join(f"{r['entry']}: {r['status']} ({(r.get('reason') or '')[:160]})" for r in errors), result)
    return result


def paper_claim(records: list[dict], dry_run: bool) -> dict:
    """PaCA against PEFT LoRA (and our LoRA) beside the paper's -22 % time, -16 % memory, with a verdict per figure."""
    by_entry = {r["entry"]: r for r in records if r.get("status") == "ok"}
    claim: dict[str, Any] = {"paper": PAPER_CLAIM, "slack": CLAIM_SLACK,
                             "setup_note": "the paper measured LLaMA3-8B at block size 512, micro-batch 2, on A100 and Gaudi2"}
    for reference in ("peft-lora", "lora"):
        paca, other = by_entry.get("paca"), by_entry.get(reference)
        if not paca or not other:
            claim[_claim_key(reference)] = {"verdict": "not measured", "reason": "PaCA or the reference did not run"}
            continue
        figures = {}
        for name, key, paper in (("time", "median_step_s", PAPER_CLAIM["time_reduction"]),
                                 ("memory", "peak_allocated_bytes", PAPER_CLAIM["memory_reduction"])):
            ours, theirs = paca.get(key), other.get(key)
            if not ours or not theirs:
                figures[name] = {"verdict": "not measured"}
                continue
            reduction = 1 - ours / theirs
            verdict = "as claimed" if reduction >= paper - CLAIM_SLACK else ("smaller than claimed" if reduction > 0 else "not reproduced")
            figures[name] = {"paca": ours, "reference": theirs, "reduction": reduction, "paper_reduction": paper, "verdict": verdict}
        claim[_claim_key(reference)] = figures
    if dry_run:
        claim["note"] = "dry run: CPU with tiny shapes; these ratios test the doctor's arithmetic, not the paper"
    return claim


def _claim_key(reference: str) -> str:
    """``vs_peft_lora``, ``vs_lora``: the claim's entry for one reference."""
    return "vs_" + reference.replace("-", "_")


# --- 4. the planner against measured steps -------------------------------------------------------------


def _dry_run_row(rows_file: Path) -> str:
    """A one-process row whose entry needs no optional package (the dry run must pass without bitsandbytes)."""
    from ..workloads.specs import parse_method_spec

    for row in json.loads(rows_file.read_text())["rows"]:
        argv = row["plan"]
        if "--fsdp" in argv or "--zero" in argv:
            continue
        if not parse_method_spec(argv[argv.index("--methods") + 1]).four_bit:
            return row["id"]
    raise StageSkipped(f"{rows_file} has no one-process row without a 4-bit base")


def stage_planner(ctx: Context) -> dict:
    """scripts/validate_on_device.py's rows: ``paca plan``'s prediction beside the measured allocated, reserved,
    device total and step time (reduced depth: every layer shape is still stepped)."""
    script = PACKAGE_ROOT / "scripts" / "validate_on_device.py"
    rows = PACKAGE_ROOT / "docs" / "plan-published" / "rows.json"
    if not script.is_file() or not rows.is_file():
        raise StageSkipped(f"{script.name} or the published rows are not in this installation: run paca doctor from a paca-hal checkout")
    out = ctx.logs / "validate-on-device"
    remaining = ctx.remaining()
    argv = ["--device", str(ctx.device), "--out", str(out), "--overwrite"]
    if ctx.dry_run:
        argv += ["--model", "smollm2-135m", "--layers", "1", "--seq-len", "32", "--batch-size", "1", "--dtype", "fp32", "--only",
                 _dry_run_row(rows), "--in-process", "--steps", "1", "--warmup", "0"]
        spec = importlib.util.spec_from_file_location("validate_on_device", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        code = module.main(argv)
    else:
        per_config = min(120.0, remaining)
        argv += ["--budget-seconds", str(max(0.0, remaining - per_config)), "--timeout", str(per_config)]
        with open(ctx.logs / "validate-on-device.log", "w") as log:
            try:
                code = subprocess.run([sys.executable, str(script), *argv], cwd=PACKAGE_ROOT, env=_child_env(), timeout=remaining + 10,
                                      stdout=log, stderr=subprocess.STDOUT, check=False).returncode
            except subprocess.TimeoutExpired:
                code = None
    document = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {"results": [], "skipped": []}
    result = {"settings": document.get("settings"), "rows": [_planner_row(r) for r in document["results"]],
              "skipped_rows": document.get("skipped", []), "exit_code": code}
    statuses = [r["status"] for r in result["rows"]]
    if not statuses:
        raise StageFailed("no configuration was measured (see logs/validate-on-device.log)", result)
    bad = [f"{','.join(r['rows'])}: {r['status']} ({(r.get('reason') or '')[:160]})" for r in result["rows"] if r["status"] not in ("ok", "oom", "skipped")]
    if bad:
        raise StageFailed("; ".join(bad[:4]), result)
    return result


def _planner_row(entry: dict) -> dict:
    predicted, measured = entry.get("predicted") or {}, entry.get("measured") or {}
    pred_bytes = predicted.get("bytes") or {}
    return {
        "rows": entry.get("rows", []), "status": entry.get("status"), "reason": entry.get("reason"),
        "seq_len": entry.get("seq_len"), "batch_size": entry.get("batch_size"), "method": predicted.get("method"),
        "profile": entry.get("profile"), "note": entry.get("note"),
        "predicted": {"allocated_bytes": predicted.get("allocated_peak_bytes"), "reserved_bytes": predicted.get("reserved_peak_bytes"),
                      "device_total_bytes": pred_bytes.get("device_total"), "step_s": predicted.get("step_seconds")},
        "measured": {"allocated_bytes": measured.get("allocated_peak_bytes"), "reserved_bytes": measured.get("reserved_peak_bytes"),
                     "device_total_bytes": measured.get("driver_used_bytes"), "step_s": measured.get("median_step_s")},
        "ratios": entry.get("ratios"),
    }


# --- 5. the longest sequence that fits -----------------------------------------------------------------


class _OutOfTime(Exception):
    pass


def stage_max_context(ctx: Context) -> dict:
    """PaCA with every lever against PEFT LoRA with gradient checkpointing: the longest sequence whose training step
    runs on this device (real steps, bisection in steps of 1024 tokens, capped by the stage's time)."""
    from ..bench.search import search_max

    dry = ctx.dry_run
    shape = {"model": "tiny", "dtype": "fp32", "batch_size": 1} if dry else {"model": BENCH_MODEL, "dtype": "bf16", "batch_size": 1}
    step, upper, start = (32, 512, 256) if dry else (1024, 131072, 16384)
    if dry:  # the CPU probe counts bytes (it never runs out): a small budget makes the bisection decide something
        budget, budget_source = 384 << 10, "dry run: 384 KiB of counted bytes"
    else:
        stats = devices.memory_stats(ctx.device)
        if stats.total_bytes is None:
            raise StageSkipped(f"{ctx.device} does not report its memory size")
        budget, budget_source = int(stats.total_bytes), f"the device's memory ({stats.source}); a step that runs out of it does not fit"
    records = []
    entries = [(entry, *_spec_or_reason(entry)) for entry in CONTEXT_ENTRIES]
    for index, (entry, spec, why_not) in enumerate(entries):
        if spec is None:
            records.append({"entry": entry, "status": "skipped", "reason": why_not})
            continue
        share_end = time.monotonic() + ctx.remaining() / (len(entries) - index)  # each entry gets its share of what is left
        probes: list[tuple[int, int | None, bool]] = []

        def probe(seq_len: int, spec=spec, share_end=share_end, probes=probes) -> int | None:
            left = min(share_end, time.monotonic() + ctx.remaining()) - time.monotonic()
            if left < 5:
                raise _OutOfTime
            job = _job(ctx, spec, dict(shape, seq_len=seq_len), "probe")
            result = run_measurement(ctx, job, f"context-{spec.name.replace('@', '_').replace('+', '_')}-{seq_len}.log", timeout=left)
            used = int(result["memory_bytes"]) if result.get("status") == "ok" else None
            if result.get("status") not in ("ok", "oom"):
                if result.get("status") == "timeout":
                    raise _OutOfTime
                raise StageFailed(f"{spec.name} at {seq_len} tokens: {result.get('status')}: {(result.get('reason') or '')[:300]}")
            probes.append((seq_len, used, used is not None and used <= budget))
            return used

        record: dict[str, Any] = {"entry": entry, "status": "ok"}
        try:
            found = search_max(probe, start, budget, step=step, upper=upper)
            record.update(max_seq_len=found.best, capped=found.capped, time_capped=False)
        except _OutOfTime:
            fits = [s for s, _, ok in probes if ok]
            fails = [s for s, _, ok in probes if not ok]
            record.update(max_seq_len=max(fits) if fits else None, capped=False, time_capped=True,
                          first_failure=min(fails) if fails else None,
                          reason="the stage's time ran out before the bisection closed: max_seq_len is the longest that ran")
        record["probes"] = [{"seq_len": s, "bytes": b, "fits": ok} for s, b, ok in probes]
        records.append(record)
    paca, lora = (next((r for r in records if r["entry"] == e and r.get("max_seq_len")), None) for e in CONTEXT_ENTRIES)
    ratio = paca["max_seq_len"] / lora["max_seq_len"] if paca and lora else None
    return {**shape, "step": step, "upper": upper, "budget_bytes": budget, "budget_source": budget_source, "entries": records,
            "paca_over_peft_lora_gc": ratio, "paper": "+23 % longest sequence vs LoRA (LLaMA3-8B)"}


# --- helpers -------------------------------------------------------------------------------------------


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: this checkout first on PYTHONPATH (whatever is installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env


STAGE_FUNCTIONS: dict[str, Callable[[Context], dict]] = {
    "device": stage_device, "tests": stage_tests, "bench": stage_bench, "planner": stage_planner, "max_context": stage_max_context,
}
