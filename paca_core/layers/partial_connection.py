"""PaCA layer: a frozen ``nn.Linear`` whose r selected input columns are trained through a delta.

Design (see docs/ARCHITECTURE.md, "Why the weight is kept adapted"): the base weight always holds
``original + scaling·delta`` in the selected columns while the adapter is active, so a training
forward is exactly one GEMM and a gather, the backward one GEMM plus a skinny (out × r) GEMM, and
eval is the plain base layer. The original columns are kept in a small ``(out, r)`` buffer, so
disabling, unmerging and saving the base weights restore them bit for bit. The columns are
rewritten once per optimizer step (a global optimizer post-step hook), and also whenever the
delta's version counter shows it was changed in place some other way.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
import torch.nn as nn

from torch.optim.optimizer import register_optimizer_step_post_hook

from backends import Backend, get_backend

from ..indices import check_columns
from .base import AdapterLayer

logger = logging.getLogger(__name__)


def _is_compiling() -> bool:
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(check()) if check is not None else False


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None (device-generic API of torch >= 2.4)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


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


class PaCALinear(AdapterLayer):
    """Wraps a frozen ``nn.Linear`` (kept as ``base_layer``) with a trainable ``paca_delta`` of shape (out, r)."""

    method = "paca"

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float | None, indices: torch.Tensor, module_name: str = ""):
        super().__init__(base_layer, module_name)
        in_features, out_features = base_layer.in_features, base_layer.out_features
        if r > in_features:
            raise ValueError(f"r={r} exceeds in_features={in_features} of {module_name}: choose r <= {in_features}.")
        if indices.shape != (r,):
            raise ValueError(f"{module_name}: expected {r} column indices, got shape {tuple(indices.shape)}.")
        weight = base_layer.weight
        weight.requires_grad_(False)
        self.r = r
        self.alpha = float(alpha if alpha is not None else r)
        self.scaling = self.alpha / r
        self.paca_delta = nn.Parameter(torch.zeros(out_features, r, dtype=torch.float32, device=weight.device))
        self.register_buffer("paca_indices", indices.to(device=weight.device, dtype=torch.long).clone())
        self.register_buffer(
            "paca_original_columns", weight.detach().index_select(1, self.paca_indices).clone(), persistent=False
        )
        self.paca_delta._paca_layer = weakref.ref(self)  # lets the optimizer hook find this layer
        self._applied = False  # does the base weight hold original + scaling·delta right now?
        self._applied_version = -1
        self._register_hooks()
        register_optimizer_sync_hook()
        self.apply_delta()

    # --- keeping the base weight consistent ------------------------------------------------------
    @torch.no_grad()
    def apply_delta(self) -> None:
        """Write ``original + scaling·delta`` into the selected columns of the base weight."""
        weight = self.base_layer.weight
        get_backend(weight.device).write_adapted_columns(
            [weight], [self.paca_indices], [self.paca_original_columns], [self.paca_delta], [self.scaling]
        )
        self._mark_applied()

    def _mark_applied(self) -> None:
        self._applied = True
        self._applied_version = self.paca_delta._version

    @torch.no_grad()
    def restore_original(self) -> None:
        """Put the pretrained columns back (bit-identical)."""
        if self._applied:
            self.base_layer.weight.index_copy_(1, self.paca_indices, self.paca_original_columns)
            self._applied = False

    def _stale(self) -> bool:
        return not self._applied or self.paca_delta._version != self._applied_version

    def pristine_weight(self) -> torch.Tensor:
        """A copy of the base weight with the original columns (what the pretrained model had)."""
        weight = self.base_layer.weight.detach().clone()
        return weight.index_copy_(1, self.paca_indices, self.paca_original_columns)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in) in float32: ``scaling·delta`` in the selected columns, zero elsewhere."""
        full = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self.paca_delta.device)
        return full.index_copy_(1, self.paca_indices, self.paca_delta.detach() * self.scaling)

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy / pickle: the copied delta must point at this copy, not at the original layer.
        super().__setstate__(state)
        self.paca_delta._paca_layer = weakref.ref(self)
        register_optimizer_sync_hook()

    # --- checkpoint state -------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {"paca_delta": self.paca_delta, "paca_indices": self.paca_indices}

    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        indices = tensors["paca_indices"]
        check_columns(indices, self.in_features, self.module_name)
        self.restore_original()
        self.paca_indices.copy_(indices)
        self.paca_original_columns = self.base_layer.weight.detach().index_select(1, self.paca_indices).clone()
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
        if not _is_compiling() and self._stale():
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
    weight = module.base_layer.weight
    module.paca_original_columns = weight.detach().index_select(1, module.paca_indices).clone()
    if module.adapter_enabled:
        module.apply_delta()


# --- one write-back per optimizer step, for every optimizer ----------------------------------------
_HOOK_HANDLE = None


def register_optimizer_sync_hook() -> None:
    """Install (once) a global optimizer post-step hook that rewrites the columns of updated layers.

    Global hooks fire for every ``torch.optim.Optimizer`` subclass (fused and foreach kernels
    included, which do not bump version counters), so no training loop needs to know about PaCA.
    """
    global _HOOK_HANDLE
    if _HOOK_HANDLE is None:
        _HOOK_HANDLE = register_optimizer_step_post_hook(_sync_after_step)


def _sync_after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    layers = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            ref = getattr(param, "_paca_layer", None)
            layer = ref() if ref is not None else None
            if layer is not None and layer.adapter_enabled:
                layers.append(layer)
    sync_layers(layers)


def sync_layers(layers: list[PaCALinear]) -> None:
    """Rewrite the adapted columns of ``layers``, batched per device so a backend can use one launch."""
    by_device: dict[torch.device, list[PaCALinear]] = {}
    for layer in layers:
        by_device.setdefault(layer.base_layer.weight.device, []).append(layer)
    for device, group in by_device.items():
        get_backend(device).write_adapted_columns(
            [layer.base_layer.weight for layer in group],
            [layer.paca_indices for layer in group],
            [layer.paca_original_columns for layer in group],
            [layer.paca_delta for layer in group],
            [layer.scaling for layer in group],
        )
        for layer in group:
            layer._mark_applied()
