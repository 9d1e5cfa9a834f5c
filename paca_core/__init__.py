"""paca_core: what the methods do, device-agnostic. The public API is at the top (this module, ``config``, ``model``);
every other module lives in a package named for its job (docs/ARCHITECTURE.md is the map).

Imports ``backends`` and ``devices``, never the reverse; its packages import each other one way, lowest first:
surgery, memory, distributed, layers, methods, files, data, train, flags, workloads, plan, bench, doctor,
integrations, cli (``scripts/import_structure.py`` checks it).

The public names below are imported on first use (PEP 562), so ``import paca_core`` (and every ``paca``
command's start, ``paca --help`` included) does not pay for torch and transformers until something needs them.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import CheckpointError, PacaConfigError, TargetModuleError

#: public name -> the module that defines it
_LAZY = {
    **dict.fromkeys(("METHOD_CONFIGS", "config_from_dict"), "paca_core.config"),
    **dict.fromkeys(("LLAMA_PROJECTIONS", "MethodConfig"), "paca_core.base_config"),
    **dict.fromkeys(("FullConfig", "LoRAConfig", "LoRAFAConfig", "MEFTConfig", "PaCAConfig", "VeLoRAConfig"), "paca_core.methods"),
    **dict.fromkeys(("AdapterLayer", "LinearAdapterLayer", "PaCALinear"), "paca_core.layers"),
    "field_default": "paca_core.base_config",
    "layer_seed": "paca_core.layers.indices",
    **dict.fromkeys(("CommonOptions", "Method", "get_method", "register_method", "registered_methods"), "paca_core.methods"),
    **dict.fromkeys(("AdaptedModel", "PacaModel", "prepare_model"), "paca_core.model"),
    "export_peft": "paca_core.files.export",
    "quantize_base": "paca_core.memory.quantization",
    "offload_activations": "paca_core.memory.offload",
    "shard_model": "paca_core.distributed.sharding",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .base_config import LLAMA_PROJECTIONS, MethodConfig, field_default
    from .config import METHOD_CONFIGS, config_from_dict
    from .layers.indices import layer_seed
    from .layers import AdapterLayer, LinearAdapterLayer, PaCALinear
    from .methods import (
        CommonOptions, FullConfig, LoRAConfig, LoRAFAConfig, MEFTConfig, Method, PaCAConfig, VeLoRAConfig, get_method, register_method,
        registered_methods,
    )
    from .distributed.sharding import shard_model
    from .files.export import export_peft
    from .memory.offload import offload_activations
    from .memory.quantization import quantize_base
    from .model import AdaptedModel, PacaModel, prepare_model


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'paca_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = sorted(["CheckpointError", "PacaConfigError", "TargetModuleError", "__version__", *_LAZY])
