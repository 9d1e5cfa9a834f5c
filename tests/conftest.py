"""Shared fixtures: tiny random LLaMA models and the backends available on this machine."""
from __future__ import annotations

import os
from typing import Sequence

import pytest
import torch

# Processes the tests start (torchrun, bench workers, `python -m paca_core train`) pick their own `--dtype auto`; on a
# CPU with AVX512-BF16/AMX that is bf16, which would compare a bf16 subprocess with an fp32 reference. oneDNN's own cap
# below AVX512_CORE_BF16 (a documented oneDNN setting, honoured by devices.cpu_features) makes them choose fp32 as on
# CPUs without native bf16; it changes no fp32 kernel, and a CPU without AVX-512 is below the cap anyway.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")

from backends import BACKEND_CLASSES, Backend, get_backend, overridden_primitives
from devices import available_device_types, registered_runtimes


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)


def randomise_paca_deltas(paca_model, seed=3, scale=0.05):
    """Give every PaCA delta random values (a zero delta would make many checks vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in paca_model.adapter_layers().values():
            layer.paca_delta.copy_(torch.randn(layer.paca_delta.shape, generator=gen) * scale)
    paca_model.sync_adapters()


@pytest.fixture
def make_tiny_llama():
    return tiny_llama


@pytest.fixture(autouse=True)
def cpu_auto_dtype_is_fp32(monkeypatch):
    """``--dtype auto`` on CPU is bf16 where the CPU multiplies bf16 natively (AVX512-BF16/AMX), fp32 elsewhere; the
    tests run it as on a CPU without (fp32), so they say the same on every CI machine. tests/test_cpu_dtype.py
    checks the rule both ways; subprocesses a test starts still ask their real CPU."""
    from devices import cpu_features

    without = cpu_features.CpuBf16Support("x86_64", "AVX2", avx512_bf16=False, amx_bf16=False, onednn=True,
                                          source="tests/conftest.py")
    monkeypatch.setattr(cpu_features, "query_bf16_support", lambda: without)
    cpu_features.cpu_dtype_choice.cache_clear()
    yield
    cpu_features.cpu_dtype_choice.cache_clear()


PRIMITIVES = frozenset(Backend.__abstractmethods__)


#: The most pytest-xdist workers the fast tier starts (each collects the suite and holds its own torch).
MAX_TEST_WORKERS = 4


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): the whole fast tier (plain ``pytest``) on every usable core, up to
    :data:`MAX_TEST_WORKERS`. Anything else runs in one process: named files or tests (starting workers costs more
    than they save), ``-m slow`` (its tests start their own processes: torchrun ranks, bench workers) and the
    accelerator tier ``paca doctor`` runs (one accelerator). ``-n 0`` runs the whole fast tier serially too."""
    if config.getoption("file_or_dir") or (config.getoption("markexpr") or "").strip() != "not slow":
        return 0
    return min(_usable_cpus(), MAX_TEST_WORKERS)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "primitives(*names): the Backend primitives a backend_and_device test exercises (default: all)"
    )
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # an xdist worker: its share of the cores, not all of them (workers x threads > cores thrashes)
        torch.set_num_threads(max(1, _usable_cpus() // workers))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` or ``hpu`` are part of the accelerator tier (``pytest -m accelerator``, run by paca doctor)."""
    for item in items:
        if item.get_closest_marker("gpu") or item.get_closest_marker("hpu"):
            item.add_marker(pytest.mark.accelerator)


def backend_cases(primitives: Sequence[str]) -> list:
    """Conformance cases for a test of ``primitives``, generated from the registries.

    * every registered device runtime's own device, with the backend ``get_backend`` gives it
      (``cpu`` always; ``cuda``, ``hpu``, ... skipped where absent);
    * ``<backend>-kernels@cpu`` for each registered backend class that overrides one of
      ``primitives``: its own code on CPU tensors, so an override is checked where its device is absent.

    A backend that overrides none of them runs the portable code, which the ``cpu`` case checks.
    """
    unknown = set(primitives) - PRIMITIVES
    if unknown:
        raise ValueError(f"Not Backend primitives: {sorted(unknown)}; known: {sorted(PRIMITIVES)}")
    available = set(available_device_types())
    cases = []
    for runtime in registered_runtimes():
        name = runtime.name
        marks = [] if name in available else [pytest.mark.skip(reason=f"no {name} device here")]
        if not runtime.shares_host_memory:  # an accelerator's case: part of the accelerator tier (paca doctor)
            marks.append(pytest.mark.accelerator)
        cases.append(pytest.param((None, name), id=name, marks=marks))
    for backend_cls in BACKEND_CLASSES.values():
        if set(overridden_primitives(backend_cls)) & set(primitives):
            cases.append(pytest.param((backend_cls, "cpu"), id=f"{backend_cls.name}-kernels@cpu"))
    return cases


def pytest_generate_tests(metafunc):
    if "backend_and_device" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("primitives")
        primitives = marker.args if marker is not None else tuple(PRIMITIVES)
        metafunc.parametrize("backend_and_device", backend_cases(primitives), indirect=True)


@pytest.fixture
def backend_and_device(request):
    """``(backend, device)``: a fresh instance of a device backend's class on CPU tensors, or the
    backend ``get_backend`` serves for a real device."""
    backend_cls, device = request.param
    device = torch.device(device)
    return (backend_cls() if backend_cls is not None else get_backend(device)), device


SAMPLE_TEXT = (
    "When shall we three meet again in thunder, lightning, or in rain? "
    "When the hurlyburly's done, when the battle's lost and won. "
    "That will be ere the set of sun. Where the place? Upon the heath. "
    "There to meet with Macbeth. Fair is foul, and foul is fair: hover through the fog and filthy air. "
) * 12


def build_tiny_tokenizer(directory):
    """A small word-level tokenizer saved as a normal HF tokenizer folder (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tokenizer.train_from_iterator([SAMPLE_TEXT, "question answer prompt response the a is what"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random LLaMA + tokenizer folder, loadable like any local HF model."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer(directory)
    model = tiny_llama(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    return directory


@pytest.fixture
def sample_text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(SAMPLE_TEXT)
    return path


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if any model weights load: a refusal that needs no weights must come before the load."""
    import paca_core.files.assets as assets

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(assets, "load_model", refuse)  # load_model_and_tokenizer calls it too


def refused_in_one_line(argv, caplog) -> str:
    """``paca`` with ``argv`` exits 2 with exactly one error line (no traceback, no second line); that line."""
    from paca_core.cli.dispatch import main

    caplog.clear()
    with caplog.at_level("ERROR"):
        assert main(argv) == 2
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    return lines[0]
