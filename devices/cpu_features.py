"""Whether this CPU multiplies bf16 natively, as torch reports it, and the dtype ``--dtype auto`` trains in on CPU.

The rule (``choose_cpu_dtype``): **bf16 where the CPU has AVX512-BF16 or AMX-BF16, fp32 everywhere else.**

Why there: torch multiplies bf16 matrices on x86 through oneDNN, and oneDNN's data-type guide
(https://uxlfoundation.github.io/oneDNN/dev_guide_data_types.html, "Hardware Limitations") names
"Intel DL Boost with bfloat16 support" (AVX512_BF16; AMX-BF16 on Sapphire Rapids and later) as the minimal ISA for
bf16, and says its bf16 on AVX-512 CPUs without it exists "for validation purposes" and runs "3-4x lower in
comparison to the same operations on the fp32 data type". On CPUs without AVX-512 (AVX2) torch does not use oneDNN
for bf16 at all and its own bf16 GEMM converts every element to fp32 and back. So bf16 pays only where the
instructions exist: the issue that asked for this measured 1.59x the fp32 tokens/s and 23% less memory on an AMX
Xeon; docs/benchmarks.md has our own figures. ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is *not* the
question: it is also true on AVX-512 CPUs without BF16 (oneDNN runs bf16 there, emulated), so it is recorded but
does not decide.

Where torch reports it (guarded: the queries moved between releases):

* ``torch.cpu.get_capabilities()`` (torch >= 2.10): cpuinfo's flags, ``avx512_bf16`` and ``amx_bf16`` among them;
* ``torch.cpu._is_avx512_bf16_supported()`` / ``torch.cpu._is_amx_tile_supported()`` (torch 2.3-2.9, the Gaudi
  images' 2.6-2.9): the same cpuinfo flags (every AMX CPU has AMX-BF16 beside the tile unit);
* ``torch.backends.cpu.get_cpu_capability()``: the vector ISA ATen dispatches to ("AVX2", "AVX512", ...), recorded
  in the reason; it says nothing about BF16 ("AVX512" covers Skylake, which has no BF16);
* ``torch.backends.mkldnn.is_available()`` and ``.enabled``: without oneDNN torch's bf16 GEMM is its slow one;
* ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``): a cap below ``AVX512_CORE_BF16`` makes oneDNN emulate bf16.

x86 only: other architectures (e.g. Arm CPUs with BF16) stay fp32 because nothing here measured bf16 training
there; ``--dtype bf16`` is the override everywhere.
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

from ._torch import torch
from .runtime import DtypeChoice

#: oneDNN ISA names (``ONEDNN_MAX_CPU_ISA``) at or above which bf16 is native; lower caps make it emulated.
_ONEDNN_NATIVE_BF16_ISAS = frozenset({
    "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16",
    "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT",
})
_X86 = ("x86_64", "amd64", "x86", "i686", "i386")


@dataclass(frozen=True)
class CpuBf16Support:
    """What torch says about this CPU's bf16 matrix instructions (None: torch cannot tell)."""

    architecture: str
    #: ``torch.backends.cpu.get_cpu_capability()``: the vector ISA ATen's kernels use ("AVX2", "AVX512", ...).
    vector_isa: str | None
    avx512_bf16: bool | None
    amx_bf16: bool | None
    #: oneDNN is built in and enabled (torch's fast bf16 GEMM path on x86).
    onednn: bool
    #: ``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA`` when set (upper case), else None.
    onednn_isa_cap: str | None = None
    #: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` (also true where bf16 is emulated): recorded, not decisive.
    onednn_bf16_functional: bool | None = None
    #: Which torch query answered for the bf16 flags.
    source: str = ""

    @property
    def native_bf16(self) -> bool:
        return bool(self.avx512_bf16 or self.amx_bf16)

    def describe(self) -> str:
        """The figures as torch reported them, for the reason string."""
        parts = [f"capability {self.vector_isa or 'unknown'}"]
        for name in ("avx512_bf16", "amx_bf16"):
            value = getattr(self, name)
            parts.append(f"{name}={'unknown' if value is None else value}")
        if self.onednn_isa_cap:
            parts.append(f"ONEDNN_MAX_CPU_ISA={self.onednn_isa_cap}")
        return f"torch reports {', '.join(parts)}" + (f" via {self.source}" if self.source else "")


def _call(owner: object, name: str) -> bool | None:
    function = getattr(owner, name, None)
    if function is None:
        return None
    try:
        return bool(function())
    except Exception:  # a query this build exposes but cannot answer (e.g. not built for the CPU)
        return None


def _flags() -> tuple[bool | None, bool | None, str]:
    """(avx512_bf16, amx_bf16, which query answered), the newest API first."""
    cpu = getattr(torch, "cpu", None)
    get_capabilities = getattr(cpu, "get_capabilities", None)
    if get_capabilities is not None:
        try:
            capabilities = dict(get_capabilities())
            return bool(capabilities.get("avx512_bf16")), bool(capabilities.get("amx_bf16")), "torch.cpu.get_capabilities()"
        except Exception:
            pass
    avx512_bf16 = _call(cpu, "_is_avx512_bf16_supported")
    amx = _call(cpu, "_is_amx_tile_supported")
    if avx512_bf16 is not None or amx is not None:
        return avx512_bf16, amx, "torch.cpu._is_avx512_bf16_supported()/_is_amx_tile_supported()"
    native = getattr(getattr(torch, "_C", None), "_cpu", None)
    avx512_bf16 = _call(native, "_is_avx512_bf16_supported")
    amx = _call(native, "_is_amx_tile_supported")
    if avx512_bf16 is not None or amx is not None:
        return avx512_bf16, amx, "torch._C._cpu"
    return None, None, ""


def query_bf16_support() -> CpuBf16Support:
    """Ask torch what this CPU can do (never raises; unknown answers are None)."""
    avx512_bf16, amx_bf16, source = _flags()
    try:
        vector_isa = str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        vector_isa = None
    mkldnn = getattr(torch.backends, "mkldnn", None)
    try:
        onednn = bool(mkldnn is not None and mkldnn.is_available() and getattr(mkldnn, "enabled", True))
    except Exception:
        onednn = False
    functional = _call(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported") if onednn else None
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper() or None
    return CpuBf16Support(platform.machine().lower() or "unknown", vector_isa, avx512_bf16, amx_bf16, onednn, cap,
                          functional, source)


def choose_cpu_dtype(support: CpuBf16Support) -> DtypeChoice:
    """The CPU's ``--dtype auto``: bf16 with native bf16 matmul (AVX512-BF16 / AMX-BF16 through oneDNN), else fp32.

    Only the frozen base changes dtype: adapters, trained weights and optimizer state stay fp32 (as on GPUs)."""
    fp32, bf16 = torch.float32, torch.bfloat16
    seen = support.describe()
    if support.architecture not in _X86:
        return DtypeChoice(fp32, f"fp32: bf16 by default is decided only for x86 CPUs (AVX512-BF16/AMX); this is "
                                 f"{support.architecture} ({seen}); --dtype bf16 overrides")
    if support.avx512_bf16 is None and support.amx_bf16 is None:
        return DtypeChoice(fp32, f"fp32: torch {torch.__version__} cannot say whether this CPU has bf16 matrix "
                                 f"instructions ({seen}); --dtype bf16 overrides")
    if not support.native_bf16:
        return DtypeChoice(fp32, f"fp32: this CPU lacks native bf16 matmul (no AVX512-BF16 or AMX-BF16; {seen}); bf16 "
                                 "would be emulated, slower than fp32")
    if not support.onednn:
        return DtypeChoice(fp32, f"fp32: the CPU has bf16 instructions but oneDNN (torch.backends.mkldnn) is not "
                                 f"available or enabled, so torch's bf16 matmul would be its slow one ({seen})")
    if support.onednn_isa_cap and support.onednn_isa_cap not in _ONEDNN_NATIVE_BF16_ISAS:
        return DtypeChoice(fp32, f"fp32: ONEDNN_MAX_CPU_ISA={support.onednn_isa_cap} keeps oneDNN below AVX512_CORE_BF16, "
                                 f"so bf16 would be emulated ({seen})")
    instructions = "AMX-BF16" if support.amx_bf16 else "AVX512-BF16"
    return DtypeChoice(bf16, f"bf16: this CPU multiplies bf16 natively ({instructions}; {seen})")


@functools.lru_cache(maxsize=1)
def cpu_dtype_choice() -> DtypeChoice:
    """This process's CPU ``--dtype auto`` choice, decided once (``cpu_dtype_choice.cache_clear()`` to ask again)."""
    return choose_cpu_dtype(query_bf16_support())
