"""MEFT's key/value rows in host memory: which rows each token uses, their gradients, and the host's
sparse Adam update.

The device never holds this table. Per forward it receives only the rows the batch selected
(a fixed-size buffer, padded), and per backward it returns only their gradients; the update runs
here on the host, touching only rows that were used since the last step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import devices
from devices import Transfer


@dataclass
class RowSelection:
    """What one forward sends to the device, all host tensors with static shapes.

    ``rows``: the table rows placed in buffer slots ``0..len(rows)-1``; ``slots`` (T, k): the buffer
    slot each token's j-th row sits in (``capacity`` = the all-zero padding slot for rows dropped
    because the batch selected more than ``capacity`` distinct rows); ``positions`` (T, k): which of
    the token's probed experts the row belongs to (indexes its gates).
    """

    rows: torch.Tensor
    slots: torch.Tensor
    positions: torch.Tensor
    selected_rows: int
    dropped_rows: int


def default_num_experts(num_rows: int) -> int:
    """About √M/2 experts, as MEFT's default, adjusted to divide ``num_rows`` (equal-size experts)."""
    target = max(1, round(math.sqrt(num_rows) / 2))
    for candidate in range(target, 0, -1):
        if num_rows % candidate == 0:
            return candidate
    return 1


class HostRowTable:
    """Keys K (M, d) and values V (M, d) of one sparse adapter, in float32 host memory.

    Rows ``[e·S, (e+1)·S)`` form expert ``e`` (S = M / E). Gradients arrive from the device as dense
    (capacity, d) buffers and are summed into host gradient rows; :meth:`apply_update` runs Adam(W) on
    the rows touched since the previous update, with per-row step counts for the bias correction.
    """

    def __init__(self, num_rows: int, width: int, num_experts: int, key_std: float, seed: int):
        if num_rows % num_experts:
            raise ValueError(f"num_rows ({num_rows}) must be a multiple of num_experts ({num_experts}).")
        self.num_rows, self.width, self.num_experts = num_rows, width, num_experts
        self.rows_per_expert = num_rows // num_experts
        generator = torch.Generator().manual_seed(seed)
        self.keys = torch.randn(num_rows, width, generator=generator) * key_std
        self.values = torch.zeros(num_rows, width)  # zero: the adapter starts as the identity change
        self.grad_keys = torch.zeros(num_rows, width)
        self.grad_values = torch.zeros(num_rows, width)
        self.touched = torch.zeros(num_rows, dtype=torch.bool)
        self.row_steps = torch.zeros(num_rows, dtype=torch.int64)
        self.exp_avg: dict[str, torch.Tensor] = {}
        self.exp_avg_sq: dict[str, torch.Tensor] = {}
        self._pending: list[tuple[torch.Tensor, Transfer]] = []
        #: Running totals: bytes of row buffers sent (what crosses to a device with its own memory;
        #: counted on CPU too, where the copy itself is free), the minimum (the rows used only), bytes
        #: actually copied each way, and rows selected / dropped by the per-step budget.
        self.traffic = {
            "row_buffer_bytes": 0, "minimum_row_bytes": 0, "copied_to_device_bytes": 0, "copied_to_host_bytes": 0,
            "selected_rows": 0, "dropped_rows": 0,
        }

    # --- routing ---------------------------------------------------------------------------------
    @torch.no_grad()
    def select(self, x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, top_k: int, capacity: int) -> RowSelection:
        """Score each token against the rows of its probed experts only, keep its ``top_k`` rows by
        gated score, and place the batch's distinct rows into at most ``capacity`` buffer slots (the
        most used rows win; the others go to the zero padding slot)."""
        tokens, probes = experts.shape
        size = self.rows_per_expert
        x = x.float()
        # Group the (token, probe) pairs by expert into one padded batch: a single batched GEMM scores
        # every pair against its expert's rows only (no per-expert Python loop, no x·Kᵀ over all rows).
        flat_experts = experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        sorted_experts = flat_experts[order]
        rank_in_expert = torch.arange(order.numel()) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
        batch = torch.zeros(self.num_experts, int(counts.max()), self.width)
        batch[sorted_experts, rank_in_expert] = x[order // probes]
        scores = torch.bmm(batch, self.keys.view(self.num_experts, size, self.width).transpose(1, 2))
        candidate_scores = torch.empty(tokens * probes, size)
        candidate_scores[order] = scores[sorted_experts, rank_in_expert]
        candidate_scores = candidate_scores.view(tokens, probes, size)
        gated = (candidate_scores * gates.float().unsqueeze(-1)).reshape(tokens, probes * size)
        best = gated.topk(top_k, dim=1).indices
        positions = best // size
        rows = experts.gather(1, positions) * size + best % size
        unique_rows, inverse = torch.unique(rows, return_inverse=True)
        selected = unique_rows.numel()
        if selected > capacity:
            uses = torch.bincount(inverse.reshape(-1), minlength=selected)
            keep = torch.sort(uses.topk(capacity).indices).values
            slot_of = torch.full((selected,), capacity, dtype=torch.int64)
            slot_of[keep] = torch.arange(capacity)
            unique_rows = unique_rows[keep]
        else:
            slot_of = torch.arange(selected)
        return RowSelection(unique_rows, slot_of[inverse], positions, selected, max(0, selected - capacity))

    def gather(self, selection: RowSelection, capacity: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(2, capacity + 1, d) host buffer [keys; values] of the selected rows, in ``dtype``; rows past
        the selection (and the last, padding slot) are zero."""
        buffer = devices.host_tensor((2, capacity + 1, self.width), dtype, device)
        count = selection.rows.numel()
        buffer[0, :count] = self.keys.index_select(0, selection.rows)
        buffer[1, :count] = self.values.index_select(0, selection.rows)
        self.traffic["row_buffer_bytes"] += buffer.numel() * buffer.element_size()
        self.traffic["minimum_row_bytes"] += 2 * count * self.width * buffer.element_size()
        self.traffic["selected_rows"] += selection.selected_rows
        self.traffic["dropped_rows"] += selection.dropped_rows
        return buffer

    # --- gradients -------------------------------------------------------------------------------
    def receive_gradients(self, rows: torch.Tensor, transfer: Transfer) -> None:
        """Queue a (2, capacity + 1, d) gradient buffer on its way to the host; summed in at the
        next :meth:`apply_update` (or :meth:`collect`), so the copy overlaps the rest of backward."""
        self._pending.append((rows, transfer))
        self.traffic["copied_to_host_bytes"] += transfer.nbytes

    @torch.no_grad()
    def collect(self) -> None:
        """Sum every gradient that has arrived into the host gradient rows."""
        pending, self._pending = self._pending, []
        for rows, transfer in pending:
            grads = transfer.wait().float()
            count = rows.numel()
            self.grad_keys.index_add_(0, rows, grads[0, :count])
            self.grad_values.index_add_(0, rows, grads[1, :count])
            self.touched[rows] = True

    def touched_rows(self) -> torch.Tensor:
        """Indices of the rows with gradients since the last update."""
        return self.touched.nonzero().squeeze(1)

    def discard_gradients(self) -> None:
        """Forget gradients not yet applied (a skipped step)."""
        self.collect()
        idx = self.touched.nonzero().squeeze(1)
        self.grad_keys[idx] = 0
        self.grad_values[idx] = 0
        self.touched[idx] = False

    @torch.no_grad()
    def average_across_processes(self, group=None) -> None:
        """Multi-process training: every process holds the whole table and must apply the same update.

        The union of the rows any process touched is agreed on first (one all-reduce of a row mask),
        then only those rows' gradients are all-reduced and averaged — what DDP does for device
        gradients, so N processes equal one process on the global batch.
        """
        import torch.distributed as dist

        mask = self.touched.to(torch.int32)
        dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=group)
        idx = mask.nonzero().squeeze(1)
        if idx.numel() == 0:
            return
        grads = torch.cat((self.grad_keys.index_select(0, idx), self.grad_values.index_select(0, idx)), dim=1)
        dist.all_reduce(grads, group=group)
        grads /= dist.get_world_size(group)
        self.grad_keys.index_copy_(0, idx, grads[:, : self.width])
        self.grad_values.index_copy_(0, idx, grads[:, self.width :])
        self.touched[idx] = True

    @torch.no_grad()
    def apply_update(self, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> int:
        """AdamW on the touched rows only; returns how many rows were updated."""
        self.collect()
        if devices.world_size() > 1:
            self.average_across_processes(devices.host_process_group())
        idx = self.touched_rows()
        if idx.numel() == 0:
            return 0
        beta1, beta2 = betas
        self.row_steps[idx] += 1
        steps = self.row_steps[idx].to(torch.float64).unsqueeze(1)
        bias1 = (1 - beta1**steps).float()
        bias2_sqrt = (1 - beta2**steps).sqrt().float()
        for name, param, grad in (("keys", self.keys, self.grad_keys), ("values", self.values, self.grad_values)):
            if name not in self.exp_avg:
                self.exp_avg[name] = torch.zeros_like(param)
                self.exp_avg_sq[name] = torch.zeros_like(param)
            g = grad.index_select(0, idx)
            m = self.exp_avg[name].index_select(0, idx).mul_(beta1).add_(g, alpha=1 - beta1)
            v = self.exp_avg_sq[name].index_select(0, idx).mul_(beta2).addcmul_(g, g, value=1 - beta2)
            self.exp_avg[name].index_copy_(0, idx, m)
            self.exp_avg_sq[name].index_copy_(0, idx, v)
            rows = param.index_select(0, idx)
            if weight_decay:
                rows.mul_(1 - lr * weight_decay)
            rows.sub_(lr * (m / bias1) / (v.sqrt() / bias2_sqrt + eps))
            param.index_copy_(0, idx, rows)
            grad.index_fill_(0, idx, 0)
        self.touched[idx] = False
        return int(idx.numel())

    # --- optimizer state for resuming ------------------------------------------------------------
    def optimizer_state(self) -> dict[str, torch.Tensor]:
        state = {"row_steps": self.row_steps.clone()}
        for name in self.exp_avg:
            state[f"exp_avg.{name}"] = self.exp_avg[name].clone()
            state[f"exp_avg_sq.{name}"] = self.exp_avg_sq[name].clone()
        return state

    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        self.row_steps.copy_(state["row_steps"])
        self.exp_avg = {k.split(".", 1)[1]: v.clone() for k, v in state.items() if k.startswith("exp_avg.")}
        self.exp_avg_sq = {k.split(".", 1)[1]: v.clone() for k, v in state.items() if k.startswith("exp_avg_sq.")}

