"""``prepare_model`` and the :class:`PacaModel` wrapper users hold (PEFT-style verbs)."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from devices import resolve_device

from .config import PaCAConfig
from .indices import select_columns
from .layers import PaCALinear, sync_layers
from .surgery import find_targets, freeze, replace_module

logger = logging.getLogger(__name__)


def prepare_model(model: nn.Module, config: PaCAConfig, device: str | torch.device | None = None) -> "PacaModel":
    """Freeze ``model``, move it to ``device`` (``auto``/``cpu``/``cuda[:N]``/``hpu[:N]``; ``$PACA_DEVICE``
    when None) and replace its targeted ``nn.Linear`` modules with PaCA layers."""
    if isinstance(model, PacaModel):
        raise ValueError("This model is already prepared; call prepare_model on the base model once.")
    config.validate()
    target_device = resolve_device(device)
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    too_narrow = [f"{n} (in_features={m.in_features})" for n, m in targets if config.r > m.in_features]
    if too_narrow:
        raise ValueError(
            f"r={config.r} exceeds the input width of {', '.join(too_narrow[:5])}; choose r <= "
            f"{min(m.in_features for _, m in targets)} or exclude those modules."
        )
    model.to(target_device)
    freeze(model)
    for name, linear in targets:
        indices = select_columns(linear.in_features, config.r, config.seed, name)
        replace_module(model, name, PaCALinear(linear, config.r, config.alpha, indices, module_name=name))
    logger.info("PaCA: adapted %d linear layers (r=%d) on %s", len(targets), config.r, target_device)
    return PacaModel(model, config)


class PacaModel(nn.Module):
    """A causal LM with PaCA layers. Attribute access falls through to the wrapped model."""

    def __init__(self, model: nn.Module, config: PaCAConfig):
        super().__init__()
        self.base_model = model
        self.paca_config = config

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    # --- introspection ---------------------------------------------------------------------------
    def adapter_layers(self) -> dict[str, PaCALinear]:
        return {name: m for name, m in self.base_model.named_modules() if isinstance(m, PaCALinear)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def sync_adapters(self) -> None:
        """Rewrite every layer's adapted columns now (only needed after editing deltas through ``.data``)."""
        sync_layers([layer for layer in self.adapter_layers().values() if layer.adapter_enabled])

    # --- PEFT-style verbs ------------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the pretrained model inside this block; the adapter comes back afterwards."""
        layers = list(self.adapter_layers().values())
        for layer in layers:
            layer.adapter_enabled = False
            layer.restore_original()
        try:
            yield
        finally:
            for layer in layers:
                layer.adapter_enabled = True
            sync_layers(layers)

    def merge_and_unload(self) -> nn.Module:
        """The plain model with every delta folded into its weight (PaCA layers removed)."""
        return self._unload(merge=True)

    def unload(self) -> nn.Module:
        """The plain pretrained model (deltas discarded, original weights restored)."""
        return self._unload(merge=False)

    def _unload(self, merge: bool) -> nn.Module:
        for name, layer in list(self.adapter_layers().items()):
            replace_module(self.base_model, name, layer.unload(merge=merge))
        return self.base_model

    def save_pretrained(self, directory: str | Path, **extra_metadata) -> Path:
        """Write the adapter (safetensors + JSON config) atomically to ``directory``."""
        from .checkpoint import save_adapter

        return save_adapter(self, directory, extra_metadata=extra_metadata)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: str | Path, device: str | torch.device | None = None, is_trainable: bool = False
    ) -> "PacaModel":
        """Prepare ``model`` with the saved config and load the saved deltas and indices into it."""
        from .checkpoint import load_adapter

        return load_adapter(model, directory, device=device, is_trainable=is_trainable)
