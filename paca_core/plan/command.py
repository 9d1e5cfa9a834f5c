"""``paca plan``: what fits and how fast on accelerators this machine does not have.

Every number comes from tracing one real training step of the method on fake tensors (no weights,
ever) and a device profile with a cited source for each figure (devices/profiles.json); see
docs/plan.md for how the simulation was checked on this CPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

from devices.profiles import FOUR_BIT_TYPES, UnknownProfileError, calibrate_cpu, get_profile, load_profiles, measures_this_machine, save_calibration

from .. import extras
from ..atomic import write_bytes_atomic
from ..chunked_loss import DEFAULT_LOSS_CHUNK_TOKENS, parse_loss_chunk_tokens
from ..errors import PacaConfigError
from .planner import PlanSettings, plan_records
from .report import markdown_table, plot_plan
from .shapes import known_shapes, load_config
from .trace import QUANTIZED

logger = logging.getLogger(__name__)

DEFAULT_METHODS = "paca,lora,lorafa,velora,peft-lora,full,floor"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PacaConfigError(f"{flag} {text!r}: expected comma-separated positive integers, e.g. 512,2048.") from None
    if not values or min(values) <= 0:
        raise PacaConfigError(f"{flag} {text!r}: expected comma-separated positive integers, e.g. 512,2048.")
    return values


def add_plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="predict memory, the largest sequence/batch that fits and step time on A100/H100/H200/Gaudi2/Gaudi3 (no hardware needed)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", default="llama-3.1-8b",
                   help=f"a built-in shape ({', '.join(known_shapes())}), a local HF model folder, or a config.json")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated paca train / paca bench method names (PEFT peers: peft-lora, peft-lorafa; "
                   "4-bit bases: qpaca, peft-qlora)")
    p.add_argument("--device-profile", default="h100-80g", help=f"comma-separated profiles: {', '.join(load_profiles())}")
    p.add_argument("--calibrate", action="store_true", help="with the cpu profile: measure this CPU's GEMM throughput and memory bandwidth first (saved for later plans)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--seq-len", default="512,2048,8192", help="comma-separated sequence lengths")
    p.add_argument("--batch-size", default="1,8", help="comma-separated micro-batch sizes")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank; PaCA and LoRA-FA run at the rank with LoRA's trainable parameters (2x) unless --no-match-params")
    p.add_argument("--no-match-params", dest="match_params", action="store_false", help="every method at --rank")
    p.add_argument("--target-modules", default=None, help="comma-separated module names or all-linear (default: the 7 LLaMA projections, as paca train)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="HF gradient checkpointing (recompute each decoder layer in backward)")
    p.add_argument("--loss-chunk-tokens", default=str(DEFAULT_LOSS_CHUNK_TOKENS), metavar="N|off",
                   help="our methods' LM head + loss in chunks of N tokens, as paca train runs them ('off': full logits; the PEFT "
                   f"peers and full have no chunked loss) (default {DEFAULT_LOSS_CHUNK_TOKENS})")
    p.add_argument("--offload-activations", default=None, metavar="MODULES",
                   help="plan with what autograd saves inside these modules in host memory ('decoder-layers', names or a regex), "
                   "as paca train --offload-activations does on a GPU/HPU")
    p.add_argument("--quantize", choices=FOUR_BIT_TYPES, default=None,
                   help="plan on a 4-bit bitsandbytes base: paca as QPaCA and peft-lora as PEFT QLoRA (methods without a 4-bit "
                   "form stay on the --dtype base); qpaca and peft-qlora in --methods use it too (default nf4)")
    p.add_argument("--world-size", type=int, default=1, help="processes (with --fsdp: bytes per rank)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 full sharding over --world-size ranks")
    p.add_argument("--zero", type=int, choices=(1, 2, 3), default=0,
                   help="DeepSpeed ZeRO stage over --world-size ranks (paca train --deepspeed zeroN): 1 shards optimizer state, "
                   "2 also gradients, 3 also the frozen base weights (bytes per rank as FSDP2's)")
    p.add_argument("--no-search", dest="search", action="store_false", help="skip the max_seq_len / max_batch_size searches")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes tracing methods side by side (tracing is single-threaded)")
    p.add_argument("--out", type=Path, default=None, help="write plan.json, plan.md and PNG plots here")
    p.set_defaults(handler=run_plan)


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


#: The 4-bit form of each method that has one (``--quantize``).
QUANTIZED_FORMS = {"paca": "qpaca", "peft-lora": "peft-qlora"}


def _quantized_methods(methods: list[str], kind: str | None) -> list[str]:
    """``methods`` with ``--quantize``: each method that has a 4-bit form planned in that form."""
    if kind is None:
        return methods
    plain = [m for m in methods if m not in QUANTIZED_FORMS and m not in QUANTIZED]
    if plain:
        logger.info("--quantize %s: %s %s no 4-bit form in paca-hal and %s planned on the --dtype base.", kind, ", ".join(plain),
                    "has" if len(plain) == 1 else "have", "is" if len(plain) == 1 else "are")
    return list(dict.fromkeys(QUANTIZED_FORMS.get(m, m) for m in methods))


def _check_methods(methods: list[str], profiles: list, kind: str) -> None:
    """Refuse, before any tracing, a method the planner cannot trace or a profile cannot run."""
    from .trace import NOT_TRACEABLE

    for method in methods:
        if method in NOT_TRACEABLE:
            raise PacaConfigError(f"{method}: {NOT_TRACEABLE[method]}")
        if method not in QUANTIZED:
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
                remedy = "plan paca or peft-lora on the --dtype base instead"
            raise PacaConfigError(f"{method} cannot run on {profile.name}: bitsandbytes has no {kind} kernels there (the "
                                  f"profile's four_bit_types and its source say so); {remedy}.")


def run_plan(args: argparse.Namespace) -> int:
    import torch

    from ..bench.specs import parse_method_spec

    started = time.perf_counter()
    methods = _quantized_methods([m.strip().lower() for m in args.methods.split(",") if m.strip()], args.quantize)
    for method in methods:
        parse_method_spec(method)  # unknown names fail before any work
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
    config = load_config(args.model)
    profiles = _profiles(args.device_profile, args.calibrate)
    kind = args.quantize or "nf4"
    _check_methods(methods, profiles, kind)
    settings = PlanSettings(dtype=getattr(torch, DTYPES[args.dtype]), rank=args.rank, match_params=args.match_params,
                            gradient_checkpointing=args.gradient_checkpointing, world_size=args.world_size, fsdp=args.fsdp, zero=args.zero,
                            options=(("target_modules", args.target_modules),) if args.target_modules else (),
                            loss_chunk_tokens=parse_loss_chunk_tokens(args.loss_chunk_tokens),
                            offload_activations=args.offload_activations, quantize=kind)
    records = plan_records(config, args.model, methods, profiles, settings, seq_lens, batch_sizes,
                           progress=lambda m: logger.info("Tracing %s on %s (fake tensors, no weights)", m, args.model),
                           search=args.search, workers=args.workers)
    elapsed = time.perf_counter() - started
    document = {
        "command": "paca " + " ".join(sys.argv[sys.argv.index("plan"):]) if "plan" in sys.argv else "paca plan (from Python)",
        "model": args.model,
        "settings": {"offload_activations": args.offload_activations, "target_modules": args.target_modules, "loss_chunk_tokens": args.loss_chunk_tokens, "quantize": args.quantize, "dtype": args.dtype, "rank": args.rank, "match_params": args.match_params, "gradient_checkpointing": args.gradient_checkpointing,
                     "world_size": args.world_size, "fsdp": args.fsdp, "zero": args.zero, "seq_lens": seq_lens, "batch_sizes": batch_sizes},
        "profiles": {p.name: p.to_dict() for p in profiles},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "planner_seconds": round(elapsed, 1)},
        "notes": NOTES + list(dict.fromkeys(note for r in records for note in r["notes"])),
        "records": records,
    }
    table = markdown_table(records)
    print(table)
    print(f"\n({elapsed:.0f} s; simulated from traced steps and device profiles, not measured on the hardware)")
    for note in document["notes"][len(NOTES):]:
        print(f"Note: {note}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(args.out / "plan.json", json.dumps(document, indent=1, default=str).encode())
        write_bytes_atomic(args.out / "plan.md", markdown_document(document, table).encode())
        if extras.installed("matplotlib"):
            for path in plot_plan(records, args.out):
                logger.info("Wrote %s", path)
        else:
            print(f"No PNG plots: matplotlib is not installed ({extras.install_hint('matplotlib')}).")
        print(f"Wrote {args.out / 'plan.json'} and {args.out / 'plan.md'}")
    return 0


NOTES = [
    "Simulated: one real training step traced on fake tensors (paca_core/plan), timed by a roofline per kernel on the "
    "profile's cited peak throughput and bandwidth plus launch overhead; not a measurement on the device.",
    "Bytes are what the step allocates through PyTorch (exact for the traced ops); allocator fragmentation and "
    "communication buffers other than FSDP's all-gathers are not included.",
    "Attention is traced through the CPU's fused SDPA kernel, which keeps what the flash/fused kernels on CUDA and Gaudi keep; "
    "its FLOPs are counted as torch's FlopCounterMode counts flash attention (no causal halving).",
    "With --fsdp or --zero 3, bytes per rank shard weights, gradients and optimizer state by 1/N and add two decoder "
    "layers of all-gather buffers (--zero 2: gradients and optimizer state; --zero 1: optimizer state); communication "
    "time and DeepSpeed's fp32 master copies of trainable parameters under bf16 are not modelled.",
]


def markdown_document(document: dict, table: str) -> str:
    lines = [f"# paca plan: {document['model']}", "", f"- command: `{document['command']}`",
             f"- settings: {json.dumps(document['settings'])}", f"- planner time: {document['environment']['planner_seconds']} s", ""]
    for name, profile in document["profiles"].items():
        lines.append(f"- profile `{name}`: {profile['description']}")
    lines += ["", table, "", "## Notes", ""] + [f"- {n}" for n in document["notes"]]
    return "\n".join(lines) + "\n"


__all__ = ["add_plan_parser", "run_plan"]
