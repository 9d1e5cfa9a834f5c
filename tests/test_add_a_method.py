"""A method defined outside paca_core (tests/toy_method.py, written by following docs/ARCHITECTURE.md,
"Adding a method") works everywhere a built-in one does: prepare_model, checkpoints, merge,
``paca train --method toy`` and ``paca bench --methods toy``; and a method named by a
``paca_hal.methods`` entry point is found without anyone importing it."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import paca_core
from paca_core import PacaModel, prepare_model
from paca_core.cli.dispatch import DEFAULT_LR, DEFAULT_RANK, default_lr, main
from paca_core.methods import find_method, unregister_method
from paca_core.methods import registry

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


def test_the_base_classes_do_what_the_toy_layer_does_not(toy):
    """The contract is the base classes': the toy layer sets no ``method``, places nothing itself, writes no
    ``adapter_state``; its config calls no ``super()``; a wrong ``create_layer`` is refused by name."""
    assert not {"method", "adapter_state", "load_adapter_state", "frozen_adapter_parameters"} & set(vars(toy.ToyLinear))
    model = prepare_model(tiny_llama(seed=0, dtype=torch.bfloat16), toy.ToyConfig(target_modules=["q_proj"]))
    layer = model.adapter_layers()["model.layers.0.self_attn.q_proj"]
    assert (layer.method, layer.config_index) == ("toy", 0)
    assert layer.toy_scale.dtype == torch.float32 and layer.toy_scale.requires_grad  # fp32 beside a bf16 weight
    assert layer.toy_projection.device == layer.base_weight().device and not layer.toy_projection.requires_grad
    assert layer.base_parameters() == [layer.base_layer.weight]  # what ZeRO-3 gathers for the layer
    other = prepare_model(tiny_llama(seed=0), toy.ToyConfig(target_modules=["q_proj"])).adapter_layers()
    assert torch.equal(other["model.layers.0.self_attn.q_proj"].toy_projection, layer.toy_projection)  # seeded, not global RNG
    assert not torch.equal(other["model.layers.1.self_attn.q_proj"].toy_projection, layer.toy_projection)  # per layer
    with pytest.raises(paca_core.PacaConfigError, match="init"):  # ToyConfig.check runs
        toy.ToyConfig(init=float("nan"))
    with pytest.raises(paca_core.PacaConfigError, match="init"):  # and for a subclass with its own check, no super()
        type("Stricter", (toy.ToyEntryPointConfig,), {"check": lambda self: None})(init=float("inf"))
    with pytest.raises(paca_core.PacaConfigError, match="seed"):  # the shared fields are checked first
        toy.ToyConfig(seed=-1)

    class Legacy(toy.ToyConfig):  # the earlier recipe: validate() overridden, calling super()
        def validate(self):
            super().validate()
            if self.init > 1:
                raise paca_core.PacaConfigError("legacy init")

    for init, match in ((2.0, "legacy init"), (float("nan"), "finite")):
        with pytest.raises(paca_core.PacaConfigError, match=match):
            Legacy(init=init)

    class NotALayer(toy.ToyConfig):
        def create_layer(self, linear, module_name):
            return torch.nn.Identity()

    with pytest.raises(TypeError, match="NotALayer.create_layer returned a Identity"):
        prepare_model(tiny_llama(seed=0), NotALayer(target_modules=["q_proj"]))


def test_zero3_writes_into_partitions_through_each_layer_class_hook():
    """paca_core.distributed.zero names no method: it hands the layers whose base weight ZeRO-3 partitions to their class's
    ``write_partitioned`` hook, one call per class; a class that keeps nothing in its weight refuses."""
    from types import SimpleNamespace

    from paca_core.distributed import zero
    from paca_core.layers import AdapterLayer

    calls = []

    class Writes(AdapterLayer):
        def __init__(self, weight):
            super().__init__("x", 1, 1)
            self.weight = weight

        def base_weight(self):
            return self.weight

        @classmethod
        def write_partitioned(cls, layers):
            calls.append((cls.__name__, list(layers)))

    partitioned = SimpleNamespace(ds_id=1, ds_tensor=torch.zeros(1))
    first, second, plain = Writes(partitioned), Writes(partitioned), Writes(torch.zeros(1))
    assert zero.partitioned_layers([first, plain, second]) == [first, second]
    zero.write_into_partitions([first, plain, second])
    assert calls == [("Writes", [first, second])]
    with pytest.raises(NotImplementedError, match="keeps no adapter state in its base weight"):
        AdapterLayer.write_partitioned([first])


#: Run in a new interpreter: load the toy adapter into the same base model and save its logits.
_RELOAD_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from paca_core import PacaModel
    import tests.toy_method  # registers "toy", as the plug-in's import or entry point would
    from tests.conftest import tiny_llama

    adapter, ids_path, out_path = sys.argv[1:]
    model = PacaModel.from_pretrained(tiny_llama(seed=0), adapter)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.load(ids_path)).logits
    torch.save({"logits": logits, "hash": hash("model.layers.0.self_attn.q_proj")}, out_path)
""")


@pytest.mark.slow  # tests/test_architecture_plugins.py reloads a plug-in method in a fresh process in the fast tier
def test_toy_method_reloads_in_a_fresh_process_to_the_same_logits(toy, tmp_path):
    """An outside method that follows the contract (declared tensors, random ones from ``layer.generator``) reloads
    exactly in another interpreter, whose ``hash()`` salt differs: its unsaved frozen projection is rebuilt the same."""
    model = prepare_model(tiny_llama(seed=0), toy.ToyConfig(init=0.1, target_modules=["q_proj", "down_proj"], seed=5))
    layers = model.adapter_layers()
    assert all(list(layer.adapter_state()) == ["toy_scale"] for layer in layers.values())  # the projection is not saved
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.all(layer.toy_scale == 0.1) for layer in layers.values())  # trained away from its init
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with model.disable_adapter():  # without the adapter the logits differ: the comparison below is not vacuous
            assert not torch.allclose(model(input_ids=ids).logits, logits, atol=1e-4)
    model.save_pretrained(tmp_path / "adapter")
    torch.save(ids, tmp_path / "ids.pt")

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    salt = os.environ.get("PYTHONHASHSEED", "random")
    env["PYTHONHASHSEED"] = str(int(salt) + 1) if salt.isdigit() else "random"  # never the parent's salt
    subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, str(tmp_path / "adapter"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        check=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=300,
    )
    reloaded = torch.load(tmp_path / "out.pt")
    assert reloaded["hash"] != hash("model.layers.0.self_attn.q_proj")  # really another hash salt
    torch.testing.assert_close(reloaded["logits"], logits, rtol=0, atol=1e-6)


def test_toy_method_defaults_and_combinations(toy):
    assert DEFAULT_LR["toy"] == 1e-2 and default_lr("toy") == 1e-2 and DEFAULT_RANK["toy"] is None
    assert "toy" in paca_core.METHOD_CONFIGS and "toy" in paca_core.cli.dispatch.METHOD_HELP
    assert [m.name for m in paca_core.methods.parse_combination("paca+toy")] == ["paca", "toy"]
    with pytest.raises(paca_core.PacaConfigError, match="toy"):  # the error lists what --method accepts
        paca_core.methods.parse_combination("dora")


def test_paca_train_method_toy(toy, tiny_model_dir, sample_text_file, tmp_path):
    out = tmp_path / "toy"
    extra = ["--method", "toy", "--toy-init", "0.05", "--sample-tokens", "0"]
    assert main(_train_flags(tiny_model_dir, sample_text_file, out, 2, *extra)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "toy" and metrics["configs"][0]["init"] == 0.05
    from paca_core.files.assets import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    assert PacaModel.from_pretrained(model, out / "adapter").method == "toy"


@pytest.mark.slow
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
