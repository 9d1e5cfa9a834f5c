"""``paca doctor``'s driver: the stages in order, each with its own time budget under one global deadline, and
proof.json + proof.md rewritten after every stage, so a run cut short (the wrapper's hard limit, a crash in a
later stage, Ctrl-C) still leaves every stage it finished. The output folder follows the output policy of
:mod:`paca_core.files.outputs` (a new or empty folder, or an earlier doctor output with --overwrite)."""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .._version import __version__
from ..files.atomic import write_bytes_atomic
from ..errors import PacaConfigError
from ..files.outputs import RunFolder, check_output
from . import report
from .schema import SCHEMA_NAME, STAGES, STATUSES, check_proof

logger = logging.getLogger(__name__)

#: Seconds each stage may take, by mode. Full: 420 s in all, the wrapper's 480 s limit leaves a minute to spare.
BUDGETS: dict[str, dict[str, float]] = {
    "full": {"device": 20, "tests": 120, "bench": 140, "planner": 70, "max_context": 70},
    "quick": {"device": 15, "tests": 45},
    "dry-run": {"device": 10, "tests": 60, "bench": 40, "planner": 40, "max_context": 30},
}
PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "pytest", "habana-torch-plugin", "paca-hal")


class _Terminated(BaseException):
    """SIGTERM (the wrapper's time limit): stop the running stage, record it, write the proof."""


def _mode(args: argparse.Namespace) -> str:
    return "dry-run" if args.dry_run else ("quick" if args.quick else "full")


def _stages(args: argparse.Namespace, mode: str) -> list[str]:
    default = list(BUDGETS[mode])
    if not args.stages:
        return default
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STAGES]
    if unknown or not wanted:
        raise PacaConfigError(f"--stages {args.stages!r}: choose from {', '.join(STAGES)} (comma-separated).")
    return [s for s in STAGES if s in wanted]


def _commit() -> str | None:
    """The checkout's commit; on a copy without .git (a lent machine), $PACA_PROOF_COMMIT as the wrapper passes it."""
    from .stages import PACKAGE_ROOT

    if os.environ.get("PACA_PROOF_COMMIT"):
        return os.environ["PACA_PROOF_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def environment() -> dict:
    """Python, platform, the packages that decide what runs, and the settings that change device behaviour."""
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    settings = {k: v for k, v in os.environ.items() if k.startswith(("PT_HPU_", "HABANA_", "CUDA_VISIBLE", "PYTORCH_CUDA_ALLOC", "PACA_"))}
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(), "packages": packages,
            "settings": settings}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _command_line() -> str:
    if "doctor" in sys.argv:
        return "paca " + " ".join(sys.argv[sys.argv.index("doctor"):])
    return "paca doctor (called from Python)"


def run_doctor(args: argparse.Namespace) -> int:
    """Run the stages; 0 when none failed or ran out of time, 1 otherwise (proof.json says which)."""
    import devices

    from .stages import STAGE_FUNCTIONS, Context, StageFailed, StageSkipped

    mode = _mode(args)
    if args.deadline <= 0:
        raise PacaConfigError(f"--deadline must be a positive number of seconds (got {args.deadline:g}).")
    if mode == "dry-run" and args.device not in (None, "auto", "cpu"):
        raise PacaConfigError(f"--dry-run runs every stage on the CPU; drop --device {args.device}.")
    names = _stages(args, mode)
    target = check_output(args.out, "doctor", overwrite=args.overwrite)
    device = devices.resolve_device("cpu" if mode == "dry-run" else args.device)
    folder = RunFolder(target)
    logs = folder.claim("logs")
    logs.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    ctx = Context(device=device, mode=mode, logs=logs, deadline=start + args.deadline, progress=not args.no_progress)
    proof = {
        "schema": SCHEMA_NAME, "tool": "paca-hal", "version": __version__, "commit": _commit(), "command": _command_line(), "mode": mode,
        "dry_run": mode == "dry-run", "hardware_measurement": mode != "dry-run" and not devices.shares_host_memory(device),
        "device": str(device), "started_at": _now(), "finished_at": None, "seconds": 0.0, "deadline_s": float(args.deadline),
        "complete": False, "environment": environment(), "stages": [], "summary": {s: 0 for s in STATUSES},
    }
    logger.info("paca doctor (%s) on %s: stages %s, deadline %.0f s; writing %s", mode, device, ", ".join(names), args.deadline, target.path)

    def on_term(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    stopped = None
    try:
        for name in names:
            record = {"name": name, "status": "skipped", "reason": None, "seconds": 0.0, "budget_s": 0.0, "result": {}}
            left = ctx.deadline - time.monotonic()
            if stopped is not None:
                record["reason"] = stopped
            elif left <= 0:
                record["reason"] = f"the run's deadline ({args.deadline:.0f} s) came before this stage started"
            else:
                budget = min(BUDGETS[mode].get(name, 60.0), left)
                record["budget_s"] = round(budget, 1)
                ctx.stage_end = time.monotonic() + budget
                began = time.monotonic()
                try:
                    record["result"] = STAGE_FUNCTIONS[name](ctx)
                    record["status"] = "ok"
                except StageSkipped as error:
                    record["reason"] = str(error)
                except StageFailed as error:
                    record.update(status="failed", reason=str(error), result=error.result)
                except (_Terminated, KeyboardInterrupt) as error:
                    what = "SIGTERM (the wrapper's time limit)" if isinstance(error, _Terminated) else "Ctrl-C"
                    record.update(status="timeout", reason=f"stopped by {what} while running")
                    stopped = f"not started: the run was stopped by {what}"
                except Exception as error:  # a stage's bug or a device error: recorded, the next stage still runs
                    logger.warning("stage %s failed: %s", name, error, exc_info=logger.isEnabledFor(logging.DEBUG))
                    record.update(status="failed", reason=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                                  result={"traceback": traceback.format_exc()[-3000:]})
                record["seconds"] = round(time.monotonic() - began, 2)
                ctx.earlier[name] = record["result"]
            proof["stages"].append(record)
            logger.info("stage %s: %s%s (%.1f s)", name, record["status"], f": {record['reason']}" if record["reason"] else "", record["seconds"])
            _write(folder, proof, start, finished=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    proof["complete"] = stopped is None and all(s["status"] != "timeout" for s in proof["stages"])
    _write(folder, proof, start, finished=True)
    print(report.markdown(proof))
    print(f"Wrote {target.path / 'proof.json'} and {target.path / 'proof.md'}")
    return 0 if not any(s["status"] in ("failed", "timeout") for s in proof["stages"]) else 1


def _write(folder: RunFolder, proof: dict, start: float, finished: bool) -> None:
    """proof.json and proof.md, each replaced atomically; the JSON is checked against its schema first."""
    proof["seconds"] = round(time.monotonic() - start, 1)
    proof["summary"] = {status: sum(1 for s in proof["stages"] if s["status"] == status) for status in STATUSES}
    if finished:
        proof["finished_at"] = _now()
    problems = check_proof(proof)
    if problems:  # a bug in the doctor: say so, but keep what was measured
        logger.error("proof.json does not match its schema: %s", "; ".join(problems))
    write_bytes_atomic(folder.claim("proof.json"), (json.dumps(proof, indent=1, default=str) + "\n").encode())
    write_bytes_atomic(folder.claim("proof.md"), report.markdown(proof).encode())
