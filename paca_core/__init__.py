"""paca_core: what the methods do, device-agnostic — configs, layers, model surgery, checkpoints,
training loop and CLI. Talks to hardware only through ``backends`` and ``devices``.
"""
from ._version import __version__
from .config import LLAMA_PROJECTIONS, PaCAConfig
from .errors import CheckpointError, PacaConfigError, TargetModuleError
from .layers import PaCALinear
from .model import PacaModel, prepare_model

__all__ = [
    "LLAMA_PROJECTIONS",
    "CheckpointError",
    "PaCAConfig",
    "PaCALinear",
    "PacaConfigError",
    "PacaModel",
    "TargetModuleError",
    "__version__",
    "prepare_model",
]
