"""``paca train``'s preflight: every check that needs no weights, before anything heavy runs.

A run that would fail must fail in the first second, not after the model loads (minutes at 8B-70B) or, worse,
after hours of training at the first save. So this module checks, in order, and with one line each: the
arguments (ranges, and flags the chosen method does not use), the data files (exist, readable, not empty,
parse; the line named), the output folder (:mod:`paca_core.files.outputs`' policy), the ``--resume`` folder (a
checkpoint of this method, rank and targets, of this base model), and, once the model folder is known,
``--seq-len`` against the model's context (its config.json). :func:`describe` then says what the run will do.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base_config import MethodConfig
from ..errors import CheckpointError, PacaConfigError
from ..files.input_checks import read_model_config
from ..files.outputs import OutputTarget, check_output

logger = logging.getLogger(__name__)

#: An AdamW learning rate above this is a typo (1e38, 3 instead of 3e-4), not a choice.
MAX_LEARNING_RATE = 1.0
TRAIN_ENTRIES = ("adapter", "checkpoint", "metrics.json", "config.yaml")


@dataclass
class TrainPlan:
    """What preflight decided: the configs and loop arguments, the files, and what to evaluate."""

    configs: list[MethodConfig]
    lr: float
    train_args: Any  # trainer.TrainingArguments
    loss_chunk_tokens: int | None
    budget: int | None
    output: OutputTarget
    data_path: Path
    eval_data_path: Path | None
    evaluate: bool
    resume_dir: Path | None = None
    resume_summary: dict[str, Any] = field(default_factory=dict)
    recorded_shape: dict[str, int] | None = None
    warnings: list[str] = field(default_factory=list)
    data: Any = None  # data_formats.preflight.DataPlan: the field map and what --data holds
    logging_output: OutputTarget | None = None  # --logging-dir outside --out: an output of its own
    #: ``--adapter``: the trained adapter the run starts from (ours or PEFT's PaCA), and its config as read.
    init_adapter: Path | None = None
    init_adapter_document: dict[str, Any] = field(default_factory=dict)


def _defaults() -> dict[str, Any]:
    from ..flags.train_options import train_parser

    return vars(train_parser().parse_args([]))


def _given(args: argparse.Namespace, defaults: dict[str, Any], name: str) -> bool:
    """Whether the user set ``name`` to something other than its default (an explicit default reads as unset)."""
    return name in defaults and getattr(args, name, defaults[name]) != defaults[name]


def check_ranges(args: argparse.Namespace) -> None:
    """Numbers a run cannot use, all reported at once (beside :meth:`TrainingArguments.validate`'s)."""
    from ..flags.train_options import is_auto

    problems = []

    def need(condition: bool, text: str) -> None:
        if not condition:
            problems.append(text)

    if not is_auto(args.seq_len):
        need(args.seq_len >= 2, f"--seq-len must be at least 2 (got {args.seq_len})")
    need(args.sample_tokens >= 0, f"--sample-tokens must be 0 (no sample) or more (got {args.sample_tokens})")
    need(math.isfinite(args.eval_fraction) and 0 <= args.eval_fraction < 1,
         f"--eval-fraction must be at least 0 and below 1 (got {args.eval_fraction}); 0 (or --no-eval) skips evaluation")
    need(math.isfinite(args.weight_decay) and args.weight_decay >= 0, f"--weight-decay must be 0 or more (got {args.weight_decay})")
    need(math.isfinite(args.max_grad_norm) and args.max_grad_norm >= 0, f"--max-grad-norm must be 0 (no clipping) or more (got {args.max_grad_norm})")
    if args.lr is not None:  # positive and finite: TrainingArguments.validate
        need(not (math.isfinite(args.lr) and args.lr > MAX_LEARNING_RATE),
             f"--lr {args.lr:g} is far above any AdamW learning rate that trains (about 1e-5 to 1e-2)")
    if args.alpha is not None:
        need(math.isfinite(args.alpha) and args.alpha > 0, f"--alpha must be a positive number (got {args.alpha})")
    if problems:
        raise PacaConfigError("; ".join(problems) + ".")


def check_flag_use(args: argparse.Namespace, defaults: dict[str, Any]) -> list[str]:
    """Flags that do nothing in this run: an error for a method's own flag on a run without the method (the
    user meant another method), a warning for the rest. Returns the warnings."""
    from ..methods import parse_combination, registered_methods

    chosen = parse_combination(args.method)
    names = {m.name for m in chosen}
    used = {option for m in chosen for option in m.options}
    foreign = []
    for method in registered_methods():
        for option in method.options:
            if option not in used and _given(args, defaults, option):
                foreign.append(f"--{option.replace('_', '-')} ({method.name})")
    if foreign:
        raise PacaConfigError(f"{', '.join(dict.fromkeys(foreign))} do(es) nothing with --method {args.method}: drop the flag or "
                              "choose a method that uses it.")
    warnings = []
    if args.rank is not None and not any(m.uses_rank for m in chosen):
        warnings.append(f"--rank does nothing with --method {args.method} ({', '.join(sorted(names))} has no rank)")
    if args.resume is None and getattr(args, "trust_checkpoint", False):
        raise PacaConfigError("--trust-checkpoint applies only with --resume: drop it, or pass the checkpoint to resume.")
    if args.resume is not None and getattr(args, "overwrite", False):
        raise PacaConfigError("--resume continues the run in --out and --overwrite replaces it: pass one of them.")
    evaluating = not args.no_eval and (args.eval_data is not None or args.eval_fraction > 0)
    if args.eval_data is not None and args.no_eval:
        raise PacaConfigError("--eval-data with --no-eval: drop one of them.")
    if args.eval_data is not None and _given(args, defaults, "eval_fraction"):
        warnings.append("--eval-fraction does nothing with --eval-data (all of --data trains, --eval-data is held out)")
    if not evaluating and args.sample_tokens and _given(args, defaults, "sample_tokens"):
        warnings.append("--sample-tokens: the before/after samples use a held-out prompt, and this run holds nothing out")
    if args.steps and args.warmup_steps >= args.steps:
        warnings.append(f"--warmup-steps {args.warmup_steps} is not below --steps {args.steps}: the learning rate never reaches its peak")
    if args.steps and args.save_every >= args.steps:
        warnings.append(f"--save-every {args.save_every} is not below --steps {args.steps}: only the final checkpoint is written")
    return warnings


def check_tracking(args: argparse.Namespace) -> list[str]:
    """``--report-to``'s libraries installed (one line naming the pip install when not), ``--eval-every`` with held-out
    data to evaluate, ``--logging-dir`` with TensorBoard. Returns the warnings."""
    from ..train.tracking import check_report_to

    names = check_report_to(getattr(args, "report_to", "none"))
    warnings = []
    evaluating = not args.no_eval and (args.eval_data is not None or args.eval_fraction > 0)
    if getattr(args, "eval_every", 0) and not evaluating:
        raise PacaConfigError("--eval-every evaluates the held-out data, and this run holds none out (--no-eval or --eval-fraction 0): "
                              "drop --eval-every, or keep a held-out share.")
    if getattr(args, "logging_dir", None) and "tensorboard" not in names:
        warnings.append("--logging-dir is where TensorBoard's event files go, and --report-to does not name tensorboard")
    if getattr(args, "run_name", None) and not {"wandb", "mlflow"} & set(names):
        warnings.append("--run-name names the run in W&B and MLflow, and --report-to names neither")
    return warnings


#: What ``--adapter`` decides for a run (the adapter's own method, rank, scaling and targets).
ADAPTER_DECIDES = ("method", "rank", "alpha", "target_modules", "quantize")


def adapter_configs(args: argparse.Namespace, defaults: dict[str, Any]) -> tuple[Path, dict[str, Any], list[MethodConfig]]:
    """``--adapter``: its folder, its config document and the method configs it was trained with (a PEFT PaCA
    adapter read as ours), refused in one line when unreadable or when flags it decides were given too."""
    from ..files.checkpoint import read_adapter_config, read_configs

    given = [f"--{name.replace('_', '-')}" for name in ADAPTER_DECIDES if _given(args, defaults, name)]
    if given:
        raise PacaConfigError(f"--adapter {args.adapter} decides the method, rank, alpha and targets it was trained with: "
                              f"drop {', '.join(given)} (or leave out --adapter to start a new adapter).")
    directory = Path(args.adapter).expanduser()
    document = read_adapter_config(directory)
    return directory, document, read_configs(document, directory)


def check_resume(resume: str, configs: list[MethodConfig]) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder ``--resume`` names, checked against this run's method configs (method, rank,
    targets, every option). Returns the folder and its summary (step, shape, data, base-model fingerprint)."""
    from ..files.checkpoint import config_differences, read_adapter_config
    from ..train.training_state import has_training_state, read_summary

    directory = Path(resume).expanduser()
    if not directory.exists():
        raise CheckpointError(f"--resume {resume}: no such folder; pass the checkpoint of an earlier run (<out>/checkpoint).")
    if has_training_state(directory / "checkpoint"):
        directory = directory / "checkpoint"
    if not has_training_state(directory):
        raise CheckpointError(f"--resume {resume} is not a resumable checkpoint (expected <out>/checkpoint of an earlier paca train run).")
    document = read_adapter_config(directory)
    differences = config_differences(document["configs"], [c.to_dict() for c in configs])
    if differences:
        raise CheckpointError(f"Cannot resume from {directory}: the run differs from the checkpoint's ({'; '.join(differences)}). "
                              "Pass the flags the checkpoint was trained with (its ../metrics.json lists them).")
    return directory, read_summary(directory)


def check_method_widths(configs: list[MethodConfig], fields: dict[str, Any], model: str) -> None:
    """Options bounded by the model's widths, known from config.json before loading: VeLoRA's groups per token above the
    hidden size (the input width of the layers it compresses) zero-pad every token, keeping more than the plain input."""
    hidden = fields.get("hidden_size")
    for config in configs:
        groups = getattr(config, "num_groups", None)
        if config.method == "velora" and isinstance(hidden, int) and isinstance(groups, int) and groups > hidden:
            raise PacaConfigError(f"--velora-groups {groups} is larger than {model}'s hidden size {hidden} (the input width of the "
                                  f"layers VeLoRA compresses): every token would be zero-padded to {groups} groups, keeping more "
                                  f"memory than LoRA; pass --velora-groups {hidden} or less.")


def check_resume_has_work(args: argparse.Namespace, summary: dict[str, Any], directory: Path) -> None:
    """A resume must have steps left: ``--steps`` counts the run's steps in all, so one at or below the checkpoint's
    step would train nothing and still rewrite the checkpoint, adapter and metrics."""
    step = summary.get("step")
    if args.steps and isinstance(step, int) and step >= args.steps:
        raise PacaConfigError(f"--resume {args.resume}: the checkpoint is already at step {step}, and --steps {args.steps} counts "
                              f"the run's steps in all, so there is nothing to train; to train more, pass --steps above {step} "
                              f"(e.g. --steps {2 * step}).")


def check_resume_has_work_in_epochs(args: argparse.Namespace, summary: dict[str, Any], per_epoch: int, examples: int) -> None:
    """The same rule when ``--epochs`` sets the length (``--steps 0``): the run's steps in all are known once the data
    is read (``per_epoch`` optimizer steps per pass over its ``examples``), still before the weights load."""
    from ..train.trainer import epochs_to_steps

    step = summary.get("step")
    total_steps = epochs_to_steps(args.epochs, per_epoch)
    if args.resume and not args.steps and isinstance(step, int) and step >= total_steps:
        more = max(math.ceil(2 * step / per_epoch * 100) / 100, 2 * args.epochs)  # twice the steps trained so far
        raise PacaConfigError(f"--resume {args.resume}: the checkpoint is already at step {step}, and --epochs {args.epochs:g} is "
                              f"{total_steps} step{'' if total_steps == 1 else 's'} of this data ({examples} training examples, "
                              f"{per_epoch} steps per epoch), so there is nothing to train; to train more, pass --epochs above "
                              f"{step / per_epoch:.3g} (e.g. --epochs {more:g}) or --steps above {step}.")


def resume_into_its_folder(args: argparse.Namespace, defaults: dict[str, Any], directory: Path) -> None:
    """``--resume runs/x`` without ``--out`` continues runs/x (the folder the user named), not the default --out."""
    if _given(args, defaults, "out"):
        return
    if directory.name != "checkpoint":
        raise PacaConfigError(f"--resume {args.resume} is not inside a run folder (<out>/checkpoint): pass --out for the continued "
                              "run.")
    args.out = str(directory.parent)
    logger.info("--resume %s without --out: continuing in %s, the run folder it belongs to.", args.resume, args.out)


def check_logging_dir(args: argparse.Namespace, output: OutputTarget, resume_dir: Path | None) -> OutputTarget | None:
    """``--logging-dir`` follows --out's policy: inside --out it is one of the run's entries (checked with it); elsewhere
    it is an output of its own (new, empty, or an earlier one's event files, replaced with --overwrite or added to with
    --resume), never an input or a folder of the user's. Returns that output, or None when it lies inside --out."""
    folder = getattr(args, "logging_dir", None)
    if not folder or "tensorboard" not in str(getattr(args, "report_to", "none")).split(","):
        return None
    from ..files.outputs import resolved

    real = resolved(Path(os.path.abspath(os.path.expanduser(folder))), "--logging-dir", folder)
    out = resolved(output.path, "--out", str(args.out))
    if real == out:
        raise PacaConfigError(f"--logging-dir {folder} is --out itself: leave --logging-dir out (TensorBoard then writes to "
                              f"{output.path / 'runs'}) or pass another folder.")
    if out in real.parents:
        return None
    inputs = {"--model": None if args.model == "default" else args.model, "--data": None if args.data == "default" else args.data,
              "--eval-data": args.eval_data, "--out": output.path}
    return check_output(folder, "train --logging-dir", overwrite=args.overwrite, resume=resume_dir, flag="--logging-dir",
                        inputs=inputs)


def check_tracker_folders(args: argparse.Namespace, inputs: dict[str, Any]) -> None:
    """A tracker folder set by the environment (``$WANDB_DIR``, a local ``$MLFLOW_TRACKING_URI``) is written by its
    library, never under --out; it may not be or lie inside what the run reads (the model, the data, the adapter)."""
    from ..files.outputs import input_holding, resolved
    from ..train.tracking import TRACKERS, parse_report_to

    for name in parse_report_to(getattr(args, "report_to", "none")):
        found = TRACKERS[name].environment_folder()
        if found is None:
            continue
        variable, folder = found
        real = resolved(Path(os.path.abspath(folder)), variable, str(folder))
        holding = input_holding(real, inputs)
        if holding is not None:
            flag, value, source = holding
            what = "is" if real == source else "lies inside"
            raise PacaConfigError(f"{variable} {folder} {what} the {flag} {value}: {name} would write into what this run reads; "
                                  f"point {variable} elsewhere, or unset it ({name} then writes under --out).")


def check_resume_inputs(summary: dict[str, Any], data_path: Path, seq_len: Any) -> list[str]:
    """Warnings when a resumed run reads other data or another shape than the checkpoint recorded."""
    warnings = []
    recorded_data = summary.get("data")
    if recorded_data and os.path.abspath(recorded_data) != os.path.abspath(data_path):
        warnings.append(f"resuming on --data {data_path}, but the checkpoint trained on {recorded_data}: the data position "
                        "it restores counts batches of the other file")
    recorded_len = summary.get("seq_len")
    if isinstance(seq_len, int) and isinstance(recorded_len, int) and recorded_len != seq_len:
        warnings.append(f"resuming at --seq-len {seq_len}, but the checkpoint trained at {recorded_len}")
    return warnings


def check_base_model(summary: dict[str, Any], fingerprint: str | None, model: str) -> None:
    """A checkpoint resumes only on the base model it was trained on (the fingerprint of its weights)."""
    recorded = summary.get("base_model_fingerprint")
    if recorded and fingerprint and recorded != fingerprint:
        raise CheckpointError(f"--resume: the checkpoint was trained on another base model (fingerprint {recorded}, "
                              f"recorded from {summary.get('base_model') or 'its model'}) than --model {model} ({fingerprint}); "
                              "pass the model it was trained on.")


def check_context(model_path: str | Path, seq_len: Any) -> None:
    """``--seq-len`` against the context the model's config.json allows (as ``paca plan`` checks)."""
    if not isinstance(seq_len, int):
        return
    from ..plan.shapes import context_length, load_config

    try:
        context = context_length(load_config(str(model_path)))
    except PacaConfigError:
        return  # no readable config.json: loading will say what is wrong with the folder
    if seq_len > context:
        raise PacaConfigError(f"--seq-len {seq_len} is above this model's context ({context} tokens, max_position_embeddings in "
                              f"{Path(model_path) / 'config.json'}); use --seq-len {context} or less.")


def preflight_train(args: argparse.Namespace) -> TrainPlan:
    """Every ``paca train`` check that needs no weights, in the order a user fixes them; raises on the first
    failing group with one line. Nothing is written and nothing heavy is loaded."""
    from ..files import assets
    from ..memory.chunked_loss import parse_loss_chunk_tokens
    from ..data.formats.preflight import check_data_for_model, check_training_data
    from ..plan.auto_shape import parse_budget
    from ..flags.train_options import build_configs, default_lr_for, is_auto
    from ..train.trainer import TrainingArguments

    defaults = _defaults()
    check_ranges(args)
    init_adapter, adapter_document = None, {}
    if args.adapter:
        init_adapter, adapter_document, configs = adapter_configs(args, defaults)
    else:
        configs = build_configs(args)
    warnings = check_flag_use(args, defaults)
    loss_chunk_tokens = parse_loss_chunk_tokens(args.loss_chunk_tokens)
    budget = parse_budget(args.memory_budget) if args.memory_budget is not None else None
    lr = args.lr if args.lr is not None else default_lr_for(configs)
    train_args = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, epochs=args.epochs,
        batch_size=1 if is_auto(args.batch_size) else args.batch_size,  # auto: chosen before loading
        grad_accum=args.grad_accum, lr=lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm, seed=args.seed, log_every=args.log_every, save_every=args.save_every,
        progress=not args.no_progress, on_nan=args.on_nan, fsdp=args.fsdp, deepspeed=args.deepspeed,
        eval_every=getattr(args, "eval_every", 0),
    )
    train_args.validate()
    warnings += check_tracking(args)

    data_path = assets.default_dataset_path() if args.data == "default" else Path(args.data).expanduser()
    eval_data_path = Path(args.eval_data).expanduser() if args.eval_data else None
    data = check_training_data(data_path, eval_data_path, split=args.data_split, split_given=_given(args, defaults, "data_split"),
                               text_field=args.text_field, field_map=args.field_map, packing=args.packing)
    warnings += data.warnings
    evaluate = not args.no_eval and (eval_data_path is not None or args.eval_fraction > 0)

    resume_dir, summary, recorded = None, {}, None
    if args.resume:
        resume_dir, summary = check_resume(args.resume, configs)
        check_resume_has_work(args, summary, resume_dir)
        resume_into_its_folder(args, defaults, resume_dir)
        train_args.output_dir = args.out
        warnings += check_resume_inputs(summary, data_path, args.seq_len)
        if is_auto(args.seq_len) or is_auto(args.batch_size):
            from ..train.training_state import recorded_shape

            recorded = recorded_shape(resume_dir)
            if recorded is None:
                raise PacaConfigError(
                    f"--resume {args.resume} with --seq-len/--batch-size auto: this checkpoint does not record the sequence length and "
                    "batch size it was trained at (written before paca-hal recorded them), and planning them again could change "
                    "them. Pass the run's --seq-len and --batch-size as numbers (its metrics.json lists them).")
    model_input = None if args.model == "default" else args.model
    output = check_output(
        args.out, "train", overwrite=args.overwrite, resume=resume_dir, legacy=is_legacy_train_output,
        inputs={"--model": model_input, "--data": None if args.data == "default" else data_path, "--eval-data": eval_data_path,
                "--adapter": init_adapter},
    )
    if resume_dir is not None and not _inside(resume_dir, output.path) and output.previous:
        raise PacaConfigError(f"--out {args.out} holds another run than --resume {args.resume}: resume into the checkpoint's own "
                              "run folder, or pass an empty --out.")
    logging_output = check_logging_dir(args, output, resume_dir)
    check_tracker_folders(args, {"--model": model_input, "--data": None if args.data == "default" else data_path,
                                 "--eval-data": eval_data_path, "--adapter": init_adapter, "--resume": resume_dir})
    if model_input is not None and os.path.isdir(os.path.expanduser(model_input)):
        fields = read_model_config(os.path.expanduser(model_input))  # damaged config.json: said here, not as the tokenizer's
        check_method_widths(configs, fields, model_input)
        check_context(os.path.expanduser(model_input), args.seq_len)
        check_data_for_model(data, os.path.expanduser(model_input), args.packing)
    elif model_input is None and assets.default_model_ready():
        check_method_widths(configs, read_model_config(assets.default_model_folder()), "the default model")
        check_context(assets.default_model_folder(), args.seq_len)
        check_data_for_model(data, assets.default_model_folder(), args.packing)
    for warning in warnings:
        logger.warning("%s.", warning[0].upper() + warning[1:])
    plan = TrainPlan(configs=configs, lr=lr, train_args=train_args, loss_chunk_tokens=loss_chunk_tokens, budget=budget,
                     output=output, data_path=data_path, eval_data_path=eval_data_path, evaluate=evaluate,
                     resume_dir=resume_dir, resume_summary=summary, recorded_shape=recorded, warnings=warnings, data=data,
                     init_adapter=init_adapter, init_adapter_document=adapter_document)


    plan.logging_output = logging_output
    return plan


def _inside(inner: Path, outer: Path) -> bool:
    inner, outer = Path(os.path.abspath(inner)).resolve(), Path(os.path.abspath(outer)).resolve()
    return inner == outer or outer in inner.parents


def is_legacy_train_output(folder: Path, entries: set[str]) -> bool:
    """A run folder written before outputs carried a marker: only our entries, and one of them says paca-hal."""
    import json

    if not entries or not entries <= set(TRAIN_ENTRIES):
        return False
    for config in (folder / "adapter" / "adapter_config.json", folder / "checkpoint" / "adapter_config.json"):
        try:
            if json.loads(config.read_text()).get("library") == "paca-hal":
                return True
        except (OSError, ValueError, AttributeError):
            continue
    try:
        return "library_version" in json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def describe(plan: TrainPlan, args: argparse.Namespace, device: Any, model: str) -> str:
    """The lines printed before anything loads: what will run, on what, for how long, and where it goes."""
    ranks = sorted({getattr(c, "r", None) for c in plan.configs if getattr(c, "r", None)})
    rank = f" r={ranks[0]}" if len(ranks) == 1 else ""
    t = plan.train_args
    schedule = f"{t.scheduler} with {t.warmup_steps} warm-up steps"
    length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs"
    shape = f"{args.batch_size} x {args.seq_len} tokens" + (f" x {t.grad_accum} accumulated" if t.grad_accum > 1 else "")
    evaluation = ("held-out loss before and after" + (f" (and every {t.eval_every} steps)" if t.eval_every else "") + " on "
                  + (str(plan.eval_data_path) if plan.eval_data_path else f"{args.eval_fraction:g} of --data")
                  ) if plan.evaluate else "no held-out evaluation (--no-eval)"
    resume = f"\n  resume    {plan.resume_dir} (step {plan.resume_summary.get('step', '?')})" if plan.resume_dir else ""
    replace = " (replacing the previous run there)" if plan.output.previous and plan.output.overwrite else ""
    return (f"paca train: {args.method}{rank} on {model}\n"
            f"  data      {plan.data_path}{plan.data.note(args.packing) if plan.data else ''}; {evaluation}\n"
            f"  schedule  {length} of {shape}, AdamW lr {plan.lr:g} ({schedule}), weight decay {t.weight_decay:g}\n"
            f"  device    {device}{resume}\n"
            f"  output    {plan.output.path}{replace}"
            + (f"; tracked with {args.report_to.replace(',', ', ')}" if getattr(args, "report_to", "none") != "none" else ""))
