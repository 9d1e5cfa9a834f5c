"""PEFT LoRA export: the exported adapter reproduces the PaCA model exactly in stock peft."""
import copy
import json

import pytest
import torch

from paca_core import PaCAConfig, prepare_model
from paca_core.files.export import export_peft_lora

from tests.conftest import randomise_paca_deltas as _randomise_deltas
from tests.conftest import tiny_llama

peft = pytest.importorskip("peft")


def _trained_paca(config):
    """(PaCA model with random deltas, untouched copy of the same base weights)."""
    base = tiny_llama()
    fresh = copy.deepcopy(base)  # prepare_model modifies ``base`` in place
    paca = prepare_model(base, config, device="cpu")
    _randomise_deltas(paca)
    return paca.eval(), fresh.eval()


def _ids():
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(7))


def _lora_module_names(peft_model):
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


def test_peft_logits_and_merge_match_paca(tmp_path):
    paca, fresh = _trained_paca(PaCAConfig(r=4, alpha=8.0))
    out = export_peft_lora(paca, tmp_path / "lora", base_model_name_or_path="tiny-llama")
    assert out == tmp_path / "lora"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    document = json.loads((out / "adapter_config.json").read_text())
    assert document["peft_type"] == "LORA" and document["r"] == 4 and document["lora_alpha"] == 4
    assert document["base_model_name_or_path"] == "tiny-llama"
    assert sorted(document["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    ids = _ids()
    with torch.no_grad():
        expected = paca(input_ids=ids).logits
        peft_model = peft.PeftModel.from_pretrained(fresh, out).eval()
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    # The adapter is not a no-op: the pretrained logits differ.
    with torch.no_grad(), paca.disable_adapter():
        assert (paca(input_ids=ids).logits - expected).abs().max() > 1e-3


@pytest.mark.parametrize(
    "target, expect_regex",
    [("all-linear", False), (r"model\.layers\.0\.self_attn\.(q|v)_proj|model\.layers\.1\.mlp\.down_proj", True)],
    ids=["all-linear", "partial-regex"],
)
def test_peft_adapts_exactly_the_paca_modules(tmp_path, target, expect_regex):
    paca, fresh = _trained_paca(PaCAConfig(r=3, target_modules=target))
    out = export_peft_lora(paca, tmp_path / "lora")
    document = json.loads((out / "adapter_config.json").read_text())
    assert isinstance(document["target_modules"], str) == expect_regex

    peft_model = peft.PeftModel.from_pretrained(fresh, out).eval()
    assert _lora_module_names(peft_model) == set(paca.adapter_layers())
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, paca(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_exclude_modules_forces_full_name_targets(tmp_path):
    paca, fresh = _trained_paca(PaCAConfig(r=2, target_modules=["q_proj"], exclude_modules=["layers.1.self_attn.q_proj"]))
    out = export_peft_lora(paca, tmp_path / "lora")
    peft_model = peft.PeftModel.from_pretrained(fresh, out)
    assert _lora_module_names(peft_model) == {"model.layers.0.self_attn.q_proj"}


def test_lora_a_rows_are_one_hot_at_indices(tmp_path):
    from safetensors.torch import load_file

    paca, _ = _trained_paca(PaCAConfig(r=4, alpha=8.0))
    tensors = load_file(str(export_peft_lora(paca, tmp_path / "lora") / "adapter_model.safetensors"))
    layers = paca.adapter_layers()
    assert set(tensors) == {f"base_model.model.{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    for name, layer in layers.items():
        lora_a = tensors[f"base_model.model.{name}.lora_A.weight"]
        lora_b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert lora_a.dtype == lora_b.dtype == torch.float32
        assert lora_a.shape == (layer.r, layer.in_features) and lora_b.shape == (layer.out_features, layer.r)
        expected_a = torch.zeros(layer.r, layer.in_features)
        expected_a[torch.arange(layer.r), layer.paca_indices] = 1.0
        assert torch.equal(lora_a, expected_a), name
        assert torch.equal(lora_b, layer.paca_delta.detach() * layer.scaling), name
        assert torch.equal(lora_b @ lora_a, layer.delta_weight()), name


def test_export_never_deletes_other_files_and_needs_peft(tmp_path, monkeypatch):
    paca, _ = _trained_paca(PaCAConfig(r=2))
    target = tmp_path / "lora"
    export_peft_lora(paca, target)
    export_peft_lora(paca, target)  # its own earlier export: replaced
    (target / "notes.txt").write_text("mine")
    (target / "adapter_config.json").write_text("{}")  # an older file of its own name: replaced
    export_peft_lora(paca, target)  # written beside the user's file, as PeftModel.save_pretrained does
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    assert (target / "notes.txt").read_text() == "mine" and json.loads((target / "adapter_config.json").read_text())["r"] == 2

    import builtins

    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(ImportError, match=r"pip install .paca-hal\[peft\]."):
        export_peft_lora(paca, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_lora_and_lorafa_export_to_peft_match():
    import copy

    import peft

    from paca_core.config import LoRAConfig, LoRAFAConfig

    for config in (LoRAConfig(r=4, alpha=8.0), LoRAFAConfig(r=4, alpha=8.0)):
        base = tiny_llama()
        fresh = copy.deepcopy(base)
        model = prepare_model(base, config, device="cpu")
        with torch.no_grad():
            for layer in model.adapter_layers().values():
                layer.lora_B.normal_(0, 0.1)
        import tempfile

        directory = export_peft_lora(model, tempfile.mkdtemp() + "/lora")
        twin = peft.PeftModel.from_pretrained(fresh, directory)
        ids = torch.randint(0, 128, (2, 8))
        with torch.no_grad():
            torch.testing.assert_close(twin(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
