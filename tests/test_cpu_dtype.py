"""``--dtype auto`` on CPU: bf16 only where the CPU multiplies bf16 natively (AVX512-BF16 / AMX-BF16), else fp32.

Every decision here is made with torch's capability queries stubbed both ways, so the tests say the same on an AVX2
laptop, an AVX512-BF16 EPYC and an AMX Xeon; the bf16 training steps run wherever torch runs bf16 (everywhere,
slowly where it is emulated: the model is tiny).
"""
import json
import math
from types import SimpleNamespace

import pytest
import torch

import devices
from devices import cpu_features
from devices.cpu import CpuRuntime
from devices.cpu_features import CpuBf16Support, choose_cpu_dtype, query_bf16_support
from devices.cuda import CudaRuntime
from devices.runtime import DeviceRuntime, DtypeChoice, MemoryStats

AVX2 = CpuBf16Support("x86_64", "AVX2", avx512_bf16=False, amx_bf16=False, onednn=True, source="stub")
SKYLAKE = CpuBf16Support("x86_64", "AVX512", avx512_bf16=False, amx_bf16=False, onednn=True, onednn_bf16_functional=True,
                         source="stub")  # AVX-512 without BF16: oneDNN runs bf16 there, emulated
ZEN4 = CpuBf16Support("x86_64", "AVX512", avx512_bf16=True, amx_bf16=False, onednn=True, source="stub")
SAPPHIRE_RAPIDS = CpuBf16Support("x86_64", "AVX512", avx512_bf16=True, amx_bf16=True, onednn=True, source="stub")


@pytest.fixture
def cpu_reports(monkeypatch):
    """``cpu_reports(support)``: the CPU runtime decides from ``support`` instead of asking torch (over conftest's
    pin; cache cleared before and after, so no other test sees the stub)."""
    def stub(support: CpuBf16Support) -> None:
        monkeypatch.setattr(cpu_features, "query_bf16_support", lambda: support)
        cpu_features.cpu_dtype_choice.cache_clear()

    cpu_features.cpu_dtype_choice.cache_clear()
    yield stub
    monkeypatch.undo()
    cpu_features.cpu_dtype_choice.cache_clear()


# --- the rule -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("support", [ZEN4, SAPPHIRE_RAPIDS], ids=["avx512-bf16", "amx"])
def test_native_bf16_matmul_trains_in_bf16(support):
    choice = choose_cpu_dtype(support)
    assert choice.dtype == torch.bfloat16 and choice.name == "bf16"
    assert choice.reason.startswith("bf16: this CPU multiplies bf16 natively")
    assert ("AMX-BF16" if support.amx_bf16 else "AVX512-BF16") in choice.reason
    assert "avx512_bf16=True" in choice.reason and "capability AVX512" in choice.reason


@pytest.mark.parametrize("support", [AVX2, SKYLAKE], ids=["avx2", "avx512-without-bf16"])
def test_emulated_bf16_keeps_fp32(support):
    choice = choose_cpu_dtype(support)
    assert choice.dtype == torch.float32 and choice.name == "fp32"
    assert choice.reason.startswith("fp32: this CPU lacks native bf16 matmul")
    assert "emulated" in choice.reason and f"capability {support.vector_isa}" in choice.reason


def test_fp32_when_torch_cannot_tell_or_bf16_would_not_reach_onednn():
    unknown = CpuBf16Support("x86_64", "AVX2", avx512_bf16=None, amx_bf16=None, onednn=True)
    assert choose_cpu_dtype(unknown).dtype == torch.float32 and "cannot say" in choose_cpu_dtype(unknown).reason
    no_onednn = CpuBf16Support("x86_64", "AVX512", avx512_bf16=True, amx_bf16=False, onednn=False)
    assert choose_cpu_dtype(no_onednn).dtype == torch.float32 and "oneDNN" in choose_cpu_dtype(no_onednn).reason
    capped = CpuBf16Support("x86_64", "AVX512", avx512_bf16=True, amx_bf16=True, onednn=True, onednn_isa_cap="AVX512_CORE")
    assert choose_cpu_dtype(capped).dtype == torch.float32 and "ONEDNN_MAX_CPU_ISA=AVX512_CORE" in choose_cpu_dtype(capped).reason
    amx_cap = CpuBf16Support("x86_64", "AVX512", avx512_bf16=True, amx_bf16=True, onednn=True, onednn_isa_cap="AVX512_CORE_AMX")
    assert choose_cpu_dtype(amx_cap).dtype == torch.bfloat16
    arm = CpuBf16Support("aarch64", "SVE256", avx512_bf16=False, amx_bf16=False, onednn=True)
    assert choose_cpu_dtype(arm).dtype == torch.float32 and "aarch64" in choose_cpu_dtype(arm).reason


# --- what torch is asked --------------------------------------------------------------------------------------


def test_query_reads_torch_capabilities_then_the_older_helpers(monkeypatch):
    """torch >= 2.10: torch.cpu.get_capabilities(); torch 2.3-2.9 (Gaudi images): torch.cpu._is_*_supported();
    neither: unknown (fp32)."""
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # conftest caps it for the tests' subprocesses
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    fake_cpu = SimpleNamespace(get_capabilities=lambda: {"avx512_bf16": False, "amx_bf16": True, "amx_tile": True})
    monkeypatch.setattr(torch, "cpu", fake_cpu)
    support = query_bf16_support()
    assert (support.avx512_bf16, support.amx_bf16) == (False, True) and "get_capabilities" in support.source
    assert support.vector_isa == torch.backends.cpu.get_cpu_capability()
    assert choose_cpu_dtype(support).dtype == torch.bfloat16 or not support.onednn

    older = SimpleNamespace(_is_avx512_bf16_supported=lambda: True, _is_amx_tile_supported=lambda: False)
    monkeypatch.setattr(torch, "cpu", older)
    support = query_bf16_support()
    assert (support.avx512_bf16, support.amx_bf16) == (True, False) and "_is_avx512_bf16_supported" in support.source

    monkeypatch.setattr(torch, "cpu", SimpleNamespace())
    monkeypatch.setattr(torch._C, "_cpu", SimpleNamespace(), raising=False)
    support = query_bf16_support()
    assert support.avx512_bf16 is None and support.amx_bf16 is None
    assert choose_cpu_dtype(support).dtype == torch.float32


def test_the_real_query_answers_without_raising():
    """What this machine's torch says, whatever the CPU: a complete record, and a decision with a reason."""
    support = query_bf16_support()
    assert isinstance(support.architecture, str) and isinstance(support.onednn, bool)
    assert support.avx512_bf16 in (True, False, None) and support.amx_bf16 in (True, False, None)
    choice = choose_cpu_dtype(support)
    assert choice.dtype in (torch.float32, torch.bfloat16) and choice.reason.startswith(f"{choice.name}: ")


def test_the_suite_runs_auto_as_fp32_unless_a_test_says_otherwise():
    """tests/conftest.py pins the CPU to one without native bf16, so other tests' --dtype auto is fp32 everywhere."""
    assert devices.default_dtype("cpu") == torch.float32
    assert devices.default_dtype_choice("cpu").reason.endswith("slower than fp32")


def test_onednn_isa_cap_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert query_bf16_support().onednn_isa_cap == "AVX2"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert query_bf16_support().onednn_isa_cap is None


# --- the runtimes -----------------------------------------------------------------------------------------------


def test_cpu_runtime_follows_the_rule_both_ways(cpu_reports):
    cpu_reports(AVX2)
    assert devices.default_dtype("cpu") == torch.float32
    assert devices.default_dtype_choice("cpu").reason.startswith("fp32: this CPU lacks native bf16 matmul")
    cpu_reports(SAPPHIRE_RAPIDS)
    assert CpuRuntime().preferred_dtype().dtype == torch.bfloat16
    assert devices.default_dtype(torch.device("cpu")) == torch.bfloat16


def test_the_choice_is_made_once_per_process(cpu_reports, monkeypatch):
    asked = []
    monkeypatch.setattr(cpu_features, "query_bf16_support", lambda: asked.append(1) or ZEN4)
    cpu_features.cpu_dtype_choice.cache_clear()
    for _ in range(3):
        devices.default_dtype("cpu")
    assert len(asked) == 1


def test_accelerators_and_plug_ins_keep_their_declared_default():
    """The plug-in contract is unchanged: a runtime that declares ``default_dtype`` gets it from ``--dtype auto``."""
    class PlugIn(DeviceRuntime):
        name = "mydev"
        default_dtype = torch.float16

        def is_available(self):
            return True

        def device_count(self):
            return 1

        def memory_stats(self, device):
            return MemoryStats(str(device), 0, 0, None, "none")

        def reset_peak_memory_stats(self, device):
            pass

    assert PlugIn().preferred_dtype() == DtypeChoice(torch.float16, "fp16: the mydev runtime's default")
    assert CudaRuntime().preferred_dtype().dtype == torch.bfloat16
    assert devices.default_dtype_choice("cuda") == DtypeChoice(torch.bfloat16, "bf16: the cuda runtime's default")
    assert devices.default_dtype("hpu") == torch.bfloat16


# --- the commands ---------------------------------------------------------------------------------------------


def test_train_resolves_auto_with_the_rule_and_keeps_explicit_choices(cpu_reports):
    from paca_core.cli.train_command import _resolve_dtype

    cpu = torch.device("cpu")
    cpu_reports(AVX2)
    dtype, reason = _resolve_dtype("auto", cpu)
    assert dtype == torch.float32 and reason.startswith("fp32: this CPU lacks")
    cpu_reports(ZEN4)
    assert _resolve_dtype("auto", cpu)[0] == torch.bfloat16
    assert _resolve_dtype("fp32", cpu) == (torch.float32, "fp32: --dtype fp32")


def test_train_auto_on_a_native_bf16_cpu_trains_a_bf16_base_with_fp32_adapters(cpu_reports, tiny_model_dir, sample_text_file,
                                                                               tmp_path, caplog):
    """The CLI with --dtype auto where the CPU (stubbed) has AMX: a bf16 base, fp32 adapters, finite losses, and
    metrics.json saying what it chose and why."""
    from safetensors.torch import load_file

    from paca_core.cli.dispatch import main

    cpu_reports(SAPPHIRE_RAPIDS)
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="paca_core"):
        assert main(["train", "--device", "cpu", "--model", str(tiny_model_dir), "--data", str(sample_text_file), "--out",
                     str(out), "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--rank", "4", "--warmup-steps", "0",
                     "--log-every", "1", "--sample-tokens", "0", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dtype"] == "bfloat16"
    assert metrics["dtype_reason"].startswith("bf16: this CPU multiplies bf16 natively (AMX-BF16")
    assert "--dtype auto on cpu: bf16: this CPU multiplies bf16 natively" in caplog.text
    assert len(metrics["history"]) == 2 and all(math.isfinite(r["loss"]) for r in metrics["history"])
    assert math.isfinite(metrics["held_out_loss_after"])
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and {t.dtype for t in adapter.values() if t.is_floating_point()} == {torch.float32}  # + int64 indices


@pytest.mark.parametrize("method", ["paca", "lora"])
def test_bf16_cpu_training_step_keeps_adapters_and_optimizer_state_fp32(method, make_tiny_llama):
    """A real bf16 step on CPU (runs everywhere; emulated where the CPU lacks BF16): the base stays bf16 and
    frozen, the trained tensors and AdamW's moments are fp32, and the step changes them."""
    from paca_core import LoRAConfig, PaCAConfig, prepare_model

    model = make_tiny_llama(dtype=torch.bfloat16)
    config = (PaCAConfig if method == "paca" else LoRAConfig)(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    adapted = prepare_model(model, config, device="cpu")
    trained = adapted.trainable_parameters()
    assert trained and {p.dtype for p in trained} == {torch.float32}
    assert {p.dtype for p in adapted.parameters() if not p.requires_grad} == {torch.bfloat16}
    before = [p.detach().clone() for p in trained]
    optimizer = devices.make_adamw(trained, "cpu", lr=1e-2)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = adapted(input_ids=ids, labels=ids).loss
    assert loss.dtype in (torch.float32, torch.bfloat16) and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, trained))
    moments = [state["exp_avg"] for state in optimizer.state.values()]
    assert moments and {m.dtype for m in moments} == {torch.float32}


def test_plan_auto_follows_the_rule_on_the_cpu_profile(cpu_reports, caplog):
    from devices.profiles import get_profile
    from paca_core.cli.dispatch import build_parser
    from paca_core.plan.run import plan_dtype

    assert build_parser().parse_args(["plan"]).dtype == "auto"
    cpu, h100 = get_profile("cpu"), get_profile("h100-80g")
    cpu_reports(AVX2)
    name, reason = plan_dtype("auto", [cpu])
    assert name == "fp32" and "cpu: fp32: this CPU lacks native bf16 matmul" in reason
    with caplog.at_level("WARNING"):
        assert plan_dtype("auto", [cpu, h100])[0] == "bf16"  # the devices disagree: the accelerators' default, said
    assert "different dtypes" in caplog.text
    assert plan_dtype("fp16", [cpu]) == ("fp16", "--dtype fp16")
    cpu_reports(ZEN4)
    assert plan_dtype("auto", [cpu])[0] == "bf16" and plan_dtype("auto", [cpu, h100])[0] == "bf16"
    assert plan_dtype("auto", [h100]) == ("bf16", "h100-80g: bf16: the cuda runtime's default")


@pytest.mark.parametrize("support, expected", [(AVX2, "float32"), (ZEN4, "bfloat16")], ids=["avx2", "avx512-bf16"])
def test_bench_auto_follows_the_rule(cpu_reports, support, expected):
    from paca_core.bench.worker import run_job

    cpu_reports(support)
    result = run_job({"mode": "speed", "method": "paca", "rank": 2, "model": "tiny", "dtype": "auto", "device": "cpu",
                      "seq_len": 8, "batch_size": 1, "steps": 1, "warmup_steps": 0, "lr": 1e-3, "options": {}})
    assert result["status"] == "ok", result
    assert result["dtype"] == expected and result["dtype_reason"] == choose_cpu_dtype(support).reason
