"""paca_core: what the methods do, device-agnostic — configs, layers, model surgery, checkpoints,
training loop and CLI. Talks to hardware only through ``backends`` and ``devices``.
"""
from ._version import __version__
from .config import (
    LLAMA_PROJECTIONS,
    METHOD_CONFIGS,
    FullConfig,
    LoRAConfig,
    LoRAFAConfig,
    MEFTConfig,
    MethodConfig,
    PaCAConfig,
    VeLoRAConfig,
    config_from_dict,
)
from .errors import CheckpointError, PacaConfigError, TargetModuleError
from .layers import AdapterLayer, LinearAdapterLayer, PaCALinear
from .methods import CommonOptions, Method, get_method, register_method, registered_methods
from .model import AdaptedModel, PacaModel, prepare_model

__all__ = [
    "LLAMA_PROJECTIONS",
    "METHOD_CONFIGS",
    "AdaptedModel",
    "AdapterLayer",
    "LinearAdapterLayer",
    "CommonOptions",
    "Method",
    "get_method",
    "register_method",
    "registered_methods",
    "MethodConfig",
    "config_from_dict",
    "FullConfig",
    "LoRAConfig",
    "LoRAFAConfig",
    "MEFTConfig",
    "VeLoRAConfig",
    "CheckpointError",
    "PaCAConfig",
    "PaCALinear",
    "PacaConfigError",
    "PacaModel",
    "TargetModuleError",
    "__version__",
    "prepare_model",
]
