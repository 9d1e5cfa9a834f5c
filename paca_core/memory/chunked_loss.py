"""The LM head and the next-token loss over chunks of tokens, so the (tokens × vocab) logits and their
gradient never exist in full.

At long sequence lengths the logits are the largest single tensor of a training step (vocab 49,152
for the default model, 128,256 for LLaMA-3; fp32 for the loss). :func:`chunked_linear_cross_entropy`
computes, for one chunk of ``chunk_tokens`` tokens at a time: logits → logsumexp → the loss terms of
the chunk, and — when a gradient is wanted — the gradient of the loss w.r.t. the chunk's hidden states
and the head's weight (and bias), in the forward pass ("fused linear cross entropy"). The chunk's
logits are freed before the next chunk, so the logits cost O(chunk × vocab).

Design choice: gradients computed in forward, not logits recomputed in backward. Recomputing would
cost one more (tokens × hidden × vocab) GEMM per step (the head is a large part of a small model's
FLOPs) and save the hidden states instead of their gradient — the same O(tokens × hidden) bytes.
Saved for backward: ``grad_hidden`` (tokens × hidden, the hidden states' dtype) and, only when the
head's weight is trainable (full fine-tuning, or a tied embedding that trains), ``grad_weight``
(vocab × hidden, the weight's dtype; accumulated over chunks in fp32 by the backend's
``skinny_grad_fp32``). Backward only scales them by the incoming gradient (e.g. 1/grad_accum).

The chunk loop is a Python loop over fixed slices: its trip count depends only on the input's shape
(static under torch.compile, no host reads, no data-dependent shapes), so it runs alike on CPU, CUDA
and HPU. The last chunk may be shorter; a chunk larger than the tokens is just one chunk.

The loss is Hugging Face's causal-LM loss: labels shifted by one, ``-100`` ignored, mean over the
non-ignored target tokens (or their sum divided by ``num_items_in_batch`` when the HF Trainer passes
it). A batch with no target token gives ``nan``, as HF's mean over zero tokens does, and zero
gradients, as HF's do.

:func:`chunked_causal_lm_forward` applies it to a transformers causal LM whose output head is a plain
``nn.Linear``: it runs the model's decoder for the hidden states and the chunked head and loss on them.
Anything else — a quantized or custom head, logit scaling or soft-capping, an MoE auxiliary loss, a
head loaded by an accelerate hook, an FSDP root, a model wrapped by a graph mode — returns ``None`` and
the caller runs the ordinary forward (one info log line per reason).
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

import devices
from backends import get_backend

from ..errors import PacaConfigError
from .loss_chunks import DEFAULT_LOSS_CHUNK_TOKENS, check_chunk_tokens, parse_loss_chunk_tokens  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

#: Keyword arguments the chunked path passes to the decoder unchanged; any other one → ordinary forward.
_DECODER_KWARGS = frozenset(
    {"input_ids", "attention_mask", "position_ids", "inputs_embeds", "use_cache", "cache_position",
     "output_attentions", "output_hidden_states", "past_key_values", "cache"}
)
_logged: set[str] = set()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, divisor, chunk_tokens):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        tokens = hidden.shape[0]
        loss_dtype = torch.promote_types(hidden.dtype, torch.float32)  # HF's logits.float(); float64 stays float64
        valid = targets != IGNORE_INDEX
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        # The gradient's scale: 1/divisor, with 0 target tokens giving zero gradients (as HF) instead of nan.
        grad_scale = 1.0 / divisor.to(loss_dtype).clamp_min(1)
        loss_sum = torch.zeros((), dtype=loss_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32 if weight.dtype != torch.float64 else weight.dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=grad_weight.dtype if grad_weight is not None else loss_dtype, device=weight.device) if need_bias else None
        backend = get_backend(hidden.device) if need_weight else None
        for start in range(0, tokens, chunk_tokens):  # static trip count for a given shape
            end = min(start + chunk_tokens, tokens)
            h = hidden[start:end]
            logits = F.linear(h, weight, bias).to(loss_dtype)
            lse = torch.logsumexp(logits, dim=-1)
            t = safe_targets[start:end].unsqueeze(1)
            v = valid[start:end]
            target_logit = logits.gather(1, t).squeeze(1)
            loss_sum = loss_sum + torch.where(v, lse - target_logit, torch.zeros_like(lse)).sum()
            if need_hidden or need_weight or need_bias:
                # d(loss)/d(logits) = (softmax − one-hot(target)) / divisor on target tokens, 0 elsewhere.
                grad_logits = torch.exp(logits.sub_(lse.unsqueeze(1)))  # in place: the logits are not needed again
                grad_logits.scatter_add_(1, t, torch.full_like(target_logit, -1.0).unsqueeze(1))
                grad_logits.mul_((v.to(loss_dtype) * grad_scale).unsqueeze(1))
                grad_logits = grad_logits.to(hidden.dtype)  # HF's backward through .float() rounds here too
                if need_hidden:
                    grad_hidden[start:end] = grad_logits.mm(weight.to(hidden.dtype))
                if need_weight:
                    grad_weight.add_(backend.skinny_grad_fp32(grad_logits, h.to(grad_logits.dtype)))
                if need_bias:
                    grad_bias.add_(grad_logits.sum(0).to(grad_bias.dtype))
                del grad_logits
            del logits
        loss = loss_sum / divisor.to(loss_dtype)  # nan for zero target tokens, as HF's mean
        saved = [g for g in (grad_hidden, grad_weight.to(weight.dtype) if need_weight else None,
                              grad_bias.to(bias.dtype) if need_bias else None) if g is not None]
        ctx.layout = (need_hidden, need_weight, need_bias)
        ctx.save_for_backward(*saved)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = list(ctx.saved_tensors)
        need_hidden, need_weight, need_bias = ctx.layout
        grads = []
        for need in (need_hidden, need_weight, need_bias):
            if need:
                g = saved.pop(0)
                grads.append(g * grad_loss.to(g.dtype))
            else:
                grads.append(None)
        return grads[0], grads[1], grads[2], None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift_labels: bool = True,
) -> torch.Tensor:
    """HF's causal-LM loss of ``F.linear(hidden, weight, bias)`` against ``labels`` without the full logits.

    ``hidden``: (batch, seq, hidden) or (tokens, hidden); ``labels``: (batch, seq) or (tokens,), ``-100``
    ignored. ``shift_labels``: position i predicts label i+1 within each row (HF's label shift; the last
    position of each row predicts nothing). ``num_items_in_batch``: divide the summed loss by it instead
    of by the number of target tokens (the HF Trainer's gradient-accumulation normalisation).
    ``chunk_tokens``: tokens per chunk, > 0; larger than the tokens → one chunk. The loss is fp32 (fp64
    for fp64 inputs); gradients reach ``hidden``, ``weight`` and ``bias`` as far as they require them.
    """
    chunk_tokens = check_chunk_tokens(chunk_tokens)
    if chunk_tokens is None:
        raise PacaConfigError("chunked_linear_cross_entropy needs a positive chunk_tokens.")
    if shift_labels:
        labels = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    targets = labels.reshape(-1).to(device=hidden.device, dtype=torch.long)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if flat.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden states hold {flat.shape[0]} tokens but labels {targets.shape[0]}.")
    if num_items_in_batch is None:
        divisor = (targets != IGNORE_INDEX).sum()
    else:
        divisor = torch.as_tensor(num_items_in_batch).to(hidden.device)
    return _ChunkedLinearCrossEntropy.apply(flat, weight, bias, targets, divisor, chunk_tokens)


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        logger.info("Chunked LM loss off for this model (%s); computing the full logits.", reason)


def _fallback_reason(model: nn.Module, kwargs: dict) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or type(head) is not nn.Linear:
        return f"its output head is {type(head).__name__}, not a plain nn.Linear"
    if getattr(head, "_hf_hook", None) is not None:
        return "its output head is placed by an accelerate hook"
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"its config sets {name}"
    if getattr(config, "output_router_logits", False) or kwargs.get("output_router_logits"):
        return "it adds an MoE router loss"
    extra = set(kwargs) - _DECODER_KWARGS - {"labels", "num_items_in_batch", "return_dict"}
    if extra:
        return f"the forward got {sorted(extra)}"
    if kwargs.get("return_dict") is False:
        return "return_dict=False"
    if devices.graph_mode_of(model) != "eager":
        return f"graph mode {devices.graph_mode_of(model)} wraps the whole model"
    if _is_fsdp_module(model):
        return "the model is an FSDP root (its forward gathers the head)"
    if not hasattr(model, "get_decoder") or model.get_decoder() is None or model.get_decoder() is model:
        return "it has no separate decoder"
    return None


def _is_fsdp_module(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return False
    return isinstance(model, FSDPModule)


def chunked_causal_lm_forward(model: nn.Module, chunk_tokens: int, **kwargs):
    """``model(**kwargs)`` for a transformers causal LM with ``labels``, its loss computed by
    :func:`chunked_linear_cross_entropy`: the decoder (``model.get_decoder()``) runs as the model's
    forward would run it, the output head and loss over chunks. Returns a ``CausalLMOutputWithPast``
    whose ``logits`` is None, or None when the model cannot take this path (see the module docstring;
    the caller then runs ``model(**kwargs)``)."""
    reason = _fallback_reason(model, kwargs)
    if reason is not None:
        _log_once(reason)
        return None
    from transformers.modeling_outputs import CausalLMOutputWithPast

    labels = kwargs.pop("labels")
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("return_dict", None)
    outputs = model.get_decoder()(**kwargs)
    head = model.get_output_embeddings()
    loss = chunked_linear_cross_entropy(
        outputs.last_hidden_state, head.weight, labels, bias=head.bias, chunk_tokens=chunk_tokens,
        num_items_in_batch=num_items_in_batch,
    )
    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}  # `cache` in transformers 5, `past_key_values` before
    passed = {name: getattr(outputs, name, None) for name in ("cache", "past_key_values", "hidden_states", "attentions") if name in fields}
    return CausalLMOutputWithPast(loss=loss, logits=None, **passed)
