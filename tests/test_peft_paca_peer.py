"""PEFT's own PaCA (peft >= 0.22) as a peer of ours: the peft-paca / peft-qpaca entries of bench and plan, the
refusal on an older peft, and our PaCA against PEFT's on the same columns (numbers and bytes kept for backward)."""
import copy
import json
import re
import sys

import pytest
import torch

from .conftest import refused_in_one_line, tiny_llama
from paca_core import extras
from paca_core.errors import PacaConfigError

peft = pytest.importorskip("peft")
needs_peft_paca = pytest.mark.skipif(not extras.peft_has_paca(), reason="the installed peft has no PaCA (needs peft >= 0.22)")
try:
    import bitsandbytes  # noqa: F401

    HAVE_BNB = True
except ImportError:
    HAVE_BNB = False

R = 4


def test_peft_paca_entries_parse_in_bench_and_plan():
    from paca_core.bench.defaults import DEFAULT_METHODS
    from paca_core.plan.run import _quantized_methods
    from paca_core.workloads.four_bit import four_bit_form
    from paca_core.workloads.specs import parse_method_list, parse_method_spec, peer_equivalents

    plain, four_bit, levered = parse_method_list("peft-paca,peft-qpaca,peft-paca@gc")
    assert (plain.kind, plain.equivalent, plain.four_bit, plain.match_factor) == ("peft", "paca", False, 2)
    assert (four_bit.kind, four_bit.equivalent, four_bit.four_bit) == ("peft", "paca", True)
    assert levered.levers == ("gc",) and levered.method == "peft-paca"
    assert plain.rank(8, match_params=True) == parse_method_spec("paca").rank(8, match_params=True) == 16
    assert peer_equivalents()["peft-paca"] == peer_equivalents()["peft-qpaca"] == "paca"  # paca's METHOD declares them
    assert four_bit_form("peft-paca") == "peft-qpaca"
    assert _quantized_methods(["paca", "peft-paca"], "nf4") == ["qpaca", "peft-qpaca"]  # paca plan --quantize
    assert "peft-paca" not in DEFAULT_METHODS  # a default bench must not need peft >= 0.22
    with pytest.raises(PacaConfigError, match="Did you mean 'peft-paca'"):
        parse_method_list("peft_paca")


def _hide_peft_paca(monkeypatch, version="0.21.2"):
    """This machine as if it had an older peft: no peft.tuners.paca, and that version in its metadata."""
    monkeypatch.setitem(sys.modules, "peft.tuners.paca", None)
    monkeypatch.setattr(extras, "installed_version", lambda name: version if name == "peft" else None)


def test_older_peft_is_refused_in_one_line_before_any_work(monkeypatch, caplog, tmp_path, no_load):
    from paca_core.workloads import prepare as prepare_module

    _hide_peft_paca(monkeypatch)
    with pytest.raises(extras.MissingExtraError) as error:
        extras.require_peft_paca()
    assert str(error.value) == "peft-paca needs peft >= 0.22 (PaCA); this machine has peft 0.21.2: pip install -U 'peft>=0.22'"

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr("paca_core.bench.run.run_worker", no_work)
    monkeypatch.setattr("paca_core.plan.run.load_config", no_work)
    line = refused_in_one_line(["bench", "--model", "tiny", "--methods", "paca,peft-paca", "--out", str(tmp_path / "b")], caplog)
    assert "peft-paca needs peft >= 0.22 (PaCA); this machine has peft 0.21.2" in line and "pip install -U 'peft>=0.22'" in line
    line = refused_in_one_line(["plan", "--model", "smollm2-135m", "--methods", "peft-qpaca"], caplog)
    assert "peft-qpaca needs peft >= 0.22" in line
    line = refused_in_one_line(["plan", "--model", "smollm2-135m", "--methods", "peft-paca", "--quantize", "nf4"], caplog)
    assert "peft-qpaca needs peft >= 0.22" in line  # planned in its 4-bit form, refused under that name
    # A worker reached another way (the lr sweep) reports the entry unavailable instead of building LoRA in its place.
    from paca_core.workloads.specs import parse_method_spec

    with pytest.raises(prepare_module.Unavailable, match="needs peft >= 0.22"):
        prepare_module.prepare(parse_method_spec("peft-paca"), tiny_llama(), R, {}, torch.device("cpu"), 1e-3)
    # Nothing else changes: the other peers and our methods still parse and are not refused.
    from paca_core.workloads.specs import parse_method_list, require_peer_versions

    require_peer_versions(parse_method_list("peft-lora,paca,qpaca,peft-qlora"))


def test_not_installed_peft_is_named_too(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft.tuners.paca", None)
    monkeypatch.setattr(extras, "installed_version", lambda name: None)
    with pytest.raises(extras.MissingExtraError, match=r"^export-peft --format paca needs peft >= 0.22 \(PaCA\); peft is not installed"):
        extras.require_peft_paca("export-peft --format paca")


def _pair(alpha=None, seed=0):
    """Our paca and PEFT's PaCA (get_peft_model, our columns via paca_indices_pattern, paca_alpha = our alpha) on
    two copies of one tiny model; every delta given the same random values (a zero delta checks little)."""
    from paca_core.config import PaCAConfig
    from paca_core.layers.indices import select_columns
    from paca_core.model import prepare_model

    base = tiny_llama(seed)
    ours_config = PaCAConfig(r=R, alpha=alpha, seed=seed)
    ours = prepare_model(copy.deepcopy(base), [ours_config])
    layers = ours.adapter_layers()
    pattern = {re.escape(name): select_columns(layer.in_features, R, seed, name).tolist() for name, layer in layers.items()}
    for name, layer in layers.items():  # the layer holds the very columns we hand PEFT
        assert layer.paca_indices.tolist() == pattern[re.escape(name)]
    config = peft.PacaConfig(r=R, paca_alpha=alpha if alpha is not None else R, target_modules=list(layers), paca_indices_pattern=pattern)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(7)
    peft_layers = {name: module for name, module in theirs.base_model.model.named_modules() if hasattr(module, "paca_delta")}
    assert set(peft_layers) == set(layers)
    with torch.no_grad():
        for name, layer in layers.items():
            values = torch.randn(layer.paca_delta.shape, generator=generator) * 0.05
            layer.paca_delta.copy_(values)
            peft_layers[name].paca_delta["default"].copy_(values)
            assert peft_layers[name].paca_indices["default"].tolist() == layer.paca_indices.tolist()
    ours.sync_adapters()
    return ours, theirs, layers, peft_layers


@needs_peft_paca
@pytest.mark.parametrize("alpha", [None, 2 * R], ids=["alpha=r", "alpha=2r"])
def test_our_paca_equals_peft_paca_on_the_same_columns(alpha):
    """Forward, gradients and three AdamW steps: bit for bit in fp32 (checked with torch.equal), with scaling 1 and 2."""
    ours, theirs, layers, peft_layers = _pair(alpha)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    ours_params = [layer.paca_delta for layer in layers.values()]
    peft_params = [peft_layers[name].paca_delta["default"] for name in layers]
    ours_opt = torch.optim.AdamW(ours_params, lr=1e-2)
    peft_opt = torch.optim.AdamW(peft_params, lr=1e-2)
    ours.train(), theirs.train()
    for step in range(3):
        ours_loss = ours(input_ids=ids, labels=ids)
        peft_loss = theirs(input_ids=ids, labels=ids)
        assert torch.equal(ours_loss.logits, peft_loss.logits), f"logits differ at step {step}"
        ours_loss.loss.backward()
        peft_loss.loss.backward()
        for name, mine, its in zip(layers, ours_params, peft_params):
            assert torch.equal(mine.grad, its.grad), f"{name}: delta gradients differ at step {step}"
        ours_opt.step(), peft_opt.step()
        ours_opt.zero_grad(), peft_opt.zero_grad()
    for mine, its in zip(ours_params, peft_params):
        assert torch.equal(mine, its)
    merged = ours.merge_and_unload().state_dict()  # the trained weights are the same too
    for name, value in theirs.merge_and_unload().state_dict().items():
        assert torch.equal(merged[name], value), name


@needs_peft_paca
def test_we_keep_no_more_for_backward_than_peft_paca():
    """Bytes autograd saves in one training forward (storages of the model's own weights are not activations):
    ours the r selected input columns only; PEFT's also the original and adapted (out, r) columns per layer."""
    from paca_core.memory.measure import count_saved_tensors

    ours, theirs, layers, _ = _pair()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    ours.train(), theirs.train()
    with count_saved_tensors(ours) as mine:
        ours(input_ids=ids, labels=ids).loss.backward()
    with count_saved_tensors(theirs) as its:
        theirs(input_ids=ids, labels=ids).loss.backward()
    columns = sum(2 * layer.out_features * R * 4 for layer in layers.values())  # PEFT's originals + adapted, fp32
    assert mine.activation_bytes + columns == its.activation_bytes


@needs_peft_paca
def test_bench_worker_runs_peft_paca_beside_ours():
    """The worker sets peft-paca up on our columns: the same trainable count, the same first loss, fewer bytes kept."""
    from paca_core.bench import report
    from paca_core.bench.worker import run_job

    def speed(method):
        job = {"mode": "speed", "method": method, "rank": R, "model": "tiny", "dtype": "fp32", "device": "cpu", "seq_len": 16,
               "batch_size": 2, "steps": 1, "warmup_steps": 0, "lr": 1e-3, "options": {}}
        result = run_job(job)
        assert result["status"] == "ok", result
        return dict(result, method=method, seq_len=16, batch_size=2, group_rank=R, rank=R)

    ours, theirs = speed("paca"), speed("peft-paca")
    assert ours["trainable_parameters"] == theirs["trainable_parameters"]
    assert ours["counted"]["saved_activation_bytes"] < theirs["counted"]["saved_activation_bytes"]
    assert ours["counted"]["optimizer_state_bytes"] == theirs["counted"]["optimizer_state_bytes"]
    records = [theirs, ours]
    report.add_ratios(records)
    assert ours["vs_peft_paca"]["saved_activations"] < 1.0 and theirs["vs_peft_paca"]["step_time"] == 1.0
    markdown = report.speed_markdown(records)
    assert "step ×PEFT PaCA" in markdown and "kept for backward ×PEFT PaCA" in markdown


@needs_peft_paca
@pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed (pip install 'paca-hal[quant]')")
def test_peft_qpaca_trains_on_the_base_qpaca_trains_on():
    """peft-qpaca: PEFT's PaCA on the NF4 base qpaca uses (every linear but the head, norms not upcast), bf16."""
    from paca_core.bench.worker import run_job

    def speed(method):
        job = {"mode": "speed", "method": method, "rank": R, "model": "smollm2-135m-shape:1", "dtype": "bf16", "device": "cpu",
               "seq_len": 8, "batch_size": 1, "steps": 1, "warmup_steps": 0, "lr": 1e-3, "options": {"target_modules": "q_proj,down_proj"}}
        result = run_job(job)
        assert result["status"] == "ok", result
        return result

    ours, theirs = speed("qpaca"), speed("peft-qpaca")
    assert ours["counted"]["parameter_bytes"] == theirs["counted"]["parameter_bytes"]  # the same 4-bit base
    assert ours["trainable_parameters"] == theirs["trainable_parameters"]
    assert ours["counted"]["saved_activation_bytes"] < theirs["counted"]["saved_activation_bytes"]


@needs_peft_paca
@pytest.mark.slow
def test_bench_command_puts_ours_beside_peft_paca(tmp_path):
    from paca_core.cli.dispatch import main

    out = tmp_path / "bench"
    code = main(["bench", "--model", "tiny", "--methods", "peft-paca,paca", "--seq-len", "16", "--batch-size", "2", "--rank", "4",
                 "--steps", "2", "--warmup-steps", "0", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert code == 0
    records = {r["method"]: r for r in json.loads((out / "bench.json").read_text())["speed"]}
    assert all(r["status"] == "ok" for r in records.values())
    assert records["paca"]["rank"] == records["peft-paca"]["rank"] == 8
    assert records["paca"]["vs_peft_paca"]["saved_activations"] < 1.0
    assert "step ×PEFT PaCA" in (out / "bench.md").read_text()
