"""Which optional extra brings which package, so a missing one is named before any work starts.

paca-hal's core needs only torch, transformers, safetensors, tqdm, numpy and PyYAML. Everything else is an
extra (pyproject.toml); this module answers "is it there?" without importing it (``find_spec``)
and turns "it is not" into one clear error that says what to install.
"""
from __future__ import annotations

import importlib.util

from .errors import PacaConfigError

#: Importable module -> (extra that installs it, pip name). The pip name is what ``pip install`` takes.
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "peft": ("peft", "peft"),
    "matplotlib": ("bench", "matplotlib"),
    "bitsandbytes": ("quant", "bitsandbytes"),
    "trl": ("trl", "trl"),
    "optimum": ("gaudi", "optimum-habana"),
    "gguf": ("default-model", "gguf"),
    "accelerate": ("default-model", "accelerate"),
    "datasets": ("data", "datasets"),  # paca train --data on .parquet/.arrow/.csv and save_to_disk folders
    # paca train --report-to (paca_core/tracking.py)
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


class MissingExtraError(PacaConfigError):
    """An optional package a requested feature needs is not installed."""


def installed(module: str) -> bool:
    """True when ``module`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken half-install
        return False


def install_hint(module: str) -> str:
    """``pip install 'paca-hal[extra]'`` for an optional module (or its pip name for any other)."""
    top = module.split(".")[0]
    extra, pip_name = OPTIONAL_PACKAGES.get(top, (None, top))
    if extra is None:
        return f"pip install {pip_name}"
    return f"pip install 'paca-hal[{extra}]'  (or: pip install {pip_name})"


def require(modules: dict[str, str]) -> None:
    """Raise one :class:`MissingExtraError` naming every missing module, given ``{module: what needs it}``."""
    missing = {module: why for module, why in modules.items() if not installed(module)}
    if not missing:
        return
    lines = [f"- {why} needs '{module}': {install_hint(module)}" for module, why in missing.items()]
    raise MissingExtraError("Optional packages are missing; nothing was run:\n" + "\n".join(lines))


def missing_optional_module(error: BaseException) -> str | None:
    """The optional module an ImportError (or the ImportError it was raised from) is about; None otherwise."""
    while error is not None:
        name = (getattr(error, "name", None) or "").split(".")[0]
        if isinstance(error, ImportError) and name in OPTIONAL_PACKAGES:
            return name
        error = error.__cause__
    return None
