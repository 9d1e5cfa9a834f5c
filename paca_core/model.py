"""``prepare_model`` and the :class:`AdaptedModel` wrapper users hold (PEFT-style verbs)."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from devices import resolve_device

from .base_config import ALL_LINEAR, MethodConfig, method_name
from .files.checkpoint import finish_loading, plan_loading, save_adapter
from .memory.chunked_loss import DEFAULT_LOSS_CHUNK_TOKENS, check_chunk_tokens, chunked_causal_lm_forward
from .errors import PacaConfigError
from .layers import AdapterLayer, sync_layers
from .layers.partial_connection import PaCALinear
from .surgery.placement import check_mergeable, check_targets_placement, move_model
from .surgery.targets import find_targets, freeze, replace_module

logger = logging.getLogger(__name__)


def _as_list(configs: MethodConfig | Sequence[MethodConfig]) -> list[MethodConfig]:
    items = [configs] if isinstance(configs, MethodConfig) else list(configs)
    if not items or not all(isinstance(c, MethodConfig) for c in items):
        raise PacaConfigError("Pass a method config (e.g. PaCAConfig(r=8)) or a list of them.")
    for config in items:
        config.validate()
    return items


def prepare_model(
    model: nn.Module, configs: MethodConfig | Sequence[MethodConfig], device: str | torch.device | None = None
) -> "AdaptedModel":
    """Freeze ``model`` and replace its targeted modules with the methods' adapter layers, in place.

    ``device=None`` (default) moves nothing: every adapter is created beside the weight it adapts, so the
    Trainer, accelerate, torchrun, DeepSpeed or a ``device_map`` that runs the script places the model, as
    with PEFT's ``get_peft_model``. An explicit ``device`` (``auto``/``cpu``/``cuda[:N]``/``hpu[:N]``)
    moves the whole model there first.

    The base keeps the dtype it was loaded in; adapter parameters (and so their gradients and optimizer state)
    are fp32 whatever it is. To load as ``paca train --dtype auto`` does, pass ``devices.default_dtype(device)``
    as ``from_pretrained``'s dtype: bf16 on GPUs and Gaudi, and on CPUs that multiply bf16 natively
    (AVX512-BF16 or AMX); fp32 on other CPUs, where bf16 would be emulated and slower.
    """
    if isinstance(model, AdaptedModel):
        raise ValueError("This model is already prepared; call prepare_model on the base model once.")
    configs = _as_list(configs)
    primaries = [c for c in configs if not c.modifier]
    modifiers = [c for c in configs if c.modifier]
    if not primaries:
        raise PacaConfigError(
            f"{method_name(configs)} only modifies layers another method creates; combine it, e.g. lora+velora."
        )
    plan: dict[str, tuple[MethodConfig, nn.Module]] = {}
    for config in primaries:
        for name, linear in find_targets(model, config.target_modules, config.exclude_modules, types=config.target_types):
            if name in plan:
                raise PacaConfigError(
                    f"{name} is targeted by both {plan[name][0].method} and {config.method}; give the methods "
                    "disjoint target_modules (or exclude_modules)."
                )
            plan[name] = (config, linear)
    narrow = [(n, c, m) for n, (c, m) in plan.items() if getattr(c, "r", 0) > getattr(m, "in_features", 0)]
    if narrow:
        listed = ", ".join(f"{n} (in_features={m.in_features})" for n, _, m in narrow[:5])
        raise ValueError(
            f"r={narrow[0][1].r} exceeds the input width of {listed}; choose r <= "
            f"{min(m.in_features for _, _, m in narrow)} or exclude those modules."
        )
    _refuse_partitioned(plan)
    if device is not None:
        move_model(model, resolve_device(device))  # refused for offloaded or device_map-dispatched models
    check_targets_placement(plan)  # before any surgery: methods that cannot use an offloaded weight say so
    freeze(model)
    for config in configs:  # e.g. QPaCA's whole-base 4-bit quantization, before the targets are wrapped
        config.prepare_base(model, set(plan))
    created = {}
    for name, (config, module) in sorted(plan.items(), key=lambda item: -item[0].count(".")):  # deepest first
        created[name] = _created_layer(config, module, name)
        created[name].bind_config(config, configs.index(config))  # its method and config index (saved in checkpoints)
        if not created[name].attaches:
            replace_module(model, name, created[name])
    for modifier in modifiers:
        _apply_modifier(model, modifier, created)
    logger.info("%s: adapted %d modules on %s", method_name(configs), len(plan), _devices_text(created.values()))
    return AdaptedModel(model, configs)


def _created_layer(config: MethodConfig, module: nn.Module, name: str) -> AdapterLayer:
    """``config.create_layer``, checked: everything after surgery (checkpoints, merge, export) relies on the layer contract."""
    layer = config.create_layer(module, name)
    if not isinstance(layer, AdapterLayer):
        raise TypeError(
            f"{type(config).__name__}.create_layer returned a {type(layer).__name__} for {name}; it must return an "
            "AdapterLayer (subclass paca_core.LinearAdapterLayer or AdapterLayer)."
        )
    return layer


def _refuse_partitioned(plan: dict[str, tuple[MethodConfig, nn.Module]]) -> None:
    """Weights DeepSpeed ZeRO-3 partitioned while loading (``zero.Init``) are empty here: adapters built on
    them would read nothing (PaCA's columns) and silently train a different model."""
    partitioned = [name for name, (_, module) in plan.items() if hasattr(getattr(module, "weight", None), "ds_tensor")]
    if partitioned:
        raise PacaConfigError(
            f"{partitioned[0]} (and {len(partitioned) - 1} more) were partitioned by DeepSpeed ZeRO-3 while loading "
            "(TrainingArguments(deepspeed=<stage 3>) made before from_pretrained turns on zero.Init). Load the model "
            "and call prepare_model first, then make the TrainingArguments: the Trainer partitions the prepared model."
        )


def _devices_text(layers: Iterable[AdapterLayer]) -> str:
    """The devices adapter tensors ended up on, for the log line (several under a device_map)."""
    found = {t.device for layer in layers for t in layer.adapter_state().values() if isinstance(t, torch.Tensor)}
    return ", ".join(sorted(str(d) for d in found)) or "no device"


def _apply_modifier(model: nn.Module, modifier: MethodConfig, created: dict[str, AdapterLayer]) -> None:
    """Attach a modifier (VeLoRA) to the adapted layers it targets that support it."""
    supported = {n: layer for n, layer in created.items() if layer.supports_compression()}
    if not supported:
        raise PacaConfigError(
            f"{modifier.method} compresses inputs kept only for a weight gradient; none of the adapted layers has one "
            "(it applies to lora and full layers: PaCA already keeps only r columns and LoRA-FA none)."
        )
    if modifier.target_modules == ALL_LINEAR:
        chosen = list(supported)
    else:
        chosen = [n for n, _ in find_targets(model, modifier.target_modules, modifier.exclude_modules, types=(AdapterLayer,))]
        unsupported = [n for n in chosen if n not in supported]
        if unsupported:
            raise PacaConfigError(
                f"{modifier.method} targets {', '.join(unsupported[:3])}, whose method keeps no compressible input; "
                "target lora or full layers."
            )
    for name in chosen:
        supported[name].attach_compressor(modifier.create_compressor(supported[name]))


class AdaptedModel(nn.Module):
    """A causal LM with adapter layers. Attribute access falls through to the wrapped model."""

    def __init__(self, model: nn.Module, configs: list[MethodConfig]):
        super().__init__()
        self.base_model = model
        self.configs = configs
        #: Tokens per chunk of the LM head + loss in training forwards with ``labels``
        #: (:mod:`paca_core.memory.chunked_loss`); None (the default for a model used directly, whose training
        #: forward then returns logits as usual) computes the full logits. ``paca train`` and
        #: ``PacaTrainer`` turn it on (DEFAULT_LOSS_CHUNK_TOKENS) unless :meth:`set_loss_chunk_tokens` chose.
        self.loss_chunk_tokens: int | None = None
        self.loss_chunk_tokens_chosen = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    @property
    def method(self) -> str:
        return method_name(self.configs)

    def forward(self, *args, **kwargs):
        """The wrapped model's forward. In training (``self.training`` and gradients on) with ``labels``,
        the LM head and loss run over chunks of ``loss_chunk_tokens`` tokens (:mod:`paca_core.memory.chunked_loss`):
        the same loss, no full logits, and the output's ``logits`` is None. Evaluation, generation and
        calls without labels return the logits as usual; a model the chunked path cannot take (a
        quantized or custom head, ...) runs the ordinary forward."""
        if self.loss_chunk_tokens is not None and self.training and torch.is_grad_enabled() and kwargs.get("labels") is not None:
            call = dict(kwargs)
            if len(args) == 1 and "input_ids" not in kwargs:
                call["input_ids"] = args[0]
            if len(args) == 0 or (len(args) == 1 and "input_ids" not in kwargs):
                output = chunked_causal_lm_forward(self.base_model, self.loss_chunk_tokens, **call)
                if output is not None:
                    return output
        return self.base_model(*args, **kwargs)

    def set_loss_chunk_tokens(self, chunk_tokens: int | None) -> "AdaptedModel":
        """Chunk the LM head and loss over ``chunk_tokens`` tokens in training (> 0; larger than a batch's
        tokens = one chunk), or None for the full logits."""
        self.loss_chunk_tokens = check_chunk_tokens(chunk_tokens)
        self.loss_chunk_tokens_chosen = True
        return self

    def default_loss_chunking(self) -> "AdaptedModel":
        """Chunk the loss over DEFAULT_LOSS_CHUNK_TOKENS tokens unless :meth:`set_loss_chunk_tokens` chose already
        (what the trainers call: they never read a training forward's logits)."""
        if not self.loss_chunk_tokens_chosen:
            self.loss_chunk_tokens = DEFAULT_LOSS_CHUNK_TOKENS
        return self

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """HF activation checkpointing on the wrapped model (each decoder layer recomputed in backward),
        non-reentrant unless ``gradient_checkpointing_kwargs`` says otherwise. ``kwargs`` (e.g. transformers
        5's ``every_n_layers``, ``offload``) go to the wrapped model's method. A model whose
        ``supports_gradient_checkpointing`` is False is refused (PacaConfigError), never silently ignored."""
        if not getattr(self.base_model, "supports_gradient_checkpointing", False):
            raise PacaConfigError(
                f"{type(self.base_model).__name__} does not support gradient checkpointing "
                "(its supports_gradient_checkpointing is False); train without --gradient-checkpointing."
            )
        checkpoint_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)  # transformers >= 5's name
        if enable is not None:
            enable(activation_checkpointing_kwargs=checkpoint_kwargs, **kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """transformers 5's name for :meth:`gradient_checkpointing_enable`."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        disable = getattr(self.base_model, "activation_checkpointing_disable", None) or self.base_model.gradient_checkpointing_disable
        disable()

    activation_checkpointing_disable = gradient_checkpointing_disable

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    # --- introspection ---------------------------------------------------------------------------
    def adapter_layers(self) -> dict[str, AdapterLayer]:
        """Adapter layers keyed by the name of the module each adapts."""
        return {m.module_name or name: m for name, m in self.base_model.named_modules() if isinstance(m, AdapterLayer)}

    def host_parameter_count(self) -> int:
        """Parameters trained in host memory (MEFT's key/value rows), not counted by ``parameter_counts``."""
        return sum(m.table.keys.numel() + m.table.values.numel() for m in self._host_layers())

    def host_traffic(self) -> dict[str, int]:
        """Bytes host-memory layers moved so far, and the minimum (selected rows only), summed over layers."""
        totals: dict[str, int] = {}
        for layer in self._host_layers():
            for key, value in layer.table.traffic.items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def _host_layers(self) -> list[AdapterLayer]:
        return [m for m in self.adapter_layers().values() if m.table is not None]

    def host_optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer state kept in host memory by layers that update themselves there (MEFT), by layer."""
        return {m.module_name: m.table.optimizer_state() for m in self._host_layers()}

    def load_host_optimizer_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        layers = self.adapter_layers()
        for name, layer_state in state.items():
            layers[name].table.load_optimizer_state(layer_state)

    def discard_host_gradients(self) -> None:
        """Drop host-side gradients not yet applied (call when a step is skipped)."""
        for layer in self._host_layers():
            layer.table.discard_gradients()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def sync_adapters(self) -> None:
        """Rewrite PaCA layers' adapted columns now (only needed after editing deltas through ``.data``)."""
        sync_layers([m for m in self.adapter_layers().values() if isinstance(m, PaCALinear) and m.adapter_enabled])

    # --- PEFT-style verbs ------------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the pretrained model inside this block; the adapter comes back afterwards."""
        layers = list(self.adapter_layers().values())
        for layer in layers:
            layer.set_adapter_enabled(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.set_adapter_enabled(True)

    def merge_and_unload(self) -> nn.Module:
        """The plain model with every ΔW folded into its weight (adapter layers removed)."""
        return self._unload(merge=True)

    def unload(self) -> nn.Module:
        """The plain pretrained model (adapters discarded, original weights restored)."""
        return self._unload(merge=False)

    def _unload(self, merge: bool) -> nn.Module:
        layers = list(self.adapter_layers().items())
        blocked = sorted({layer.method for _, layer in layers if not layer.mergeable})
        if merge and blocked:
            raise PacaConfigError(
                f"{', '.join(blocked)} adds a nonlinear branch that cannot be folded into the weights; keep the adapted "
                "model (save_pretrained / from_pretrained) or call unload() to drop the adapter."
            )
        if merge:
            check_mergeable([(name, layer) for name, layer in layers if not layer.attaches])
        for name, layer in layers:
            if layer.attaches:
                layer.detach(self.base_model.get_submodule(name))
            else:
                replace_module(self.base_model, name, layer.unload(merge=merge))
        return self.base_model

    def save_pretrained(self, directory: str | Path, is_main_process: bool = True, **extra_metadata) -> Path:
        """Write the adapter (safetensors + JSON config) atomically to ``directory``.

        Under FSDP call it on every process (the shards are gathered); only ``is_main_process`` writes.
        """
        return save_adapter(self, directory, extra_metadata=extra_metadata, is_main_process=is_main_process)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: str | Path, device: str | torch.device | None = None, is_trainable: bool = False
    ) -> "AdaptedModel":
        """Prepare ``model`` as the checkpoint describes and load its adapter tensors into it (``device`` as in
        :func:`prepare_model`: None keeps the model where it is, adapters beside their weights)."""
        return load_adapter(model, directory, device=device, is_trainable=is_trainable)


def load_adapter(model: nn.Module, directory: str | Path, device=None, is_trainable: bool = False, method: str | None = None) -> AdaptedModel:
    """Prepare ``model`` as the checkpoint describes and load its adapter tensors (all checked first)."""
    configs, saved_targets, tensors = plan_loading(model, directory, method)
    adapted = prepare_model(model, configs, device=device)
    finish_loading(adapted, saved_targets, tensors, directory, is_trainable)
    return adapted


#: PEFT-style name kept for PaCA users.
PacaModel = AdaptedModel
