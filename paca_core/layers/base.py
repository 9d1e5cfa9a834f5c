"""What every adapter layer offers, so surgery, checkpoints, merge and export are written once."""
from __future__ import annotations

import torch
import torch.nn as nn


class AdapterLayer(nn.Module):
    """Wraps a frozen ``nn.Linear`` (kept as ``base_layer``) and adds a method's trainable state.

    Subclasses implement :meth:`adapter_state` (the tensors a checkpoint holds),
    :meth:`load_adapter_state`, :meth:`delta_weight` (ΔW in float32) and ``forward``.
    """

    method: str = ""
    #: False: the layer replaces the module it adapts. True: it attaches to it (hooks) and is removed
    #: with :meth:`detach` (the module tree keeps its names).
    attaches: bool = False
    #: Whether ΔW exists, so ``merge_and_unload`` can fold the adapter into the weights.
    mergeable: bool = True
    #: Whether FSDP2 can shard it (its state is plain parameters; see paca_core/sharding.py).
    shardable: bool = True
    #: The rank, for methods that have one (None otherwise).
    r: int | None = None

    def __init__(self, base_layer: nn.Linear, module_name: str = ""):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"{type(self).__name__} adapts nn.Linear layers only; {module_name or 'module'} is {type(base_layer).__name__}."
            )
        self.base_layer = base_layer
        self._init_adapter_fields(module_name, base_layer.in_features, base_layer.out_features)

    def _init_adapter_fields(self, module_name: str, in_features: int, out_features: int) -> None:
        #: The name of the module this layer adapts (what checkpoints key it by).
        self.module_name = module_name
        self.in_features, self.out_features = in_features, out_features
        self.adapter_enabled = True
        self.merged = False

    # --- what a checkpoint holds -----------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Tensors that define this layer's adapter, by short name (e.g. ``lora_A``)."""
        raise NotImplementedError

    def adapter_state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.adapter_state().items()}

    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checkpoint tensors in (shapes already checked by the caller)."""
        raise NotImplementedError

    # --- merge / disable -------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in) in float32, so ``W_merged = W + ΔW``."""
        raise NotImplementedError

    def set_adapter_enabled(self, enabled: bool) -> None:
        self.adapter_enabled = enabled

    def unload(self, merge: bool) -> nn.Linear:
        """Return the base layer, with ΔW folded into its weight when ``merge`` is true."""
        if merge:
            with torch.no_grad():
                weight = self.base_layer.weight
                weight.copy_((weight.to(torch.float32) + self.delta_weight().to(weight.device)).to(weight.dtype))
        return self.base_layer

