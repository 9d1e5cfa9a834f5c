#!/usr/bin/env python3
"""Measure on a real device what ``paca plan`` predicts, for the published configurations at reduced depth.

    python scripts/validate_on_device.py --device cuda [--layers 4] [--out runs/validate-on-device]

(``scripts/validate_on_device.sh`` runs it with an 8-minute limit.) For each one-process row of
``docs/plan-published/rows.json`` it takes the row's own ``paca plan`` arguments, keeps the first
``--layers`` decoder layers of its model (``llama-3.1-8b-layers:4``: the same layer shapes, embeddings and
head), and, in a fresh process per configuration:

1. plans that configuration on the device's profile (``paca plan ... --no-search``, the planner's own code);
2. builds the model from its config with random weights on the device in the planned dtype, sets it up with
   the code ``paca bench`` and the planner share (:func:`paca_core.workloads.prepare.prepare`, the row's
   levers, gradient checkpointing, loss chunking) and runs real training steps through
   :func:`paca_core.train.steps.train_step` (the first creates the optimizer state, then ``--warmup`` and ``--steps``
   timed steps and one held-out batch, as the planner traces them);
3. records the allocator's peak allocated bytes (``devices.memory_stats``), its peak reserved bytes (the
   torch device module's ``max_memory_reserved`` where it has one), the memory the driver reports in use,
   and the median step time, beside the plan's allocated peak, reserved peak and step time.

The rows' published figures are for the full models; this checks the planner where a device can run in
seconds (at a reduced depth every decoder layer is still traced and stepped, so the per-layer bytes and the
fixed costs are what is checked). Rows that shard over several processes (FSDP, ZeRO) are listed as skipped:
one device cannot run them. On ``--device cpu`` the same path runs end to end on a small configuration
(``--model smollm2-135m --layers 1``): the CPU runtime reports process RSS, not allocator bytes, so allocated
and reserved are null there with the reason.

Writes ``results.json`` in ``--out`` after every configuration (an interrupted run keeps what it measured).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from paca_core.files.atomic import write_bytes_atomic  # noqa: E402  (torch-free)

ROWS_FILE = ROOT / "docs" / "plan-published" / "rows.json"
#: A device's name → the planner profile for it (``--profile`` overrides): the first fragment found wins.
PROFILE_BY_NAME = (("H200", "h200"), ("H100", "h100-80g"), ("HL-325", "gaudi3"), ("Gaudi3", "gaudi3"),
                   ("HL-225", "gaudi2"), ("Gaudi2", "gaudi2"))
#: Flags of a row's plan that the reduced-depth check replaces or drops (one process, no search, its own profile).
_DROPPED = {"--device-profile", "--memory-budget", "--world-size", "--workers", "--out"}
_DROPPED_SWITCHES = {"--no-search", "--overwrite", "--calibrate"}

logger = logging.getLogger("validate_on_device")


# --- which configurations -----------------------------------------------------------------------------


def _flag(argv: list[str], name: str) -> str | None:
    return next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name), None)


def _without(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _DROPPED:
            skip = True
            continue
        if arg in _DROPPED_SWITCHES:
            continue
        out.append(arg)
    return out


def reduced_configs(rows: list[dict], layers: int, model: str | None = None, seq_len: int | None = None,
                    batch_size: int | None = None, dtype: str | None = None) -> tuple[list[dict], list[dict]]:
    """(configurations to run, rows skipped with the reason). A configuration is the row's plan arguments with the
    model cut to ``layers`` decoder layers, at the row's published boundary where it has one (the longest sequence
    or largest batch that ran), else at the row's own shape; identical configurations run once."""
    configs: dict[tuple, dict] = {}
    skipped = []
    for row in rows:
        argv = list(row["plan"])
        if "--fsdp" in argv or "--zero" in argv:
            skipped.append({"id": row["id"], "reason": "shards over several processes (FSDP/ZeRO): one device cannot run it"})
            continue
        pub = row["published"]
        seq, batch = int(_flag(argv, "--seq-len")), int(_flag(argv, "--batch-size"))
        if pub["kind"] == "max_seq_len" and pub["value"]:
            seq = int(pub["value"])
        if pub["kind"] == "max_batch_size" and pub["value"]:
            batch = int(pub["value"])
        seq, batch = seq_len or seq, batch_size or batch
        base = _without(argv)
        base_model = model or _flag(base, "--model")
        index = base.index("--model")
        base[index + 1] = f"{base_model}-layers:{layers}"
        for flag, value in (("--seq-len", seq), ("--batch-size", batch)):
            base[base.index(flag) + 1] = str(value)
        if dtype:
            if "--dtype" in base:
                base[base.index("--dtype") + 1] = dtype
            else:
                base += ["--dtype", dtype]
        key = tuple(base)
        if key in configs:
            configs[key]["rows"].append(row["id"])
            continue
        note = "one process of the row's DDP run (gradient all-reduce not included)" if _flag(argv, "--world-size") not in (None, "1") else None
        configs[key] = {"rows": [row["id"]], "source": row["source"], "plan_args": base, "seq_len": seq, "batch_size": batch,
                        "note": note}
    return interleave_sources(list(configs.values())), skipped


def interleave_sources(configs: list[dict]) -> list[dict]:
    """Each source's first configuration, then each one's second...: a run cut short by its time budget has
    still checked every source."""
    groups: dict[str, list[dict]] = {}
    for config in configs:
        groups.setdefault(config["source"], []).append(config)
    out = []
    while any(groups.values()):
        for group in groups.values():
            if group:
                out.append(group.pop(0))
    return out


def profile_for(device_name: str, total_bytes: int | None, device_type: str) -> str | None:
    """The planner profile that describes this device, from its name (None: unknown, pass --profile)."""
    if device_type == "cpu":
        return "cpu"
    for fragment, profile in PROFILE_BY_NAME:
        if fragment.lower() in device_name.lower():
            return profile
    if "a100" in device_name.lower():
        return "a100-80g" if (total_bytes or 0) > 60 * (1 << 30) else "a100-40g"
    return None


# --- one configuration, in its own process --------------------------------------------------------------


def _plan(plan_args: list[str], profile: str) -> dict:
    """``paca plan`` (its own code, in this process) for the configuration on ``profile``; its one record."""
    from paca_core.cli.dispatch import main as paca_main

    with tempfile.TemporaryDirectory(prefix="validate-plan-") as tmp:
        out = Path(tmp) / "plan"
        code = paca_main(["plan", *plan_args, "--device-profile", profile, "--no-search", "--workers", "1", "--out", str(out)])
        if code != 0:
            raise RuntimeError(f"paca plan exited {code} for: {' '.join(plan_args)}")
        document = json.loads((out / "plan.json").read_text())
    record = document["records"][0]
    return {
        "allocated_peak_bytes": record["bytes"].get("allocated_peak", record["bytes"].get("peak")),
        "reserved_peak_bytes": record["bytes"].get("reserved_peak"),
        "fits": record.get("fits"),
        "step_seconds": record.get("step_seconds"),
        "dtype": document["settings"]["dtype"],
        "rank": record.get("rank"),
        "method": record.get("method"),
        "bytes": record["bytes"],
    }


def _reserved_peak(device) -> tuple[int | None, str]:
    """The allocator's peak reserved bytes from the torch module of the device's type (``torch.cuda``, the Gaudi
    bridge's ``torch.hpu``), where it has ``max_memory_reserved``; else None and why."""
    import torch

    module = getattr(torch, device.type, None)
    reader = getattr(module, "max_memory_reserved", None)
    if reader is None:
        return None, f"torch.{device.type} has no max_memory_reserved"
    try:
        return int(reader(device)), f"torch.{device.type}.max_memory_reserved"
    except (RuntimeError, TypeError) as error:  # a bridge without per-device stats
        return None, f"torch.{device.type}.max_memory_reserved failed: {error}"


def _reset_reserved_peak(device) -> None:
    import torch

    module = getattr(torch, device.type, None)
    reset = getattr(module, "reset_peak_memory_stats", None)
    if reset is not None:
        reset(device)


def _build(config, plan_args: list[str], dtype_name: str, device):
    """The configuration's model on ``device`` with random weights, set up as the planner traces it."""
    import torch
    from transformers import AutoModelForCausalLM

    import devices
    from paca_core.memory.loss_chunks import parse_loss_chunk_tokens
    from paca_core.train.steps import grads_to_none
    from paca_core.workloads.models import default_dtype
    from paca_core.workloads.prepare import apply_levers, prepare
    from paca_core.workloads.specs import parse_method_spec

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    spec = parse_method_spec(_flag(plan_args, "--methods"))
    rank = spec.rank(int(_flag(plan_args, "--rank") or 8), "--no-match-params" not in plan_args)
    options = {}
    if _flag(plan_args, "--target-modules"):
        options["target_modules"] = _flag(plan_args, "--target-modules")
    if spec.four_bit:
        options["quantize"] = _flag(plan_args, "--quantize") or "nf4"
    chunk = parse_loss_chunk_tokens(_flag(plan_args, "--loss-chunk-tokens") or "1024")
    torch.manual_seed(0)
    import transformers

    dtype_argument = {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}
    with torch.device(device), default_dtype(dtype):
        model = AutoModelForCausalLM.from_config(config, **dtype_argument)  # config.json's torch_dtype must not win
    if "--gradient-checkpointing" in plan_args:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prepared = prepare(spec, model, rank, options, device, lr=1e-4)
    prepared.module.train()
    if hasattr(prepared.module, "set_loss_chunk_tokens"):
        prepared.module.set_loss_chunk_tokens(chunk)
    levers = tuple(lever for lever in spec.levers if not (lever == "gc" and "--gradient-checkpointing" in plan_args))
    apply_levers(prepared, model, levers, loss_chunk_tokens=chunk)
    graph_mode = devices.resolve_graph_mode(device, "auto")  # as the bench worker: the device's default mode
    devices.apply_graph_mode(prepared.module, device, graph_mode)
    prepared.set_to_none = grads_to_none(prepared.module)  # captured graphs keep gradient buffers
    devices.synchronize(device)
    return prepared, int(config.vocab_size), graph_mode


def measure(job: dict) -> dict:
    """Plan, then run, one configuration (``job``: plan_args, seq_len, batch_size, device, profile, steps, warmup)."""
    import torch

    import devices
    from paca_core.errors import is_out_of_memory
    from paca_core.plan.shapes import load_config
    from paca_core.train.steps import summed_loss, train_step

    device = devices.resolve_device(job["device"])
    stats = devices.memory_stats(device)
    name = devices.device_name(device)
    profile = job.get("profile") or profile_for(name, stats.total_bytes, device.type)
    if profile is None:
        return {"status": "error", "reason": f"no planner profile known for {name!r}: pass --profile"}
    result: dict = {"device": str(device), "device_name": name, "profile": profile}
    plan_args = job["plan_args"]
    planned = _plan(plan_args, profile)
    result["predicted"] = planned
    config = load_config(_flag(plan_args, "--model"))
    try:
        prepared, vocab, result["graph_mode"] = _build(config, plan_args, planned["dtype"], device)
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (job["batch_size"], job["seq_len"]), generator=generator).to(device)

        def step():
            return train_step(prepared.forward, [ids], prepared.optimizer, device, params=prepared.params,
                              set_to_none=prepared.set_to_none).loss

        step()  # creates the optimizer state: every later step is a steady-state step, as the planner's
        devices.synchronize(device)
        before = devices.memory_stats(device).current_bytes
        devices.reset_peak_memory_stats(device)
        _reset_reserved_peak(device)
        for _ in range(job["warmup"]):
            step()
        times = []
        for _ in range(job["steps"]):
            devices.synchronize(device)
            started = time.perf_counter()
            loss = step()
            devices.synchronize(device)
            times.append(time.perf_counter() - started)
        module = prepared.module
        module.eval()
        with torch.no_grad():  # the held-out batch paca train runs (and the planner traces) with the optimizer state live
            summed_loss(module, ids, ids, None, getattr(module, "loss_chunk_tokens", None))
        module.train()
        devices.synchronize(device)
        after = devices.memory_stats(device)
        reserved, reserved_source = _reserved_peak(device)
        free = devices.free_memory_bytes(device)
    except Exception as error:  # an OOM is a result; anything else is reported with the configuration
        if is_out_of_memory(error):
            return {**result, "status": "oom", "reason": (str(error).splitlines() or [type(error).__name__])[0]}
        raise
    host = devices.shares_host_memory(device)
    measured = {
        "allocated_peak_bytes": None if host else after.peak_bytes,
        "allocated_source": after.source if not host else f"null: the {device.type} runtime reports process memory ({after.source}), not allocator bytes",
        "reserved_peak_bytes": None if host else reserved,
        "reserved_source": f"null: the {device.type} runtime has no caching allocator to read" if host else reserved_source,
        "process_peak_bytes": after.peak_bytes if host else None,
        "driver_used_bytes": None if host or free is None or after.total_bytes is None else after.total_bytes - free,
        "live_before_steps_bytes": before,
        "step_times_s": times,
        "median_step_s": statistics.median(times) if times else None,
        "loss": float(loss.detach().float()) if times else None,
    }
    result.update(status="ok", measured=measured, ratios=ratios(planned, measured))
    return result


def ratios(planned: dict, measured: dict) -> dict:
    """planned / measured for each figure both have."""
    out = {}
    for key, p_key, m_key in (("allocated", "allocated_peak_bytes", "allocated_peak_bytes"),
                              ("reserved", "reserved_peak_bytes", "reserved_peak_bytes"),
                              ("step_time", "step_seconds", "median_step_s")):
        p, m = planned.get(p_key), measured.get(m_key)
        out[key] = p / m if p is not None and m and math.isfinite(m) else None
    return out


def _worker(job_path: str, result_path: str) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    job = json.loads(Path(job_path).read_text())
    try:
        result = measure(job)
    except Exception as error:  # reported per configuration; the others still run
        import traceback

        result = {"status": "error", "reason": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
    Path(result_path).write_text(json.dumps(result, default=str))
    return 0


# --- the driver ---------------------------------------------------------------------------------------


def run_one(job: dict, timeout: float, in_process: bool) -> dict:
    if in_process:
        return measure(job)
    with tempfile.TemporaryDirectory(prefix="validate-job-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        try:
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(job_file), str(result_file)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "reason": f"over {timeout:.0f} s"}
        if not result_file.is_file():
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-6:])
            return {"status": "error", "reason": f"worker exit {done.returncode}: {tail}"}
        return json.loads(result_file.read_text())


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"commit": commit or None, "python": sys.version.split()[0], **found}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(*argv[1:3])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cuda, hpu, cpu or auto (devices.resolve_device)")
    parser.add_argument("--profile", default=None, help="the planner profile of this device (default: from its name)")
    parser.add_argument("--rows", type=Path, default=ROWS_FILE)
    parser.add_argument("--only", default=None, help="comma-separated row ids")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers kept of each model (default 4)")
    parser.add_argument("--model", default=None, help="replace every row's model (the CPU check: smollm2-135m)")
    parser.add_argument("--seq-len", type=int, default=None, help="replace every configuration's sequence length")
    parser.add_argument("--batch-size", type=int, default=None, help="replace every configuration's micro-batch")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="replace the planned dtype")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per configuration")
    parser.add_argument("--budget-seconds", type=float, default=450.0, help="start no configuration after this many seconds")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "runs" / "validate-on-device"))
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier results.json in --out")
    parser.add_argument("--in-process", action="store_true", help="run every configuration in this process (tests)")
    args = parser.parse_args(argv)
    target = args.out / "results.json"
    if target.exists() and not args.overwrite:
        parser.error(f"{target} exists: pass --overwrite to replace it, or another --out")
    if args.layers < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--layers and --steps must be at least 1, --warmup at least 0")
    rows = json.loads(args.rows.read_text(encoding="utf-8"))["rows"]
    if args.only:
        wanted = {i.strip() for i in args.only.split(",") if i.strip()}
        missing = wanted - {r["id"] for r in rows}
        if missing:
            parser.error(f"--only: no row {', '.join(sorted(missing))} in {args.rows}")
        rows = [r for r in rows if r["id"] in wanted]
    configs, skipped = reduced_configs(rows, args.layers, args.model, args.seq_len, args.batch_size, args.dtype)
    started = time.perf_counter()
    document = {
        "what": "paca plan's prediction against real training steps at reduced depth (scripts/validate_on_device.py)",
        "started_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": {"device": args.device, "profile": args.profile, "layers": args.layers, "steps": args.steps, "warmup": args.warmup},
        "environment": environment(), "skipped": skipped, "results": [],
    }
    for config in configs:
        elapsed = time.perf_counter() - started
        entry = {"rows": config["rows"], "plan_args": config["plan_args"], "seq_len": config["seq_len"],
                 "batch_size": config["batch_size"], "note": config["note"]}
        if elapsed > args.budget_seconds:
            document["results"].append({**entry, "status": "skipped", "reason": f"time budget ({args.budget_seconds:.0f} s) spent"})
        else:
            job = {"plan_args": config["plan_args"], "seq_len": config["seq_len"], "batch_size": config["batch_size"],
                   "device": args.device, "profile": args.profile, "steps": args.steps, "warmup": args.warmup}
            result = run_one(job, args.timeout, args.in_process)
            document["results"].append({**entry, **result})
            r = document["results"][-1]
            print(f"[{','.join(config['rows'])}] {r['status']}: {r.get('ratios') or r.get('reason', '')}", flush=True)
        document["seconds"] = round(time.perf_counter() - started, 1)
        write_bytes_atomic(target, (json.dumps(document, indent=1, default=str) + "\n").encode())
    statuses = [r["status"] for r in document["results"]]
    print(f"{statuses.count('ok')} measured, {len(statuses) - statuses.count('ok')} not, {len(skipped)} rows skipped "
          f"({document.get('seconds', 0):.0f} s); wrote {target}")
    return 0 if statuses and all(s in ("ok", "oom", "skipped") for s in statuses) else 1


if __name__ == "__main__":
    raise SystemExit(main())
