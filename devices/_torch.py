"""``torch``, imported the first time one of its attributes is used.

Every ``paca`` command imports ``devices`` to build its ``--device`` flag, and importing torch takes about 1.5 s:
``paca --help`` and an argument error must not pay it. So the device modules reach torch through this proxy; the
first attribute read (a runtime resolving a device, a tensor being made) imports the real module, and every
read after that is one dictionary lookup. Type hints stay strings (``from __future__ import annotations``).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _LazyTorch:
    """Stands for the ``torch`` module; imports it on first attribute access."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        module: ModuleType = importlib.import_module("torch")
        return getattr(module, name)

    def __repr__(self) -> str:
        return "<torch, imported on first use>"


torch: Any = _LazyTorch()


class TorchDtype:
    """A class attribute that is a torch dtype, named rather than built at class creation (which would import torch
    when the module is imported). Subclasses may assign a real ``torch.dtype`` instead."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, instance: object, owner: type) -> Any:
        return getattr(torch, self.name)
