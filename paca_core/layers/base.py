"""What every adapter layer offers, so surgery, checkpoints, merge, sharding and export are written once.

Every member a caller uses is declared here with a default; callers never probe with hasattr/getattr.
:class:`AdapterLayer` is any adapter (MEFT attaches beside a feed-forward block);
:class:`LinearAdapterLayer` wraps a frozen ``nn.Linear`` (PaCA, QPaCA, LoRA, LoRA-FA, full).

The contract a layer follows (what a method outside the package must know, declared rather than discovered):

* **Adapter tensors are declared**, with :meth:`AdapterLayer.add_adapter_parameter` (trained, or frozen with
  ``trainable=False``) and :meth:`AdapterLayer.add_adapter_buffer` (never trained; ``saved=False`` for tensors
  rebuilt on load). The base class places them beside the adapted weights (:attr:`AdapterLayer.adapter_device`,
  floating point in float32) and derives :meth:`~AdapterLayer.adapter_state`, :meth:`~AdapterLayer.load_adapter_state`
  and :attr:`~AdapterLayer.frozen_adapter_parameters` from the declarations.
* **Random tensors come from** :meth:`AdapterLayer.generator` (the config's seed and the module name through
  :func:`paca_core.layers.indices.layer_seed`): the same numbers in every process, so a reloaded adapter rebuilds
  what it did not save. Never Python's ``hash()`` (salted per process) or the global RNG.
* **The method name** (:attr:`AdapterLayer.method`) and the config index are set from the config that made the
  layer, by ``prepare_model`` (:meth:`AdapterLayer.bind_config`); a layer never sets them.
* **The base weights** a layer reads are :meth:`AdapterLayer.base_parameters` (:meth:`~AdapterLayer.base_weight`):
  what DeepSpeed ZeRO-3 gathers for the layer's forward. A layer that keeps part of its adapter *inside* its base
  weight (PaCA's columns) writes it into ZeRO-3 partitions in :meth:`AdapterLayer.write_partitioned`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn as nn

from .indices import layer_seed
from ..surgery.placement import adapter_device

if TYPE_CHECKING:
    from ..base_config import MethodConfig


class AdapterLayer(nn.Module):
    """A method's trainable state for one module of the base model.

    Subclasses declare their adapter tensors in ``__init__`` (:meth:`add_adapter_parameter`,
    :meth:`add_adapter_buffer`) and implement :meth:`delta_weight` (ΔW in float32, where mergeable) and
    ``forward`` (or, when ``attaches``, hooks on the module and :meth:`detach`). :meth:`adapter_state` and
    :meth:`load_adapter_state` follow from the declarations; override them only for state kept elsewhere
    (host memory, a submodule), calling ``super()`` for the declared part.
    """

    #: The method whose config made this layer (``config.method``), set by :meth:`bind_config`; "" before.
    method: str = ""
    #: False: the layer replaces the module it adapts. True: it attaches to it (hooks) and is removed
    #: with :meth:`detach` (the module tree keeps its names).
    attaches: bool = False
    #: Whether ΔW exists, so ``merge_and_unload`` can fold the adapter into the weights.
    mergeable: bool = True
    #: Whether FSDP2 can shard it (its state is plain parameters; see paca_core/distributed/sharding.py).
    shardable: bool = True
    #: The rank, for methods that have one (None otherwise).
    r: int | None = None
    #: True when the wrapped weight is a bitsandbytes 4-bit weight (QPaCA): merging dequantizes.
    quantized_base: bool = False
    #: Which of the model's configs made this layer (set by :meth:`bind_config`; saved in checkpoints).
    config_index: int | None = None
    #: Host-memory row table of layers that train rows outside autograd and the optimizer (MEFT), else None.
    table = None
    #: True for layers that keep their update inside the base weight's storage (PaCA's adapted columns): a weight
    #: tied to another module (a head tied to the embeddings) then changes that module too.
    writes_base_weight: bool = False

    def __init__(self, module_name: str, in_features: int, out_features: int, adapted: nn.Module | None = None):
        """``adapted``: the module whose weights this layer's tensors live beside (an attaching layer's target;
        :class:`LinearAdapterLayer` finds its own)."""
        super().__init__()
        #: The name of the module this layer adapts (what checkpoints key it by, and what seeds its random tensors).
        self.module_name = module_name
        self.in_features, self.out_features = in_features, out_features
        self.adapter_enabled = True
        self.merged = False
        #: Declared adapter tensors in declaration order: name -> (kind, saved); kind is "trained", "frozen" or "buffer".
        self._adapter_tensors: dict[str, tuple[str, bool]] = {}
        self._adapter_device = adapter_device(adapted, module_name) if adapted is not None else None

    # --- binding to the config that made it ----------------------------------------------------
    def bind_config(self, config: MethodConfig, config_index: int) -> None:
        """Record which config made this layer (its ``method`` and index among the model's configs).

        ``prepare_model`` calls it for every layer it creates: export, merge and checkpoints read these."""
        self.method = config.method
        self.config_index = config_index

    # --- seeds -----------------------------------------------------------------------------------
    def layer_seed(self, seed: int, stream: int = 0) -> int:
        """This layer's seed: :func:`paca_core.layers.indices.layer_seed` of the config's ``seed`` and the module name,
        plus ``stream`` (distinct streams for several random tensors). Stable across processes and Python versions."""
        return layer_seed(seed, self.module_name) + stream

    def generator(self, seed: int, stream: int = 0) -> torch.Generator:
        """A CPU generator for this layer's random tensors (draw on CPU, then declare: the draw is the same on
        every device). A tensor that is not saved must be drawn from it: loading rebuilds it in another process."""
        return torch.Generator().manual_seed(self.layer_seed(seed, stream))

    # --- declared adapter tensors ----------------------------------------------------------------
    @property
    def adapter_device(self) -> torch.device:
        """Where adapter tensors go: beside the weights of the adapted module, or, when accelerate offloads them,
        on the device it runs the module on (:func:`paca_core.surgery.placement.adapter_device`)."""
        if self._adapter_device is None:
            raise TypeError(f"{type(self).__name__} passed no adapted module to AdapterLayer.__init__, so its adapter tensors have no place.")
        return self._adapter_device

    def _place(self, name: str, value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        if name in self._adapter_tensors or hasattr(self, name):
            raise ValueError(f"{type(self).__name__}.{name} is already defined; adapter tensors need their own names.")
        if dtype is None:
            dtype = torch.float32 if value.is_floating_point() else value.dtype
        return value.detach().to(device=self.adapter_device, dtype=dtype)

    def add_adapter_parameter(self, name: str, value: torch.Tensor, trainable: bool = True, dtype: torch.dtype | None = None) -> nn.Parameter:
        """Declare adapter parameter ``name`` (saved in checkpoints): trained, or frozen with ``trainable=False``
        (LoRA-FA's A: saved, kept frozen by ``from_pretrained(is_trainable=True)`` too).

        ``value`` goes to :attr:`adapter_device`, floating point as float32 (the update and optimizer state at
        full precision whatever the base's dtype) unless ``dtype``; no copy when it is already there."""
        parameter = nn.Parameter(self._place(name, value, dtype), requires_grad=trainable)
        self.register_parameter(name, parameter)
        self._adapter_tensors[name] = ("trained" if trainable else "frozen", True)
        return parameter

    def add_adapter_buffer(self, name: str, value: torch.Tensor, saved: bool = True, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Declare a never-trained adapter tensor ``name`` (column indices, a frozen random projection), placed as
        :meth:`add_adapter_parameter` places. ``saved=False`` leaves it out of checkpoints: it must then be rebuilt
        exactly on load, so draw it from :meth:`generator`."""
        placed = self._place(name, value, dtype)
        self.register_buffer(name, placed, persistent=saved)
        self._adapter_tensors[name] = ("buffer", saved)
        return placed

    @property
    def frozen_adapter_parameters(self) -> tuple[str, ...]:
        """Names in :meth:`adapter_state` that are parameters kept frozen (declared with ``trainable=False``)."""
        return tuple(name for name, (kind, _) in self._adapter_tensors.items() if kind == "frozen")

    # --- what a checkpoint holds -----------------------------------------------------------------
    def declared_state(self) -> dict[str, torch.Tensor]:
        """The declared adapter tensors a checkpoint holds (``saved``), in declaration order."""
        if not self._adapter_tensors:
            raise NotImplementedError(
                f"{type(self).__name__} declares no adapter tensors: declare them in __init__ (add_adapter_parameter / "
                "add_adapter_buffer) or override adapter_state and load_adapter_state."
            )
        return {name: getattr(self, name) for name, (_, saved) in self._adapter_tensors.items() if saved}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Tensors that define this layer's adapter, by short name (e.g. ``lora_A``): :meth:`declared_state`, plus
        what an override adds (state outside the declared tensors)."""
        return self.declared_state()

    def adapter_state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.adapter_state().items()}

    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checkpoint tensors into the declared, saved tensors (names and shapes already checked by the caller)."""
        for name, tensor in self.declared_state().items():
            tensor.copy_(tensors[name])

    # --- the base model's weights this layer reads -----------------------------------------------
    def base_parameters(self) -> list[nn.Parameter]:
        """Parameters of the base model this layer's own forward reads (DeepSpeed ZeRO-3 gathers them for it).

        None by default: an attaching layer runs beside its module, whose forward gathers its own."""
        return []

    def base_weight(self) -> torch.Tensor | None:
        """The weight of the module this layer adapts (None for layers without one)."""
        return None

    @classmethod
    def write_partitioned(cls, layers: Sequence["AdapterLayer"]) -> None:
        """For layers that keep part of their adapter *inside* their base weight (PaCA's adapted columns): write it
        into the flat partition of the weight each rank holds under DeepSpeed ZeRO-3 (a collective: every rank
        calls it with the same layers; :func:`paca_core.distributed.zero.write_into_partitions` dispatches by layer class).
        Layers whose adapter lives in its own tensors have nothing to write."""
        if layers:
            raise NotImplementedError(f"{cls.__name__} keeps no adapter state in its base weight; nothing to write under ZeRO-3.")

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
        """Called once FSDP2 or ZeRO-3 manages this layer's parameters (paca_core/distributed/sharding.py, paca_core/distributed/zero.py)."""


class LinearAdapterLayer(AdapterLayer):
    """An adapter that wraps a frozen ``nn.Linear``, kept as ``base_layer``; its adapter tensors live beside its weight."""

    def __init__(self, base_layer: nn.Linear, module_name: str = ""):
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"{type(self).__name__} adapts nn.Linear layers only; {module_name or 'module'} is {type(base_layer).__name__}."
            )
        super().__init__(module_name, base_layer.in_features, base_layer.out_features)
        self.base_layer = base_layer

    @property
    def adapter_device(self) -> torch.device:
        """Beside ``base_layer``'s weight (where accelerate runs it when it is offloaded)."""
        return adapter_device(self.base_layer, self.module_name)

    def base_parameters(self) -> list[nn.Parameter]:
        """``base_layer``'s weight and bias."""
        return list(self.base_layer.parameters())

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def unload(self, merge: bool) -> nn.Linear:
        """Return the base layer, with ΔW folded into its weight when ``merge`` is true."""
        if merge:
            with torch.no_grad():
                weight = self.base_layer.weight
                weight.copy_((weight.to(torch.float32) + self.delta_weight().to(weight.device)).to(weight.dtype))
        return self.base_layer
