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
    # paca train --report-to (paca_core/train/tracking.py)
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


#: The first PEFT release with PaCA (``peft.tuners.paca``, ``peft.PacaConfig``).
PEFT_PACA_VERSION = "0.22"


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` from its metadata (no import), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def peft_has_paca() -> bool:
    """True when the installed peft ships PaCA (``peft/tuners/paca``), checked without importing peft.

    Looks for the subpackage rather than comparing version numbers, so a source build of PEFT's main branch from
    before the 0.22 release counts too; a test (or a user) that blocks it in ``sys.modules`` makes it absent."""
    import sys
    from pathlib import Path

    if "peft.tuners.paca" in sys.modules:
        return sys.modules["peft.tuners.paca"] is not None
    try:
        spec = importlib.util.find_spec("peft")
    except (ImportError, ValueError):
        return False
    locations = (spec.submodule_search_locations or ()) if spec is not None else ()
    return any((Path(location) / "tuners" / "paca" / "__init__.py").is_file() for location in locations)


def require_peft_paca(what: str = "peft-paca") -> None:
    """Refuse, in one line before any work, a feature built on PEFT's PaCA when the installed peft has none.

    ``what`` names the feature in the message (``peft-paca``, ``export-peft --format paca``)."""
    if peft_has_paca():
        return
    have = installed_version("peft")
    here = f"this machine has peft {have}" if have else "peft is not installed here"
    raise MissingExtraError(f"{what} needs peft >= {PEFT_PACA_VERSION} (PaCA); {here}: pip install -U 'peft>={PEFT_PACA_VERSION}'")
