"""The ``paca`` command: ``paca train`` (fine-tune), ``paca merge`` and ``paca export-peft``."""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import devices

from ._version import __version__
from .base_config import MethodConfig, parse_targets
from .bench.command import add_bench_parser
from .plan.command import add_plan_parser
from .errors import PacaConfigError
from .zero import requested_stage
from .methods import default_lr as _registry_default_lr
from .methods import method_help, primary_name
from .train_options import DEFAULT_LR, DEFAULT_RANK, DTYPES, add_train_arguments, build_configs, default_lr_for, is_auto

if TYPE_CHECKING:
    from .plan.auto_shape import ShapeChoice

logger = logging.getLogger("paca_core")

__all__ = ["DEFAULT_LR", "DEFAULT_RANK", "DTYPES", "METHOD_HELP", "build_configs", "build_parser", "default_lr", "main"]


def __getattr__(name: str):
    if name == "METHOD_HELP":  # read from the registry each time: methods registered later appear too
        return method_help()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a causal LM (defaults: SmolLM2-135M-Instruct on Shakespeare's Macbeth, offline)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_train_arguments(p)
    p.add_argument("--out", default="runs/paca", help="output folder: adapter/, checkpoint/, metrics.json")
    p.add_argument("--resume", default=None, help="continue from a checkpoint folder (<out>/checkpoint or <out>)")
    p.add_argument(
        "--trust-checkpoint", action="store_true",
        help="with --resume: you trust who made the checkpoint, so an old (0.1.0) trainer_state.pt that cannot be read "
        "safely may be unpickled in full (which can run code from it). Never needed for checkpoints from this version",
    )
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: only at the end / on Ctrl-C)")
    p.add_argument("--log-every", type=int, default=5, help="steps per progress/metrics record")
    p.add_argument("--sample-tokens", type=int, default=40, help="tokens generated for the before/after sample (0: skip)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--on-nan", default="stop", choices=["stop", "skip"],
        help="a NaN/inf loss or gradient norm: stop (save the last good state and exit) or skip that step",
    )
    p.add_argument(
        "--fsdp", action="store_true",
        help="under torchrun/accelerate launch: shard base weights and adapters across processes with FSDP2 "
        "(default: DDP, a full copy per process)",
    )
    p.add_argument(
        "--deepspeed", default=None, metavar="zero1|zero2|zero3|PATH.json",
        help="train under DeepSpeed ZeRO (launch with torchrun, deepspeed or accelerate launch; needs paca-hal[deepspeed]). "
        "A stage name expands to a config from these flags (micro-batch --batch-size, --grad-accum, --max-grad-norm, bf16 "
        "when --dtype is bf16); in your JSON these flags fill only \"auto\" fields, and a value that contradicts them is an "
        "error. zero3 partitions base weights too. `accelerate launch --use_deepspeed` sets it for you",
    )
    # The deepspeed launcher passes --local_rank=N to the script (it sets LOCAL_RANK too, which is what we read).
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(handler=run_train)


def _add_adapter_command(sub, name: str, help_text: str, out_help: str, handler) -> None:
    """A subcommand that reads a trained adapter and its base model and writes something to --out."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--adapter", required=True, help="adapter folder (from paca train: <out>/adapter)")
    p.add_argument("--model", default="default", help="base model folder the adapter was trained on")
    p.add_argument("--out", required=True, help=out_help)
    p.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paca", description="Memory-efficient fine-tuning on CPU, CUDA and Intel Gaudi.")
    parser.add_argument("--version", action="version", version=f"paca-hal {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The deepspeed launcher puts --local_rank=N before the subcommand (it sets LOCAL_RANK too, which is what we read).
    parser.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    _add_adapter_command(sub, "merge", "fold an adapter into its base model and save a plain HF model", "where to write the merged model", run_merge)
    _add_adapter_command(
        sub, "export-peft", "write a PaCA/LoRA adapter as a standard PEFT LoRA adapter", "where to write the PEFT adapter", run_export
    )
    add_bench_parser(sub)  # `paca bench`: every method measured side by side
    add_plan_parser(sub)  # `paca plan`: what fits and how fast on accelerators, simulated
    return parser


_targets = parse_targets  # the old private name (scripts use it)


def _primary_method(parts: list[str]) -> str:
    """The method of a combination that sets its default rank and learning rate (by names)."""
    return primary_name(parts)


def _default_lr(configs: list[MethodConfig]) -> float:
    return default_lr_for(configs)


def default_lr(method: str, rank: int | None = None) -> float:
    """The learning rate ``paca train --method METHOD --rank RANK`` uses without --lr."""
    return _registry_default_lr(method, rank)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    return DTYPES[name] or devices.default_dtype(device)


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


def run_train(args: argparse.Namespace) -> int:
    from . import assets
    from .dataset import load_dataset, split_held_out
    from .chunked_loss import parse_loss_chunk_tokens
    from .model import prepare_model
    from .plan.auto_shape import parse_budget
    from .trainer import Trainer, TrainingArguments, write_metrics

    # Validate everything cheap before loading anything.
    configs = build_configs(args)
    loss_chunk_tokens = parse_loss_chunk_tokens(args.loss_chunk_tokens)
    budget = parse_budget(args.memory_budget) if args.memory_budget is not None else None
    auto = is_auto(args.seq_len) or is_auto(args.batch_size)
    recorded = _recorded_shape(args.resume) if auto and args.resume else None
    lr = args.lr if args.lr is not None else _default_lr(configs)
    train_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        epochs=args.epochs,
        batch_size=1 if is_auto(args.batch_size) else args.batch_size,  # auto: chosen before loading, below
        grad_accum=args.grad_accum,
        lr=lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        log_every=args.log_every,
        save_every=args.save_every,
        progress=not args.no_progress,
        on_nan=args.on_nan,
        fsdp=args.fsdp or _accelerate_asks_for_fsdp(),
        deepspeed=args.deepspeed or _accelerate_deepspeed_spec(args),
    )
    train_args.validate()
    # The planner's sharded layout (base weights and adapters split over the processes) is also ZeRO-3's.
    shards_weights = train_args.fsdp or (train_args.deepspeed is not None and requested_stage(train_args.deepspeed) == 3)
    device, rank, world_size = devices.init_distributed(args.device)  # torchrun: one process per device
    graph_mode = devices.resolve_graph_mode(device, args.graph_mode)
    dtype = _resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)

    started = time.perf_counter()
    model_path = assets.resolve_model_path(args.model)
    host_memory = devices.shares_host_memory(device)
    # Offload moves nothing where device memory is host memory, so the plan leaves it out there, as the run does.
    planned_offload = None if host_memory else args.offload_activations
    shape = None
    if recorded is not None:
        _reuse_recorded_shape(args, recorded)
    elif auto:
        from .plan.auto_shape import choose_with_tracer
        from .plan.preflight import step_tracer

        if budget is None:
            budget = _default_budget(device, world_size)
        tracer = step_tracer(model_path, args.method, configs, dtype, world_size, shards_weights, loss_chunk_tokens,
                             args.gradient_checkpointing, planned_offload)
        shape = choose_with_tracer(tracer, args.seq_len, args.batch_size, budget, include_host=host_memory)
        args.seq_len, args.batch_size = shape.seq_len, shape.batch_size
        logger.info("%s", _describe_choice(shape))
    elif args.plan_check == "on" or (args.plan_check == "auto" and not host_memory):
        from .plan.preflight import check_before_loading

        check_before_loading(model_path, args.method, configs, args.seq_len, args.batch_size, dtype,
                             budget if budget is not None else devices.memory_stats(device).total_bytes,
                             world_size=world_size, fsdp=shards_weights, loss_chunk_tokens=loss_chunk_tokens,
                             gradient_checkpointing=args.gradient_checkpointing, offload_activations=planned_offload,
                             include_host=host_memory)
    train_args.batch_size = args.batch_size
    model, tokenizer = assets.load_model_and_tokenizer(model_path, dtype=dtype)
    data_path = assets.default_dataset_path() if args.data == "default" else Path(args.data)
    data = load_dataset(data_path, tokenizer, args.seq_len)
    if args.eval_data:
        train_data, eval_data = data, load_dataset(args.eval_data, tokenizer, args.seq_len)
    else:
        train_data, eval_data = split_held_out(data, args.eval_fraction, args.seed)
    logger.info("Data: %d training and %d held-out examples of %d tokens from %s", len(train_data), len(eval_data), args.seq_len, data_path)
    if shape is not None and "batch_size" in shape.chosen:
        train_args.batch_size = args.batch_size = _batch_within_data(args.batch_size, len(train_data), world_size)

    paca_model = prepare_model(model, configs, device=device)
    paca_model.set_loss_chunk_tokens(loss_chunk_tokens)
    if args.gradient_checkpointing:
        paca_model.gradient_checkpointing_enable()
    if args.offload_activations:
        from .offload import offload_activations

        modules = args.offload_activations
        offload_activations(paca_model.base_model, modules if modules == "decoder-layers" else _targets(modules))
    devices.apply_graph_mode(paca_model.base_model, device, graph_mode)
    trainable, total = paca_model.parameter_counts()
    logger.info("Trainable parameters: %d of %d (%.3f%%)", trainable, total, 100 * trainable / total)

    trainer = Trainer(paca_model, train_args, train_data, device)
    if args.resume:
        trainer.resume_from(args.resume, trust_checkpoint=args.trust_checkpoint)
    prompt_ids = eval_data.input_ids[:1, : min(24, args.seq_len // 2)].to(device)
    eval_before = trainer.evaluate(eval_data)
    sample_before = _sample(paca_model, tokenizer, prompt_ids, args.sample_tokens) if args.sample_tokens else None
    logger.info("Held-out loss before training: %.4f", eval_before)

    train_start = time.perf_counter()
    interrupted = False
    try:
        trainer.train()
    except KeyboardInterrupt:
        interrupted = True
    train_seconds = time.perf_counter() - train_start

    out = Path(args.out)
    metrics = {
        "library_version": __version__,
        "command": " ".join(sys.argv),
        "method": paca_model.method,
        "model": str(model_path),
        "data": str(data_path),
        "device": str(device),
        "graph_mode": graph_mode,
        "dtype": str(dtype).replace("torch.", ""),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": _version_of("transformers")},
        "configs": [c.to_dict() for c in configs],
        "seq_len": args.seq_len,
        "auto_shape": _auto_shape_record(shape, recorded, args),
        "training": vars(train_args),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "host_parameters": paca_model.host_parameter_count(),
        "host_traffic": paca_model.host_traffic(),
        "steps": trainer.state.step,
        "train_seconds": train_seconds,
        "history": trainer.state.history,
        "held_out_loss_before": eval_before,
        "interrupted": interrupted,
        "checkpoint": str(trainer.checkpoint_dir),
    }
    if interrupted:
        if rank == 0:
            write_metrics(out / "metrics.json", metrics)
            print(f"Interrupted: resume with  paca train --resume {trainer.checkpoint_dir} <same flags>")
        return 130
    eval_after = trainer.evaluate(eval_data)
    sample_after = _sample(paca_model, tokenizer, prompt_ids, args.sample_tokens) if args.sample_tokens else None
    adapter_dir = out / "adapter"
    # Every rank takes part (FSDP gathers the shards); rank 0 writes.
    paca_model.save_pretrained(adapter_dir, is_main_process=rank == 0, base_model=str(model_path))
    metrics.update(
        held_out_loss_after=eval_after,
        held_out_perplexity_before=_safe_exp(eval_before),
        held_out_perplexity_after=_safe_exp(eval_after),
        prompt=tokenizer.decode(prompt_ids[0], skip_special_tokens=True),
        sample_before=sample_before,
        sample_after=sample_after,
        adapter=str(adapter_dir),
        peak_memory_bytes=devices.memory_stats(device).peak_bytes,
        total_seconds=time.perf_counter() - started,
        world_size=world_size,
    )
    if rank == 0:
        write_metrics(out / "metrics.json", metrics)
        _print_summary(metrics)
    devices.shutdown_distributed()  # every rank waits for rank 0's writes, then leaves the group
    return 0


def _recorded_shape(resume: str) -> dict[str, int]:
    """The shape the checkpoint being resumed was trained at: a resumed auto run must keep it (the data position
    counts its batches), so it is re-used, not planned again. Read before anything loads."""
    from .checkpoint import CheckpointError
    from .training_state import has_training_state, recorded_shape

    directory = Path(resume)
    if has_training_state(directory / "checkpoint"):
        directory = directory / "checkpoint"
    if not has_training_state(directory):
        raise CheckpointError(f"{directory} is not a resumable checkpoint (expected <out>/checkpoint).")
    shape = recorded_shape(directory)
    if shape is None:
        raise PacaConfigError(
            f"--resume {resume} with --seq-len/--batch-size auto: this checkpoint does not record the sequence length and "
            "batch size it was trained at (written before paca-hal recorded them), and planning them again could change "
            "them. Pass the run's --seq-len and --batch-size as numbers (its metrics.json lists them)."
        )
    return shape


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


def _describe_choice(shape: "ShapeChoice") -> str:
    """The INFO line of an auto choice: the shape, its planned peak, the budget, and where the figure comes from."""
    from .plan.auto_shape import format_bytes

    def flag(name: str, value: int) -> str:
        return f"--{name.replace('_', '-')} {value}" + (" (auto)" if name in shape.chosen else "")

    return (f"{flag('seq_len', shape.seq_len)} at {flag('batch_size', shape.batch_size)}: planned peak "
            f"{format_bytes(shape.peak_bytes)} per process of a {format_bytes(shape.budget_bytes)} memory budget "
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


def _safe_exp(value: float) -> float:
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
        f"paca train finished: {m['steps']} steps of {m['method']} on {m['device']} ({m['dtype']}) in {m['train_seconds']:.0f} s",
        f"  trainable parameters   {m['trainable_parameters']:,} of {m['total_parameters']:,}"
        + (f" (+ {m['host_parameters']:,} trained in host memory)" if m.get("host_parameters") else ""),
        f"  held-out loss          {m['held_out_loss_before']:.4f} -> {m['held_out_loss_after']:.4f}"
        f"  (perplexity {m['held_out_perplexity_before']:.1f} -> {m['held_out_perplexity_after']:.1f})",
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


def _load_for_adapter(args):
    from . import assets
    from .checkpoint import read_adapter_config

    read_adapter_config(args.adapter)  # clear error before the model loads
    model, tokenizer = assets.load_model_and_tokenizer(assets.resolve_model_path(args.model))
    from .model import PacaModel

    return PacaModel.from_pretrained(model, args.adapter, device="cpu"), tokenizer


def run_merge(args: argparse.Namespace) -> int:
    from .quantization import is_quantized_model, merge_and_dequantize

    paca_model, tokenizer = _load_for_adapter(args)
    # A 4-bit (QPaCA) base is written dequantized with the delta added: exact, and a plain HF model.
    merged = merge_and_dequantize(paca_model) if is_quantized_model(paca_model) else paca_model.merge_and_unload()
    merged.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"Merged model written to {args.out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .export import export_peft_lora

    paca_model, _ = _load_for_adapter(args)
    export_peft_lora(paca_model, args.out, base_model_name_or_path=None)
    print(f"PEFT LoRA adapter written to {args.out} (load with peft.PeftModel.from_pretrained)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .assets import AssetError
    from .checkpoint import CheckpointError
    from .dataset import DataError
    from .errors import NonFiniteLossError, PacaConfigError, TargetModuleError, TrainingOutOfMemoryError

    try:
        return args.handler(args)
    except (
        AssetError, devices.DeviceUnavailableError, devices.InvalidDeviceError, PacaConfigError, TargetModuleError,
        CheckpointError, DataError, ValueError, NonFiniteLossError, TrainingOutOfMemoryError,
    ) as error:
        if args.verbose:
            logger.exception("%s", error)
        else:
            logger.error("%s", error)
        return 2
    except ImportError as error:
        from .extras import install_hint, missing_optional_module

        module = missing_optional_module(error)
        if module is None:
            raise  # not an optional extra: a real bug, keep its traceback
        if "paca-hal[" in str(error):  # already says what to install
            logger.error("%s", error)
        else:
            logger.error("%s needs the optional package '%s', which is not installed: %s", args.command, module, install_hint(module))
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
