"""``paca train``: preflight, announce, shape, load, train, finish — each stage a function with one job."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import devices

from .._version import __version__
from ..base_config import parse_targets
from ..errors import PacaConfigError
from ..flags.train_options import DTYPES, is_auto
from ..distributed.zero import requested_stage

if TYPE_CHECKING:
    from ..plan.auto_shape import ShapeChoice

logger = logging.getLogger("paca_core")


def _resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The base's dtype and why: ``--dtype`` as given, or for ``auto`` the device's choice (on CPU: bf16 only where it
    multiplies bf16 natively). Logged, and recorded in metrics.json as ``dtype``/``dtype_reason``."""
    if DTYPES[name] is not None:
        return DTYPES[name], f"{name}: --dtype {name}"
    choice = devices.default_dtype_choice(device)
    logger.info("--dtype auto on %s: %s", device, choice.reason)
    return choice.dtype, choice.reason


@torch.no_grad()
def _sample(model, tokenizer, prompt_ids: torch.Tensor, new_tokens: int) -> str:
    was_training = model.training
    model.eval()
    output = model.generate(
        input_ids=prompt_ids,
        attention_mask=torch.ones_like(prompt_ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    model.train(was_training)
    return tokenizer.decode(output[0, prompt_ids.shape[1] :], skip_special_tokens=True)


@dataclass
class _Run:
    """What the stages of one ``paca train`` hand each other."""

    args: argparse.Namespace
    plan: Any  # train_preflight.TrainPlan
    device: torch.device
    rank: int
    world_size: int
    graph_mode: str
    dtype: torch.dtype
    model_path: str
    fingerprint: str | None
    dtype_reason: str = ""
    shape: Any = None  # plan.auto_shape.ShapeChoice when --seq-len/--batch-size auto chose
    started: float = field(default_factory=time.perf_counter)
    evaluation_seconds: float = 0.0


def run_train(args: argparse.Namespace) -> int:
    """``paca train`` in stages, each with one job: set up (preflight, no weights; device; shape; announce), load,
    evaluate before, train, and finish (evaluate after, save, report). The run's flags go to <out>/config.yaml with its
    first write, and to the trackers ``--report-to`` names, which are closed however the run ends."""
    flags = _requested_flags(args)  # before set-up resolves auto shapes and launcher settings: what was asked for
    run = _set_up(args)
    paca_model, tokenizer, trainer, train_data, eval_data = _load(run)
    _record_and_track(run, trainer, eval_data, flags)
    try:
        return _train_and_finish(run, paca_model, tokenizer, trainer, train_data, eval_data)
    except BaseException as error:
        if trainer.tracker is not None:
            tracker, trainer.tracker = trainer.tracker, None
            tracker.finish(failed=not isinstance(error, KeyboardInterrupt))
        raise
    finally:
        if trainer.tracker is not None:
            trainer.tracker.finish()
        _record_written(run, trainer)


def _train_and_finish(run: _Run, paca_model, tokenizer, trainer, train_data, eval_data) -> int:
    """Evaluate before, train, and finish (evaluate after, save, report)."""
    args = run.args
    prompt_ids = _sample_prompt(eval_data if eval_data is not None else train_data, args.seq_len).to(run.device)
    before, sample_before = _evaluate_and_sample(run, trainer, paca_model, tokenizer, eval_data, prompt_ids, "before")
    train_start = time.perf_counter()
    interrupted = False
    try:
        trainer.train()
    except KeyboardInterrupt:
        interrupted = True
    metrics = _metrics(run, paca_model, trainer, time.perf_counter() - train_start, before, interrupted)
    if interrupted:
        if run.rank == 0:
            _write_run_metrics(trainer, metrics)
            print(_interrupted_message(trainer))
        return 130
    after, sample_after = _evaluate_and_sample(run, trainer, paca_model, tokenizer, eval_data, prompt_ids, "after")
    adapter_dir = _save_adapter(run, paca_model, trainer)
    metrics.update(
        eval_seconds=run.evaluation_seconds,
        held_out_loss_after=after,
        held_out_perplexity_before=_safe_exp(before),
        held_out_perplexity_after=_safe_exp(after),
        prompt=tokenizer.decode(prompt_ids[0], skip_special_tokens=True),
        sample_before=sample_before,
        sample_after=sample_after,
        adapter=str(adapter_dir),
        peak_memory_bytes=devices.memory_stats(run.device).peak_bytes,
        total_seconds=time.perf_counter() - run.started,
        world_size=run.world_size,
    )
    if run.rank == 0:
        _write_run_metrics(trainer, metrics)
        _print_summary(metrics)
    devices.shutdown_distributed()  # every rank waits for rank 0's writes, then leaves the group
    return 0


def _set_up(args: argparse.Namespace) -> _Run:
    """Everything before the weights load: preflight, the device, the model folder's checks, the shape, and the
    lines saying what will run."""
    from ..files import assets
    from .train_preflight import check_base_model, check_context, describe, preflight_train

    if _accelerate_asks_for_fsdp():
        args.fsdp = True
    args.deepspeed = args.deepspeed or _accelerate_deepspeed_spec(args)
    plan = preflight_train(args)  # every check that needs no weights; nothing written, nothing loaded
    device, rank, world_size = devices.init_distributed(args.device)  # torchrun: one process per device
    graph_mode = devices.resolve_graph_mode(device, args.graph_mode)
    dtype, dtype_reason = _resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model_path = assets.resolve_model_path(args.model)  # the default model is converted here, once
    check_context(model_path, args.seq_len)
    fingerprint = assets.model_fingerprint(model_path)
    if plan.resume_dir is not None:
        check_base_model(plan.resume_summary, fingerprint, args.model)
    if plan.init_adapter is not None:
        from .adapter_commands import check_recorded_fingerprint

        check_recorded_fingerprint(plan.init_adapter_document, str(model_path))
    run = _Run(args, plan, device, rank, world_size, graph_mode, dtype, str(model_path), fingerprint, dtype_reason,
               started=started)
    train_args = plan.train_args
    # The planner's sharded layout (base weights and adapters split over the processes) is also ZeRO-3's.
    shards_weights = train_args.fsdp or (train_args.deepspeed is not None and requested_stage(train_args.deepspeed) == 3)
    run.shape = _choose_shape(args, plan, model_path, device, dtype, world_size, shards_weights)
    train_args.batch_size = args.batch_size
    if rank == 0:
        print(describe(plan, args, device, run.model_path), flush=True)
    return run


def _load(run: _Run):
    """The weights, the data, the adapters and the Trainer (resumed when asked)."""
    from ..files import assets
    from ..files.outputs import RunFolder
    from ..train.trainer import Trainer, steps_per_epoch
    from .train_preflight import check_resume_has_work_in_epochs

    args, plan = run.args, run.plan
    tokenizer = assets.load_tokenizer(run.model_path)  # the data is read and checked before the weights load
    train_data, eval_data = _load_data(args, plan, tokenizer)
    if run.shape is not None and "batch_size" in run.shape.chosen:
        plan.train_args.batch_size = args.batch_size = _batch_within_data(args.batch_size, len(train_data), run.world_size)
    if plan.resume_dir is not None:
        per_epoch = steps_per_epoch(plan.train_args, len(train_data), run.world_size)
        check_resume_has_work_in_epochs(args, plan.resume_summary, per_epoch, len(train_data))
    model = assets.load_model(run.model_path, dtype=run.dtype)
    paca_model = _prepare(args, model, plan, run.device, run.graph_mode)
    trainable, total = paca_model.parameter_counts()
    logger.info("Trainable parameters: %d of %d (%.3f%%)", trainable, total, 100 * trainable / total)
    trainer = Trainer(paca_model, plan.train_args, train_data, run.device)
    trainer.run_folder = RunFolder(plan.output)
    trainer.checkpoint_metadata = {"data": str(plan.data_path), "base_model": run.model_path, "base_model_fingerprint": run.fingerprint}
    if plan.resume_dir is not None:
        trainer.resume_from(plan.resume_dir, trust_checkpoint=args.trust_checkpoint)
    return paca_model, tokenizer, trainer, train_data, eval_data


def _evaluate_and_sample(run: _Run, trainer, paca_model, tokenizer, eval_data, prompt_ids, when: str):
    """The held-out loss (None without held-out data) and the greedy sample, timed into ``run.evaluation_seconds``.
    After training, an ``--eval-every`` evaluation at the last step is that loss already (and reported already)."""
    started = time.perf_counter()
    evaluations = trainer.state.evaluations
    measured = when == "after" and bool(evaluations) and evaluations[-1]["step"] == trainer.state.step
    loss = evaluations[-1]["held_out_loss"] if measured else trainer.evaluate(eval_data) if eval_data is not None else None
    if loss is not None and not measured and trainer.tracker is not None:
        trainer.tracker.log_eval(loss, trainer.state.step)
    seconds = time.perf_counter() - started
    run.evaluation_seconds += seconds
    sample = _sample(paca_model, tokenizer, prompt_ids, run.args.sample_tokens) if run.args.sample_tokens else None
    if loss is not None and when == "before":
        logger.info("Held-out loss before training: %.4f (%d examples, %.0f s)", loss, len(eval_data), seconds)
    return loss, sample


def _save_adapter(run: _Run, paca_model, trainer) -> Path:
    adapter_dir = trainer.output_dir / "adapter"
    if run.rank == 0:
        trainer.run_folder.claim("adapter")
    # Every rank takes part (FSDP gathers the shards); rank 0 writes.
    paca_model.save_pretrained(adapter_dir, is_main_process=run.rank == 0, base_model=run.model_path,
                               base_model_fingerprint=run.fingerprint)
    if run.rank == 0:
        trainer.run_folder.refresh()
    return adapter_dir


def _record_written(run: _Run, trainer) -> None:
    """However the run ends, the output folders' markers list every file it wrote (trackers' event files included),
    so the next --overwrite or --resume knows them from a user's."""
    if run.rank != 0:
        return
    for folder in (trainer.run_folder, getattr(trainer, "logging_folder", None)):
        if folder is not None and folder.path.is_dir():
            try:
                folder.refresh()
            except OSError as error:
                logger.warning("Could not update %s's marker (%s).", folder.path, error)


def _metrics(run: _Run, paca_model, trainer, train_seconds: float, before: float | None, interrupted: bool) -> dict:
    """metrics.json as it stands when training ends (finish adds the evaluation after, the sample and the adapter)."""
    args, plan = run.args, run.plan
    trainable, total = paca_model.parameter_counts()
    return {
        "library_version": __version__,
        "command": " ".join(sys.argv),
        "method": paca_model.method,
        "model": run.model_path,
        "base_model_fingerprint": run.fingerprint,
        "data": str(plan.data_path),
        "eval_data": str(plan.eval_data_path) if plan.eval_data_path else None,
        "device": str(run.device),
        "graph_mode": run.graph_mode,
        "dtype": str(run.dtype).replace("torch.", ""),
        "dtype_reason": run.dtype_reason,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": _version_of("transformers")},
        "configs": [c.to_dict() for c in plan.configs],
        "seq_len": args.seq_len,
        "auto_shape": _auto_shape_record(run.shape, plan.recorded_shape, args),
        "training": vars(plan.train_args),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "host_parameters": paca_model.host_parameter_count(),
        "host_traffic": paca_model.host_traffic(),
        "steps": trainer.state.step,
        "train_seconds": train_seconds,
        "eval_seconds": run.evaluation_seconds,
        "history": trainer.state.history,
        "data_layout": trainer.train_data.layout(),  # record forms, rows, packing and the padding share
        "evaluations": trainer.state.evaluations,
        "held_out_loss_before": before,
        "interrupted": interrupted,
        "checkpoint": str(trainer.checkpoint_dir) if trainer.last_saved_step is not None else None,
    }


def _choose_shape(args, plan, model_path, device, dtype, world_size: int, shards_weights: bool):
    """``--seq-len/--batch-size auto``: the checkpoint's shape on resume, else the largest that plans to fit; with
    numbers, the memory check before loading (``--plan-check``). Traces fake tensors only."""
    host_memory = devices.shares_host_memory(device)
    # Offload moves nothing where device memory is host memory, so the plan leaves it out there, as the run does.
    planned_offload = None if host_memory else args.offload_activations
    budget = plan.budget
    if plan.recorded_shape is not None:
        _reuse_recorded_shape(args, plan.recorded_shape)
        return None
    if is_auto(args.seq_len) or is_auto(args.batch_size):
        from ..plan.auto_shape import choose_with_tracer
        from ..plan.preflight import step_tracer

        if budget is None:
            budget = _default_budget(device, world_size)
        margin = _fit_margin(args, plan, host_memory, shards_weights)
        tracer = step_tracer(model_path, args.method, plan.configs, dtype, world_size, shards_weights, plan.loss_chunk_tokens,
                             args.gradient_checkpointing, planned_offload)
        shape = choose_with_tracer(tracer, args.seq_len, args.batch_size, margin.apply(budget), include_host=host_memory,
                                   device_type=None if host_memory else device.type)
        shape = dataclasses.replace(shape, budget_bytes=budget, margin=margin.as_dict())
        args.seq_len, args.batch_size = shape.seq_len, shape.batch_size
        logger.info("%s", _describe_choice(shape, margin))
        return shape
    if args.plan_check == "on" or (args.plan_check == "auto" and not host_memory):
        from ..plan.preflight import check_before_loading

        margin = _fit_margin(args, plan, host_memory, shards_weights)
        limit = budget if budget is not None else devices.memory_stats(device).total_bytes
        logger.info("--plan-check keeps %s: the planned step must fit %.2f GiB of %.2f GiB.", margin.phrase(),
                    margin.apply(limit) / 2**30, limit / 2**30)
        check_before_loading(model_path, args.method, plan.configs, args.seq_len, args.batch_size, dtype,
                             margin.apply(limit),
                             world_size=world_size, fsdp=shards_weights, loss_chunk_tokens=plan.loss_chunk_tokens,
                             gradient_checkpointing=args.gradient_checkpointing, offload_activations=planned_offload,
                             include_host=host_memory, device_type=None if host_memory else device.type)
    elif args.memory_budget is not None:
        logger.warning("--memory-budget %s does nothing in this run: it is what --seq-len/--batch-size auto fit and what --plan-check "
                       "compares against, and this run has fixed sizes with the check off (--plan-check %s on %s). Pass --plan-check "
                       "on to compare, or auto sizes to fit it.", args.memory_budget, args.plan_check, device.type)
    return None


def _load_data(args, plan, tokenizer):
    """Training and held-out examples (None held out with --no-eval / --eval-fraction 0)."""
    from ..data.dataset import load_dataset, split_held_out

    fields = plan.data.fields if plan.data is not None else None
    data = load_dataset(plan.data_path, tokenizer, args.seq_len, split=args.data_split, fields=fields, packing=args.packing)
    if plan.eval_data_path is not None:
        eval_data = load_dataset(plan.eval_data_path, tokenizer, args.seq_len, split=None, fields=fields, packing=args.packing)
        train_data = data
    elif plan.evaluate:
        train_data, eval_data = split_held_out(data, args.eval_fraction, args.seed)
    else:
        train_data, eval_data = data, None
    logger.info("Data: %d training and %d held-out %s of %d tokens from %s (padding: %.1f%% of the training tokens)", len(train_data),
                0 if eval_data is None else len(eval_data), "packed rows" if train_data.packed else "examples", args.seq_len,
                plan.data_path, 100 * train_data.padding_share)
    return train_data, eval_data


def _prepare(args, model, plan, device, graph_mode: str):
    """The model with its adapters and the run's memory levers, on ``device``."""
    from ..model import load_adapter, prepare_model

    if plan.init_adapter is not None:  # --adapter: its layers, columns and weights, trainable
        paca_model = load_adapter(model, plan.init_adapter, device=device, is_trainable=True)
    else:
        paca_model = prepare_model(model, plan.configs, device=device)
    paca_model.set_loss_chunk_tokens(plan.loss_chunk_tokens)
    if args.gradient_checkpointing:
        paca_model.gradient_checkpointing_enable()
    if args.offload_activations:
        from ..memory.offload import offload_activations

        modules = args.offload_activations
        offload_activations(paca_model.base_model, modules if modules == "decoder-layers" else parse_targets(modules))
    devices.apply_graph_mode(paca_model.base_model, device, graph_mode)
    return paca_model


def _requested_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Every flag a config file may set, as this run was asked (local paths absolute): config.yaml's and the trackers'."""
    from .run_config import resolved_config
    from ..flags.train_options import train_parser

    return resolved_config(args, train_parser())


def _record_and_track(run: _Run, trainer, eval_data, flags: dict[str, Any]) -> None:
    """config.yaml written with the run folder's first entry; on rank 0 the trackers started (their folders claimed in
    the run folder) and told the flags; held-out data handed to the loop for ``--eval-every``."""
    from .run_config import RecordingRunFolder, config_text
    from ..train.tracking import start_tracking
    from ..flags.train_options import option_groups, train_parser

    args = run.args
    trainer.eval_data = eval_data
    trainer.run_folder = RecordingRunFolder(run.plan.output, config_text(flags, option_groups(train_parser())))
    if run.rank != 0:
        return

    def claim(folder: Path) -> None:
        from ..files.outputs import OutputFolder

        inside = Path(os.path.abspath(folder))
        out = trainer.run_folder.path
        if out in inside.parents:
            trainer.run_folder.claim_fresh(inside.relative_to(out).parts[0])
        elif run.plan.logging_output is not None and inside == run.plan.logging_output.path:
            trainer.logging_folder = OutputFolder(run.plan.logging_output)  # checked by the preflight like --out
            trainer.logging_folder.open()

    trainer.tracker = start_tracking(getattr(args, "report_to", "none"), run.plan.output.path, run_name=getattr(args, "run_name", None),
                                     logging_dir=getattr(args, "logging_dir", None), config=flags, claim=claim)


def _sample_prompt(data, seq_len: int) -> torch.Tensor:
    return data.input_ids[:1, : min(24, seq_len // 2)]


def _write_run_metrics(trainer, metrics: dict) -> None:
    from ..train.trainer import write_metrics

    write_metrics(trainer.run_folder.claim("metrics.json"), metrics)


def _interrupted_message(trainer) -> str:
    """After Ctrl-C: where to resume from, or that nothing was saved (a second Ctrl-C aborts before the save)."""
    step = trainer.state.step
    if trainer.last_saved_step == step:
        return f"Interrupted at step {step}: checkpoint saved; resume with  paca train --resume {trainer.checkpoint_dir} <same flags>"
    if trainer.last_saved_step is not None:
        return (f"Aborted at step {step}: nothing saved since step {trainer.last_saved_step}; resume from that step with  "
                f"paca train --resume {trainer.checkpoint_dir} <same flags>")
    return f"Aborted at step {step}: nothing was saved (a second Ctrl-C stops without saving)."


def _reuse_recorded_shape(args: argparse.Namespace, recorded: dict[str, int]) -> None:
    """``auto`` on resume: the checkpoint's values, said at INFO; given numbers are kept as given."""
    for name in ("seq_len", "batch_size"):
        if is_auto(getattr(args, name)):
            setattr(args, name, recorded[name])
            logger.info("--%s auto on resume: %d, as the checkpoint recorded (not planned again).", name.replace("_", "-"), recorded[name])


def _default_budget(device: torch.device, world_size: int) -> int:
    """The device's free memory for this process; processes on one machine split host memory between them.
    Under a launch every process takes the smallest figure, so all choose the same shape."""
    free = devices.free_memory_bytes(device)
    if free is None:
        raise PacaConfigError(f"{device} cannot tell how much memory is free: pass --memory-budget (e.g. 24GiB) with auto.")
    if devices.shares_host_memory(device):
        free //= max(1, devices.local_world_size())
    if world_size > 1:
        import torch.distributed as dist

        smallest = torch.tensor([free], dtype=torch.int64)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN, group=devices.host_process_group())
        free = int(smallest.item())
    return free


def _fit_margin(args, plan, host_memory: bool, shards_weights: bool):
    """The margin auto and --plan-check keep below the budget (paca_core/plan/margin.py): ``--margin``, none where
    device memory is host memory (the plan is exact there), else the measured margin of the run's regime."""
    from ..plan.margin import margin_for, parse_margin, regime

    four_bit = any(getattr(c, "quantize", None) for c in plan.configs)
    sharded = shards_weights or bool(getattr(args, "deepspeed", None))
    override = parse_margin(getattr(args, "margin", None))
    return margin_for(regime(four_bit, args.gradient_checkpointing, sharded), override, host_memory=host_memory)


def _describe_choice(shape: "ShapeChoice", margin=None) -> str:
    """The INFO line of an auto choice: the shape, its planned peak, the budget and the margin kept below it, and
    where the figure comes from."""
    from ..plan.auto_shape import format_bytes

    def flag(name: str, value: int) -> str:
        return f"--{name.replace('_', '-')} {value}" + (" (auto)" if name in shape.chosen else "")

    kept = f", keeping {margin.phrase()}" if margin is not None and margin.fraction > 0 else ""
    return (f"{flag('seq_len', shape.seq_len)} at {flag('batch_size', shape.batch_size)}: planned peak "
            f"{format_bytes(shape.peak_bytes)} per process of a {format_bytes(shape.budget_bytes)} memory budget{kept} "
            "(paca plan's trace, before loading weights).")


def _batch_within_data(batch_size: int, examples: int, world_size: int) -> int:
    """An auto batch larger than the training split allows (one global batch) drops to what it holds: a smaller
    batch never plans a higher peak, and the data size was unknown when the batch was chosen."""
    most = max(1, examples // max(1, world_size))
    if batch_size > most:
        logger.info("--batch-size auto: %d fits the budget, but the training split holds %d examples per process; "
                    "using %d.", batch_size, most, most)
        return most
    return batch_size


def _auto_shape_record(shape: "ShapeChoice | None", recorded: dict[str, int] | None, args: argparse.Namespace) -> dict | None:
    """What metrics.json says about an auto shape: planned here (and how), or re-used from the checkpoint."""
    if shape is not None:
        record = shape.as_dict()
        if args.batch_size != shape.batch_size:  # lowered to the data: the planned peak is that of the larger batch
            record.update(batch_size=args.batch_size, planned_batch_size=shape.batch_size)
        return record
    if recorded is not None:
        return {**recorded, "source": f"checkpoint {args.resume}"}
    return None


def _accelerate_asks_for_fsdp() -> bool:
    """``accelerate launch --use_fsdp`` (or an accelerate config with FSDP) sets this for the processes it starts."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def _accelerate_deepspeed_spec(args: argparse.Namespace) -> str | dict | None:
    """What ``accelerate launch --use_deepspeed`` asked for, from the variables it sets for its processes.

    Its config file if it named one, else its ZeRO stage (default 2, accelerate's) with its offload
    devices. Its accumulation and clipping must agree with ours (they are the same two numbers).
    """
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() not in ("1", "true", "yes"):
        return None
    problems = []
    for name, ours, flag in (("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", args.grad_accum, "--grad-accum"),
                             ("ACCELERATE_GRADIENT_CLIPPING", args.max_grad_norm, "--max-grad-norm")):
        value = env.get(name)
        if value not in (None, "", "auto", "none") and float(value) != float(ours):
            problems.append(f"accelerate's {name.split('_', 1)[1].lower()} is {value} but {flag} is {ours}")
    if problems:
        raise PacaConfigError("; ".join(problems) + ": make them agree (paca train takes these from its own flags).")
    if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        return env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
    zero = {"stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}
    for kind in ("optimizer", "param"):
        device = env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{kind.upper()}_DEVICE")
        if device and device != "none":
            zero[f"offload_{kind}"] = {"device": device}
    return {"zero_optimization": zero}


def _safe_exp(value: float | None) -> float | None:
    if value is None:
        return None
    return float("inf") if value > 80 else float(torch.tensor(value).exp())


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _print_summary(m: dict) -> None:
    last = m["history"][-1] if m["history"] else {}
    lines = [
        "",
        f"paca train finished: {m['steps']} steps of {m['method']} on {m['device']} ({m['dtype']}) in {m['train_seconds']:.0f} s "
        f"of training, {m['total_seconds']:.0f} s in all",
        f"  trainable parameters   {m['trainable_parameters']:,} of {m['total_parameters']:,}"
        + (f" (+ {m['host_parameters']:,} trained in host memory)" if m.get("host_parameters") else ""),
        f"  held-out loss          {m['held_out_loss_before']:.4f} -> {m['held_out_loss_after']:.4f}"
        f"  (perplexity {m['held_out_perplexity_before']:.1f} -> {m['held_out_perplexity_after']:.1f}; evaluation took "
        f"{m['eval_seconds']:.0f} s)" if m.get("held_out_loss_before") is not None else "  held-out loss          not evaluated (--no-eval)",
        f"  throughput             {last.get('tokens_per_s', 0):.0f} tokens/s, peak memory {m['peak_memory_bytes'] / 2**20:.0f} MiB",
    ]
    if m.get("sample_before") is not None:
        lines += [
            f"  prompt                 {m['prompt']!r}",
            f"  sample before          {m['sample_before']!r}",
            f"  sample after           {m['sample_after']!r}",
        ]
    lines += [f"  adapter                {m['adapter']}", f"  metrics                {Path(m['adapter']).parent / 'metrics.json'}"]
    print("\n".join(lines))
