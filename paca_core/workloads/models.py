"""Models to measure or plan: named synthetic LLaMA shapes with random weights, local folders, or the real default.

Synthetic shapes let one command measure a LLaMA-3-8B-sized layer stack without its weights:
speed and memory depend on shapes, not on values. Held-out loss (accuracy mode) needs real
weights and a tokenizer, so it takes ``default`` or a local folder. Torch and transformers are
imported only when a model is built, so ``paca bench``'s parser can name the shapes cheaply.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import PacaConfigError

if TYPE_CHECKING:
    import torch

#: name -> (LlamaConfig fields, default number of layers). ``name:N`` overrides the layer count.
SYNTHETIC_SHAPES: dict[str, tuple[dict[str, Any], int]] = {
    "tiny": (
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False),
        2,
    ),
    "smollm2-135m-shape": (
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
            rope_theta=100000.0,
        ),
        30,
    ),
    # Llama-3.2-1B's layer shapes (its config.json; rope scaling left out: it changes no tensor shape or FLOP count).
    "llama-3.2-1b-shape": (
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=True,
            rope_theta=500000.0,
        ),
        16,
    ),
    "llama-3-8b-layers": (
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=False,
            rope_theta=500000.0,
        ),
        32,
    ),
}
MODEL_HELP = (
    "a synthetic shape with random weights (" + ", ".join(f"{n}[:LAYERS]" for n in SYNTHETIC_SHAPES) + "), "
    "a local HF model folder, or 'default' (the real SmolLM2-135M-Instruct)"
)


@dataclass(frozen=True)
class ModelChoice:
    """A parsed --model: ``synthetic`` (shape + layers), ``default`` or ``path``."""

    text: str
    kind: str
    shape: str | None = None
    layers: int | None = None

    @property
    def has_real_weights(self) -> bool:
        return self.kind != "synthetic"


def parse_model(text: str) -> ModelChoice:
    """Parse --model; synthetic names are checked here, folders when a worker loads them."""
    name, _, layers = text.partition(":")
    if name in SYNTHETIC_SHAPES:
        if layers and not (layers.isdigit() and int(layers) > 0):
            raise PacaConfigError(f"--model {text!r}: the layer count after ':' must be a positive integer.")
        return ModelChoice(text, "synthetic", name, int(layers) if layers else SYNTHETIC_SHAPES[name][1])
    if text == "default":
        return ModelChoice(text, "default")
    return ModelChoice(text, "path")


def synthetic_config(choice: ModelChoice):
    """The transformers LlamaConfig of a synthetic shape."""
    from transformers import LlamaConfig

    fields, _ = SYNTHETIC_SHAPES[choice.shape]
    return LlamaConfig(num_hidden_layers=choice.layers, max_position_embeddings=131072, rms_norm_eps=1e-5, **fields)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype`` for the block, restored after: models are built directly in their dtype,
    so an 8B-shaped stack never exists in fp32 first."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(choice: ModelChoice, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """(model, tokenizer or None) on ``device`` in ``dtype``; synthetic weights are seeded, so every
    method of one run starts from the same model."""
    import torch

    if choice.kind == "synthetic":
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)
        with torch.device(device), default_dtype(dtype):
            model = LlamaForCausalLM(synthetic_config(choice))
        return model.to(device=device, dtype=dtype), None
    from ..files import assets

    model, tokenizer = assets.load_model_and_tokenizer(assets.resolve_model_path(choice.text), dtype=dtype)
    return model.to(device), tokenizer


def vocab_size(model) -> int:
    return int(model.get_input_embeddings().weight.shape[0])
