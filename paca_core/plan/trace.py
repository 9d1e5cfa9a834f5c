"""Trace one real training step of a method on a model built from its config, without its weights.

The model is built under ``FakeTensorMode`` (shapes, dtypes and storages, no memory), set up by the
same code ``paca bench`` uses (:mod:`paca_core.workloads.prepare`: ``prepare_model`` for our methods,
PEFT's ``get_peft_model`` for its peers) and stepped by :func:`paca_core.train.steps.train_step`, the loop
``paca train`` runs, under a :class:`~paca_core.plan.tracker.StepTracker`. A method that changes its code changes its plan.

``fake=False`` runs the identical procedure on real CPU tensors: that is how the plan is checked.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..errors import PacaConfigError
from ..memory.quantization import quant_state_tensors
from ..train.steps import summed_loss, train_step
from ..workloads.accounting import host_tables, table_tensors
from ..workloads.models import default_dtype
from ..workloads.prepare import Prepared, apply_levers, prepare
from ..workloads.specs import MethodSpec
from .standins import PlannedActivationOffload, plan_host_tables, unpacked_sequences
from .tracker import StepTrace, StepTracker

logger = logging.getLogger(__name__)

#: What plans of entries on a 4-bit base say: they are traced with bitsandbytes' own ops on fake tensors,
#: the packed weight in a plain parameter (``paca_core.memory.quantization``'s fake layer).
QUANTIZED_NOTE = ("4-bit base planned with a stand-in: bitsandbytes' quantize/dequantize ops run as their registered "
                  "fake kernels (real shapes and bytes, no arithmetic); the packed weight sits in a plain parameter "
                  "instead of bitsandbytes' Params4bit.")
#: Methods whose step depends on values, not only shapes, and why they are not planned.
NOT_TRACEABLE: dict[str, str] = {}


@dataclass
class TracedModel:
    """A model set up for one method, with its optimizer state created, ready to trace steps."""

    spec: MethodSpec
    prepared: Prepared
    fake_mode: Any
    vocab_size: int
    host_tensors: list[torch.Tensor] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def context(self):
        if self.fake_mode is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(self.fake_mode)
        stack.enter_context(unpacked_sequences())
        return stack


def _apply_overwriting(self: nn.Module, fn, recurse: bool = True) -> nn.Module:
    """``Module._apply`` that replaces converted parameters instead of swapping them: torch swaps
    fake parameters in place, which fails once fake mode holds a weak reference to them (PEFT moves
    and upcasts its adapters with ``.to``)."""
    if recurse:
        for child in self.children():
            child._apply(fn)
    for key, param in self._parameters.items():
        if param is not None:
            with torch.no_grad():
                applied = fn(param)
            if applied is not param:
                self._parameters[key] = nn.Parameter(applied, requires_grad=param.requires_grad)
    for key, buffer in self._buffers.items():
        if buffer is not None:
            self._buffers[key] = fn(buffer)
    return self


@contextlib.contextmanager
def _fake_safe_conversion() -> Iterator[None]:
    original = nn.Module._apply
    nn.Module._apply = _apply_overwriting
    try:
        yield
    finally:
        nn.Module._apply = original


def _dtype_argument(dtype: torch.dtype) -> dict:
    """``from_config``'s dtype keyword: ``dtype`` on transformers 5, ``torch_dtype`` before."""
    import transformers

    return {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}


@contextlib.contextmanager
def _data_dependence_explained(method: str) -> Iterator[None]:
    """A step that reads tensor values on the host cannot be traced on fake tensors: say which op."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    try:
        yield
    except (DataDependentOutputException, DynamicOutputShapeException) as error:
        raise PacaConfigError(
            f"{method}: its training step depends on tensor values ({error.func}: a host read or a shape that depends "
            "on data), so it cannot be traced on fake tensors and the planner cannot plan it."
        ) from None


def _bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            seen[id(storage)] = storage.nbytes()
    return sum(seen.values())


def _weight_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and 4-bit layers' quantization state: what the model holds before a step."""
    return list(module.parameters()) + list(module.buffers()) + quant_state_tensors(module)


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def build(config, spec: MethodSpec, rank: int | None, dtype: torch.dtype, options: dict | None = None, fake: bool = True,
          seed: int = 0, gradient_checkpointing: bool = False, configs: list | None = None,
          loss_chunk_tokens: int | None = None, offload_activations: str | None = None) -> TracedModel:
    """Build ``config``'s causal LM (fake or real CPU tensors), set it up for ``spec`` and run one
    tiny step so the optimizer state exists (what every later step starts from). ``configs``: our
    method's configs as ``paca train`` built them (copied; the bench's defaults otherwise).
    ``loss_chunk_tokens``: our methods' LM head + loss in chunks, as ``paca train`` runs them (the PEFT
    peers and full fine-tuning have no chunked loss and ignore it). ``offload_activations``: modules
    whose saved activations go to host memory (``paca train --offload-activations``), as on a device
    with its own memory (:class:`~paca_core.plan.standins.PlannedActivationOffload`)."""
    from transformers import AutoModelForCausalLM

    if spec.name in NOT_TRACEABLE and fake:
        raise PacaConfigError(f"{spec.name}: {NOT_TRACEABLE[spec.name]}")
    fake_mode = None
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with (fake_mode or contextlib.nullcontext()), (_fake_safe_conversion() if fake else contextlib.nullcontext()), \
            (unpacked_sequences() if fake else contextlib.nullcontext()), torch.device("cpu"), default_dtype(dtype):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, **_dtype_argument(dtype))  # config.json's torch_dtype must not win
        if gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise PacaConfigError(f"{type(model).__name__} does not support gradient checkpointing.")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        prepared = prepare(spec, model, rank, dict(options or {}), torch.device("cpu"), lr=1e-4, place=False,
                           configs=copy.deepcopy(configs) if configs is not None else None)
        prepared.module.train()
        if loss_chunk_tokens is not None and hasattr(prepared.module, "set_loss_chunk_tokens"):
            prepared.module.set_loss_chunk_tokens(loss_chunk_tokens)
        if offload_activations:
            PlannedActivationOffload(prepared.module, offload_activations)
        # The entry's own levers (paca bench's ``method@gc+chunked-loss+offload``), less those asked for above.
        levers = tuple(lever for lever in spec.levers if not (lever == "gc" and gradient_checkpointing)
                       and not (lever == "offload" and offload_activations))
        apply_levers(prepared, model, levers, offload=PlannedActivationOffload, loss_chunk_tokens=loss_chunk_tokens)
        traced = TracedModel(spec, prepared, fake_mode, int(config.vocab_size))
        tables = host_tables(prepared.module)
        plan_host_tables(tables)  # MEFT: worst-case row choices instead of data-dependent ones (standins.py)
        ids = torch.zeros((1, 2), dtype=torch.long)
        with _data_dependence_explained(spec.name):
            phased_step(prepared, ids)
        # After the step: the tables' Adam moments exist now (they are attributes of the table).
        traced.host_tensors = [t for table in tables for t in table_tensors(table)]
        module = prepared.module
        traced.counts = {
            "trainable_params": sum(p.numel() for p in prepared.params) + prepared.extra_trainable,
            "total_params": sum(p.numel() for p in module.parameters()),
            "weights": _bytes(_weight_tensors(module)),
            "optimizer": _bytes(_optimizer_tensors(prepared.optimizer)),
            "host": _bytes(traced.host_tensors),
        }
    return traced


def phased_step(prepared: Prepared, ids: torch.Tensor, tracker: StepTracker | None = None) -> dict[str, int]:
    """One :func:`train_step` as ``paca train`` runs it, its phases labelled for the tracker: forward,
    backward (train_step calls it right after forward returns), optimizer (with clipping), and the
    optimizer's post-step hooks, where PaCA writes its columns."""
    counted: dict[str, int] = {}
    label = tracker.set_phase if tracker is not None else (lambda name: None)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        label("forward")
        with (tracker.saving() if tracker is not None else contextlib.nullcontext()):
            loss = prepared.forward(batch)
        label("backward")
        return loss

    def after_backward() -> None:
        counted["gradients"] = _bytes(p.grad for p in prepared.params if p.grad is not None)
        label("optimizer")

    # Instance post-step hooks run before the global ones (PaCA's column write).
    hook = prepared.optimizer.register_step_post_hook(lambda *args: label("column_write")) if prepared.optimizer else None
    try:
        train_step(forward, [ids], prepared.optimizer, torch.device("cpu"), params=prepared.params,
                   set_to_none=prepared.set_to_none, after_backward=after_backward)
    finally:
        if hook is not None:
            hook.remove()
    return counted


def trace_step(traced: TracedModel, seq_len: int, batch_size: int) -> tuple[StepTrace, dict[str, int]]:
    """One training step at (batch_size, seq_len) under the tracker, then the held-out pass ``paca train`` runs
    with the optimizer state live (phase ``evaluate``: its peak counts, its kernels do not time the step);
    returns the trace and byte counts."""
    prepared = traced.prepared
    with traced.context():
        ids = torch.zeros((batch_size, seq_len), dtype=torch.long)
        baseline = _weight_tensors(prepared.module) + _optimizer_tensors(prepared.optimizer)
        tracker = StepTracker(baseline, host=traced.host_tensors)
        with tracker, _data_dependence_explained(traced.spec.name):
            counted = phased_step(prepared, ids, tracker)
        tracker.trace.end_bytes = tracker.live_bytes
        live_grads = [p.grad for p in prepared.params if p.grad is not None]  # kept in place under captured graphs
        evaluation = StepTracker(_weight_tensors(prepared.module) + _optimizer_tensors(prepared.optimizer) + live_grads,
                                 host=traced.host_tensors)
        with evaluation, _data_dependence_explained(traced.spec.name):
            evaluation.set_phase("evaluate")
            _evaluate(prepared, ids)
    trace = tracker.trace
    trace.peak_by_phase["evaluate"] = evaluation.trace.peak_bytes
    trace.evaluation_events = evaluation.trace.memory_events  # for the allocator model (allocator.py)
    trace.peak_bytes = max(trace.peak_bytes, evaluation.trace.peak_bytes)
    return trace, dict(traced.counts, gradients=counted.get("gradients", 0))


def _evaluate(prepared: Prepared, ids: torch.Tensor) -> None:
    """One batch of ``paca train``'s held-out pass (:func:`paca_core.train.steps.evaluate`): the training micro-batch, no
    gradients, the chunked head and loss where the model chunks its training loss."""
    module = prepared.module
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            # No attention mask, as the traced training step: transformers skips an all-ones mask in the real run.
            summed_loss(module, ids, ids, None, getattr(module, "loss_chunk_tokens", None))
    finally:
        module.train(was_training)
