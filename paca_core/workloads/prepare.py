"""A model set up for one entry: what to call, what trains, its optimizer, and the entry's memory levers.

The one place an entry becomes a trainable model, so ``paca bench`` (real tensors, in a worker
process) and ``paca plan`` (fake tensors) step exactly the same thing. Our methods go through
:func:`paca_core.model.prepare_model` with the configs ``paca train`` would build; the PEFT peers
through ``peft.get_peft_model`` (PEFT's PaCA on our columns: :func:`peft_paca_config`); 4-bit entries hold
the base in 4 bits as their users do (PEFT QLoRA and PEFT PaCA on 4 bits: every linear but the head, then
``prepare_model_for_kbit_training``; QPaCA: ``PaCAConfig.quantize_scope``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

import devices

from ..base_config import ALL_LINEAR, LLAMA_PROJECTIONS, field_default, parse_targets
from ..memory.chunked_loss import DEFAULT_LOSS_CHUNK_TOKENS, chunked_causal_lm_forward
from ..errors import PacaConfigError
from ..extras import MissingExtraError, require_peft_paca
from ..methods.velora import VeLoRAConfig
from ..model import prepare_model
from ..memory.offload import ActivationOffload
from ..memory.quantization import quantize_base
from .accounting import host_tables, tensor_bytes
from .peers import PEERS
from .specs import MethodSpec, build_our_configs


class Unavailable(RuntimeError):
    """The entry cannot run here (a package or module is missing); reported, not raised to the user."""


@dataclass
class Prepared:
    """A model set up for one entry: what to call, what trains, and how it steps."""

    module: nn.Module
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer | None
    forward: Callable[[torch.Tensor], torch.Tensor]
    #: Bytes of optimizer state kept outside ``optimizer`` (MEFT's host rows' Adam moments).
    extra_state: Callable[[], int] = field(default=lambda: 0)
    #: Trainable numbers outside ``params`` (MEFT's host rows).
    extra_trainable: int = 0
    #: zero_grad(set_to_none=...): False under a graph mode that keeps gradient buffers (captured HPU graphs).
    set_to_none: bool = True


def _lm_loss(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda ids: module(input_ids=ids, labels=ids).loss


def target_list(text: str | None) -> list[str] | str:
    """``--target-modules`` as a list, or the seven LLaMA projections every method adapts by default."""
    return parse_targets(text) if text else list(LLAMA_PROJECTIONS)


def _peft_lora_config(rank: int, options: dict, velora: bool):
    import peft

    velora_config = None
    if velora:  # PEFT's VeLoRA, with our velora method's options where the entry sets them, else its defaults
        def option(flag: str, field: str):
            value = options.get(flag)
            return value if value is not None else field_default(VeLoRAConfig, field)

        velora_config = peft.tuners.lora.config.VeloraConfig(
            num_groups=int(option("velora_groups", "num_groups")), init_type=option("velora_init", "init_type")
        )
    # alpha = r (scaling 1), as our methods default to; dropout 0 as ours (a mask would keep full-size tensors).
    return peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=target_list(options.get("target_modules")),
                           velora_config=velora_config)


def peft_paca_config(model: nn.Module, rank: int | None, options: dict):
    """PEFT's ``PacaConfig`` for the modules, columns and scaling our ``paca`` takes on ``model`` with the same
    options: the targets :func:`paca_core.surgery.targets.find_targets` picks, each layer's columns from
    :func:`paca_core.layers.indices.select_columns` given to PEFT as ``paca_indices_pattern`` (one exact name per layer), and
    ``paca_alpha`` our alpha (``r`` by default, scaling 1). So ``peft-paca`` and ``paca`` train the same connections
    and any difference between them is the implementation."""
    import re

    import peft

    from ..layers.indices import select_columns
    from ..methods.paca import given_columns
    from ..surgery.targets import find_targets

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    ours = build_our_configs("paca", rank or 8, options)[0]
    targets = find_targets(model, ours.target_modules, ours.exclude_modules)
    columns = {}
    with unset_fake_temporarily():  # the planner's fake mode: the columns are numbers PEFT's config holds, drawn for real
        for name, linear in targets:
            given = given_columns(ours.columns, name)
            indices = sorted(given) if given is not None else select_columns(linear.in_features, ours.r, ours.seed, name).tolist()
            columns[re.escape(name)] = [int(i) for i in indices]
    alpha = ours.alpha if ours.alpha is not None else ours.r
    return peft.PacaConfig(r=ours.r, paca_alpha=int(alpha) if float(alpha).is_integer() else alpha,
                           target_modules=[name for name, _ in targets], paca_indices_pattern=columns)


def _import_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise Unavailable(f"HF PEFT is not installed ({error}); pip install 'paca-hal[peft]'") from None


def quantize_for_qlora(model: nn.Module, options: dict, upcast: bool = True) -> nn.Module:
    """PEFT QLoRA as its users run it: every linear layer but the output head in 4 bits (what transformers'
    ``BitsAndBytesConfig(load_in_4bit=True)`` loads, whatever the LoRA targets), then PEFT's
    ``prepare_model_for_kbit_training``, which upcasts the parameters left in 16 bits (norms, embeddings, head) to
    fp32 and makes the embeddings' output require grad. Its gradient checkpointing stays a lever of the entry
    (``@gc``), not forced here.

    ``upcast=False`` (``Peer.upcast``) stops after the quantization and freezes the base, leaving norms, embeddings
    and head in the model's dtype: ``peft-qlora-16bit`` is QLoRA as programs run it that never call PEFT's helper
    (torchtune, LitGPT, LLaMA-Factory); ``peft-qpaca`` needs it because PEFT 0.22's PaCA layer multiplies its input
    with the dequantized weight as they come, so on an upcast base (fp32 activations, bf16 weights) it raises a dtype
    mismatch outside autocast; not upcast, the base is the very one ``qpaca`` trains on (``quantize_scope`` base)."""
    import peft

    try:
        model = quantize_base(model, options.get("quantize") or "nf4", target_modules=ALL_LINEAR)
    except ImportError as error:
        raise Unavailable(str(error).splitlines()[0]) from None
    if not upcast:
        model.requires_grad_(False)
        return model
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _dequantize_fake_4bit(peft_model: nn.Module) -> None:
    """PEFT's PaCA layers on the planner's fake 4-bit layers (:mod:`paca_core.memory.fake_4bit`): PEFT dequantizes a weight
    it recognises by its class name, ``Params4bit``, which a fake tensor cannot carry, so each such layer is given the
    dequantization PEFT runs on a real one (bitsandbytes' ``dequantize_4bit`` of the packed weight with its
    ``quant_state``). Layers on real ``Params4bit`` weights are left as PEFT made them."""
    import bitsandbytes as bnb
    from peft.tuners.paca.layer import PacaLayer

    for module in peft_model.modules():
        if not isinstance(module, PacaLayer) or module.quantization_backend is None:
            continue
        weight = module.get_base_layer().weight
        if type(weight).__name__ != "Params4bit" and hasattr(weight, "quant_state"):
            module._get_weight_for_matmul = lambda weight=weight: bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


def prepare(spec: MethodSpec, model: nn.Module, rank: int | None, options: dict, device: torch.device, lr: float,
            place: bool = True, configs: list | None = None) -> Prepared:
    """Set ``model`` up for ``spec``; the optimizer is AdamW in the device's form (PEFT LoRA-FA: its own).
    ``place=False`` leaves the model where it is (the planner's fake tensors cannot be moved);
    ``configs``: our method's configs as ``paca train`` built them (instead of the bench's)."""
    make_adamw = lambda params: devices.make_adamw(params, device, lr=lr, eps=1e-8)  # noqa: E731
    if spec.kind == "floor":
        model.requires_grad_(False)
        embed = model.get_input_embeddings()

        def forward(ids: torch.Tensor) -> torch.Tensor:
            # Nothing trains; back-propagating to the input makes autograd keep what the frozen model needs.
            embeds = embed(ids).detach().requires_grad_(True)
            return model(inputs_embeds=embeds, labels=ids).loss

        return Prepared(model, [], None, forward)
    if spec.kind == "full":
        model.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        return Prepared(model, params, make_adamw(params), _lm_loss(model))
    if spec.kind == "peft":
        _import_peft()  # before quantizing: a missing package is said first
        if PEERS[spec.method].tuner == "paca":
            try:
                require_peft_paca(spec.method)
            except MissingExtraError as error:
                raise Unavailable(str(error)) from None
    if spec.four_bit and spec.kind == "peft":
        model = quantize_for_qlora(model, options, upcast=PEERS[spec.method].upcast)
    elif spec.four_bit:  # ours (qpaca): the method quantizes the base as paca train --quantize does (quantize_scope)
        options = {**options, "quantize": options.get("quantize") or "nf4"}
    if spec.kind == "peft":
        return _prepare_peft(spec, model, rank, options, lr, make_adamw)
    configs = configs if configs is not None else build_our_configs(spec.equivalent, rank or 8, options)
    try:
        adapted = prepare_model(model, configs, device=device if place else None)
    except ImportError as error:  # bitsandbytes missing for a 4-bit entry
        raise Unavailable(str(error).splitlines()[0]) from None
    adapted.set_loss_chunk_tokens(None)  # every candidate on the full logits: the peers have no chunked loss
    params = adapted.trainable_parameters()
    tables = host_tables(adapted)
    extra_trainable = sum(t.keys.numel() + t.values.numel() for t in tables)
    host_state = lambda: tensor_bytes(v for t in tables for v in t.optimizer_state().values())  # noqa: E731
    return Prepared(adapted, params, make_adamw(params), _lm_loss(adapted), host_state, extra_trainable)


def _prepare_peft(spec: MethodSpec, model: nn.Module, rank: int | None, options: dict, lr: float, make_adamw) -> Prepared:
    import peft

    peer = PEERS[spec.method]
    if peer.tuner == "paca":
        config = peft_paca_config(model, rank, options)
    else:
        config = _peft_lora_config(rank, options, velora=peer.velora)
    peft_model = peft.get_peft_model(model, config)
    if peer.tuner == "paca" and peer.four_bit:
        _dequantize_fake_4bit(peft_model)
    if peer.lorafa:
        from peft.optimizers import create_lorafa_optimizer

        optimizer = create_lorafa_optimizer(peft_model, r=rank, lora_alpha=rank, lr=lr)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    else:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = make_adamw(params)
    return Prepared(peft_model, params, optimizer, _lm_loss(peft_model))


def apply_levers(prepared: Prepared, model: nn.Module, levers: tuple[str, ...], offload: type | None = None,
                 loss_chunk_tokens: int | None = None) -> None:
    """Add an entry's memory levers (``MethodSpec.levers``) to a prepared entry, as ``paca train`` would.

    ``model``: the Hugging Face model :func:`prepare` set up (PEFT injects into it in place).
    ``offload``: the activation-offload class (the planner passes its stand-in). ``loss_chunk_tokens``:
    chunk size for ``chunked-loss`` (default: paca train's)."""
    if "gc" in levers:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise PacaConfigError(f"{type(model).__name__} does not support gradient checkpointing (lever 'gc').")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if "chunked-loss" in levers:
        chunk = loss_chunk_tokens or DEFAULT_LOSS_CHUNK_TOKENS
        if hasattr(prepared.module, "set_loss_chunk_tokens"):  # ours: paca train's own chunked loss
            prepared.module.set_loss_chunk_tokens(chunk)
        else:  # a peer: the same pure-torch fused linear cross entropy around its model

            def chunked_forward(ids: torch.Tensor) -> torch.Tensor:
                output = chunked_causal_lm_forward(model, chunk, input_ids=ids, labels=ids)
                if output is None:
                    raise PacaConfigError(f"lever 'chunked-loss' does not apply to {type(model).__name__} (see the log).")
                return output.loss

            prepared.forward = chunked_forward
    if "offload" in levers:
        (offload or ActivationOffload)(model, "decoder-layers")
