"""Measure one method in this process: ``python -m paca_core.bench.worker JOB.json RESULT.json``.

The parent (:mod:`.run`) starts one worker per method (and per search probe), so every peak
memory figure starts from a clean process. A job is a JSON object (see :func:`run_job`); the
result is a JSON object with ``status`` ``ok``, ``oom``, ``unavailable`` (a package is missing) or
``error``, and the figures.

Memory is reported two ways. ``peak_memory_bytes`` comes from the device (allocator peak on CUDA/HPU;
VmHWM on CPU, which also counts the weights, Python and libraries). ``counted`` is exact and
device-independent: bytes autograd keeps for backward (``saved_tensors_hooks``, weights excluded),
plus parameter, gradient and optimizer-state bytes summed from the tensors themselves.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

import devices

from ..errors import is_out_of_memory
from ..memory.measure import count_saved_tensors
from ..methods import import_method_modules
from ..memory.quantization import quant_state_tensors
from ..train.steps import evaluate, grads_to_none, train_step
from ..workloads.accounting import host_tables, optimizer_state_bytes, table_tensors, tensor_bytes
from ..workloads.models import ModelChoice, build_model, parse_model, vocab_size
from ..workloads.prepare import Prepared, Unavailable, apply_levers, prepare
from ..workloads.specs import MethodSpec, parse_method_spec

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _step(prepared: Prepared, ids: torch.Tensor, device: torch.device, max_grad_norm: float = 0.0, after_backward=None) -> torch.Tensor:
    """One training step on ``ids``: :func:`paca_core.train.steps.train_step`, as ``paca train`` runs it."""
    return train_step(
        prepared.forward, [ids], prepared.optimizer, device, params=prepared.params, set_to_none=prepared.set_to_none,
        max_grad_norm=max_grad_norm, after_backward=after_backward,
    ).loss


def _counted_step(prepared: Prepared, ids: torch.Tensor, device: torch.device) -> dict[str, int]:
    """One training step with exact accounting of what it keeps."""
    module = prepared.module
    counts: dict[str, int] = {}

    def counted_forward(batch: torch.Tensor) -> torch.Tensor:
        with count_saved_tensors(module) as report:
            loss = prepared.forward(batch)
        counts["saved"] = report.activation_bytes  # the report holds the saved tensors: only its count outlives this
        return loss

    def count_gradients() -> None:
        counts["grads"] = tensor_bytes(p.grad for p in prepared.params if p.grad is not None)

    train_step(
        counted_forward, [ids], prepared.optimizer, device, params=prepared.params, set_to_none=prepared.set_to_none,
        after_backward=count_gradients,
    )
    saved, grads = counts["saved"], counts["grads"]
    params = tensor_bytes(list(module.parameters()) + list(module.buffers()) + quant_state_tensors(module))
    optimizer_state = optimizer_state_bytes(prepared.optimizer) + prepared.extra_state()
    host_table_bytes = tensor_bytes(v for t in host_tables(module) for v in table_tensors(t))
    return {
        "saved_activation_bytes": saved,
        "parameter_bytes": params,
        "gradient_bytes": grads,
        "optimizer_state_bytes": optimizer_state,
        "host_table_bytes": host_table_bytes,
        "total_bytes": saved + params + grads + optimizer_state + host_table_bytes,
    }


def _trainable_counts(prepared: Prepared) -> tuple[int, int]:
    trainable = sum(p.numel() for p in prepared.params) + prepared.extra_trainable
    total = sum(p.numel() for p in prepared.module.parameters())
    return trainable, total


def _setup(job: dict) -> tuple[MethodSpec, ModelChoice, torch.device, Prepared, Any]:
    spec = parse_method_spec(job["method"])
    choice = parse_model(job["model"])
    device = devices.resolve_device(job.get("device"))
    auto = devices.default_dtype_choice(device) if job.get("dtype") in (None, "auto") else None  # the CPU: bf16 only if native
    dtype = auto.dtype if auto is not None else DTYPES[job["dtype"]]
    graph_mode = devices.resolve_graph_mode(device, job.get("graph_mode", "auto"))
    model, tokenizer = build_model(choice, dtype, device, seed=job.get("seed", 0))
    torch.manual_seed(job.get("seed", 0))
    prepared = prepare(spec, model, job.get("rank"), job.get("options", {}), device, job.get("lr", 1e-4))
    apply_levers(prepared, model, spec.levers)
    devices.apply_graph_mode(prepared.module, device, graph_mode)
    prepared.set_to_none = grads_to_none(prepared.module)  # as the Trainer: captured graphs keep gradient buffers
    job["resolved"] = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "graph_mode": graph_mode,
                       "dtype_reason": auto.reason if auto is not None else f"--dtype {job['dtype']}"}
    return spec, choice, device, prepared, tokenizer


def _random_batch(prepared: Prepared, job: dict, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(job.get("seed", 0) + 1)
    vocab = vocab_size(prepared.module)
    return torch.randint(0, vocab, (job["batch_size"], job["seq_len"]), generator=generator).to(device)


def run_speed(job: dict) -> dict:
    """Counted first step, then ``warmup_steps`` and ``steps`` timed steps; the device peak covers those."""
    spec, _, device, prepared, _ = _setup(job)
    prepared.module.train()
    ids = _random_batch(prepared, job, device)
    trainable, total = _trainable_counts(prepared)
    counted = _counted_step(prepared, ids, device)
    devices.synchronize(device)
    after_setup = devices.memory_stats(device).current_bytes
    devices.reset_peak_memory_stats(device)
    for _ in range(job.get("warmup_steps", 1)):
        _step(prepared, ids, device)
    times = []
    for _ in range(job["steps"]):
        devices.synchronize(device)
        start = time.perf_counter()
        _step(prepared, ids, device)
        devices.synchronize(device)
        times.append(time.perf_counter() - start)
    stats = devices.memory_stats(device)
    median = statistics.median(times) if times else float("nan")
    return {
        "status": "ok",
        "trainable_parameters": trainable,
        "total_parameters": total,
        "step_times_s": times,
        "median_step_s": median,
        "tokens_per_s": job["batch_size"] * job["seq_len"] / median if times else float("nan"),
        "peak_memory_bytes": stats.peak_bytes,
        "memory_before_steps_bytes": after_setup,
        "memory_source": stats.source,
        "counted": counted,
        **job["resolved"],
    }


def run_probe(job: dict) -> dict:
    """Does one step at this shape fit? CPU: counted bytes (exact, deterministic); else the device peak."""
    _, _, device, prepared, _ = _setup(job)
    prepared.module.train()
    ids = _random_batch(prepared, job, device)
    counted = _counted_step(prepared, ids, device)
    if devices.runtime_for(device).shares_host_memory:
        return {"status": "ok", "memory_bytes": counted["total_bytes"], "memory_kind": "counted", "counted": counted}
    devices.synchronize(device)
    devices.reset_peak_memory_stats(device)
    _step(prepared, ids, device)  # optimizer state now exists: this is the steady-state peak
    devices.synchronize(device)
    return {"status": "ok", "memory_bytes": devices.memory_stats(device).peak_bytes, "memory_kind": "device peak", "counted": counted}


#: Mean next-token loss over every target token of ``data``: the evaluation ``paca train`` runs.
_held_out_loss = evaluate


def run_accuracy(job: dict) -> dict:
    """Fine-tune for ``steps`` on real text and record train and held-out loss (floor: no training)."""
    from ..files import assets
    from ..data.dataset import load_dataset, split_held_out

    spec, choice, device, prepared, tokenizer = _setup(job)
    if not choice.has_real_weights or tokenizer is None:
        raise ValueError("Accuracy mode needs real weights and a tokenizer: use --model default or a local model folder.")
    acc = job.get("accuracy", {})
    data_path = assets.default_dataset_path() if acc.get("data", "default") == "default" else Path(acc["data"])
    data = load_dataset(data_path, tokenizer, job["seq_len"])
    train_data, eval_data = split_held_out(data, acc.get("eval_fraction", 0.1), job.get("seed", 0))
    result = fine_tune(prepared, train_data, eval_data, job, device)
    return {**result, "data": str(data_path), **job["resolved"]}


def fine_tune(prepared: Prepared, train_data, eval_data, job: dict, device: torch.device, loss_before: float | None = None) -> dict:
    """The accuracy-mode training loop on already prepared data (shared with the lr sweep, which
    loads the model once per process). ``loss_before``: the frozen model's held-out loss, when the
    caller already has it (an adapter starts as the identity, so it is the same for every method)."""
    from ..train.trainer import TrainingArguments, _lr_lambda

    acc = job.get("accuracy", {})
    module = prepared.module
    module.train()
    trainable, total = _trainable_counts(prepared)
    eval_every = max(1, acc.get("eval_every", 10))
    evals = [(0, _held_out_loss(module, eval_data, device) if loss_before is None else loss_before)]
    losses, times = [], []
    if prepared.optimizer is not None and job["steps"] > 0:
        args = TrainingArguments(output_dir="", max_steps=job["steps"], warmup_steps=acc.get("warmup_steps", 5), lr=job["lr"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(prepared.optimizer, _lr_lambda(args, job["steps"]))
        order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(job.get("seed", 0)))
        per_epoch = len(train_data) // job["batch_size"]
        if per_epoch == 0:
            raise ValueError(f"{len(train_data)} training examples are fewer than --batch-size {job['batch_size']}.")
        for step in range(1, job["steps"] + 1):
            first = ((step - 1) % per_epoch) * job["batch_size"]
            batch = train_data.subset(order[first : first + job["batch_size"]])
            start = time.perf_counter()
            inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}
            loss = train_step(
                lambda b: module(**b).loss, [{k: v.to(device) for k, v in inputs.items()}], prepared.optimizer, device,
                params=prepared.params, set_to_none=prepared.set_to_none, max_grad_norm=1.0, scheduler=scheduler,
            ).loss
            losses.append(float(loss.detach()))
            times.append(time.perf_counter() - start)
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"training loss became {losses[-1]} at step {step}")
            if step % eval_every == 0 or step == job["steps"]:
                evals.append((step, _held_out_loss(module, eval_data, device)))
    return {
        "status": "ok",
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_loss": losses,
        "held_out": evals,
        "held_out_loss_before": evals[0][1],
        "held_out_loss": evals[-1][1],
        "median_step_s": statistics.median(times) if times else None,
        "train_examples": len(train_data),
        "held_out_examples": len(eval_data),
        "peak_memory_bytes": devices.memory_stats(device).peak_bytes,
    }


MODES = {"speed": run_speed, "probe": run_probe, "accuracy": run_accuracy}


def run_job(job: dict) -> dict:
    """Run one job and return its result; failures become ``status`` fields, never exceptions."""
    try:
        import_method_modules(job.get("method_modules", ()))  # methods the parent registered from outside paca_core
        return MODES[job["mode"]](dict(job))
    except Unavailable as error:
        return {"status": "unavailable", "reason": str(error)}
    except Exception as error:  # reported per method; the other methods still run
        if is_out_of_memory(error):  # every device's form (CUDA's OutOfMemoryError, HPU/CPU RuntimeErrors)
            return {"status": "oom", "reason": (str(error).splitlines() or [type(error).__name__])[0]}
        logger.debug("worker failed", exc_info=True)
        return {"status": "error", "reason": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-4000:]}


def worker_main(argv: list[str] | None, run: Callable[[dict], dict], module: str) -> int:
    """``python -m MODULE JOB.json RESULT.json``: read a job, run it with ``run``, write its result (any job's error is
    in the result, so the exit status is 0 unless the arguments are wrong)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(f"usage: python -m {module} JOB.json RESULT.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    job = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(run(job), default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return worker_main(argv, run_job, "paca_core.bench.worker")


if __name__ == "__main__":
    raise SystemExit(main())
