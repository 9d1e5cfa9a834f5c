"""Running ``paca plan`` (its flags are in :mod:`.command`): trace each method on fake tensors, simulate
each device profile, and write the table, plan.json, plan.md and the plots."""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

import devices
from devices.profiles import UnknownProfileError, calibrate_cpu, get_profile, measures_this_machine, save_calibration

from .. import extras
from ..files.outputs import check_output, publish_directory
from ..workloads.byte_sizes import parse_bytes
from ..memory.chunked_loss import parse_loss_chunk_tokens
from ..errors import PacaConfigError
from ..workloads.four_bit import four_bit_entries, four_bit_form
from ..workloads.specs import parse_method_spec, require_peer_versions
from .margin import parse_margin
from .planner import PlanSettings, plan_records
from .report import markdown_table, plot_plan
from .shapes import load_config
from .trace import NOT_TRACEABLE

logger = logging.getLogger(__name__)

#: --dtype (:data:`.command.DTYPE_CHOICES`) as a torch dtype.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def plan_dtype(name: str, profiles: list) -> tuple[str, str]:
    """The planned base's ``--dtype`` and why. ``auto``: what ``paca train --dtype auto`` trains in on each profile's
    device (its runtime's ``preferred_dtype``: bf16 on GPUs and Gaudi; the ``cpu`` profile is this machine, so bf16
    only where it multiplies bf16 natively, else fp32). Profiles whose devices disagree are all planned in bf16,
    the accelerators' default, with a warning."""
    if name != "auto":
        return name, f"--dtype {name}"
    choices = {profile.name: devices.runtime_for(profile.device_type).preferred_dtype() for profile in profiles}
    names = {choice.name for choice in choices.values()}
    if len(names) == 1:
        return names.pop(), "; ".join(f"{profile}: {choice.reason}" for profile, choice in choices.items())
    told = "; ".join(f"{profile}: {choice.reason}" for profile, choice in choices.items())
    logger.warning("--dtype auto: the profiles' devices train in different dtypes by default (%s); planning all in bf16. "
                   "Plan them separately, or pass --dtype, for each one's own default.", told)
    return "bf16", f"bf16: the profiles disagree ({told})"


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PacaConfigError(f"{flag} {text!r}: expected comma-separated positive integers, e.g. 512,2048.") from None
    if not values or min(values) <= 0:
        raise PacaConfigError(f"{flag} {text!r}: expected comma-separated positive integers, e.g. 512,2048.")
    return values


def _profiles(text: str, calibrate: bool) -> list:
    names = [n.strip() for n in text.split(",") if n.strip()]
    profiles = []
    for name in names:
        try:
            profile = get_profile(name)
        except UnknownProfileError as error:
            raise PacaConfigError(str(error)) from None
        if calibrate and measures_this_machine(name):
            profile = calibrate_cpu()
            path = save_calibration(profile)
            logger.info("CPU calibrated: %s (saved to %s)", _profile_line(profile), path)
        profiles.append(profile)
    if calibrate and not any(measures_this_machine(n) for n in names):
        raise PacaConfigError("--calibrate measures this CPU: add 'cpu' to --device-profile.")
    return profiles


def _profile_line(profile) -> str:
    return (f"fp32 matmul {profile.matmul_flops.get('fp32', 0) / 1e9:.1f} GFLOP/s, bf16 {profile.matmul_flops.get('bf16', 0) / 1e9:.1f} GFLOP/s, "
            f"bandwidth {profile.memory_bandwidth / 1e9:.1f} GB/s, launch {profile.launch_overhead_s * 1e6:.1f} µs")


def _quantized_methods(methods: list[str], kind: str | None) -> list[str]:
    """``methods`` with ``--quantize``: each method that has a 4-bit form (``Method.four_bit_form``, a
    peer's) planned in that form."""
    if kind is None:
        return methods
    four_bit = set(four_bit_entries())
    forms = {m: four_bit_form(m) for m in methods}
    plain = [m for m in methods if forms[m] is None and m not in four_bit]
    if plain:
        logger.info("--quantize %s: %s %s no 4-bit form in paca-hal and %s planned on the --dtype base.", kind, ", ".join(plain),
                    "has" if len(plain) == 1 else "have", "is" if len(plain) == 1 else "are")
    return list(dict.fromkeys(forms[m] or m for m in methods))


def _check_methods(methods: list[str], profiles: list, kind: str) -> None:
    """Refuse, before any tracing, a method the planner cannot trace or a profile cannot run."""
    for method in methods:
        if method in NOT_TRACEABLE:
            raise PacaConfigError(f"{method}: {NOT_TRACEABLE[method]}")
        spec = parse_method_spec(method)
        if not spec.four_bit:
            continue
        if importlib.util.find_spec("bitsandbytes") is None:
            raise PacaConfigError(f"{method} plans a bitsandbytes 4-bit base: pip install 'paca-hal[quant]' (the planner "
                                  "traces bitsandbytes' own quantize and dequantize ops, on fake tensors).")
        for profile in profiles:
            if profile.supports_4bit(kind):
                continue
            if profile.four_bit_types:
                remedy = f"use --quantize {profile.four_bit_types[0]} (the 4-bit types it has: {', '.join(profile.four_bit_types)})"
            else:
                remedy = "plan on the --dtype base instead (no --quantize, no 4-bit entries)"
            raise PacaConfigError(f"{method} cannot run on {profile.name}: bitsandbytes has no {kind} kernels there (the "
                                  f"profile's four_bit_types and its source say so); {remedy}.")


def library_versions() -> dict[str, str | None]:
    """The libraries a traced step depends on (e.g. whether the loss makes an fp32 copy of the logits): recorded
    beside torch's version in plan.json so a plan can be matched to the stack it was made on."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("transformers", "peft", "bitsandbytes", "deepspeed", "accelerate"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def run_plan(args: argparse.Namespace) -> int:
    """``paca plan``: trace each method, write the table (and with --out plan.json, plan.md and plots)."""
    started = time.perf_counter()
    from .preflight import check_plan_arguments

    check_plan_arguments(args)  # flags that would plan nothing, before any tracing
    methods = _quantized_methods([m.strip().lower() for m in args.methods.split(",") if m.strip()], args.quantize)
    require_peer_versions([parse_method_spec(method) for method in methods])  # unknown names, peft-paca on peft < 0.22: before any work
    seq_lens, batch_sizes = _ints(args.seq_len, "--seq-len"), _ints(args.batch_size, "--batch-size")
    if args.world_size < 1:
        raise PacaConfigError("--world-size must be at least 1.")
    if args.fsdp and args.world_size < 2:
        raise PacaConfigError("--fsdp shards over --world-size ranks: pass --world-size 2 or more.")
    if args.zero and args.world_size < 2:
        raise PacaConfigError("--zero shards over --world-size ranks: pass --world-size 2 or more.")
    if args.zero and args.fsdp:
        raise PacaConfigError("--zero and --fsdp are two engines for the same job: choose one.")
    if args.rank < 1:
        raise PacaConfigError("--rank must be at least 1.")
    if args.workers < 1:
        raise PacaConfigError("--workers must be at least 1.")
    budget = parse_bytes(args.memory_budget) if args.memory_budget is not None else None
    target = None
    if args.out is not None:  # before any tracing: the output policy (paca_core.files.outputs)
        local_model = args.model if Path(str(args.model)).expanduser().exists() else None
        target = check_output(args.out, "plan", overwrite=args.overwrite, inputs={"--model": local_model}, legacy=is_legacy_plan_output)
    config = load_config(args.model)
    profiles = _profiles(args.device_profile, args.calibrate)
    kind = args.quantize or "nf4"
    _check_methods(methods, profiles, kind)
    args.dtype, dtype_reason = plan_dtype(args.dtype, profiles)
    logger.info("Planning a %s base: %s", args.dtype, dtype_reason)
    settings = PlanSettings(dtype=DTYPES[args.dtype], memory_budget=budget, rank=args.rank, match_params=args.match_params,
                            gradient_checkpointing=args.gradient_checkpointing, world_size=args.world_size, fsdp=args.fsdp, zero=args.zero,
                            options=(("target_modules", args.target_modules),) if args.target_modules else (),
                            loss_chunk_tokens=parse_loss_chunk_tokens(args.loss_chunk_tokens),
                            offload_activations=args.offload_activations, quantize=kind,
                            margin=parse_margin(getattr(args, "margin", None)))
    records = plan_records(config, args.model, methods, profiles, settings, seq_lens, batch_sizes,
                           progress=lambda m: logger.info("Tracing %s on %s (fake tensors, no weights)", m, args.model),
                           search=args.search, workers=args.workers)
    elapsed = time.perf_counter() - started
    document = {
        "command": "paca " + " ".join(sys.argv[sys.argv.index("plan"):]) if "plan" in sys.argv else "paca plan (from Python)",
        "model": args.model,
        "settings": {"offload_activations": args.offload_activations, "target_modules": args.target_modules, "loss_chunk_tokens": args.loss_chunk_tokens, "quantize": args.quantize, "dtype": args.dtype, "dtype_reason": dtype_reason, "rank": args.rank, "match_params": args.match_params, "gradient_checkpointing": args.gradient_checkpointing,
                     "world_size": args.world_size, "fsdp": args.fsdp, "zero": args.zero, "memory_budget": budget, "margin": getattr(args, "margin", None), "layout": settings.layout(), "seq_lens": seq_lens, "batch_sizes": batch_sizes},
        "profiles": {p.name: p.to_dict() for p in profiles},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, **library_versions(),
                        "planner_seconds": round(elapsed, 1)},
        "notes": NOTES + list(dict.fromkeys(note for r in records for note in r["notes"])),
        "records": records,
    }
    table = markdown_table(records)
    print(table)
    print(f"\n({elapsed:.0f} s; simulated from traced steps and device profiles, not measured on the hardware)")
    for note in document["notes"][len(NOTES):]:
        print(f"Note: {note}")
    if target is not None:
        with publish_directory(target) as staging:  # the old output stays whole until the new one is complete
            (staging / "plan.json").write_text(json.dumps(document, indent=1, default=str))
            (staging / "plan.md").write_text(markdown_document(document, table))
            plots = plot_plan(records, staging) if extras.installed("matplotlib") else []
        for path in plots:
            logger.info("Wrote %s", target.path / path.name)
        if not extras.installed("matplotlib"):
            print(f"No PNG plots: matplotlib is not installed ({extras.install_hint('matplotlib')}).")
        print(f"Wrote {target.path / 'plan.json'} and {target.path / 'plan.md'}")
    return 0


def is_legacy_plan_output(folder: Path, entries: set[str]) -> bool:
    """A ``paca plan --out`` folder from before outputs carried a marker: plan.json (with its records), plan.md, plots."""
    if not {"plan.json"} <= entries or any(name not in ("plan.json", "plan.md") and not name.endswith(".png") for name in entries):
        return False
    try:
        document = json.loads((folder / "plan.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and "records" in document and "profiles" in document


NOTES = [
    "Simulated: one real training step traced on fake tensors (paca_core/plan), timed by a roofline per kernel on the "
    "profile's cited peak throughput (GEMMs at the share their shape reaches, the profile's efficiency curve) and "
    "bandwidth plus launch overhead; not a measurement on the device.",
    "bytes.peak is what the step's tensors hold (exact for the traced ops); allocated_peak / reserved_peak replay the "
    "step's allocations through the profile's allocator model (paca_core/plan/allocator.py: PyTorch's CUDA caching "
    "allocator, the Gaudi bridge's pool, or none on CPU); device_total adds what the runtime holds outside the allocator "
    "(CUDA context, NCCL/HCCL buffers when --world-size > 1); 'fits' compares device_total with usable_bytes: the "
    "profile's memory (or --memory-budget) less a margin for untraced overhead, sized per regime from the worst optimism "
    "measured on published rows (record 'margin'; --margin overrides it); the bytes themselves stay unpadded. Each figure's source is in the profile.",
    "Attention is traced through the CPU's fused SDPA kernel, which keeps what the flash/fused kernels on CUDA and Gaudi keep; "
    "'flops' counts it as torch's FlopCounterMode does, while the time charges what a fused causal kernel computes (the key "
    "blocks on or below the diagonal, about half) at the profile's attention share of the peak.",
    "With --fsdp or --zero 3, bytes per rank shard weights, gradients and optimizer state by 1/N and add two decoder "
    "layers of all-gather buffers (--zero 2: gradients and optimizer state; --zero 1: optimizer state); DeepSpeed's fp32 "
    "master copies of trainable parameters under bf16 are not modelled.",
    "With --world-size N, step_seconds is per rank and includes the communication left exposed by the overlap rule "
    "(ring collectives over the profile's intra-node link, hierarchical across nodes of devices_per_node; "
    "paca_core/plan/communication.py); each record's 'communication' gives bytes per rank, seconds and exposed seconds.",
]


def markdown_document(document: dict, table: str) -> str:
    lines = [f"# paca plan: {document['model']}", "", f"- command: `{document['command']}`",
             f"- settings: {json.dumps(document['settings'])}", f"- planner time: {document['environment']['planner_seconds']} s", ""]
    for name, profile in document["profiles"].items():
        lines.append(f"- profile `{name}`: {profile['description']}")
    lines += ["", table, "", "## Notes", ""] + [f"- {n}" for n in document["notes"]]
    return "\n".join(lines) + "\n"

