"""PaCA layer: a frozen ``nn.Linear`` whose r selected input columns are trained through a delta.

Design (see docs/ARCHITECTURE.md, "Why the weight is kept adapted"): the base weight always holds
``original + scaling·delta`` in the selected columns while the adapter is active, so a training
forward is exactly one GEMM and a gather, the backward one GEMM plus a skinny (out × r) GEMM, and
eval is the plain base layer. The original columns are kept in a small ``(out, r)`` buffer, so
disabling, unmerging and saving the base weights restore them bit for bit. The columns are
rewritten once per optimizer step (a global optimizer post-step hook), and also whenever the
delta's version counter shows it was changed in place some other way.

Under FSDP2 the weight and the delta are DTensors sharded on dim 0 (output features) between steps:
their row shards line up, so each rank rewrites the columns of its own rows (paca_core/distributed/sharding.py)
and the all-gathered weight of the next forward and backward is adapted everywhere.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
import torch.nn as nn

from torch.optim.optimizer import register_optimizer_step_post_hook

from backends import Backend, get_backend

from .indices import check_columns
from ..distributed.sharding import full_tensor, gather_rows, is_sharded, local_rows, wrap_local
from ..distributed.zero import gathered, partition_bounds, partitioned_layers, write_into_partitions
from .base import LinearAdapterLayer

logger = logging.getLogger(__name__)


def _is_compiling() -> bool:
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(check()) if check is not None else False


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None (device-generic API of torch >= 2.4)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def check_rank_fits(r: int | None, in_features: int, module_name: str) -> None:
    """PaCA trains r of a layer's input columns: r may not exceed them (PaCA, QPaCA and prepare_model ask this)."""
    if r is not None and r > in_features:
        raise ValueError(f"r={r} exceeds in_features={in_features} of {module_name}: choose r <= {in_features}.")


def init_partial_connection(
    layer: LinearAdapterLayer, r: int, alpha: float | None, indices: torch.Tensor, scaling: float | None = None
) -> None:
    """The state PaCA and QPaCA share: ``r``, ``alpha``, ``scaling``, and the declared adapter tensors ``paca_delta``
    (out, r, fp32, zero; trained) and ``paca_indices`` (saved), beside the base weight.

    ``scaling`` defaults to ``alpha / r``; a layer given its own columns (``PaCAConfig.columns``, PEFT's
    ``paca_indices_pattern``) keeps the config's ``alpha / r`` whatever its number of columns, as PEFT does."""
    check_rank_fits(r, layer.in_features, layer.module_name)
    if indices.shape != (r,):
        raise ValueError(f"{layer.module_name}: expected {r} column indices, got shape {tuple(indices.shape)}.")
    layer.r = r
    layer.alpha = float(alpha if alpha is not None else r)
    layer.scaling = float(scaling) if scaling is not None else layer.alpha / r
    device = layer.adapter_device
    layer.add_adapter_parameter("paca_delta", torch.zeros(layer.out_features, r, dtype=torch.float32, device=device))
    layer.add_adapter_buffer("paca_indices", indices.to(device=device, dtype=torch.long).clone())  # a copy of the caller's


def partial_connection_delta(layer: LinearAdapterLayer, delta: torch.Tensor) -> torch.Tensor:
    """ΔW (out, in) in float32: ``scaling·delta`` in the selected columns, zero elsewhere."""
    full = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float32, device=delta.device)
    return full.index_copy_(1, layer.paca_indices, delta * layer.scaling)


class _PartialConnectionLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W already adapted; saves only x[..., idx]; grads to x and the delta."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, indices, scaling, backend: Backend, compute_dtype):
        if compute_dtype is not None:  # autocast: cast explicitly, run the GEMM outside autocast
            x = x.to(compute_dtype)
            weight_c = weight.to(compute_dtype)
            bias_c = bias.to(compute_dtype) if bias is not None else None
            with torch.autocast(device_type=x.device.type, enabled=False):
                output, x_selected = backend.partial_connection_forward(x, weight_c, bias_c, indices)
        else:
            output, x_selected = backend.partial_connection_forward(x, weight, bias, indices)
        ctx.save_for_backward(x_selected, weight)
        ctx.scaling = scaling
        ctx.backend = backend
        ctx.compute_dtype = output.dtype
        ctx.has_bias = bias is not None
        ctx.delta_dtype = delta.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x_selected, weight = ctx.saved_tensors
        need_x, _, need_bias, need_delta = ctx.needs_input_grad[:4]
        grad_output = grad_output.to(ctx.compute_dtype)
        grads = ctx.backend.partial_connection_backward(
            grad_output,
            x_selected,
            weight.to(ctx.compute_dtype),
            need_input_grad=need_x,
            need_delta_grad=need_delta,
            need_bias_grad=need_bias and ctx.has_bias,
        )
        grad_delta = grads.delta.mul_(ctx.scaling).to(ctx.delta_dtype) if grads.delta is not None else None
        return grads.input, None, grads.bias, grad_delta, None, None, None, None


class PaCALinear(LinearAdapterLayer):
    """Wraps a frozen ``nn.Linear`` (kept as ``base_layer``) with a trainable ``paca_delta`` of shape (out, r)."""

    writes_base_weight = True

    def __init__(
        self, base_layer: nn.Linear, r: int, alpha: float | None, indices: torch.Tensor, module_name: str = "",
        scaling: float | None = None,
    ):
        super().__init__(base_layer, module_name)
        weight = base_layer.weight
        weight.requires_grad_(False)
        init_partial_connection(self, r, alpha, indices, scaling)
        self.register_buffer(
            "paca_original_columns", weight.detach().index_select(1, self.paca_indices).clone(), persistent=False
        )
        self._applied = False  # does the base weight hold original + scaling·delta right now?
        self._applied_version = -1
        self._sharded = False  # FSDP2 manages the parameters: the post-step hook alone keeps them adapted
        _LAYERS.add(self)  # lets the optimizer hook find this layer
        self._register_hooks()
        register_optimizer_sync_hook()
        self.apply_delta()

    # --- keeping the base weight consistent ------------------------------------------------------
    @torch.no_grad()
    def apply_delta(self) -> None:
        """Write ``original + scaling·delta`` into the selected columns of the base weight."""
        sync_layers([self])

    def _local_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weight, original columns, delta) for the rows this process holds: all of them unless sharded."""
        weight, rows = local_rows(self.base_layer.weight)
        delta, _ = local_rows(self.paca_delta)
        if is_sharded(self.base_layer.weight):
            self._sharded = True
        return weight, self.paca_original_columns[rows], delta

    def mark_sharded(self) -> None:
        """Called by :func:`paca_core.distributed.sharding.shard_model`: forwards then see all-gathered copies."""
        self._sharded = True

    def _mark_applied(self) -> None:
        self._applied = True
        self._applied_version = self.paca_delta._version

    @torch.no_grad()
    def restore_original(self) -> None:
        """Put the pretrained columns back (bit-identical)."""
        if self._applied:
            weight, original, _ = self._local_parts()
            weight.index_copy_(1, self.paca_indices, original)
            self._applied = False

    def _stale(self) -> bool:
        return not self._applied or self.paca_delta._version != self._applied_version

    def pristine_weight(self) -> torch.Tensor:
        """A copy of the base weight with the original columns (what the pretrained model had)."""
        weight, original, _ = self._local_parts()
        pristine = weight.detach().clone().index_copy_(1, self.paca_indices, original)
        return wrap_local(pristine, self.base_layer.weight)

    def _original_columns(self) -> torch.Tensor:
        """The selected columns of the base weight as they are now, whole (gathered when sharded)."""
        weight, _ = local_rows(self.base_layer.weight.detach())
        return gather_rows(weight.index_select(1, self.paca_indices), self.base_layer.weight)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in) in float32: ``scaling·delta`` in the selected columns, zero elsewhere."""
        return partial_connection_delta(self, full_tensor(self.paca_delta).detach())  # FSDP/ZeRO-3: gathered (every rank calls this)

    @classmethod
    @torch.no_grad()
    def write_partitioned(cls, layers: "list[PaCALinear]") -> None:
        """The column write under DeepSpeed ZeRO-3: ``weight[:, idx] = original + scaling·delta`` on each rank's partition.

        The (out × r) deltas are all-gathered once for all layers; the adapted values are rounded exactly as
        the backend's write rounds them (it writes them); then each rank copies the entries whose flat
        position ``row·in + column`` falls inside its own partition. No frozen weight is gathered. A weight
        DeepSpeed keeps whole between forwards (smaller than ``stage3_param_persistence_threshold``) gets
        the columns in that whole copy too.
        """
        with gathered([layer.paca_delta for layer in layers]):
            for layer in layers:
                weight = layer.base_layer.weight
                partition = weight.ds_tensor
                adapted = torch.empty(layer.out_features, layer.r, dtype=partition.dtype, device=partition.device)
                every = torch.arange(layer.r, device=partition.device)
                get_backend(partition.device).write_adapted_columns(
                    [adapted], [every], [layer.paca_original_columns.to(partition.device)],
                    [layer.paca_delta.detach().to(partition.device)], [layer.scaling],
                )
                local, source = layer._partition_positions(weight)
                partition.view(-1).index_copy_(0, local, adapted.view(-1).index_select(0, source))
                if weight.data.numel() == weight.ds_numel:  # held whole between forwards (a small, persistent parameter)
                    weight.data.view(layer.out_features, layer.in_features).index_copy_(
                        1, layer.paca_indices.to(weight.device), adapted.to(weight.device)
                    )
                layer._mark_applied()

    def _partition_positions(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions in this rank's ZeRO-3 partition, positions in the (out, r) adapted block) of the adapted entries."""
        key = (int(self.paca_indices.sum()), tuple(self.paca_indices[:4].tolist()), self.r)
        cached = getattr(self, "_zero3_positions", None)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        start, end = partition_bounds(weight)
        rows = torch.arange(self.out_features, device=self.paca_indices.device).unsqueeze(1)
        flat = (rows * self.in_features + self.paca_indices.unsqueeze(0)).reshape(-1)
        inside = (flat >= start) & (flat < end)
        device = weight.ds_tensor.device
        local = (flat[inside] - start).to(device)
        source = inside.nonzero().squeeze(1).to(device)
        self._zero3_positions = (key, local, source)
        return local, source

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy / pickle: register the copy so the optimizer hook keeps it adapted too.
        super().__setstate__(state)
        _LAYERS.add(self)
        register_optimizer_sync_hook()

    # --- checkpoint state (declared: paca_delta, paca_indices) -------------------------------------
    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        indices = tensors["paca_indices"]
        check_columns(indices, self.in_features, self.module_name)
        self.restore_original()
        self.paca_indices.copy_(indices)
        self.paca_original_columns = self._original_columns()
        self.paca_delta.copy_(tensors["paca_delta"])
        if self.adapter_enabled:
            self.apply_delta()

    def set_adapter_enabled(self, enabled: bool) -> None:
        self.adapter_enabled = enabled
        if enabled:
            self.apply_delta()
        else:
            self.restore_original()

    # --- state dict: saved base weights are always the pristine ones ---------------------------
    def _register_hooks(self) -> None:
        self._register_state_dict_hook(_state_dict_with_pristine_weight)
        self._register_load_state_dict_pre_hook(_before_load, with_module=True)
        self.register_load_state_dict_post_hook(_after_load)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            if self._applied:
                self.restore_original()
            return self.base_layer(x)
        if not _is_compiling() and not self._sharded and self._stale():
            self.apply_delta()
        if self.merged or not self.paca_delta.requires_grad or not torch.is_grad_enabled():
            return self.base_layer(x)  # weight already adapted: inference costs nothing extra
        weight = self.base_layer.weight
        if weight.requires_grad:
            raise RuntimeError(
                f"{self.module_name}: the base weight of a PaCA layer must stay frozen (the trainable part is "
                "paca_delta); call requires_grad_(False) on it or fully train the module without PaCA."
            )
        return _PartialConnectionLinear.apply(
            x,
            weight,
            self.base_layer.bias,
            self.paca_delta,
            self.paca_indices,
            self.scaling,
            get_backend(x.device),
            _autocast_dtype(x.device.type),
        )

    # --- PEFT-style verbs ------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the delta in and stop training it (forward is the plain base layer)."""
        self.apply_delta()
        self.merged = True

    def unmerge(self) -> None:
        """Back to adapter mode after :meth:`merge`."""
        self.merged = False

    def unload(self, merge: bool) -> nn.Linear:
        """Return the base layer, with the delta folded in (``merge=True``) or the original weight."""
        if merge:
            self.apply_delta()
        else:
            self.restore_original()
        self._applied = False
        return self.base_layer

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, in={self.in_features}, out={self.out_features}"


def _state_dict_with_pristine_weight(module: PaCALinear, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    key = prefix + "base_layer.weight"
    if module._applied and key in state_dict:
        state_dict[key] = module.pristine_weight()


def _before_load(module: PaCALinear, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    module.restore_original()  # loaded base weights and indices then describe a pristine layer


@torch.no_grad()
def _after_load(module: PaCALinear, incompatible_keys) -> None:
    module.paca_original_columns = module._original_columns()
    if module.adapter_enabled:
        module.apply_delta()


# --- one write-back per optimizer step, for every optimizer ----------------------------------------
_HOOK_HANDLE = None
#: Every live PaCA layer. The hook looks layers up by their delta's identity rather than tagging the
#: parameter, because FSDP2 replaces parameters with new (sharded) ones.
_LAYERS: "weakref.WeakSet[PaCALinear]" = weakref.WeakSet()


def register_optimizer_sync_hook() -> None:
    """Install (once) a global optimizer post-step hook that rewrites the columns of updated layers.

    Global hooks fire for every ``torch.optim.Optimizer`` subclass (fused and foreach kernels
    included, which do not bump version counters), so no training loop needs to know about PaCA.
    """
    global _HOOK_HANDLE
    if _HOOK_HANDLE is None:
        _HOOK_HANDLE = register_optimizer_step_post_hook(_sync_after_step)


def _sync_after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    # In the optimizer's parameter order, not the WeakSet's (memory addresses): the same run allocates the
    # same temporaries in the same order every time, so its memory peak is reproducible (paca plan traces it).
    by_delta = {id(layer.paca_delta): layer for layer in list(_LAYERS) if layer.adapter_enabled}
    stepped = [by_delta.pop(id(param)) for group in optimizer.param_groups for param in group["params"] if id(param) in by_delta]
    sync_layers(stepped)


@torch.no_grad()
def sync_layers(layers: list[PaCALinear]) -> None:
    """Rewrite the adapted columns of ``layers``, batched per device so a backend can use one launch.

    Under DeepSpeed ZeRO-3 each rank writes its own flat partition of the weights (:meth:`PaCALinear.write_partitioned`)."""
    partitioned = partitioned_layers(layers)
    if partitioned:
        write_into_partitions(partitioned)
        written = {id(layer) for layer in partitioned}
        layers = [layer for layer in layers if id(layer) not in written]
    by_device: dict[torch.device, list[tuple[PaCALinear, tuple]]] = {}
    for layer in layers:
        parts = layer._local_parts()
        by_device.setdefault(parts[0].device, []).append((layer, parts))
    for device, group in by_device.items():
        get_backend(device).write_adapted_columns(
            [weight for _, (weight, _, _) in group],
            [layer.paca_indices for layer, _ in group],
            [original for _, (_, original, _) in group],
            [delta for _, (_, _, delta) in group],
            [layer.scaling for layer, _ in group],
        )
        for layer, _ in group:
            layer._mark_applied()
