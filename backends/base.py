"""The Backend interface: the few primitives the methods need, implemented once per device type."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Tolerance:
    """How close an implementation must come to the float64 reference, per dtype (used by conformance tests)."""

    rtol: float
    atol: float


@dataclass
class PartialConnectionGrads:
    """Gradients of the partial-connection GEMM. ``delta`` is at least float32 whatever the input dtype."""

    input: torch.Tensor | None
    delta: torch.Tensor | None
    bias: torch.Tensor | None


class Backend(ABC):
    """The primitives the device-agnostic methods call, grouped by what they compute.

    :class:`backends.portable.TorchBackend` implements all of them in plain PyTorch and serves any
    device type without a backend of its own. A device backend subclasses it and overrides only what
    its device does faster (CUDA: :meth:`skinny_grad_fp32`); the shared conformance suite
    (tests/test_backend_conformance.py) runs each override against float64 references with the
    tolerances the backend declares. Host<->device copies are not here: they are stream plumbing
    (``devices.copy_to_device`` / ``devices.copy_to_host``).
    """

    #: Device type this backend serves ("cpu", "cuda", "hpu", ...).
    device_type: str = ""
    #: Human-readable name used in logs and test ids.
    name: str = ""
    tolerances: dict[torch.dtype, Tolerance] = {}

    def __init__(self, device_type: str | None = None) -> None:
        if device_type is not None:
            self.device_type = device_type

    def tolerance(self, dtype: torch.dtype) -> Tolerance:
        return self.tolerances[dtype]

    # --- GEMM with a long token dimension (every weight gradient below) ----------------------------
    @abstractmethod
    def skinny_grad_fp32(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``aᵀ · b`` for 2-D ``a`` (N, m) and ``b`` (N, k), accumulated and returned in at least
        float32: a weight gradient ``gradᵀ · x`` summed over N tokens, where m or k is usually a
        rank r (PaCA's and QPaCA's (out, r) delta, LoRA's A under VeLoRA). Half-precision inputs
        must not lose the sum to half-precision accumulation."""

    # --- partial connection (PaCA) ---------------------------------------------------------------
    @abstractmethod
    def partial_connection_forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One GEMM with the (already adapted) weight; returns ``(output, x[..., indices])``.

        ``x[..., indices]`` is the only activation a PaCA layer keeps for backward.
        """

    @abstractmethod
    def partial_connection_backward(
        self,
        grad_output: torch.Tensor,
        x_selected: torch.Tensor,
        weight: torch.Tensor,
        need_input_grad: bool,
        need_delta_grad: bool,
        need_bias_grad: bool,
    ) -> PartialConnectionGrads:
        """Grad input with one full GEMM (``grad_output @ weight``) and the (out, r) delta gradient
        ``grad_outputᵀ · x_selected`` through :meth:`skinny_grad_fp32`."""

    @abstractmethod
    def write_adapted_columns(
        self,
        weights: Sequence[torch.Tensor],
        indices: Sequence[torch.Tensor],
        originals: Sequence[torch.Tensor],
        deltas: Sequence[torch.Tensor],
        scalings: Sequence[float],
    ) -> None:
        """For every layer: ``weight[:, idx] = (original + scaling · delta)`` rounded once to the
        weight's dtype, in place. Batched so a device can do all layers in one launch."""

    # --- activation compression (VeLoRA) ---------------------------------------------------------
    @abstractmethod
    def compress(self, x: torch.Tensor, projection: torch.Tensor, num_groups: int) -> torch.Tensor:
        """Split each token of ``x`` (…, d) into ``num_groups`` sub-tokens of size ``ceil(d/G)`` (zero
        padded) and keep one coefficient per sub-token: its dot product with the unit vector
        ``projection``. Returns (tokens, G) in ``x``'s dtype — G numbers per token instead of d."""

    @abstractmethod
    def decompress(self, coefficients: torch.Tensor, projection: torch.Tensor, in_features: int) -> torch.Tensor:
        """The rank-1 rebuild ``coefficient · projection`` of every sub-token, as (tokens, in_features)."""

    @abstractmethod
    def subtoken_mean_direction(self, x: torch.Tensor, num_groups: int) -> torch.Tensor:
        """The normalised mean of all sub-tokens of ``x`` (float32, unit norm): VeLoRA's projection."""

    # --- sparse host-memory adapter (MEFT) -------------------------------------------------------
    @abstractmethod
    def sparse_rows_forward(
        self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, gates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MEFT's adapter on the rows that came to the device.

        ``x`` (T, d); ``keys``/``values`` (R, d) row buffers; ``slots`` (T, k) int64 rows of the buffer
        each token uses; ``gates`` (T, k) per-row weights. Returns ``out`` (T, d) with
        ``out[t] = Σ_j gates[t, j] · relu(x[t] · keys[slots[t, j]]) · values[slots[t, j]]`` and the
        pre-activation scores (T, k), the only new activation kept for backward. Static shapes: T, k and
        R never depend on the data.
        """

    @abstractmethod
    def sparse_rows_backward(
        self,
        grad_output: torch.Tensor,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        slots: torch.Tensor,
        gates: torch.Tensor,
        scores: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients ``(x, keys, values, gates)`` of :meth:`sparse_rows_forward`; the row gradients are
        (R, d) float32, summed over every token that used a row."""

    # --- partial connection on a 4-bit quantized base (QPaCA) ------------------------------------
    @abstractmethod
    def quantized_partial_connection_forward(
        self,
        x: torch.Tensor,
        weight_4bit: torch.Tensor,
        quant_state: object,
        bias: torch.Tensor | None,
        delta: torch.Tensor | None,
        indices: torch.Tensor,
        scaling: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``y = x W_qᵀ (+ b) + scaling · x[..., indices] Δᵀ`` in ``x``'s dtype: one 4-bit GEMM with the
        packed bitsandbytes weight (``quant_state`` describes it) plus one skinny (tokens × r × out)
        GEMM, so the 4-bit weight is never rewritten. ``delta`` None means the base layer alone.
        Returns ``(y, x[..., indices])``; the latter is the only activation QPaCA keeps."""

    @abstractmethod
    def quantized_partial_connection_backward(
        self,
        grad_output: torch.Tensor,
        x_selected: torch.Tensor,
        weight_4bit: torch.Tensor,
        quant_state: object,
        delta: torch.Tensor,
        indices: torch.Tensor,
        scaling: float,
        need_input_grad: bool,
        need_delta_grad: bool,
        need_bias_grad: bool,
    ) -> PartialConnectionGrads:
        """Gradients of :meth:`quantized_partial_connection_forward`: grad input through the 4-bit
        weight (``grad_output · deq(W_q)``) plus the skinny ``scaling · grad_output Δ`` added into the
        selected columns; the delta gradient ``scaling · grad_outputᵀ x_selected`` through
        :meth:`skinny_grad_fp32`."""

