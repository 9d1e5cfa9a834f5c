"""One training step and one held-out evaluation, used by every loop paca-hal runs: the
:class:`~paca_core.train.trainer.Trainer` (``paca train``) and the ``paca bench`` worker (speed, probe and
accuracy modes, and the learning-rate sweep built on it). The Hugging Face / TRL / Gaudi integrations
leave the loop to those trainers.

The step is device-generic: one ``devices.step_boundary`` after backward and one after the update
(an HPU lazy-mode graph each), gradient clipping through ``devices.clip_grad_norm``, and gradients
freed after the update unless the model runs in a graph mode that holds gradient buffers by address
(captured HPU graphs: ``devices.keeps_grad_buffers``), where they are zeroed in place instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

import devices


def grads_to_none(model: nn.Module) -> bool:
    """``zero_grad(set_to_none=...)`` for ``model``: False under a graph mode that keeps gradient buffers."""
    return not devices.keeps_grad_buffers(devices.graph_mode_of(model))


@dataclass
class StepResult:
    """What one step did. ``loss``: mean over its micro-batches, detached, on the device (no host read)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    applied: bool


def train_step(
    forward: Callable[[Any], torch.Tensor],
    micro_batches: Iterable[Any],
    optimizer: torch.optim.Optimizer | None,
    device: torch.device,
    *,
    params: Iterable[torch.Tensor] = (),
    set_to_none: bool = True,
    grad_accum: int = 1,
    max_grad_norm: float = 0.0,
    scheduler: Any = None,
    after_backward: Callable[[], None] | None = None,
    should_apply: Callable[[torch.Tensor, torch.Tensor | None], bool] | None = None,
) -> StepResult:
    """Forward and backward over ``grad_accum`` micro-batches, then one optimizer update.

    ``forward(batch) -> loss``. ``set_to_none``: from :func:`grads_to_none` of the model (in place
    under captured graphs). ``after_backward``: called with the gradients present (accounting).
    ``should_apply(loss, grad_norm)``: False skips the update (the caller drops the gradients).
    Without an optimizer (nothing trains) only forward and backward run.
    """
    step_loss = torch.zeros((), device=device)
    for _, batch in zip(range(grad_accum), micro_batches):
        loss = forward(batch)
        (loss / grad_accum if grad_accum > 1 else loss).backward()
        step_loss += loss.detach() / grad_accum
    devices.step_boundary(device)
    if after_backward is not None:
        after_backward()
    grad_norm = None
    if optimizer is None:
        return StepResult(step_loss, None, applied=False)
    if max_grad_norm > 0:
        grad_norm = devices.clip_grad_norm(list(params), max_grad_norm, device)
    if should_apply is not None and not should_apply(step_loss, grad_norm):
        return StepResult(step_loss, grad_norm, applied=False)
    optimizer.step()  # PaCA layers rewrite their columns in the optimizer's post-step hook
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=set_to_none)
    devices.step_boundary(device)
    return StepResult(step_loss, grad_norm, applied=True)


@torch.no_grad()
def evaluate(model: nn.Module, data, device: torch.device, batch_size: int = 8, *, loss_chunk_tokens: int | None = None,
             progress: bool = False) -> float:
    """Mean next-token loss over every target token of ``data`` (a :class:`~paca_core.data.dataset.TokenizedData`).

    Runs inside the memory the training step was sized for: ``batch_size`` examples at a time (callers pass the
    training micro-batch) and, where the model chunks its training loss (``loss_chunk_tokens``, default the
    model's own), the LM head and loss over chunks too, so the (tokens x vocab) logits never exist in full.
    ``progress``: a tqdm bar (a held-out pass over a large split takes minutes).
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    chunk = loss_chunk_tokens if loss_chunk_tokens is not None else getattr(model, "loss_chunk_tokens", None)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = 0
    starts = range(0, len(data), batch_size)
    for first in tqdm(starts, desc="held-out loss", unit="batch", disable=not progress or len(starts) < 2, dynamic_ncols=True, leave=False):
        subset = data.subset(slice(first, first + batch_size))
        total_tokens += int((subset.labels[:, 1:] != -100).sum())  # counted on the host copy: no device read
        # Packed rows: the per-example position ids keep the examples apart, and an attention mask would join them.
        positions = subset.position_ids.to(device) if getattr(subset, "position_ids", None) is not None else None
        total_loss += summed_loss(model, subset.input_ids.to(device), subset.labels.to(device),
                                  None if positions is not None else subset.attention_mask.to(device), chunk,
                                  position_ids=positions).double()
        devices.step_boundary(device)  # HPU lazy mode: one graph per eval batch
    model.train(was_training)
    return float(total_loss) / max(1, total_tokens)


def summed_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None,
                chunk_tokens: int | None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The summed next-token loss of one batch (what :func:`evaluate` adds up, and what ``paca plan`` traces of it):
    through the chunked head where the model allows it, else from the full logits (in fp32, as the training loss
    computes them). ``position_ids``: packed rows (no attention mask, and no KV cache, so transformers reads the
    example boundaries from the positions)."""
    extra = {} if position_ids is None else {"position_ids": position_ids, "use_cache": False}
    base = getattr(model, "base_model", None)
    if chunk_tokens is not None and base is not None:
        from ..memory.chunked_loss import chunked_causal_lm_forward

        output = chunked_causal_lm_forward(base, chunk_tokens, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                           num_items_in_batch=1, **extra)
        if output is not None:
            return output.loss
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def deepspeed_train_step(zero, forward, micro_batches, device: torch.device, grad_accum: int, scheduler=None, should_apply=None):
    """:func:`train_step` through a :class:`paca_core.distributed.zero.ZeroEngine`: DeepSpeed scales, reduces, clips and steps.

    ``should_apply(loss, None)`` is asked after the last backward, before the update: False leaves the
    update unapplied (the caller stops; skipping steps is not offered under DeepSpeed).
    """
    step_loss = torch.zeros((), device=device)
    batches = [batch for _, batch in zip(range(grad_accum), micro_batches)]
    for index, batch in enumerate(batches):
        loss = forward(batch)
        zero.engine.backward(loss)  # divides by the accumulation steps itself
        step_loss += loss.detach() / grad_accum
        if index < len(batches) - 1:
            zero.engine.step()  # not a boundary: bookkeeping only
    devices.step_boundary(device)
    if should_apply is not None and not should_apply(step_loss, None):
        return StepResult(step_loss, None, applied=False)
    zero.engine.step()
    zero.after_step()
    if scheduler is not None:
        scheduler.step()
    devices.step_boundary(device)
    return StepResult(step_loss, None, applied=True)
