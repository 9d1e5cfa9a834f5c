"""Built-in model shapes for the planner (paca_core/plan/shapes.py): configs, loading, parameter counts.

Models are built on the ``meta`` device: shapes only, no memory, so even the 70B costs nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from paca_core.errors import PacaConfigError
from paca_core.plan import shapes
from paca_core.plan.shapes import BUILTIN_SHAPES, context_length, describe, known_shapes, load_config

EXPECTED_NAMES = ["llama-2-7b", "llama-3-8b", "llama-3.1-70b", "llama-3.1-8b", "mistral-7b", "qwen2.5-7b", "smollm2-135m"]


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def test_known_shapes_lists_every_builtin():
    assert known_shapes() == EXPECTED_NAMES
    for name, entry in BUILTIN_SHAPES.items():
        assert entry["source"].endswith("/config.json"), name
        assert entry["context_length"] == entry["config"]["max_position_embeddings"], name


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_every_builtin_builds_on_meta_and_matches_the_shape_count(name):
    config = load_config(name)
    model = _meta_model(config)
    assert type(model).__name__ == BUILTIN_SHAPES[name]["config"]["architectures"][0]
    assert all(p.device.type == "meta" for p in model.parameters())
    assert describe(config)["parameters"] == _numel(model)


def test_llama_3_1_8b_shape():
    config = load_config("llama-3.1-8b")
    info = describe(config)
    assert info["parameters"] == 8_030_261_248
    assert (info["hidden_size"], info["intermediate_size"], info["num_layers"]) == (4096, 14336, 32)
    assert (info["num_heads"], info["num_kv_heads"], info["head_dim"], info["vocab_size"]) == (32, 8, 128, 128256)
    assert info["tied_embeddings"] is False
    assert context_length(config) == 131072 == context_length("llama-3.1-8b")
    # llama3 RoPE scaling survives whichever spelling the installed transformers uses.
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    assert rope["rope_type"] == "llama3"
    assert rope["factor"] == 8.0 and rope["original_max_position_embeddings"] == 8192
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    assert theta == 500000.0


def test_smollm2_135m_shape_and_tied_head():
    config = load_config("smollm2-135m")
    info = describe(config)
    assert info["tied_embeddings"] is True and info["head_params"] == 0
    assert (info["hidden_size"], info["num_layers"], info["num_heads"], info["num_kv_heads"]) == (576, 30, 9, 3)
    assert info["parameters"] == 134_515_008 == _numel(_meta_model(config))
    assert context_length("smollm2-135m") == 8192


def test_smollm2_matches_the_local_default_model_config():
    """The built-in smollm2-135m is the default model's shape (when its converted copy is cached here)."""
    cached = sorted(Path.home().glob(".cache/paca-hal/smollm2-135m-instruct-*/config.json"))
    if not cached:
        pytest.skip("the default model has not been converted on this machine")
    local = json.loads(cached[-1].read_text(encoding="utf-8"))
    builtin = BUILTIN_SHAPES["smollm2-135m"]["config"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "head_dim"):
        assert local[key] == builtin[key], key
    assert describe(load_config(str(cached[-1].parent)))["parameters"] == describe(load_config("smollm2-135m"))["parameters"]


def test_other_builtin_facts():
    llama70 = describe(load_config("llama-3.1-70b"))
    assert (llama70["hidden_size"], llama70["intermediate_size"], llama70["num_layers"]) == (8192, 28672, 80)
    assert (llama70["num_heads"], llama70["num_kv_heads"], llama70["vocab_size"]) == (64, 8, 128256)
    assert context_length("llama-2-7b") == 4096 and context_length("llama-3-8b") == 8192
    mistral = load_config("mistral-7b")
    assert mistral.sliding_window == 4096 and context_length(mistral) == 32768
    qwen = describe(load_config("qwen2.5-7b"))
    assert qwen["qkv_bias"] is True and qwen["tied_embeddings"] is False
    assert (qwen["hidden_size"], qwen["num_heads"], qwen["num_kv_heads"], qwen["vocab_size"]) == (3584, 28, 4, 152064)
    assert context_length("qwen2.5-7b") == 131072  # what config.json says; see the entry's note


def test_names_are_case_insensitive():
    assert describe(load_config("Llama-3.1-8B"))["parameters"] == 8_030_261_248


def test_local_folder_and_config_json_path(tmp_path):
    fields = dict(BUILTIN_SHAPES["llama-3-8b"]["config"], num_hidden_layers=2, vocab_size=1000,
                  transformers_version="4.40.0.dev0", bos_token_id=128000, eos_token_id=128001)
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(fields), encoding="utf-8")
    from_folder = load_config(str(folder))
    from_file = load_config(str(folder / "config.json"))
    for config in (from_folder, from_file):
        assert config.model_type == "llama" and config.num_hidden_layers == 2
        assert describe(config)["parameters"] == _numel(_meta_model(config))


def test_transformers_5_rope_parameters_config_loads(tmp_path):
    """A config.json written by transformers 5.x (rope_parameters) loads on either major version."""
    fields = dict(BUILTIN_SHAPES["smollm2-135m"]["config"], num_hidden_layers=1)
    fields.pop("rope_theta"), fields.pop("rope_scaling")
    fields["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(fields), encoding="utf-8")
    config = load_config(str(path))
    rope = getattr(config, "rope_parameters", None) or {}
    assert rope.get("rope_theta", getattr(config, "rope_theta", None)) == 100000.0


def test_unknown_name_lists_known_names():
    with pytest.raises(PacaConfigError) as caught:
        load_config("llama-9-400b")
    message = str(caught.value)
    for name in EXPECTED_NAMES:
        assert name in message
    assert "local folder" in message and "config.json" in message


def test_hub_id_is_not_downloaded(monkeypatch):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("load_config must not call from_pretrained")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    with pytest.raises(PacaConfigError) as caught:
        load_config("meta-llama/Llama-3.1-8B")
    message = str(caught.value)
    assert "meta-llama/Llama-3.1-8B" in message
    assert "local folder" in message and "downloads nothing" in message


def test_folder_without_config_json(tmp_path):
    with pytest.raises(PacaConfigError, match="without config.json"):
        load_config(str(tmp_path))


def test_unknown_model_type_is_a_clear_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "not-a-real-model", "hidden_size": 8}), encoding="utf-8")
    with pytest.raises(PacaConfigError, match="not-a-real-model.*does not know"):
        load_config(str(path))
    path.write_text(json.dumps({"hidden_size": 8}), encoding="utf-8")
    with pytest.raises(PacaConfigError, match="no model_type"):
        load_config(str(path))
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(PacaConfigError, match="not valid JSON"):
        load_config(str(path))


def test_shapes_module_keeps_transformers_lazy():
    """Importing the shapes module must not need transformers (the CLI imports it eagerly)."""
    source = Path(shapes.__file__).read_text(encoding="utf-8")
    top = source.split("\ndef ", 1)[0]
    assert "\nimport transformers" not in top and "\nfrom transformers" not in top
