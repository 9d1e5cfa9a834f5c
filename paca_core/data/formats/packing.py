"""``--packing``: several short examples in one fixed-length row, each attending only to itself.

Padding every prompt/response or conversation to ``--seq-len`` spends most of a step on padding when examples are
short. Packing places them into rows of ``--seq-len`` tokens (best-fit decreasing: longest first, each into the row
it fills best), so the rows stay static in shape (what graph modes need) and nearly full of data.

Examples must not see each other. The rows carry **per-example position ids** (0, 1, 2, ... restarting at each
example; the padding at a row's end is one more such run) and *no* attention mask: transformers then finds the
examples from where the positions restart (``masking_utils.find_packed_sequence_indices``, in 4.55 and 5.x) and
builds a block-diagonal causal mask for the ``eager``, ``sdpa`` and ``flex_attention`` implementations; the flash
attention kernels read the same positions as sequence boundaries, but only for a batch of one row in transformers
5.x (they are taken for a single flattened sequence), so they need ``--batch-size 1``. Each example's first token
gets no label, so no example learns to predict the next one's start. Two more conditions, checked here: the model
must build its mask with transformers' masking utilities and take ``position_ids`` (a model that does neither
would let the examples attend to each other), and no KV cache may be built in the training forward (the packed
positions are read only without one), so :func:`prepare_packed_attention` turns ``config.use_cache`` off.
"""
from __future__ import annotations

import bisect
import inspect
import logging
import sys
from pathlib import Path
from typing import Sequence

from ...errors import PacaConfigError
from .base import IGNORE_INDEX

logger = logging.getLogger(__name__)

#: Attention implementations whose masks transformers builds from packed position ids.
MASKED_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")
_MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_masks_for_generate")


def pack_examples(examples: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int):
    """Rows of ``seq_len`` tokens holding ``examples`` (``(ids, labels)``, each at most ``seq_len`` long) by best-fit
    decreasing. Returns ``(input_ids, labels, attention_mask, position_ids)`` as (rows, seq_len) tensors; the
    attention mask marks data (1) and padding (0) for the bookkeeping only — the model is given the positions."""
    import torch

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))  # stable: equal lengths keep file order
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (space left, row), sorted: the best fit is the first with enough space
    for index in order:
        length = len(examples[index][0])
        if length > seq_len:
            raise ValueError(f"example {index} has {length} tokens, more than a row of {seq_len}")
        at = bisect.bisect_left(free, (length, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(index)
            if space - length:
                bisect.insort(free, (space - length, row))
        else:
            rows.append([index])
            if seq_len - length:
                bisect.insort(free, (seq_len - length, len(rows) - 1))
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    position_ids = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for index in members:
            ids, example_labels = examples[index]
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids, dtype=torch.long)
            labels[r, start:end] = torch.tensor(example_labels, dtype=torch.long)
            labels[r, start] = IGNORE_INDEX  # predicted by the previous example's last token: never a target
            attention_mask[r, start:end] = 1
            position_ids[r, start:end] = torch.arange(len(ids))
            start = end
        position_ids[r, start:] = torch.arange(seq_len - start)  # the padding: a run of its own
    return input_ids, labels, attention_mask, position_ids


# --------------------------------------------------------------------------------------------
# whether the model keeps packed examples apart


def _causal_lm_and_decoder(model):
    """The transformers model inside an AdaptedModel (or a DDP wrapper's ``module``), and its decoder stack."""
    from transformers import PreTrainedModel

    inner = getattr(model, "module", model)
    if not isinstance(inner, PreTrainedModel) and isinstance(getattr(inner, "base_model", None), PreTrainedModel):
        inner = inner.base_model  # AdaptedModel: the wrapped causal LM
    decoder = getattr(inner, "base_model", inner)  # transformers' own: the decoder under base_model_prefix
    return inner, decoder


def _model_class_problem(model_class: type, decoder_class: type | None = None) -> str | None:
    """Why this architecture cannot keep packed examples apart, or None (no weights needed: the classes suffice)."""
    from transformers import masking_utils

    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        return "this transformers version cannot build attention masks from packed position ids (upgrade to 4.55 or later)"
    decoder_class = decoder_class or model_class
    module = sys.modules.get(decoder_class.__module__)
    if module is None or not any(getattr(module, name, None) is getattr(masking_utils, name, object()) for name in _MASK_BUILDERS):
        return (f"{decoder_class.__name__} builds its attention mask without transformers' masking utilities, so packed "
                "examples would attend to each other")
    if "position_ids" not in inspect.signature(decoder_class.forward).parameters:
        return f"{decoder_class.__name__} takes no position_ids, so packed examples cannot be told apart"
    return None


def packed_attention_problem(model, micro_batch: int) -> str | None:
    """Why ``model`` cannot train on packed rows (micro-batches of ``micro_batch`` rows) without attention crossing
    examples; None when it can."""
    inner, decoder = _causal_lm_and_decoder(model)
    problem = _model_class_problem(type(inner), type(decoder))
    if problem is not None:
        return problem
    config = getattr(inner, "config", None)
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if "flash" in implementation:
        if micro_batch != 1:
            return (f"attention implementation {implementation!r} tells packed examples apart only in a batch of one row; "
                    "use --batch-size 1 (with --grad-accum for the same tokens per step)")
        return None
    if implementation not in MASKED_IMPLEMENTATIONS:
        return (f"attention implementation {implementation!r} does not build its mask from packed position ids (those that "
                f"do: {', '.join(MASKED_IMPLEMENTATIONS)}, and flash attention at batch size 1)")
    return None


def prepare_packed_attention(model, micro_batch: int) -> None:
    """Refuse a model that would let packed examples attend to each other; turn the training forward's KV cache off
    (transformers reads packed positions only without one). Call once the weights are loaded, before training."""
    problem = packed_attention_problem(model, micro_batch)
    if problem is not None:
        raise PacaConfigError(f"--packing cannot keep examples apart on this model: {problem}. Drop --packing (examples are then "
                              "padded to --seq-len instead).")
    inner, _ = _causal_lm_and_decoder(model)
    config = getattr(inner, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
        logger.info("Packing: the model's KV cache is off during training (config.use_cache=False), so its attention mask "
                    "follows the packed position ids.")


def packing_problem_before_loading(model_folder: str | Path) -> str | None:
    """What config.json alone says against packing (the architecture's mask code), or None when it says nothing against
    it; the attention implementation is checked once the model is loaded."""
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        config = AutoConfig.from_pretrained(str(model_folder), local_files_only=True)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except Exception:  # noqa: BLE001 - an unreadable or unknown config: loading says what is wrong, then the full check runs
        return None
    return _model_class_problem(model_class)  # its module holds the decoder too (transformers' one-file-per-model rule)
