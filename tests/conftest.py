"""Shared fixtures: tiny random LLaMA models and the backends available on this machine."""
from __future__ import annotations

import pytest
import torch

from backends import CpuBackend, CudaBackend, HpuBackend
from devices import available_device_types


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


_AVAILABLE = set(available_device_types())

# (test id, backend class, device the tensors live on). The *-kernels@cpu entries run a device
# backend's own code on CPU tensors, so its overrides are checked even where the device is absent.
BACKEND_CASES = [
    pytest.param((CpuBackend, "cpu"), id="cpu"),
    pytest.param((CudaBackend, "cpu"), id="cuda-kernels@cpu"),
    pytest.param((HpuBackend, "cpu"), id="hpu-kernels@cpu"),
    pytest.param(
        (CudaBackend, "cuda"), id="cuda", marks=pytest.mark.skipif("cuda" not in _AVAILABLE, reason="no CUDA device")
    ),
    pytest.param((HpuBackend, "hpu"), id="hpu", marks=pytest.mark.skipif("hpu" not in _AVAILABLE, reason="no Gaudi (HPU) device")),
]


@pytest.fixture(params=BACKEND_CASES)
def backend_and_device(request):
    backend_cls, device = request.param
    return backend_cls(), torch.device(device)


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
