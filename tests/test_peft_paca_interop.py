"""Adapters move both ways between PEFT's own PaCA (peft >= 0.22) and paca-hal, exactly.

PEFT's side is always built by PEFT itself (``get_peft_model``, ``save_pretrained``, ``PeftModel.from_pretrained``,
``merge_and_unload``), never by copied code.
"""
import copy
import json
import logging
import warnings

import pytest
import torch

from paca_core import PaCAConfig, PacaModel, prepare_model
from paca_core.errors import CheckpointError, PacaConfigError
from paca_core.files.export import export_peft

from tests.conftest import randomise_paca_deltas, refused_in_one_line, tiny_llama

peft = pytest.importorskip("peft")
if not hasattr(peft, "PacaConfig"):
    pytest.skip("needs peft >= 0.22 (PaCA)", allow_module_level=True)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def _ids(vocab=128):
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(5))


def _base(**overrides):
    """A tiny LLaMA with grouped-query attention (4 heads, 2 kv heads) and biased projections."""
    return tiny_llama(attention_bias=True, **overrides).eval()


def _peft_trained(tmp_path, pattern=None, r=4, alpha=8, **overrides):
    """A PEFT PaCA adapter trained three AdamW steps by PEFT itself, saved by PEFT: (folder, peft model, pristine base)."""
    base = _base(**overrides)
    pristine = copy.deepcopy(base)
    config = peft.PacaConfig(r=r, paca_alpha=alpha, target_modules=TARGETS, random_seed=11, paca_indices_pattern=pattern or {})
    model = peft.get_peft_model(base, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    folder = tmp_path / "peft-paca"
    model.save_pretrained(folder)
    return folder, model, pristine


def test_peft_adapter_loads_to_peft_logits_bitwise_and_merges_to_peft_weights(tmp_path):
    # One layer given 3 columns by paca_indices_pattern: PEFT keeps paca_alpha / r (r of the config) there too.
    folder, peft_model, pristine = _peft_trained(tmp_path, pattern={"layers.0.self_attn.q_proj": [1, 5, 30]})
    ids = _ids()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        ours = PacaModel.from_pretrained(copy.deepcopy(pristine), folder).eval()
        assert torch.equal(ours(input_ids=ids).logits, expected)
    layers = ours.adapter_layers()
    assert layers["model.layers.0.self_attn.q_proj"].r == 3
    assert layers["model.layers.0.self_attn.q_proj"].paca_indices.tolist() == [1, 5, 30]
    assert all(layer.scaling == 2.0 for layer in layers.values())  # paca_alpha 8 / r 4, also for the 3-column layer
    merged_ours = ours.merge_and_unload().state_dict()
    merged_peft = peft_model.merge_and_unload().state_dict()
    assert merged_ours.keys() == merged_peft.keys()
    assert all(torch.equal(merged_ours[k], merged_peft[k]) for k in merged_ours)
    changed = [k for k in merged_ours if not torch.equal(merged_ours[k], pristine.state_dict()[k])]
    assert len(changed) == 2 * len(TARGETS)  # the adapter is not a no-op: every adapted weight moved


def test_our_adapter_exports_to_peft_paca_without_warnings_and_same_logits(tmp_path):
    base = _base()
    pristine = copy.deepcopy(base)
    ours = prepare_model(base, PaCAConfig(r=4, alpha=6.0, target_modules=TARGETS, columns={"layers.1.mlp.down_proj": [0, 7]}))
    randomise_paca_deltas(ours)
    ours.eval()
    out = export_peft(ours, tmp_path / "exported", format="paca", base_model_name_or_path="tiny-llama")
    document = json.loads((out / "adapter_config.json").read_text())
    assert document["peft_type"] == "PACA" and document["r"] == 4 and document["paca_alpha"] == 6
    assert list(document["paca_indices_pattern"].values()) == [[0, 7]]
    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "missing/unexpected keys" would be a warning
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), out).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ours(input_ids=ids).logits)
    # and back: ours -> PEFT -> ours is the same adapter
    again = PacaModel.from_pretrained(copy.deepcopy(pristine), out).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_lora_format_still_default_and_exact(tmp_path):
    base = _base()
    pristine = copy.deepcopy(base)
    ours = prepare_model(base, PaCAConfig(r=4, target_modules=TARGETS))
    randomise_paca_deltas(ours)
    out = export_peft(ours.eval(), tmp_path / "lora")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    loaded = peft.PeftModel.from_pretrained(pristine, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=_ids()).logits, ours(input_ids=_ids()).logits, rtol=0, atol=1e-5)


def test_several_adapters_in_one_folder_are_refused(tmp_path):
    folder, peft_model, pristine = _peft_trained(tmp_path)
    peft_model.add_adapter("second", peft.PacaConfig(r=2, target_modules=["q_proj"]))
    both = tmp_path / "both"
    peft_model.save_pretrained(both)
    with pytest.raises(CheckpointError, match="several PEFT adapters.*'second'"):
        PacaModel.from_pretrained(copy.deepcopy(pristine), both)
    PacaModel.from_pretrained(copy.deepcopy(pristine), both / "second")  # one adapter's own folder loads


def test_what_has_no_paca_form_is_refused_in_one_line(tmp_path):
    folder, _, pristine = _peft_trained(tmp_path)
    document = json.loads((folder / "adapter_config.json").read_text())
    for change, expected in (({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"peft_type": "LORA"}, "PEFT LORA adapter")):
        (folder / "adapter_config.json").write_text(json.dumps({**document, **change}))
        with pytest.raises(CheckpointError, match=expected):
            PacaModel.from_pretrained(copy.deepcopy(pristine), folder)
    (folder / "adapter_config.json").write_text(json.dumps(document))
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        PacaModel.from_pretrained(copy.deepcopy(pristine), folder)


def test_peft_adapter_on_a_4bit_base_matches_peft(tmp_path):
    pytest.importorskip("bitsandbytes")
    from paca_core.memory.quantization import quantize_base

    # Widths that are multiples of bitsandbytes' 64-wide blocks (its CPU kernels mis-scale other widths; see quantization.py).
    folder, _, pristine = _peft_trained(tmp_path, hidden_size=64, intermediate_size=128)
    ids = _ids()
    peft_base = quantize_base(copy.deepcopy(pristine), "nf4")
    our_base = quantize_base(copy.deepcopy(pristine), "nf4")
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(peft_base, folder).eval()(input_ids=ids).logits
        ours = PacaModel.from_pretrained(our_base, folder).eval()
        got = ours(input_ids=ids).logits
    assert ours.adapter_layers()["model.layers.0.self_attn.q_proj"].quantized_base
    # PEFT swaps the columns into a dequantized copy, we add scaling·delta·x[idx] beside the 4-bit GEMM: same math,
    # another summation order.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# --- the CLI ------------------------------------------------------------------------------------------------------


def _peft_folder_for(tiny_model_dir, tmp_path, **config):
    """A PEFT PaCA adapter with random deltas for the saved tiny model (as a user trained with PEFT)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = peft.get_peft_model(base, peft.PacaConfig(r=4, paca_alpha=4, target_modules=TARGETS, random_seed=1, init_weights=False, **config))
    folder = tmp_path / "from-peft"
    model.save_pretrained(folder)
    return folder, model


def test_paca_merge_of_a_peft_adapter_equals_peft_merge_and_unload(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from paca_core.cli.dispatch import main

    folder, model = _peft_folder_for(tiny_model_dir, tmp_path)
    assert main(["merge", "--adapter", str(folder), "--model", str(tiny_model_dir), "--out", str(tmp_path / "merged")]) == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    expected = model.merge_and_unload().state_dict()
    assert all(torch.equal(merged[k], expected[k].to(merged[k].dtype)) for k in merged)


def test_export_peft_format_paca_cli_and_version_refusal(tiny_model_dir, tmp_path, caplog, monkeypatch):
    from paca_core import extras
    from paca_core.cli.dispatch import main

    folder, _ = _peft_folder_for(tiny_model_dir, tmp_path)
    out = tmp_path / "exported"
    assert main(["export-peft", "--adapter", str(folder), "--model", str(tiny_model_dir), "--out", str(out), "--format", "paca"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PACA"
    monkeypatch.setattr(extras, "peft_has_paca", lambda: False)
    line = refused_in_one_line(["export-peft", "--adapter", str(folder), "--model", str(tiny_model_dir), "--out",
                                str(tmp_path / "other"), "--format", "paca"], caplog)
    assert "peft >= 0.22" in line
    assert not (tmp_path / "other").exists()


def test_an_adapter_from_paca_train_loads_in_peft_to_our_logits(tiny_model_dir, tmp_path, sample_text_file):
    from transformers import AutoModelForCausalLM

    from paca_core.cli import main

    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(sample_text_file), "--steps", "3", "--seq-len", "16",
                 "--batch-size", "2", "--lr", "1e-2", "--no-eval", "--sample-tokens", "0", "--no-progress", "--dtype", "fp32",
                 "--out", str(run)]) == 0
    out = tmp_path / "peft"
    assert main(["export-peft", "--adapter", str(run / "adapter"), "--out", str(out), "--format", "paca"]) == 0
    ids = _ids(vocab=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing or unexpected keys
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    ours = PacaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)
        with ours.disable_adapter():
            assert not torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)  # it trained


def test_paca_train_continues_a_peft_adapter(tiny_model_dir, tmp_path, sample_text_file):
    from paca_core.cli.dispatch import main

    folder, model = _peft_folder_for(tiny_model_dir, tmp_path)
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(sample_text_file), "--adapter", str(folder), "--steps", "2",
            "--seq-len", "16", "--batch-size", "2", "--no-eval", "--sample-tokens", "0", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    from transformers import AutoModelForCausalLM

    trained = PacaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    start = {k.removeprefix("base_model.model.").replace(".paca_indices.default", ".paca_indices"): v
             for k, v in model.state_dict().items() if "paca_indices" in k}
    for name, layer in trained.adapter_layers().items():
        assert torch.equal(layer.paca_indices, start[f"{name}.paca_indices"])  # PEFT's columns, kept
    before = model.base_model.model.model.layers[0].self_attn.q_proj.paca_delta["default"].detach()
    after = trained.adapter_layers()["model.layers.0.self_attn.q_proj"].paca_delta.detach()
    assert not torch.equal(before, after) and (before - after).abs().max() < 0.1  # trained on from PEFT's deltas


def test_paca_train_adapter_refuses_flags_it_decides(tiny_model_dir, tmp_path, sample_text_file, caplog, no_load):
    folder, _ = _peft_folder_for(tiny_model_dir, tmp_path)
    line = refused_in_one_line(["train", "--model", str(tiny_model_dir), "--data", str(sample_text_file), "--adapter", str(folder),
                                "--rank", "8", "--out", str(tmp_path / "run")], caplog)
    assert "drop --rank" in line


# --- composed adapters: exported exactly, or refused in one line naming the part -----------------------------------


@pytest.mark.parametrize("fmt", ["paca", "lora"])
def test_composed_paca_full_velora_is_refused_naming_the_full_layers(tmp_path, fmt, caplog):
    model = prepare_model(_base(), _configs("paca+full+velora"))
    with pytest.raises(PacaConfigError, match=r"cannot hold full layers \(model\.layers\.0\.mlp\.down_proj"):
        export_peft(model, tmp_path / "x", format=fmt)
    assert not (tmp_path / "x").exists()


def _configs(method):
    """What ``paca train --method METHOD --rank 4`` builds (``+full`` fully trains down_proj)."""
    from paca_core.workloads.specs import build_our_configs

    return build_our_configs(method, 4, {"full_modules": "down_proj", "target_modules": "q_proj,v_proj,down_proj"})


@pytest.mark.parametrize("method, fmt, exact", [
    ("paca", "paca", True), ("paca", "lora", True), ("lora", "lora", True), ("lorafa", "lora", True),
    ("lora+velora", "lora", True), ("lora", "paca", False), ("lorafa", "paca", False), ("meft", "lora", False),
    ("meft", "paca", False), ("paca+meft", "lora", False), ("full", "lora", False), ("lora+velora", "paca", False),
])
def test_every_method_exports_exactly_or_is_refused(tmp_path, method, fmt, exact):
    base = _base()
    pristine = copy.deepcopy(base)
    model = prepare_model(base, _configs(method))
    with torch.no_grad():  # every trained tensor away from its initial value, so no check is vacuous
        for param in model.trainable_parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())) * 0.05)
    model.sync_adapters()
    model.eval()
    if not exact:
        with pytest.raises(PacaConfigError, match="cannot hold .* layers .*paca merge"):
            export_peft(model, tmp_path / "x", format=fmt)
        return
    out = export_peft(model, tmp_path / "x", format=fmt)
    loaded = peft.PeftModel.from_pretrained(pristine, out).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_tied_head_is_refused_by_export(tmp_path):
    base = _base(tie_word_embeddings=True)
    model = prepare_model(base, PaCAConfig(r=4, target_modules=["lm_head", "q_proj"]))
    for fmt in ("paca", "lora"):
        with pytest.raises(PacaConfigError, match="lm_head share their weight with model.embed_tokens"):
            export_peft(model, tmp_path / fmt, format=fmt)


def test_export_of_composed_adapter_cli_refuses_before_loading(tiny_model_dir, tmp_path, sample_text_file, caplog):
    from paca_core.cli.dispatch import main

    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(sample_text_file), "--method", "paca+full+velora",
                 "--full-modules", "down_proj", "--steps", "1", "--seq-len", "16", "--batch-size", "2", "--no-eval", "--sample-tokens", "0", "--no-progress",
                 "--out", str(run)]) == 0
    for fmt in ("paca", "lora"):
        line = refused_in_one_line(["export-peft", "--adapter", str(run / "adapter"), "--out", str(tmp_path / fmt), "--format", fmt], caplog)
        assert "cannot hold full layers" in line and "paca merge" in line
        assert not (tmp_path / fmt).exists()
