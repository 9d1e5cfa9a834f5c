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
    """Primitives that the device-agnostic methods call.

    A device backend usually subclasses :class:`backends.portable.TorchBackend` and overrides only
    what it does faster; the shared conformance suite (tests/test_backend_conformance.py) runs the
    same test bodies against every backend, with the tolerances each backend declares.
    """

    #: Device type this backend serves ("cpu", "cuda", "hpu").
    device_type: str = ""
    #: Human-readable name used in logs and test ids.
    name: str = ""
    tolerances: dict[torch.dtype, Tolerance] = {}

    def tolerance(self, dtype: torch.dtype) -> Tolerance:
        return self.tolerances[dtype]

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
        ``grad_outputᵀ · x_selected`` accumulated in (at least) float32."""

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
