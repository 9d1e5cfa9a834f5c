"""MEFT: a large sparse adapter beside a feed-forward block, its parameters held in host memory.

``FFN(x) + Σ_j g · relu(x·K_j) · V_j`` over the top-k rows j of the experts each token is routed to
(g: the token's router weight for that row's expert). K and V (M rows each, M up to tens of
thousands) live in host memory (:class:`~paca_core.layers.host_rows.HostRowTable`); a small router
on the device picks a few experts per token; the host scores only those experts' rows, and only
the chosen rows cross to the device, in a fixed-size buffer. Their gradients come back and the host
applies the update when the optimizer that owns the router steps.

The adapter attaches to the feed-forward module with forward hooks instead of wrapping it, so the
module tree (and every other method's layer names inside it) stays unchanged. The pre-hook starts
the device→host copy of the inputs before the feed-forward block runs, so on devices with streams
the host's routing overlaps the block's compute.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import devices
from backends import Backend, get_backend
from devices import Transfer

from .base import AdapterLayer
from .host_rows import HostRowTable

logger = logging.getLogger(__name__)

ATTRIBUTE = "meft_adapter"


def _compiler_disable(fn):
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


class _SparseRows(torch.autograd.Function):
    """The device part: exact forward/backward on the rows that came over; row gradients go home."""

    @staticmethod
    def forward(ctx, x, gates, keys, values, slots, backend: Backend, table: HostRowTable, rows: torch.Tensor):
        out, scores = backend.sparse_rows_forward(x, keys, values, slots, gates)
        ctx.save_for_backward(x, keys, values, slots, gates, scores)
        ctx.backend, ctx.table, ctx.rows = backend, table, rows
        return out

    @staticmethod
    def backward(ctx, grad_output):
        x, keys, values, slots, gates, scores = ctx.saved_tensors
        grad_x, grad_keys, grad_values, grad_gates = ctx.backend.sparse_rows_backward(
            grad_output.contiguous(), x, keys, values, slots, gates, scores
        )
        ctx.table.receive_gradients(ctx.rows, devices.copy_to_host(torch.stack((grad_keys, grad_values))))
        return grad_x, grad_gates.to(gates.dtype), None, None, None, None, None, None


@dataclass
class _InFlight:
    """What the pre-hook started for the forward hook to finish."""

    x: torch.Tensor
    gates: torch.Tensor
    to_host: tuple[Transfer, Transfer, Transfer]


class SparseFFNAdapter(AdapterLayer):
    """MEFT adapter attached to one feed-forward module (``target.meft_adapter``)."""

    attaches = True
    mergeable = False

    def __init__(
        self,
        target: nn.Module,
        width: int,
        num_rows: int,
        top_k: int,
        num_experts: int,
        num_probe: int,
        capacity: int,
        key_std: float,
        seed: int,
        module_name: str = "",
    ):
        """``seed``: the config's seed; the router and the keys draw from this layer's own streams of it."""
        super().__init__(module_name, width, width, adapted=target)
        self.top_k, self.num_probe, self.capacity = top_k, num_probe, capacity
        parameter = next(target.parameters(), None)
        dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
        # beside the block (offloaded: where accelerate runs it), in the block's dtype: the router runs on its input
        self.router = nn.Linear(width, num_experts, bias=False, device=self.adapter_device, dtype=dtype)
        with torch.no_grad():
            self.router.weight.copy_(torch.randn(num_experts, width, generator=self.generator(seed, stream=1)) * width**-0.5)
        _LAYERS.add(self)  # lets the optimizer hook find this layer
        self.table = HostRowTable(num_rows, width, num_experts, key_std, self.layer_seed(seed))
        self._in_flight: _InFlight | None = None
        target.register_forward_pre_hook(self._start)
        target.register_forward_hook(self._finish)
        register_optimizer_update_hook()

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy / pickle: register the copy so the optimizer hook updates its host rows too.
        super().__setstate__(state)
        _LAYERS.add(self)
        register_optimizer_update_hook()

    @property
    def backend(self) -> Backend:
        return get_backend(self.router.weight.device)

    # --- forward: the pre-hook starts the host round trip, the forward hook finishes it ------------
    def _start(self, module: nn.Module, args: tuple) -> None:
        if not self.adapter_enabled or not args:
            return
        hidden = args[0]
        if hidden.shape[-1] != self.in_features:
            raise ValueError(
                f"MEFT adapter on {self.module_name} expects inputs of width {self.in_features}, got {tuple(hidden.shape)}."
            )
        # the router's device: where the block runs (accelerate's hook moves the block's own input after this hook)
        x = hidden.reshape(-1, self.in_features).to(self.router.weight.device)
        logits = self.router(x.to(self.router.weight.dtype))
        top_logits, experts = logits.topk(self.num_probe, dim=-1)
        gates = torch.softmax(top_logits.float(), dim=-1)
        to_host = (devices.copy_to_host(x.detach()), devices.copy_to_host(experts), devices.copy_to_host(gates.detach()))
        self._in_flight = _InFlight(x, gates, to_host)

    def _finish(self, module: nn.Module, args: tuple, output):
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return output
        if not isinstance(output, torch.Tensor) or output.shape[-1] != self.out_features:
            raise TypeError(
                f"MEFT adapts feed-forward modules that return one tensor of width {self.out_features}; "
                f"{self.module_name} returned {type(output).__name__}. Target the MLP block (e.g. 'mlp')."
            )
        adapter_out = self._adapter(flight)
        return output + adapter_out.view(output.shape).to(output.device, output.dtype)

    @_compiler_disable
    def _retrieve(self, flight: _InFlight) -> tuple[torch.Tensor, ...]:
        """Host part: wait for the inputs, pick rows, send them over (outside any compiled graph)."""
        x_host, experts_host, gates_host = (t.wait() for t in flight.to_host)
        table, device = self.table, flight.x.device
        table.traffic["copied_to_host_bytes"] += sum(t.nbytes for t in flight.to_host)
        # A batch of T tokens uses at most T·k rows: small batches (generation) get a smaller buffer,
        # still a pure function of the input shape.
        capacity = min(self.capacity, x_host.shape[0] * self.top_k)
        selection = table.select(x_host, experts_host, gates_host, self.top_k, capacity)
        rows_buffer = table.gather(selection, capacity, flight.x.dtype, device)
        index_buffer = devices.host_tensor((2,) + tuple(selection.slots.shape), torch.int64, device)
        index_buffer[0].copy_(selection.slots)
        index_buffer[1].copy_(selection.positions)
        rows_in, index_in = devices.copy_to_device(rows_buffer, device), devices.copy_to_device(index_buffer, device)
        table.traffic["copied_to_device_bytes"] += rows_in.nbytes + index_in.nbytes
        rows_dev, index_dev = rows_in.wait(), index_in.wait()
        return rows_dev[0], rows_dev[1], index_dev[0], index_dev[1], selection.rows

    def _adapter(self, flight: _InFlight) -> torch.Tensor:
        keys, values, slots, positions, rows = self._retrieve(flight)
        gates = flight.gates.gather(1, positions).to(flight.x.dtype)
        return _SparseRows.apply(flight.x, gates, keys, values, slots, self.backend, self.table, rows)

    # --- optimizer ------------------------------------------------------------------------------
    def apply_host_update(self, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> int:
        """Run the host's Adam(W) on the rows used since the last update (the optimizer hook calls this)."""
        return self.table.apply_update(lr, betas, eps, weight_decay)

    # --- checkpoints: state outside declared tensors (host rows, the router submodule) ------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {"meft_keys": self.table.keys, "meft_values": self.table.values, "meft_router": self.router.weight}

    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.table.keys.copy_(tensors["meft_keys"])
            self.table.values.copy_(tensors["meft_values"])
            self.router.weight.copy_(tensors["meft_router"])

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError("MEFT adds a nonlinear branch; it has no weight delta.")

    def detach(self, target: nn.Module) -> None:
        """Remove this adapter from ``target`` (the feed-forward module it is attached to)."""
        if getattr(target, ATTRIBUTE, None) is not self:
            raise ValueError(f"{self.module_name} does not carry this MEFT adapter.")
        for hooks in (target._forward_pre_hooks, target._forward_hooks):
            for key in [k for k, hook in hooks.items() if getattr(hook, "__self__", None) is self]:
                del hooks[key]
        delattr(target, ATTRIBUTE)

    def unload(self, merge: bool) -> nn.Linear:
        raise TypeError("MEFT attaches to its module; remove it with detach(target, merge) (AdaptedModel.unload does).")

    def extra_repr(self) -> str:
        t = self.table
        return (
            f"rows={t.num_rows} (host), width={t.width}, experts={t.num_experts}, probe={self.num_probe}, "
            f"top_k={self.top_k}, rows_per_step={self.capacity}"
        )


# --- the optimizer hook: the host update runs when the optimizer that owns a router steps -----------
_HOOK_HANDLE = None
#: Every live MEFT adapter, found by its router's identity (FSDP2 replaces parameters, so no tag on them).
_LAYERS: "weakref.WeakSet[SparseFFNAdapter]" = weakref.WeakSet()


def register_optimizer_update_hook() -> None:
    global _HOOK_HANDLE
    if _HOOK_HANDLE is None:
        _HOOK_HANDLE = register_optimizer_step_post_hook(_update_after_step)


def _update_after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    by_router = {id(layer.router.weight): layer for layer in list(_LAYERS)}
    if not by_router:
        return
    for group in optimizer.param_groups:  # the optimizer's order: the same on every process
        for param in group["params"]:
            layer = by_router.get(id(param))
            if layer is None:
                continue
            betas = group.get("betas", (0.9, 0.999))
            layer.apply_host_update(float(group["lr"]), (float(betas[0]), float(betas[1])), float(group.get("eps", 1e-8)), float(group.get("weight_decay", 0.0)))
