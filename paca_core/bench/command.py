"""``paca bench``'s flags. Cheap to import (no torch, transformers or peft at module level): the CLI
builds every subcommand's parser before it knows which one runs, and :mod:`.run` does the work."""
from __future__ import annotations

import argparse
import logging

from ..flags.help_format import HelpFormatter
from ..workloads.levers import LEVERS
from ..workloads.models import MODEL_HELP
from ..workloads.peers import everyday_peers
from .defaults import DEFAULT_ENTRIES, DEFAULT_METHODS

logger = logging.getLogger(__name__)


def add_bench_parser(sub) -> argparse.ArgumentParser:
    """Register ``paca bench`` on the CLI's subparsers."""
    import devices  # the device flags list the registered runtimes

    from ..workloads.four_bit import four_bit_entries

    p = sub.add_parser(
        "bench",
        help="measure every method (ours and PEFT's) on one model, shape and device: speed, memory, held-out loss",
        formatter_class=HelpFormatter, allow_abbrev=False,
    )
    devices.add_device_argument(p)
    devices.add_graph_mode_argument(p)
    p.add_argument("--mode", default="speed", choices=["speed", "accuracy", "both", "max-context"],
                   help="speed/memory, held-out loss after fine-tuning, both, or the longest sequence under --memory-budget")
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated: peers {', '.join(everyday_peers())}; 4-bit {', '.join(four_bit_entries())} (need bitsandbytes); "
        "or any `paca train --method` string (paca, lora, lorafa, velora, meft, paca+full+velora, ...); add levers after @: "
        f"{', '.join(LEVERS)} joined by + or 'all' (peft-lora@gc, paca@all). Default: {','.join(DEFAULT_METHODS)}; "
        f"max-context: {DEFAULT_ENTRIES}",
    )
    p.add_argument("--model", default="smollm2-135m-shape", help=f"speed mode: {MODEL_HELP}")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto = bf16 on GPU/HPU and on CPUs with native bf16 matmul (AVX512-BF16/AMX), else fp32")
    p.add_argument("--seq-len", default="256", help="tokens per example; comma-separated for several (512,2048,8192)")
    p.add_argument("--batch-size", default="4", help="examples per step; comma-separated for several")
    p.add_argument("--rank", default="8", help="LoRA rank r; comma-separated for several (8,64)")
    p.add_argument(
        "--no-match-params", dest="match_params", action="store_false",
        help="run PaCA / LoRA-FA at the same r as LoRA (default: 2r, which matches LoRA's trainable parameters)",
    )
    p.add_argument("--target-modules", default=None, help="modules every method adapts (default: the 7 LLaMA projections)")
    add_method_flags(p)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (median reported)")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps after the counted first step")
    p.add_argument("--memory-budget", default=None, help="also search the largest --search size that fits, e.g. 8GiB (CPU: counted bytes); "
                   "max-context: the budget for the live-bytes high-water mark")
    p.add_argument("--plan-model", default=None, help="max-context: also plan this shape (e.g. llama-3.1-8b) on --plan-profile (simulated)")
    p.add_argument("--plan-profile", default="a100-80g", help="max-context: the device profile for --plan-model")
    p.add_argument("--search", default="seq", choices=["seq", "batch"], help="what the memory-budget search varies")
    p.add_argument("--search-step", type=int, default=None, help="search granularity (default 64 tokens, or 1 example)")
    p.add_argument("--search-max", type=int, default=None, help="largest size tried (default 131072 tokens, or 4096 examples)")
    p.add_argument("--accuracy-model", default="default", help="accuracy mode: 'default' or a local model folder (real weights)")
    p.add_argument("--accuracy-steps", type=int, default=30, help="fine-tuning steps per method in accuracy mode")
    p.add_argument("--accuracy-seq-len", type=int, default=128, help="tokens per example in accuracy mode")
    p.add_argument("--accuracy-batch-size", type=int, default=4, help="examples per step in accuracy mode")
    p.add_argument("--accuracy-rank", type=int, default=8, help="LoRA rank in accuracy mode (PaCA / LoRA-FA: 2r unless --no-match-params)")
    p.add_argument("--data", default="default", help="accuracy mode: local .txt/.jsonl, or 'default' (Macbeth); 10%% held out")
    p.add_argument("--eval-every", type=int, default=10, help="accuracy mode: held-out evaluation every N steps")
    p.add_argument("--lr", type=float, default=None, help="one learning rate for every method (default: each method's paca train default)")
    p.add_argument("--seed", type=int, default=0, help="seeds the models built from a shape, the synthetic batches, column choice and data order")
    p.add_argument("--worker-timeout", type=float, default=3600.0, help="seconds before a method's worker is stopped")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json, bench.md, the PNG plots and logs/ (a new or empty "
                   "folder, or an earlier paca bench output with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier paca bench output in --out (nothing else is ever replaced)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=_run)
    return p


class _FlagRecorder(argparse.ArgumentParser):
    """A parser that keeps the actions a method's ``add_arguments`` adds, to copy the ones it benches."""

    def __init__(self) -> None:
        super().__init__(add_help=False)
        self.added: list[argparse.Action] = []

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.added.append(action)
        return action


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    """Each registered method's ``bench_flags``: its own ``paca train`` flags, defaulting to None (then the
    entry gets ``bench_options`` or paca train's default), so one value applies to every entry with it."""
    from ..methods import registered_methods

    for method in registered_methods():
        if not method.bench_flags or method.add_arguments is None:
            continue
        recorder = _FlagRecorder()
        method.add_arguments(recorder)
        for action in recorder.added:
            if action.dest not in method.bench_flags:
                continue
            default = method.bench_options.get(action.dest, action.default)
            text = f"{action.help} (every entry with {method.name}; unset: {default})"
            if action.nargs == 0:  # an on/off flag (store_true and friends)
                parser.add_argument(*action.option_strings, dest=action.dest, action="store_const", const=action.const,
                                    default=None, help=text)
            else:
                parser.add_argument(*action.option_strings, dest=action.dest, type=action.type, choices=action.choices,
                                    nargs=action.nargs, metavar=action.metavar, default=None, help=text)
        missing = set(method.bench_flags) - {action.dest for action in recorder.added}
        if missing:
            logger.warning("Method %r: bench_flags %s are not flags its add_arguments defines; paca bench leaves them out.",
                           method.name, sorted(missing))


def _run(args: argparse.Namespace) -> int:
    from .preflight import check_bench_inputs
    from .run import run_bench

    check_bench_inputs(args)  # models, data and numbers, before any worker starts or anything is written
    return run_bench(args)
