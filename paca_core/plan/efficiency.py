"""How much of a profile's dense matrix peak one kernel reaches: a GEMM by its shape, a fused attention kernel by
what it computes.

A GEMM of shape (m, n, k) and ``batch`` independent products (bmm) runs at ``peak x gemm_efficiency``::

    S(m, n, k, b) = q(m) q(n) x k / (k + k0) x T / (T + half_occupancy_tiles_per_unit x compute_units)
    k0 = k_overhead x (the dtype's matrix peak / the bf16 matrix peak)
    T = b x ceil(m / tile) x ceil(n / tile)          output tiles
    q(d) = d / (ceil(d / g) x g), g = tile if d > tile else narrow_tile     tile quantisation: real share of the last tile
    gemm_efficiency = matmul_achievable x min(1, S(m, n, k, b) / S(reference shape))

* ``matmul_achievable`` is the maximum achievable matmul FLOPS (MAMF) over the datasheet peak, measured at
  ``matmul_reference_m/n/k``: no GEMM is charged faster than the best one measured.
* ``k / (k + k0)``: each output tile pays a fixed cost (pipeline fill, epilogue) worth ``k_overhead`` steps of its
  k loop at the bf16 rate, so a short reduction (small k: LoRA's B, a weight gradient over few tokens) stays below
  the peak. The cost is a time: for a dtype whose matrix peak is lower (fp32 on CUDA cores) it is worth
  proportionally fewer of that dtype's k steps.
* ``T / (T + h x units)``: a GEMM with few output tiles leaves compute units (SMs, MMEs) idle; the library hides part
  of it (split-K, smaller tiles), so the loss is smooth: half speed at ``h x units`` tiles.
* ``q(m) q(n)``: a dimension above the tile that is not a multiple of it wastes the rest of its last tile (NVIDIA's
  "tile quantisation"). A dimension below the tile (n = a LoRA rank) is padded to ``narrow_tile``: 8 on NVIDIA
  (libraries pick narrow tiles for narrow outputs; the tensor-core instruction's n is 8), the whole array on
  Gaudi's MME (an assumption). A skinny GEMM is also slow because it has few output tiles (the occupancy term)
  and moves many bytes per FLOP, so the memory roof bounds it.

The constants are per profile in ``devices/profiles.json`` (``efficiency``), each with its source; on NVIDIA the
curve's two free constants were fitted to XLA's measured H100 GEMM table (docs/plan.md, "The time model").

A fused attention kernel with a causal mask (FlashAttention, Gaudi's FusedSDPA, the CPU's flash kernel) skips
the key blocks wholly above the diagonal: :func:`causal_fraction` is the share of (query block, key block) pairs
it computes. It runs at ``peak x efficiency.attention``, that kernel's published share of the peak in
FlashAttention's FLOP convention. A profile without an ``efficiency`` group (the calibrated CPU) keeps the plain
roofline: its figures were measured as they are.
"""
from __future__ import annotations

import math

#: Query and key block of the fused attention kernels (FlashAttention-2's 128-row tiles); only whole blocks above
#: the diagonal are skipped.
ATTENTION_BLOCK = 128


def _padded_share(size: int, tile: int, narrow: float) -> float:
    """The real share of ``size`` rounded up to the tile (above it) or to the narrow tile (below it)."""
    grain = tile if size > tile else int(narrow)
    return size / (math.ceil(size / grain) * grain)


def _shape_term(efficiency, m: int, n: int, k: int, batch: int, k_overhead: float) -> float:
    tile = int(efficiency["tile"])
    rows, cols = math.ceil(m / tile), math.ceil(n / tile)
    tiles = max(1, batch) * rows * cols
    quantisation = _padded_share(m, tile, efficiency["narrow_tile"]) * _padded_share(n, tile, efficiency["narrow_tile"])
    reduction = k / (k + k_overhead)
    occupancy = tiles / (tiles + efficiency["half_occupancy_tiles_per_unit"] * efficiency["compute_units"])
    return quantisation * reduction * occupancy


def gemm_efficiency(profile, m: int, n: int, k: int, batch: int = 1, dtype="bf16", allow_tf32: bool = False) -> float:
    """Share of ``profile``'s dense ``dtype`` matrix peak a GEMM of this shape reaches (1.0 where the profile has no
    curve). The reference shape (where the measured maximum was found) is a bf16 measurement."""
    efficiency = profile.efficiency
    if not efficiency:
        return 1.0
    if min(m, n, k, batch) <= 0:
        return efficiency["matmul_achievable"]  # no work: the value is never used for time
    overhead = efficiency["k_overhead"]
    reference = _shape_term(efficiency, int(efficiency["matmul_reference_m"]), int(efficiency["matmul_reference_n"]),
                            int(efficiency["matmul_reference_k"]), 1, overhead)
    k_overhead = overhead * profile.matmul_throughput(dtype, allow_tf32) / profile.matmul_throughput("bf16")
    return efficiency["matmul_achievable"] * min(1.0, _shape_term(efficiency, m, n, k, batch, k_overhead) / reference)


def attention_efficiency(profile) -> float:
    """Share of the dense matrix peak the profile's fused attention kernel reaches (1.0 without a curve)."""
    return profile.efficiency["attention"] if profile.efficiency else 1.0


def causal_fraction(q_len: int, kv_len: int, causal: bool, block: int = ATTENTION_BLOCK) -> float:
    """Share of the full attention FLOPs a fused kernel computes: 1 without a causal mask; with one, the
    (query block, key block) pairs on or below the diagonal (query i sees keys 0..i, as torch's ``is_causal``).
    About 1/2 for long sequences (FlashAttention's benchmarks count exactly 1/2); more for short ones, whose
    diagonal blocks are a larger share."""
    if not causal or q_len <= 0 or kv_len <= 0:
        return 1.0
    q_blocks, kv_blocks = math.ceil(q_len / block), math.ceil(kv_len / block)
    computed = sum(math.ceil(min(kv_len, (i + 1) * block) / block) for i in range(q_blocks))
    return computed / (q_blocks * kv_blocks)


__all__ = ["ATTENTION_BLOCK", "attention_efficiency", "causal_fraction", "gemm_efficiency"]
