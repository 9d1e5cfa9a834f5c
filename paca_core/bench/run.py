"""Running ``paca bench`` (its flags are in :mod:`.command`): every entry in its own worker process, then
JSON, markdown and PNG plots; ``--mode max-context`` plans then measures the longest sequence per entry."""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from tqdm.auto import tqdm

import devices
from devices.profiles import UnknownProfileError, get_profile

from ..files import assets
from .. import extras
from ..errors import PacaConfigError
from ..files.outputs import check_output, publish_directory
from ..methods import external_method_modules, registered_methods
from ..plan.planner import MethodTracer, PlanSettings, search_largest
from ..plan.shapes import load_config
from ..workloads.byte_sizes import parse_bytes
from ..workloads.models import parse_model, synthetic_config
from ..workloads.specs import MethodSpec, parse_method_list, require_peer_versions, required_packages
from . import max_context, report
from .defaults import DEFAULT_ENTRIES, DEFAULT_METHODS
from .search import search_max
from .worker import DTYPES

logger = logging.getLogger(__name__)

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding paca_core/, devices/, backends/


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise PacaConfigError(f"{flag} takes positive integers, comma-separated (got {text!r}).")
    return values


def run_worker(job: dict, log_path: Path, timeout: float) -> dict:
    """Run one job in a fresh ``python -m paca_core.bench.worker`` process; its output goes to ``log_path``."""
    with tempfile.TemporaryDirectory(prefix="paca-bench-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        env = dict(os.environ)
        # The worker must import this very checkout, whatever is installed.
        env["PYTHONPATH"] = os.pathsep.join([str(_PACKAGE_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        command = [sys.executable, "-m", "paca_core.bench.worker", str(job_path), str(result_path)]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        shown = f"{log_path.parent.name}/{log_path.name} in --out"  # the staging folder is renamed when published
        with open(log_path, "w") as log:
            try:
                completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                return {"status": "error", "reason": f"worker timed out after {timeout:.0f} s (raise --worker-timeout); log: {shown}"}
        if result_path.is_file():
            return json.loads(result_path.read_text())
        tail = log_path.read_text()[-600:].strip().replace("\n", " | ")
        if completed.returncode in (-9, 137):
            return {"status": "oom", "reason": f"worker killed by the OS (out of host memory?); log: {shown}"}
        return {"status": "error", "reason": f"worker exited with {completed.returncode}: {tail}"}


def _environment(device_text: str | None) -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "peft", "bitsandbytes", "paca-hal"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    device = devices.resolve_device(device_text)
    auto = devices.default_dtype_choice(device)  # what --dtype auto trains in here, and why
    return {"device": str(device), "device_name": devices.device_name(device), "versions": versions, "platform": platform.platform(),
            "default_dtype": auto.name, "default_dtype_reason": auto.reason}


def _job_base(args: argparse.Namespace) -> dict:
    options = {"target_modules": args.target_modules}
    for method in registered_methods():  # each method's own bench flags (command.add_method_flags)
        options.update({flag: getattr(args, flag, None) for flag in method.bench_flags})
    job = {"device": args.device, "graph_mode": args.graph_mode, "dtype": args.dtype, "seed": args.seed, "options": options}
    modules = external_method_modules()  # methods registered from outside paca_core: the worker registers them too
    if modules:
        job["method_modules"] = modules
    return job


def _lr(spec: MethodSpec, args: argparse.Namespace, rank: int | None = None) -> float:
    return args.lr if args.lr is not None else spec.default_lr(rank)


def run_bench(args: argparse.Namespace) -> int:
    if args.mode == "max-context":
        return run_max_context(args)
    specs = parse_method_list(args.methods or ",".join(DEFAULT_METHODS))
    extras.require(required_packages(specs))  # before any work: a missing extra is named, nothing is run
    require_peer_versions(specs)  # peft-paca: peft >= 0.22, said in one line
    plots = extras.installed("matplotlib")
    seq_lens, batches = _int_list(args.seq_len, "--seq-len"), _int_list(args.batch_size, "--batch-size")
    ranks = _int_list(args.rank, "--rank")
    budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    parse_model(args.model)
    if args.mode != "speed" and parse_model(args.accuracy_model).kind == "synthetic":
        raise PacaConfigError("--accuracy-model needs real weights and a tokenizer: 'default' or a local model folder.")
    if args.steps < 1:
        raise PacaConfigError("--steps must be >= 1.")
    target = _checked_output(args)
    environment = _environment(args.device)  # also fails early for a missing device
    with publish_directory(target) as out:  # logs and results staged; the old output stays whole until this one is
        return _run_speed_and_accuracy(args, out, target.path, specs, seq_lens, batches, ranks, budget, environment, plots)


def _run_speed_and_accuracy(args: argparse.Namespace, out: Path, final: Path, specs, seq_lens, batches, ranks, budget,
                            environment: dict, plots: bool) -> int:
    """The speed and accuracy jobs, each in a worker process, written into ``out`` (published at ``final``)."""
    speed_jobs = _speed_jobs(args, specs, seq_lens, batches, ranks) if args.mode in ("speed", "both") else []
    accuracy_jobs = _accuracy_jobs(args, specs) if args.mode in ("accuracy", "both") else []
    bar = tqdm(total=len(speed_jobs) + len(accuracy_jobs), desc="bench", unit="method", disable=args.no_progress, dynamic_ncols=True)
    speed_records = _run_speed_jobs(args, speed_jobs, budget, out / "logs", bar)
    accuracy_records = _run_accuracy_jobs(args, accuracy_jobs, out / "logs", bar)
    bar.close()
    report.add_ratios(speed_records)
    _point_at_published(speed_records + accuracy_records, out, final)
    document = {
        "command": _command_line(),
        "environment": environment,
        "settings": {
            "model": args.model, "dtype": args.dtype, "graph_mode": args.graph_mode, "seq_lens": seq_lens, "batch_sizes": batches,
            "ranks": ranks, "match_params": args.match_params, "steps": args.steps, "warmup_steps": args.warmup_steps,
            "memory_budget": budget, "search": args.search,
            "accuracy": {"model": args.accuracy_model, "steps": args.accuracy_steps, "seq_len": args.accuracy_seq_len,
                         "batch_size": args.accuracy_batch_size, "rank": args.accuracy_rank, "data": args.data},
        },
        "speed": speed_records,
        "accuracy": accuracy_records,
    }
    _write_report(document, out, final, plots)
    failed = [r for r in speed_records + accuracy_records if r.get("status") == "error"]
    return 1 if failed else 0


def _speed_jobs(args: argparse.Namespace, specs, seq_lens, batches, ranks) -> list[tuple[dict, list[int]]]:
    """(job, the LoRA ranks it stands for): a method without a rank runs once for the whole group of ranks."""
    base = _job_base(args)
    jobs: list[tuple[dict, list[int]]] = []
    for seq in seq_lens:
        for batch in batches:
            for spec in specs:
                group = ranks if not spec.uses_rank else None
                for rank in ([ranks[0]] if group else ranks):
                    method_rank = spec.rank(rank, args.match_params)
                    job = dict(base, mode="speed", method=spec.name, model=args.model, seq_len=seq, batch_size=batch, rank=method_rank,
                               lr=_lr(spec, args, method_rank), steps=args.steps, warmup_steps=args.warmup_steps)
                    jobs.append((job, group or [rank]))
    return jobs


def _accuracy_jobs(args: argparse.Namespace, specs) -> list[dict]:
    base = _job_base(args)
    accuracy = {"data": args.data, "eval_fraction": 0.1, "eval_every": args.eval_every, "warmup_steps": min(5, args.accuracy_steps // 5)}
    return [dict(base, mode="accuracy", method=spec.name, model=args.accuracy_model, seq_len=args.accuracy_seq_len,
                 batch_size=args.accuracy_batch_size, rank=spec.rank(args.accuracy_rank, args.match_params),
                 lr=_lr(spec, args, spec.rank(args.accuracy_rank, args.match_params)), steps=args.accuracy_steps, accuracy=accuracy)
            for spec in specs]


def _run_speed_jobs(args: argparse.Namespace, jobs: list[tuple[dict, list[int]]], budget, logs: Path, bar) -> list[dict]:
    records: list[dict] = []
    for job, group in jobs:
        bar.set_postfix_str(f"{job['method']} seq {job['seq_len']} b {job['batch_size']} r {job['rank']}")
        started = time.perf_counter()
        result = run_worker(job, logs / f"speed-{_slug(job)}.log", args.worker_timeout)
        result["wall_s"] = time.perf_counter() - started
        if budget is not None and result.get("status") == "ok":
            bar.set_postfix_str(f"{job['method']}: searching max {args.search} under {args.memory_budget}")
            result["search"] = _search(job, args, budget, logs).as_dict()
        for rank in group:
            records.append(dict(result, method=job["method"], rank=job["rank"], group_rank=rank, seq_len=job["seq_len"],
                                batch_size=job["batch_size"], lr=job["lr"]))
        _log_result(job, result)
        bar.update(1)
    return records


def _run_accuracy_jobs(args: argparse.Namespace, jobs: list[dict], logs: Path, bar) -> list[dict]:
    records = []
    for job in jobs:
        bar.set_postfix_str(f"accuracy: {job['method']} r {job['rank']}")
        result = run_worker(job, logs / f"accuracy-{_slug(job)}.log", args.worker_timeout)
        records.append(dict(result, method=job["method"], rank=job["rank"], lr=job["lr"]))
        _log_result(job, result)
        bar.update(1)
    return records


def _write_report(document: dict, out: Path, final: Path, plots: bool) -> None:
    """bench.json, bench.md and the plots into ``out``; the paths printed are where they will be (``final``)."""
    outputs = [out / "bench.json", out / "bench.md"]
    report.write_json(outputs[0], document)
    outputs[1].write_text(report.markdown_report(document))
    if plots and document["speed"]:
        outputs += report.plot_speed(document["speed"], out)
    if plots and document["accuracy"]:
        outputs.append(report.plot_loss_curves(document["accuracy"], out))
    print(report.markdown_report(document))
    print("Wrote " + ", ".join(str(final / p.name) for p in outputs))
    if not plots:
        print(f"No PNG plots: matplotlib is not installed ({extras.install_hint('matplotlib')}).")


def run_max_context(args: argparse.Namespace) -> int:
    """The longest sequence each entry trains at under --memory-budget: planned, then measured (max_context.py)."""
    specs = parse_method_list(args.methods or DEFAULT_ENTRIES)
    max_context.check_entries(specs)
    extras.require(required_packages(specs))
    require_peer_versions(specs)
    if not args.memory_budget:
        raise PacaConfigError("--mode max-context needs --memory-budget (e.g. 1.25GiB): the budget each entry's step must fit.")
    budget = parse_bytes(args.memory_budget)
    device = devices.resolve_device(args.device)
    if not devices.shares_host_memory(device):
        raise PacaConfigError(f"--mode max-context measures live bytes on host tensors; on {device} use --mode speed with "
                              "--memory-budget (the device's own peak) instead.")
    batch = _int_list(args.batch_size, "--batch-size")[0]
    lora_rank = _int_list(args.rank, "--rank")[0]
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else devices.default_dtype(device)
    options = {k: v for k, v in _job_base(args)["options"].items() if v}
    config = _model_config(args.model)
    profile = None
    if args.plan_model:
        try:
            profile = get_profile(args.plan_profile)
        except UnknownProfileError as error:
            raise PacaConfigError(str(error)) from None
    target = _checked_output(args)
    environment = _environment(args.device)
    with publish_directory(target) as out:
        return _max_context_into(args, out, target.path, specs, batch, budget, lora_rank, dtype, options, config, profile, environment)


def _max_context_into(args: argparse.Namespace, out: Path, final: Path, specs, batch: int, budget: int, lora_rank: int, dtype,
                      options: dict, config, profile, environment: dict) -> int:
    """Each entry's longest sequence (searched, then planned on --plan-model), written into ``out`` (published at ``final``)."""
    records, planned_records = [], []
    bar = tqdm(total=len(specs) * (2 if profile else 1), desc="max-context", unit="entry", disable=args.no_progress, dynamic_ncols=True)
    for spec in specs:
        bar.set_postfix_str(spec.name)
        records.append(max_context.search_entry(config, spec, batch, budget, dtype, lora_rank, args.match_params, options).as_dict())
        bar.update(1)
    if profile is not None:
        big = load_config(args.plan_model)
        for spec in specs:
            bar.set_postfix_str(f"{spec.name} on {args.plan_model}")
            longest, context = max_context.planned_longest(big, spec, batch, profile.memory_limit(), DTYPES["bf16"], lora_rank,
                                                           args.match_params, options, profile=profile)
            planned_records.append({"method": spec.name, "levers": list(spec.levers), "batch_size": batch, "context": context,
                                    "budget_bytes": profile.memory_limit(), "planned_max_seq_len": longest, "capped": longest >= context})
            bar.update(1)
    bar.close()
    max_context.add_context_ratios(records)
    max_context.add_context_ratios(planned_records)
    document = {
        "command": _command_line(), "environment": environment,
        "settings": {"mode": "max-context", "model": args.model, "dtype": str(dtype).replace("torch.", ""), "batch_size": batch,
                     "rank": lora_rank, "match_params": args.match_params, "memory_budget": budget,
                     "plan_model": args.plan_model, "plan_profile": args.plan_profile if profile else None},
        "max_context": records, "planned_max_context": planned_records,
    }
    report.write_json(out / "bench.json", document)
    text = _context_report(document, budget, profile)
    (out / "bench.md").write_text(text)
    print(text)
    if extras.installed("matplotlib"):
        max_context.plot_context(records, out / "max_context.png", f"{args.model}, batch {batch}, budget {args.memory_budget} (this CPU)")
        if planned_records:
            max_context.plot_context(planned_records, out / "max_context_planned.png",
                                     f"{args.plan_model} on {args.plan_profile}, batch {batch} (simulated)")
    print(f"Wrote {final / 'bench.json'} and {final / 'bench.md'}")
    return 0


def _point_at_published(records: list[dict], staging: Path, final: Path) -> None:
    """Log paths in failure reasons name the folder as published, not the staging folder they were written in."""
    for record in records:
        if isinstance(record.get("reason"), str):
            record["reason"] = record["reason"].replace(str(staging), str(final))


def _checked_output(args: argparse.Namespace):
    """``--out`` against the output policy (paca_core.files.outputs), before any worker runs."""
    inputs = {"--data": None if args.data == "default" else args.data}
    for flag, value in (("--model", args.model), ("--accuracy-model", getattr(args, "accuracy_model", None))):
        if value and Path(str(value)).expanduser().exists():
            inputs[flag] = value
    return check_output(args.out, "bench", overwrite=args.overwrite, inputs=inputs, legacy=is_legacy_bench_output)


def is_legacy_bench_output(folder: Path, entries: set[str]) -> bool:
    """A ``paca bench`` folder from before outputs carried a marker: bench.json (its command and results), bench.md,
    plots and logs/."""
    if "bench.json" not in entries or any(name not in ("bench.json", "bench.md", "logs") and not name.endswith(".png") for name in entries):
        return False
    try:
        document = json.loads((folder / "bench.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and "command" in document and "environment" in document


def _context_report(document: dict, budget: int, profile) -> str:
    s, env = document["settings"], document["environment"]
    lines = ["# paca bench --mode max-context", "", f"- command: `{document['command']}`",
             f"- device: {env['device_name']} ({env['device']}); model {s['model']}, {s['dtype']}, batch {s['batch_size']}, "
             f"LoRA rank {s['rank']} (PaCA at matched parameters); budget {budget / 2**30:.2f} GiB",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), "",
             "Longest sequence whose training step's live-bytes high-water mark fits the budget: planned by `paca plan`'s "
             "trace, then measured by one real step at that length and one 64 tokens longer on this CPU (real tensors, full "
             "depth). Our methods run with paca train's chunked loss. Activation offload has no separate device memory to "
             "free on CPU, so its transfers run as the planner's stand-in: device bytes as on an accelerator, host copies "
             "counted apart.", "", max_context.context_markdown(document["max_context"]), ""]
    if document["planned_max_context"]:
        lines += [f"## {s['plan_model']} on {s['plan_profile']} (simulated, {profile.memory_limit() / 2**30:.1f} GiB device limit, bf16)", "",
                  max_context.context_markdown(document["planned_max_context"], measured=False), ""]
    return "\n".join(lines)


def _command_line() -> str:
    """The command as a user would type it (``paca bench ...``), for reports."""
    if "bench" in sys.argv:
        return "paca " + " ".join(sys.argv[sys.argv.index("bench") :])
    return "paca bench (called from Python with the arguments recorded under settings)"


def _slug(job: dict) -> str:
    name = job["method"].replace("+", "_")
    return f"{name}-s{job['seq_len']}-b{job['batch_size']}-r{job['rank']}"


def _log_result(job: dict, result: dict) -> None:
    if result.get("status") == "ok" and job["mode"] == "speed":
        logger.info("%s: %.0f ms/step, %.1f MiB counted", job["method"], result["median_step_s"] * 1000, result["counted"]["total_bytes"] / 2**20)
    elif result.get("status") == "ok":
        logger.info("%s: held-out loss %.4f -> %.4f", job["method"], result["held_out_loss_before"], result["held_out_loss"])
    else:
        logger.warning("%s (%s mode): %s: %s", job["method"], job["mode"], result.get("status"), result.get("reason"))


def _search(job: dict, args: argparse.Namespace, budget: int, logs: Path):
    """Largest seq (or batch) under ``budget`` for this method, one worker per probe."""
    key = "seq_len" if args.search == "seq" else "batch_size"
    step = args.search_step or (64 if key == "seq_len" else 1)
    upper = args.search_max or (131072 if key == "seq_len" else 4096)

    def probe(size: int) -> int | None:
        result = run_worker(dict(job, mode="probe", **{key: size}), logs / f"probe-{_slug(dict(job, **{key: size}))}.log", args.worker_timeout)
        if result.get("status") == "ok":
            return int(result["memory_bytes"])
        if result.get("status") != "oom":
            logger.warning("probe %s=%d of %s failed: %s", key, size, job["method"], result.get("reason"))
        return None

    return search_max(probe, job[key], budget, step=step, upper=upper, planned=_planned_size(job, key, budget, step, upper))


def _planned_size(job: dict, key: str, budget: int, step: int, upper: int) -> int | None:
    """``paca plan``'s answer for this search (a trace on fake tensors), so real probes only confirm it.
    None when the method or model cannot be planned (the search then probes from the start)."""
    try:
        device = devices.resolve_device(job.get("device"))
        dtype = DTYPES[job["dtype"]] if job.get("dtype") not in (None, "auto") else devices.default_dtype(device)
        counted = devices.runtime_for(device).shares_host_memory  # the probe reports counted bytes there, else the device peak
        tracer = MethodTracer(_model_config(job["model"]), job["method"], PlanSettings(dtype=dtype, rank=job.get("rank") or 8, match_params=False,
                              options=tuple(sorted((k, v) for k, v in job.get("options", {}).items() if v))), profiles=())

        def planned_bytes(size: int) -> int:
            b = tracer.measure(**dict({"seq_len": job["seq_len"], "batch_size": job["batch_size"]}, **{key: size})).bytes
            return sum(b[k] for k in ("weights", "gradients", "optimizer", "saved_activations", "host")) if counted else b["peak"]

        planned = search_largest(planned_bytes, budget, job[key], upper, step)
    except (PacaConfigError, ValueError, RuntimeError, NotImplementedError, TypeError) as error:
        logger.info("No plan for the %s search of %s (%s); probing from %d.", key, job["method"], error, job[key])
        return None
    logger.info("%s: planned largest %s under the budget: %d (confirming with real probes)", job["method"], key, planned)
    return planned or None


def _model_config(text: str):
    """The config of a bench --model (synthetic shape, 'default' or a folder), without loading weights."""
    choice = parse_model(text)
    if choice.kind == "synthetic":
        return synthetic_config(choice)
    return load_config(str(assets.resolve_model_path(choice.text)))
