"""Model shapes for the planner: built-in configs, local config.json loading, and a parameter count.

The planner builds a model from its config on fake tensors (no weights) and traces a training
step, so all it needs from a model is its ``config.json``. ``load_config`` accepts

* a built-in name (``known_shapes()``: the architecture fields of a few published configs,
  kept in ``model_shapes.json`` next to this file),
* a local folder holding ``config.json``,
* a path to a ``config.json`` file,

any of them followed by ``-layers:N`` (``llama-3.1-8b-layers:4``) for its first N decoder layers: the same
shapes at reduced depth, which a real device can train in seconds (``scripts/validate_on_device.py``),
and returns a ``transformers.PretrainedConfig``. Nothing is downloaded: a hub id such as
``meta-llama/Llama-3.1-8B`` that is not a local path is an error saying what to pass instead.

The dict goes through the model type's config class (``AutoConfig.for_model``), so transformers
normalizes version differences itself (4.x ``rope_theta``/``rope_scaling`` become 5.x
``rope_parameters``; ``torch_dtype`` becomes ``dtype``).
"""
from __future__ import annotations

import inspect
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paca_core.errors import PacaConfigError

if TYPE_CHECKING:  # transformers is heavy; import it only where it is used.
    from transformers import PretrainedConfig

SHAPES_FILE = Path(__file__).with_name("model_shapes.json")
#: ``NAME-layers:N``: the model NAME cut to its first N decoder layers.
LAYERS_SUFFIX = re.compile(r"^(?P<base>.+)-layers:(?P<layers>\d+)$")


def _load_builtin_shapes() -> dict[str, dict[str, Any]]:
    with SHAPES_FILE.open(encoding="utf-8") as handle:
        return json.load(handle)["models"]


# name -> {"source", "context_length", "config": {config.json fields}, optional "note"/"confirmed_from"}
BUILTIN_SHAPES: dict[str, dict[str, Any]] = _load_builtin_shapes()

# Model types whose attention always has q/k/v biases, whatever the config says (Qwen2Attention
# builds them with bias=True and its config has no attention_bias field).
_QKV_BIAS_MODEL_TYPES = frozenset({"qwen2"})


def known_shapes() -> list[str]:
    """The built-in model names ``load_config`` accepts, sorted."""
    return sorted(BUILTIN_SHAPES)


def _not_found_message(text: str) -> str:
    return (
        f"--model {text!r} is neither a built-in model shape nor a local path. "
        f"Built-in names: {', '.join(known_shapes())}. "
        "Otherwise pass a local folder containing config.json, or the path of a config.json file (any of them may end in "
        "-layers:N for its first N decoder layers): "
        "paca-hal downloads nothing from the Hugging Face hub (fetch config.json on a connected machine)."
    )


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as handle:
            fields = json.load(handle)
    except json.JSONDecodeError as error:
        raise PacaConfigError(f"{path} is not valid JSON ({error}); pass a Hugging Face config.json") from error
    except OSError as error:
        raise PacaConfigError(f"cannot read {path}: {error}") from error
    if not isinstance(fields, dict):
        raise PacaConfigError(f"{path} holds a JSON {type(fields).__name__}, not an object; pass a Hugging Face config.json")
    return fields


def _checked(fields: dict[str, Any], path: Path) -> dict[str, Any]:
    """A user's config.json must give its own shape (paca_core.files.input_checks): one naming only its model_type would plan
    transformers' default shape, and inconsistent heads fail inside transformers."""
    from paca_core.files.input_checks import check_model_config

    check_model_config(fields, str(path))
    return fields


def _config_class_takes(config_class: type, name: str) -> bool:
    try:
        return name in inspect.signature(config_class.__init__).parameters
    except (TypeError, ValueError):
        return False


def config_from_dict(fields: dict[str, Any], where: str = "config") -> PretrainedConfig:
    """Build a ``PretrainedConfig`` from config.json fields through the model type's config class."""
    from transformers import CONFIG_MAPPING, AutoConfig

    fields = dict(fields)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise PacaConfigError(
            f"{where} has no model_type; pass the config.json of a Hugging Face causal language model"
        )
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise PacaConfigError(
            f"{where} has model_type {model_type!r}, which the installed transformers "
            f"{transformers.__version__} does not know; upgrade transformers or pass another model "
            "(models needing trust_remote_code are not supported)"
        )
    config_class = CONFIG_MAPPING[model_type]
    # A config written by transformers 5.x (rope_parameters) read by 4.x, which has rope_theta/rope_scaling.
    rope_parameters = fields.get("rope_parameters")
    if isinstance(rope_parameters, dict) and not _config_class_takes(config_class, "rope_parameters"):
        fields.pop("rope_parameters")
        rope = dict(rope_parameters)
        if "rope_theta" in rope:
            fields.setdefault("rope_theta", rope.pop("rope_theta"))
        if rope.get("rope_type", "default") != "default":
            fields.setdefault("rope_scaling", rope)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError, KeyError) as error:
        raise PacaConfigError(f"{where}: transformers could not build a {model_type!r} config: {error}") from error


def load_config(text: str) -> PretrainedConfig:
    """A built-in name, a local folder holding config.json, or a config.json path -> ``PretrainedConfig``.

    Never touches the network. Anything else raises ``PacaConfigError`` listing the built-in names.
    """
    text = str(text).strip()
    if not text:
        raise PacaConfigError(_not_found_message(text))
    reduced = LAYERS_SUFFIX.match(text)
    if reduced and not Path(text).expanduser().exists():
        return with_layers(load_config(reduced["base"]), int(reduced["layers"]), where=text)
    name = text.lower()
    if name in BUILTIN_SHAPES:
        return config_from_dict(BUILTIN_SHAPES[name]["config"], where=f"built-in shape {name!r}")
    path = Path(text).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise PacaConfigError(
                f"{path} is a folder without config.json; pass a Hugging Face model folder or the path of its config.json"
            )
        return config_from_dict(_checked(_read_config_file(config_file), config_file), where=str(config_file))
    if path.is_file():
        return config_from_dict(_checked(_read_config_file(path), path), where=str(path))
    raise PacaConfigError(_not_found_message(text))


def with_layers(config: PretrainedConfig, layers: int, where: str = "config") -> PretrainedConfig:
    """``config`` with only its first ``layers`` decoder layers (1 to its own count; per-layer kinds cut to match)."""
    total = int(_field(config, "num_hidden_layers"))
    if not 1 <= layers <= total:
        raise PacaConfigError(f"{where}: -layers:N keeps the first N of the model's {total} decoder layers; pass N from 1 to {total}.")
    fields = config.to_dict()
    fields["num_hidden_layers"] = layers
    if isinstance(fields.get("layer_types"), list):
        fields["layer_types"] = fields["layer_types"][:layers]
    return type(config).from_dict(fields)


def context_length(config: PretrainedConfig | str) -> int:
    """The context a model allows: ``max_position_embeddings``; for a built-in name, its recorded context_length."""
    if isinstance(config, str):
        name = config.strip().lower()
        if name in BUILTIN_SHAPES:
            return int(BUILTIN_SHAPES[name]["context_length"])
        config = load_config(config)
    value = getattr(config, "max_position_embeddings", None)
    if value is None:
        text_config = getattr(config, "text_config", None)
        value = getattr(text_config, "max_position_embeddings", None)
    if value is None:
        raise PacaConfigError(f"{type(config).__name__} has no max_position_embeddings; cannot tell its context length")
    return int(value)


@dataclass(frozen=True)
class ShapeSummary:
    """The shapes of a decoder-only transformer and its parameter count, for display."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    tied_embeddings: bool
    qkv_bias: bool
    embedding_params: int
    attention_params_per_layer: int
    mlp_params_per_layer: int
    norm_params_per_layer: int
    layer_params: int
    final_norm_params: int
    head_params: int
    parameters: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _field(config: Any, name: str) -> Any:
    value = getattr(config, name, None)
    if value is None:
        raise PacaConfigError(
            f"{type(config).__name__} has no {name}; the planner handles Llama-style decoder-only models "
            "(embedding, attention + gated MLP + RMSNorm per layer, LM head)"
        )
    return value


def summarize(config: PretrainedConfig) -> ShapeSummary:
    """Parameter count from shapes, for a Llama-style decoder (Llama, Mistral, Qwen2 and kin).

    Per layer: q/k/v/o projections (GQA), gate/up/down MLP, two RMSNorm weights; then a final
    norm and the LM head unless tied to the embedding. Biases follow ``attention_bias``/``mlp_bias``
    (q/k/v biases always for Qwen2).
    """
    hidden = int(_field(config, "hidden_size"))
    intermediate = int(_field(config, "intermediate_size"))
    layers = int(_field(config, "num_hidden_layers"))
    heads = int(_field(config, "num_attention_heads"))
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    vocab = int(_field(config, "vocab_size"))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    model_type = str(getattr(config, "model_type", ""))
    attention_bias = bool(getattr(config, "attention_bias", False))
    qkv_bias = attention_bias or model_type in _QKV_BIAS_MODEL_TYPES
    mlp_bias = bool(getattr(config, "mlp_bias", False))

    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    attention = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    if qkv_bias:
        attention += q_out + 2 * kv_out
    if attention_bias:  # o_proj bias (Llama's attention_bias covers all four projections)
        attention += hidden
    mlp = 3 * hidden * intermediate + ((2 * intermediate + hidden) if mlp_bias else 0)
    norms = 2 * hidden
    layer = attention + mlp + norms
    embedding = vocab * hidden
    head = 0 if tied else vocab * hidden
    total = embedding + layers * layer + hidden + head
    return ShapeSummary(
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        context_length=context_length(config),
        tied_embeddings=tied,
        qkv_bias=qkv_bias,
        embedding_params=embedding,
        attention_params_per_layer=attention,
        mlp_params_per_layer=mlp,
        norm_params_per_layer=norms,
        layer_params=layer,
        final_norm_params=hidden,
        head_params=head,
        parameters=total,
    )


def describe(config: PretrainedConfig) -> dict[str, Any]:
    """``summarize(config)`` as a plain dict (for JSON output and display)."""
    return summarize(config).as_dict()
