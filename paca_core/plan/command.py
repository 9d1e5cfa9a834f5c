"""``paca plan``'s flags: what fits and how fast on accelerators this machine does not have.

Cheap to import (no torch, transformers or peft at module level): the CLI builds every subcommand's
parser before it knows which one runs; :mod:`.run` does the work. Every number comes from tracing one
real training step of the method on fake tensors (no weights, ever) and a device profile with a cited
source for each figure (devices/profiles.json); see docs/plan.md for how the simulation was checked
on this CPU.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..flags.help_format import HelpFormatter
from ..workloads.peers import PEERS, everyday_peers
from .shapes import known_shapes

DESCRIPTION = "``paca plan``: what fits and how fast on accelerators this machine does not have."
#: What ``paca plan`` compares when --methods is not given.
DEFAULT_METHODS = "paca,lora,lorafa,velora,peft-lora,full,floor"
#: --dtype choices (the planned base's dtype; auto: what paca train --dtype auto trains in on each profile's device).
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")


def add_plan_parser(sub) -> None:
    """Register ``paca plan`` on the CLI's subparsers."""
    from devices.profiles import FOUR_BIT_TYPES, load_profiles  # the profiles' names and 4-bit types

    from ..memory.loss_chunks import DEFAULT_LOSS_CHUNK_TOKENS
    from ..workloads.four_bit import four_bit_entries, four_bit_forms

    peft_peers = [name for name in everyday_peers() if PEERS[name].kind == "peft"]
    forms = ", ".join(f"{name} as {form}" for name, form in four_bit_forms().items())
    p = sub.add_parser(
        "plan",
        help="predict memory, the largest sequence/batch that fits and step time on A100/H100/H200/Gaudi2/Gaudi3 (no hardware needed)",
        description=DESCRIPTION, formatter_class=HelpFormatter, allow_abbrev=False,
    )
    p.add_argument("--model", default="llama-3.1-8b",
                   help=f"a built-in shape ({', '.join(known_shapes())}), a local HF model folder, or a config.json")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated paca train / paca bench method names (PEFT peers: "
                   f"{', '.join(peft_peers)}; 4-bit bases: {', '.join(four_bit_entries())})")
    p.add_argument("--device-profile", default="h100-80g", help=f"comma-separated profiles: {', '.join(load_profiles())}")
    p.add_argument("--calibrate", action="store_true", help="with the cpu profile: measure this CPU's GEMM throughput and memory bandwidth first (saved for later plans)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="the planned base's dtype; auto = paca train's default on each profile's device: bf16 on GPU/HPU; "
                   "the cpu profile (this machine) bf16 only with native bf16 matmul (AVX512-BF16/AMX), else fp32")
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
                   help=f"plan on a 4-bit bitsandbytes base: each method with a 4-bit form in that form ({forms}; the others stay "
                   "on the --dtype base); 4-bit entries in --methods use it too (default nf4)")
    p.add_argument("--world-size", type=int, default=1,
                   help="processes; alone: N replicas (DDP, bytes per rank as one process); with --fsdp/--zero: sharded bytes per rank")
    p.add_argument("--memory-budget", default=None, metavar="BYTES",
                   help="device memory one process may use (e.g. 24GiB, 40e9), compared with its device total (the "
                   "allocator's reserved peak + the runtime's own memory, as nvidia-smi shows it) for 'fits' and the searched "
                   "maxima, less the margin (--margin); default: each --device-profile's memory")
    p.add_argument("--margin", default=None, metavar="SHARE",
                   help="share of the memory limit 'fits' and the searched maxima keep free for what tracing cannot see "
                   "(e.g. 12%% or 0.12); default: the worst optimism measured on published rows of the plan's regime "
                   "(paca_core/plan/margins.json; none on CPU, where the plan is exact)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 full sharding over --world-size ranks")
    p.add_argument("--zero", type=int, choices=(1, 2, 3), default=0,
                   help="DeepSpeed ZeRO stage over --world-size ranks (paca train --deepspeed zeroN): 1 shards optimizer state, "
                   "2 also gradients, 3 also the frozen base weights (bytes per rank as FSDP2's); default: none (DDP or --fsdp)")
    p.add_argument("--no-search", dest="search", action="store_false", help="skip the max_seq_len / max_batch_size searches")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes tracing methods side by side (tracing is single-threaded)")
    p.add_argument("--out", type=Path, default=None, help="write plan.json, plan.md and PNG plots here (a new or empty folder, or an "
                   "earlier paca plan output with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier paca plan output in --out (nothing else is ever replaced)")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from .run import run_plan

    return run_plan(args)


__all__ = ["DEFAULT_METHODS", "add_plan_parser"]
