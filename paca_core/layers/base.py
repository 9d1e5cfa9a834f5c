"""What every adapter layer offers, so surgery, checkpoints, merge, sharding and export are written once.

Every member a caller uses is declared here with a default; callers never probe with hasattr/getattr.
:class:`AdapterLayer` is any adapter (MEFT attaches beside a feed-forward block);
:class:`LinearAdapterLayer` wraps a frozen ``nn.Linear`` (PaCA, QPaCA, LoRA, LoRA-FA, full).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class AdapterLayer(nn.Module):
    """A method's trainable state for one module of the base model.

    Subclasses implement :meth:`adapter_state` (the tensors a checkpoint holds),
    :meth:`load_adapter_state`, :meth:`delta_weight` (ΔW in float32, where mergeable) and ``forward``
    (or, when ``attaches``, hooks on the module and :meth:`detach`).
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
    #: True when the wrapped weight is a bitsandbytes 4-bit weight (QPaCA): merging dequantizes.
    quantized_base: bool = False
    #: Which of the model's configs made this layer (set by ``prepare_model``; saved in checkpoints).
    config_index: int | None = None
    #: Names in :meth:`adapter_state` that are parameters kept frozen (LoRA-FA's ``lora_A``).
    frozen_adapter_parameters: tuple[str, ...] = ()
    #: Host-memory row table of layers that train rows outside autograd and the optimizer (MEFT), else None.
    table = None

    def __init__(self, module_name: str, in_features: int, out_features: int):
        super().__init__()
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

    def unload(self, merge: bool) -> nn.Module:
        """The module this layer replaced, with ΔW folded in when ``merge`` is true."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """Layers on a 4-bit base (``quantized_base``): the full-precision weight with ΔW added."""
        raise NotImplementedError

    def detach(self, target: nn.Module) -> None:
        """Remove an attaching layer (``attaches = True``) from ``target``."""
        raise NotImplementedError(f"{type(self).__name__} replaces its module; use unload().")

    # --- capabilities other methods and the runtime use ------------------------------------------
    def supports_compression(self) -> bool:
        """Whether a modifier (VeLoRA) can compress an input this layer keeps for a weight gradient."""
        return False

    def attach_compressor(self, compressor: nn.Module) -> None:
        raise TypeError(f"{type(self).__name__} keeps no input a compressor could replace.")

    def mark_sharded(self) -> None:
        """Called once FSDP2 manages this layer's parameters (paca_core/sharding.py)."""


class LinearAdapterLayer(AdapterLayer):
    """An adapter that wraps a frozen ``nn.Linear``, kept as ``base_layer``."""

    def __init__(self, base_layer: nn.Linear, module_name: str = ""):
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"{type(self).__name__} adapts nn.Linear layers only; {module_name or 'module'} is {type(base_layer).__name__}."
            )
        super().__init__(module_name, base_layer.in_features, base_layer.out_features)
        self.base_layer = base_layer

    def unload(self, merge: bool) -> nn.Linear:
        """Return the base layer, with ΔW folded into its weight when ``merge`` is true."""
        if merge:
            with torch.no_grad():
                weight = self.base_layer.weight
                weight.copy_((weight.to(torch.float32) + self.delta_weight().to(weight.device)).to(weight.dtype))
        return self.base_layer
