"""Where a module's weights live, so adapters are created beside them and the model is never moved.

``prepare_model`` leaves placement to whatever runs the script (HF Trainer, accelerate, torchrun,
DeepSpeed, a ``device_map``), as PEFT's ``get_peft_model`` does. Adapter tensors therefore go on the
device of the weight they adapt. accelerate *offloads* some modules (``device_map`` entries ``"disk"``,
or ``"cpu"`` beside an accelerator): their parameters sit on the ``meta`` device and a hook
(``module._hf_hook``) loads them onto its ``execution_device`` for each forward and drops them after.
Adapters of such a module go to that execution device; methods that would have to write into the
weight itself say why they cannot (:meth:`MethodConfig.offloaded_weight_problem`).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..errors import PacaConfigError

if TYPE_CHECKING:
    from ..base_config import MethodConfig

logger = logging.getLogger(__name__)


class PlacementError(PacaConfigError):
    """A method cannot adapt a module where its weights are (offloaded, not loaded), or the model cannot be moved."""


def _accelerate_hooks(module: nn.Module) -> list:
    """The accelerate hooks on ``module`` (a ``SequentialHook`` holds several)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate runs ``module`` on (its hook's ``execution_device``), or None without a hook."""
    for hook in _accelerate_hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def is_offloaded(module: nn.Module) -> bool:
    """True when some parameter of ``module`` is on ``meta`` (accelerate offload, or never loaded)."""
    return any(p.is_meta for p in module.parameters())


def adapter_device(module: nn.Module, name: str = "") -> torch.device:
    """Where an adapter of ``module`` belongs: beside its weights, or, when they are offloaded, on the device
    accelerate runs it on (adapter tensors are trained, so they must be real tensors somewhere)."""
    for param in module.parameters():
        if not param.is_meta:
            return param.device
    for sub in module.modules():
        device = execution_device(sub)
        if device is not None:
            return device
    if next(module.parameters(), None) is None:
        return torch.device("cpu")
    raise PlacementError(
        f"{name or type(module).__name__}: its weights are on the meta device and no accelerate hook loads them, so "
        "there is nothing to adapt. Load real weights before prepare_model (from_pretrained without "
        "init_empty_weights, or accelerate.load_checkpoint_and_dispatch)."
    )


def check_targets_placement(plan: dict[str, tuple["MethodConfig", nn.Module]]) -> None:
    """Refuse, before any surgery, every target whose method cannot work with its offloaded weights."""
    for name, (config, module) in sorted(plan.items()):
        if not is_offloaded(module):
            continue
        device = adapter_device(module, name)  # raises when nothing would ever load the weights
        problem = config.offloaded_weight_problem(module)
        if problem is not None:
            raise PlacementError(
                f"{name} cannot be adapted with {config.method}: accelerate offloads its weights (kept on the meta "
                f"device, loaded onto {device} for each forward). {problem} Keep {name} resident (map its decoder "
                "layer to a device in device_map instead of 'disk'/'cpu' offload, or raise max_memory), leave it "
                f"out with exclude_modules=[{name!r}], or adapt offloaded layers with LoRAConfig/LoRAFAConfig."
            )
        logger.info("%s is offloaded by accelerate; its %s adapter lives on %s", name, config.method, device)


def check_mergeable(names_and_layers: list[tuple[str, nn.Module]]) -> None:
    """Refuse to merge into offloaded weights: the merge would land on meta tensors and be lost silently."""
    offloaded = [name for name, layer in names_and_layers if any(p.is_meta for p in layer.base_parameters())]
    if offloaded:
        raise PlacementError(
            f"Cannot fold the adapter into {', '.join(offloaded[:3])}{' …' if len(offloaded) > 3 else ''}: accelerate "
            "offloads their weights (meta, reloaded from the offload copy for every forward), so a merge would be lost. "
            "Save the adapter (save_pretrained), load the base model without offload (e.g. on CPU), then "
            "PacaModel.from_pretrained(model, adapter_dir).merge_and_unload() there."
        )


def dispatched_devices(model: nn.Module) -> set[torch.device]:
    """Execution devices of the accelerate hooks in ``model`` (empty unless loaded with a ``device_map``)."""
    found = {execution_device(module) for module in model.modules()}
    return {device for device in found if device is not None}


def move_model(model: nn.Module, device: torch.device) -> None:
    """``model.to(device)``, refused where it would break what accelerate set up for a ``device_map``."""
    offloaded = [n for n, p in model.named_parameters() if p.is_meta]
    if offloaded:
        raise PlacementError(
            f"device={device} moves the whole model, but {len(offloaded)} of its parameters (e.g. {offloaded[0]}) are "
            "on the meta device (offloaded by accelerate or never loaded) and cannot be moved. Call prepare_model "
            "without device= to keep the device_map placement."
        )
    other = sorted(str(d) for d in dispatched_devices(model) if d != device)
    if other:
        raise PlacementError(
            f"device={device} would move a model dispatched by accelerate (device_map) whose hooks keep sending "
            f"inputs to {', '.join(other)}. Call prepare_model without device= to keep the device_map placement, "
            "or load the model without device_map."
        )
    model.to(device)
