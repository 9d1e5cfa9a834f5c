"""QPaCA vs PEFT QLoRA on the same bitsandbytes 4-bit base: memory, step time, held-out loss.

Both methods start from the same model, quantized by the same call
(``paca_core.memory.quantization.quantize_base``: NF4 by default, blocks of 64, double-quantized scales)
on the same 7 projections, and train with the same loop (AdamW, 5 warm-up steps then cosine decay,
gradient clipping 1.0, identical batches) for the same number of steps. Ranks are parameter-matched:
QPaCA r=16 trains 16·Σout per layer, QLoRA r=8 trains 8·Σ(in+out) (within 2% on SmolLM2-135M);
learning rates are each method's `paca train` default.

Each method runs in its own process, so peak memory is not shared between them. Reported:
- parameter bytes (every parameter and buffer, packed 4-bit weights and quantization state included),
- trainable parameters and optimizer-state bytes,
- activation bytes kept for backward by one training forward (exact, from saved-tensor hooks),
- peak memory during training: device allocator peak on CUDA/HPU, process peak RSS (VmHWM) on CPU,
- median step time (forward + backward + optimizer step, first 2 steps excluded), in the separate
  runs and again with both models stepping alternately in one process (fair under outside load),
- held-out loss before and after training.

Run: python scripts/qpaca_vs_qlora.py [--device cpu] [--steps 30] [--quantize nf4] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import devices  # noqa: E402
from paca_core.files import assets  # noqa: E402
from paca_core.config import LLAMA_PROJECTIONS, PaCAConfig  # noqa: E402
from paca_core.data.dataset import load_dataset, split_held_out  # noqa: E402
from paca_core.memory.measure import count_saved_tensors  # noqa: E402
from paca_core.model import prepare_model  # noqa: E402
from paca_core.memory.quantization import quantize_base  # noqa: E402

METHODS = {
    # name: (rank, learning rate)
    "qpaca": (16, 5e-3),
    "qlora": (8, 2e-3),
}


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, plus the bitsandbytes quantization state of 4-bit weights."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += _tensor_bytes(tensor)
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += sum(_tensor_bytes(t) for t in state.as_dict(packed=True).values() if torch.is_tensor(t))
    return total


def build(method: str, device: torch.device, kind: str, dtype: torch.dtype):
    rank, lr = METHODS[method]
    model, tokenizer = assets.load_model_and_tokenizer(assets.resolve_model_path("default"), dtype=dtype)
    quantize_base(model, kind, target_modules=list(LLAMA_PROJECTIONS), device=device)
    if method == "qpaca":
        adapted = prepare_model(model, PaCAConfig(r=rank, seed=0), device=device)
    else:
        import peft

        model.to(device)
        for param in model.parameters():
            param.requires_grad_(False)
        config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LLAMA_PROJECTIONS), lora_dropout=0.0, bias="none")
        adapted = peft.get_peft_model(model, config)
    return adapted, tokenizer, lr


def _loss(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


@torch.no_grad()
def evaluate(model, data, device, batch_size: int) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for first in range(0, len(data), batch_size):
        part = data.subset(slice(first, first + batch_size))
        logits = model(input_ids=part.input_ids.to(device), attention_mask=part.attention_mask.to(device)).logits.float()
        labels = part.labels[:, 1:].to(device)
        total += float(torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        ))
        tokens += int((part.labels[:, 1:] != -100).sum())
    model.train()
    return total / max(1, tokens)


def run_one(args) -> dict:
    device = devices.resolve_device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(args.seed)
    model, tokenizer, lr = build(args.run_one, device, args.quantize, dtype)
    data = load_dataset(assets.default_dataset_path(), tokenizer, args.seq_len)
    train, held_out = split_held_out(data, 0.1, args.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    warmup = 5
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup))),
    )
    result = {
        "method": args.run_one,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "quantize": args.quantize,
        "rank": METHODS[args.run_one][0],
        "lr": lr,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "parameter_bytes": parameter_bytes(model),
        "held_out_loss_before": evaluate(model, held_out, device, args.batch_size),
    }
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    batches = list(train.batches(args.batch_size, order))
    model.train()
    # Activation bytes kept for backward by one training forward (exact, allocator independent).
    first = {k: v.to(device) for k, v in batches[0].items()}
    with count_saved_tensors(model) as saved:
        loss = _loss(model, first)
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    result["activation_bytes_per_step"] = saved.activation_bytes

    devices.synchronize(device)
    devices.reset_peak_memory_stats(device)
    step_times, losses = [], []
    for step in range(args.steps):
        batch = {k: v.to(device) for k, v in batches[step % len(batches)].items()}
        devices.synchronize(device)
        start = time.perf_counter()
        loss = _loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        devices.synchronize(device)
        step_times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    stats = devices.memory_stats(device)
    result.update(
        optimizer_state_bytes=sum(_tensor_bytes(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)),
        peak_memory_bytes=stats.peak_bytes,
        peak_memory_source=getattr(stats, "source", ""),
        median_step_seconds=statistics.median(step_times[2:] if len(step_times) > 4 else step_times),
        train_losses=losses,
        held_out_loss_after=evaluate(model, held_out, device, args.batch_size),
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        versions={"torch": torch.__version__, "bitsandbytes": __import__("bitsandbytes").__version__, "peft": __import__("peft").__version__},
    )
    return result


def interleaved_timing(args) -> dict:
    """Both models in one process, stepping alternately on the same batches: a step-time ratio that
    load from other processes on the machine affects equally (the separate runs above cannot promise that)."""
    device = devices.resolve_device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    runs = {}
    for method in METHODS:
        torch.manual_seed(args.seed)
        model, tokenizer, lr = build(method, device, args.quantize, dtype)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        runs[method] = (model, torch.optim.AdamW(trainable, lr=lr), trainable)
    data = load_dataset(assets.default_dataset_path(), tokenizer, args.seq_len)
    train, _ = split_held_out(data, 0.1, args.seed)
    batches = list(train.batches(args.batch_size, torch.arange(len(train))))
    times = {method: [] for method in METHODS}
    for step in range(args.timing_steps + 2):
        batch = {k: v.to(device) for k, v in batches[step % len(batches)].items()}
        order = list(METHODS) if step % 2 == 0 else list(reversed(METHODS))
        for method in order:
            model, optimizer, trainable = runs[method]
            devices.synchronize(device)
            start = time.perf_counter()
            _loss(model, batch).backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            devices.synchronize(device)
            if step >= 2:
                times[method].append(time.perf_counter() - start)
    return {method: statistics.median(values) for method, values in times.items()}


def table(results: dict[str, dict]) -> str:
    q, l = results["qpaca"], results["qlora"]
    mib = 2**20
    rows = [
        ("trainable parameters", f"{q['trainable_parameters']:,}", f"{l['trainable_parameters']:,}", q["trainable_parameters"] / l["trainable_parameters"]),
        ("parameter memory (MiB)", f"{q['parameter_bytes'] / mib:.1f}", f"{l['parameter_bytes'] / mib:.1f}", q["parameter_bytes"] / l["parameter_bytes"]),
        ("optimizer state (MiB)", f"{q['optimizer_state_bytes'] / mib:.2f}", f"{l['optimizer_state_bytes'] / mib:.2f}", q["optimizer_state_bytes"] / l["optimizer_state_bytes"]),
        ("activations kept for backward per step (MiB)", f"{q['activation_bytes_per_step'] / mib:.1f}", f"{l['activation_bytes_per_step'] / mib:.1f}", q["activation_bytes_per_step"] / l["activation_bytes_per_step"]),
        (f"peak memory while training (MiB, {q['peak_memory_source'] or 'device'})", f"{q['peak_memory_bytes'] / mib:.0f}", f"{l['peak_memory_bytes'] / mib:.0f}", q["peak_memory_bytes"] / l["peak_memory_bytes"]),
        ("median step time, separate runs (s)", f"{q['median_step_seconds']:.3f}", f"{l['median_step_seconds']:.3f}", q["median_step_seconds"] / l["median_step_seconds"]),
        ("median step time, interleaved in one process (s)", f"{results['interleaved']['qpaca']:.3f}", f"{results['interleaved']['qlora']:.3f}", results["interleaved"]["qpaca"] / results["interleaved"]["qlora"]),
        ("held-out loss before", f"{q['held_out_loss_before']:.4f}", f"{l['held_out_loss_before']:.4f}", None),
        (f"held-out loss after {q['steps']} steps", f"{q['held_out_loss_after']:.4f}", f"{l['held_out_loss_after']:.4f}", None),
    ]
    lines = ["| | QPaCA (r=16) | PEFT QLoRA (r=8) | QPaCA / QLoRA |", "|---|---|---|---|"]
    lines += [f"| {name} | {a} | {b} | {'' if ratio is None else f'{ratio:.3f}'} |" for name, a, b, ratio in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--quantize", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--timing-steps", type=int, default=6, help="steps per method of the interleaved timing")
    parser.add_argument("--run-one", choices=sorted(METHODS) + ["interleaved"], help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        result = interleaved_timing(args) if args.run_one == "interleaved" else run_one(args)
        Path(args.result_file).write_text(json.dumps(result))
        return 0
    results = {}
    common = ["--device", args.device, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
              "--batch-size", str(args.batch_size), "--quantize", args.quantize, "--seed", str(args.seed),
              "--timing-steps", str(args.timing_steps)]
    with tempfile.TemporaryDirectory() as tmp:
        for method in [*METHODS, "interleaved"]:  # one process each: peak memory is per run
            out = Path(tmp) / f"{method}.json"
            subprocess.run([sys.executable, __file__, *common, "--run-one", method, "--result-file", str(out)], check=True)
            results[method] = json.loads(out.read_text())
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
