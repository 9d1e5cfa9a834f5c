"""A method defined outside paca_core (tests/toy_method.py, written by following docs/ARCHITECTURE.md,
"Adding a method") works everywhere a built-in one does: prepare_model, checkpoints, merge,
``paca train --method toy`` and ``paca bench --methods toy``; and a method named by a
``paca_hal.methods`` entry point is found without anyone importing it."""
from __future__ import annotations

import importlib.metadata
import json
import sys

import pytest
import torch

import paca_core
from paca_core import PacaModel, prepare_model
from paca_core.cli import DEFAULT_LR, DEFAULT_RANK, default_lr, main
from paca_core.methods import find_method, registry, unregister_method

from .conftest import tiny_llama
from .plugin_dist import write_distribution
from .test_training import _train_flags


@pytest.fixture
def toy():
    from . import toy_method

    if find_method("toy") is None:  # registered by the module's import the first time, by this call after
        paca_core.register_method(toy_method.METHOD)
    yield toy_method
    unregister_method("toy")


def test_toy_method_prepares_saves_loads_and_merges(toy, tmp_path):
    model = prepare_model(tiny_llama(seed=0), toy.ToyConfig(init=0.1, target_modules=["q_proj", "down_proj"]))
    assert {layer.method for layer in model.adapter_layers().values()} == {"toy"}
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = PacaModel.from_pretrained(tiny_llama(seed=0), tmp_path / "adapter")
    assert loaded.method == "toy" and isinstance(loaded.configs[0], toy.ToyConfig) and loaded.configs[0].init == 0.1
    torch.testing.assert_close(loaded(input_ids=ids).logits, logits)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_toy_method_defaults_and_combinations(toy):
    assert DEFAULT_LR["toy"] == 1e-2 and default_lr("toy") == 1e-2 and DEFAULT_RANK["toy"] is None
    assert "toy" in paca_core.METHOD_CONFIGS and "toy" in paca_core.cli.METHOD_HELP
    assert [m.name for m in paca_core.methods.parse_combination("paca+toy")] == ["paca", "toy"]
    with pytest.raises(paca_core.PacaConfigError, match="toy"):  # the error lists what --method accepts
        paca_core.methods.parse_combination("dora")


def test_paca_train_method_toy(toy, tiny_model_dir, sample_text_file, tmp_path):
    out = tmp_path / "toy"
    extra = ["--method", "toy", "--toy-init", "0.05", "--sample-tokens", "0"]
    assert main(_train_flags(tiny_model_dir, sample_text_file, out, 2, *extra)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "toy" and metrics["configs"][0]["init"] == 0.05
    from paca_core.assets import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    assert PacaModel.from_pretrained(model, out / "adapter").method == "toy"


def test_paca_bench_methods_toy(toy, tmp_path):
    out = tmp_path / "bench"
    code = main([
        "bench", "--model", "tiny", "--methods", "toy", "--seq-len", "16", "--batch-size", "2", "--rank", "4",
        "--steps", "1", "--warmup-steps", "0", "--device", "cpu", "--no-progress", "--out", str(out),
    ])
    assert code == 0
    records = {r["method"]: r for r in json.loads((out / "bench.json").read_text())["speed"]}
    assert records["toy"]["status"] == "ok", records["toy"]
    assert records["toy"]["rank"] is None and records["toy"]["trainable_parameters"] > 0


def test_entry_point_method_is_found_lazily_once(monkeypatch, tiny_model_dir, sample_text_file, tmp_path):
    """A method in another installed distribution, named only by its ``paca_hal.methods`` entry point:
    the distribution (module + dist-info) is written to a folder on ``sys.path``, so importlib.metadata
    reads real package metadata, as for a ``pip install``-ed plug-in."""
    site = write_distribution(
        tmp_path / "site-packages",
        "paca-toyep",
        {registry.ENTRY_POINT_GROUP: {"toyep": "paca_toyep:METHOD"}},
        {"paca_toyep.py": """
            \"\"\"paca-toyep: the toy method under its own name, from its own distribution.\"\"\"
            from tests.toy_method import ENTRY_POINT_METHOD as METHOD
        """},
    )
    monkeypatch.syspath_prepend(str(site))
    reads = []
    real_entry_points = importlib.metadata.entry_points

    def counting_entry_points(**selection):  # the real lookup, counted
        reads.append(selection.get("group"))
        return real_entry_points(**selection)

    monkeypatch.setattr(importlib.metadata, "entry_points", counting_entry_points)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.delitem(sys.modules, "paca_toyep", raising=False)
    try:
        assert find_method("toyep") is not None and "paca_toyep" in sys.modules  # nobody imported it but the registry
        assert paca_core.get_method("toyep").default_lr == 3e-3
        assert default_lr("toyep") == 3e-3
        paca_core.registered_methods()
        assert reads.count(registry.ENTRY_POINT_GROUP) == 1  # loaded once, when first needed
        out = tmp_path / "toyep"
        assert main(_train_flags(tiny_model_dir, sample_text_file, out, 1, "--method", "toyep", "--sample-tokens", "0")) == 0
        assert json.loads((out / "metrics.json").read_text())["method"] == "toyep"
    finally:
        if find_method("toyep") is not None:
            unregister_method("toyep")
