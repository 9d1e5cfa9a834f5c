"""Finding target modules and swapping them, written once for every method."""
from __future__ import annotations

import re
from typing import Iterable

import torch.nn as nn

from ..base_config import ALL_LINEAR
from ..errors import TargetModuleError

#: Output heads are never adapted by "all-linear" (their gradient is huge and the vocab dimension wide).
_OUTPUT_HEAD_NAMES = ("lm_head", "embed_out", "output", "score", "classifier")


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _output_head_names(model: nn.Module) -> set[str]:
    heads = {n for n, _ in model.named_modules() if n.split(".")[-1] in _OUTPUT_HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
        heads |= {n for n, m in model.named_modules() if m is head}
    return heads


def find_targets(
    model: nn.Module, target_modules: list[str] | str, exclude_modules: Iterable[str] = (), types: tuple[type, ...] = (nn.Linear,)
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` pairs selected by ``target_modules`` (modules of ``types``); raises with the
    candidates when none match."""
    exclude = list(exclude_modules)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, types)]
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        heads = _output_head_names(model)
        chosen = [n for n in linear_names if n not in heads]
        check_type = False
    elif isinstance(target_modules, str):
        try:
            regex = re.compile(target_modules)
        except re.error as error:
            raise TargetModuleError(f"target_modules {target_modules!r} is not a valid regular expression: {error}") from None
        chosen = [n for n, _ in model.named_modules() if n and regex.fullmatch(n)]
        check_type = True
    else:
        chosen = [n for n, _ in model.named_modules() if n and any(_matches(n, t) for t in target_modules)]
        check_type = True
    chosen = [n for n in chosen if not any(_matches(n, e) for e in exclude)]
    modules = dict(model.named_modules())
    if not chosen:
        leaf_names = sorted({n.split(".")[-1] for n in linear_names})
        raise TargetModuleError(
            f"target_modules={target_modules!r} matched no module. Linear layers in this model are named: "
            f"{', '.join(leaf_names) or '(none)'}; pass some of these, or 'all-linear'."
        )
    if check_type:
        wrong = [f"{n} ({type(modules[n]).__name__})" for n in chosen if not isinstance(modules[n], types)]
        if wrong:
            wanted = " or ".join(t.__name__ for t in types)
            raise TargetModuleError(
                f"target_modules selected modules that are not {wanted}: {', '.join(wrong[:5])}"
                f"{' …' if len(wrong) > 5 else ''}. Only linear layers can be adapted; name the linear children instead."
            )
    return [(n, modules[n]) for n in chosen]


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    """Put ``new_module`` where ``name`` is in ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new_module)


def freeze(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def feed_forward_width(module: nn.Module, name: str) -> int:
    """The model width d of a feed-forward block (input and output width): its ``hidden_size`` if it
    has one, else the input width of its first linear layer (which must match its last's output)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if isinstance(module, nn.Linear) or not linears:
        raise TargetModuleError(
            f"{name} ({type(module).__name__}) is not a feed-forward block with linear layers; MEFT targets MLP blocks "
            "such as 'mlp'."
        )
    width = getattr(module, "hidden_size", None)
    width = width if isinstance(width, int) else linears[0].in_features
    if linears[0].in_features != width or linears[-1].out_features != width:
        raise TargetModuleError(
            f"{name} ({type(module).__name__}) maps {linears[0].in_features} features to {linears[-1].out_features}; MEFT "
            "needs a block whose input and output have the same width (a transformer MLP)."
        )
    return width


def module_io(module: nn.Module) -> tuple[int | None, int | None]:
    """(in, out) width of a module an adapter may target: a linear layer or a feed-forward block."""
    if isinstance(module, nn.Linear) or hasattr(module, "in_features"):
        return getattr(module, "in_features", None), getattr(module, "out_features", None)
    try:
        width = feed_forward_width(module, "")
    except TargetModuleError:
        return None, None
    return width, width


#: Names of the ModuleList that holds a decoder's blocks (LLaMA/Mistral/Qwen: layers; GPT-2: h; others: blocks).
DECODER_BLOCK_LISTS = ("layers", "h", "blocks")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, in order (the units for activation offload and FSDP)."""
    lists = [m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.split(".")[-1] in DECODER_BLOCK_LISTS]
    return [block for blocks in lists for block in blocks]
