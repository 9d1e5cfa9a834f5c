"""DeepSpeed ZeRO 1/2/3 for adapted models (``paca train --deepspeed``, ``TrainingArguments(deepspeed=...)``).

DeepSpeed is an optional extra (``pip install 'paca-hal[deepspeed]'``) imported only here, and only
when asked for. What it must know about our layers, and what we need from it, lives in this module:

* **Config.** A stage name (``zero1``/``zero2``/``zero3``) expands to a config built from our flags;
  a user's JSON gets our flags only in its ``"auto"`` fields, and a value that contradicts a flag is
  an error, never silently overridden (:func:`build_config`).
* **ZeRO-3 partitions every parameter** (flattened, split by element count, empty outside the
  forward that needs it). Adapter layers read their base weights inside their own forward, so the
  parameters each declares (``layer.base_parameters()``) are registered as its *external* parameters: DeepSpeed
  gathers them for that forward and its backward (:func:`initialize`).
* **After each optimizer step** the layers that update themselves from a global optimizer post-step
  hook find their parameters by identity; DeepSpeed's inner optimizer steps flat partitions instead, so
  :func:`after_step` calls those hooks once more with the model's own parameters. A layer that keeps
  adapter state inside its base weight writes it into each rank's own flat partition through its class's
  ``write_partitioned`` hook (:func:`write_into_partitions` dispatches; the layer module implements it), so
  the frozen weights themselves never cross. This module names no method.
* **Checkpoints** hold whole tensors in the single-process format: adapters gathered, optimizer state
  assembled with DeepSpeed's tensor-fragment API (:func:`full_optimizer_state`), so a ZeRO checkpoint
  resumes with any number of processes, with or without DeepSpeed (:func:`restore_optimizer_state`).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from ..errors import CheckpointError, PacaConfigError

logger = logging.getLogger(__name__)

#: Built-in stage names for ``--deepspeed``.
STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
INSTALL_HINT = "pip install 'paca-hal[deepspeed]' (on CPU-only machines: DS_BUILD_OPS=0 pip install deepspeed)"
#: Optimizer-state keys of AdamW, the optimizer paca train builds.
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")
#: What a resumed optimizer group takes from the saved one (the schedule's lr and AdamW's settings); the
#: implementation flags (fused, foreach) stay DeepSpeed's.
SCHEDULED_HYPERPARAMETERS = ("lr", "initial_lr", "betas", "eps", "weight_decay")


@functools.lru_cache(maxsize=None)
def deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def require_deepspeed():
    """The ``deepspeed`` module, or a clear error saying how to install it."""
    if not deepspeed_available():
        raise PacaConfigError(f"--deepspeed needs DeepSpeed, which is not installed: {INSTALL_HINT}.")
    import deepspeed

    return deepspeed


# --- config ---------------------------------------------------------------------------------------
def _read_config(spec: str | Path | dict) -> tuple[dict, str]:
    """The config as a dict (a copy) and where it came from, for messages."""
    if isinstance(spec, dict):
        return copy.deepcopy(spec), "the DeepSpeed config"
    text = str(spec)
    if text.lower() in STAGES:
        return {"zero_optimization": {"stage": STAGES[text.lower()]}}, f"--deepspeed {text.lower()}"
    path = Path(text).expanduser()
    if not path.is_file():
        raise PacaConfigError(
            f"--deepspeed {text!r}: not a stage name ({', '.join(STAGES)}) and no such JSON file. Pass zero1, zero2, "
            "zero3 or the path of a DeepSpeed config."
        )
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PacaConfigError(f"--deepspeed {path}: not valid JSON ({error}).") from None
    if not isinstance(document, dict):
        raise PacaConfigError(f"--deepspeed {path}: a DeepSpeed config is a JSON object, found {type(document).__name__}.")
    return document, str(path)


def requested_stage(spec: str | Path | dict) -> int | None:
    """The ZeRO stage ``spec`` asks for (None when it does not say), before any flags are filled in."""
    config, _ = _read_config(spec)
    stage = (config.get("zero_optimization") or {}).get("stage")
    return stage if isinstance(stage, int) else None


def config_stage(config: dict) -> int:
    """The ZeRO stage of a built config (0 when it has none)."""
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def build_config(
    spec: str | Path | dict,
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    max_grad_norm: float,
    dtype: torch.dtype,
) -> dict:
    """The DeepSpeed config for a run: ``spec`` (stage name, JSON path or dict) with our flags filled in.

    Our flags fill the fields a built-in stage leaves open and a user's ``"auto"`` (or missing) fields:
    the micro-batch and accumulation, the global batch (micro × accumulation × processes), gradient
    clipping and the precision (``bf16``/``fp16`` follow the model's dtype). A user's value that
    differs from the flag is an error that names both. paca-hal builds the optimizer and schedule
    itself, so ``optimizer``/``scheduler`` sections are refused rather than ignored.
    """
    config, origin = _read_config(spec)
    problems: list[str] = []
    zero = config.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise PacaConfigError(f"{origin}: 'zero_optimization' must be an object.")
    stage = zero.get("stage", "auto")
    if stage == "auto":
        problems.append("'zero_optimization.stage' must be set (1, 2 or 3)")
    elif not (isinstance(stage, int) and stage in (1, 2, 3)):
        problems.append(
            f"ZeRO stage must be 1, 2 or 3 (got {stage!r}); stage 0 is plain data parallelism, which paca train runs as "
            "DDP without --deepspeed"
        )
    for section in ("optimizer", "scheduler"):
        if section in config:
            problems.append(
                f"remove its '{section}' section: paca train builds AdamW and the learning-rate schedule from its own flags "
                "(--lr, --weight-decay, --warmup-steps)"
            )
    for kind in ("offload_param", "offload_optimizer"):
        if str((zero.get(kind) or {}).get("device", "none")).lower() == "nvme":
            problems.append(f"{kind} to NVMe is not supported by paca-hal's adapters; use device 'cpu' or 'none'")
    flags = {
        "train_micro_batch_size_per_gpu": (micro_batch_size, "--batch-size"),
        "gradient_accumulation_steps": (grad_accum, "--grad-accum"),
        "train_batch_size": (micro_batch_size * grad_accum * world_size, f"--batch-size × --grad-accum × {world_size} processes"),
        "gradient_clipping": (float(max_grad_norm), "--max-grad-norm"),
    }
    for key, (value, flag) in flags.items():
        current = config.get(key, "auto")
        if current == "auto":
            config[key] = value
        elif not isinstance(current, (int, float)) or float(current) != float(value):
            problems.append(f"'{key}' is {current!r} but {flag} means {value!r} (set it to \"auto\" or make them agree)")
    for section, wanted in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        block = config.setdefault(section, {})
        enabled = block.get("enabled", "auto")
        if enabled == "auto":
            block["enabled"] = wanted
        elif bool(enabled) != wanted:
            problems.append(
                f"'{section}.enabled' is {enabled!r} but the model is loaded as {str(dtype).replace('torch.', '')} "
                f"(--dtype): pass --dtype {section if enabled else 'fp32'} or set it to \"auto\""
            )
    if problems:
        raise PacaConfigError(f"{origin}: " + "; ".join(problems) + ".")
    # Quiet and permissive defaults, only where the user did not choose: our AdamW may be a device's
    # fused one (Habana FusedAdamW), which DeepSpeed has not listed as tested.
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("steps_per_print", 2**31 - 1)
    config.setdefault("wall_clock_breakdown", False)
    return config


# --- ZeRO-3 parameters ----------------------------------------------------------------------------
def is_partitioned(tensor: Any) -> bool:
    """Whether ``tensor`` is a ZeRO-3 parameter (its data lives in per-rank flat partitions)."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_tensor")


@contextlib.contextmanager
def gathered(parameters: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """ZeRO-3 parameters made whole for the block (a collective: every rank enters it, in the same order).

    ``modifier_rank``: the rank whose in-place changes are kept (re-partitioned) on exit; None: read only.
    A no-op for ordinary tensors.
    """
    partitioned = [p for p in parameters if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def full_parameter(tensor: torch.Tensor) -> torch.Tensor:
    """A whole copy of a ZeRO-3 parameter (a collective); other tensors as they are."""
    if not is_partitioned(tensor):
        return tensor
    with gathered([tensor]):
        return tensor.detach().clone()


def partition_bounds(parameter: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the flat (row-major) elements this rank's partition of a ZeRO-3 parameter holds."""
    import torch.distributed as dist

    size = int(parameter.ds_tensor.ds_numel)
    rank = dist.get_rank(group=parameter.ds_process_group)
    return rank * size, (rank + 1) * size


def partitioned_layers(layers: Iterable[nn.Module]) -> list:
    """The adapter layers among ``layers`` whose base weight (``layer.base_weight()``) ZeRO-3 partitions."""
    return [layer for layer in layers if is_partitioned(layer.base_weight())]


def write_into_partitions(layers: Iterable[nn.Module]) -> None:
    """Layers that keep adapter state inside their base weight, brought up to date in each rank's own ZeRO-3
    partition: each layer class's ``write_partitioned`` hook (``AdapterLayer.write_partitioned``) gets its layers,
    classes in first-seen order (a collective: every rank calls it with the same layers)."""
    by_class: dict[type, list] = {}
    for layer in partitioned_layers(layers):
        by_class.setdefault(type(layer), []).append(layer)
    for cls, group in by_class.items():
        cls.write_partitioned(group)


# --- the engine -------------------------------------------------------------------------------------
def _register_base_parameters(model: nn.Module) -> int:
    """ZeRO-3: an adapter layer's forward reads its base layer's parameters, so DeepSpeed must gather
    them for that layer's forward and backward too."""
    from deepspeed.runtime.zero import register_external_parameter

    count = 0
    for layer in model.adapter_layers().values():
        for parameter in layer.base_parameters():  # declared by the layer (AdapterLayer.base_parameters)
            register_external_parameter(layer, parameter)
            count += 1
    return count


def refuse_unsupported(model: nn.Module, stage: int) -> None:
    """Layers whose state DeepSpeed cannot hold are refused before anything is partitioned."""
    refusing = sorted({type(layer).__name__ for layer in model.adapter_layers().values() if not layer.shardable})
    if refusing:
        raise PacaConfigError(
            f"{', '.join(refusing)} cannot run under DeepSpeed ZeRO (its bitsandbytes 4-bit base weights are not "
            "parameters ZeRO can broadcast or partition); train it with DDP (drop --deepspeed)."
        )


class ZeroEngine:
    """A DeepSpeed engine over an adapted model, with what our loop and checkpoints need from it."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: dict):
        deepspeed = require_deepspeed()
        refuse_unsupported(model, config_stage(config))
        # State a resume put into the optimizer: DeepSpeed would drop it; it goes into the partitions after.
        pending = {p: dict(optimizer.state[p]) for group in optimizer.param_groups for p in group["params"] if p in optimizer.state}
        for parameter in pending:
            del optimizer.state[parameter]
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        # The model's parameters per group as DeepSpeed keeps them (it drops empty groups).
        self._attach(model, engine, model_parameter_groups(engine.optimizer))
        if pending:
            self.restore_optimizer_state(pending)

    @classmethod
    def around(cls, engine, model: nn.Module | None = None) -> "ZeroEngine":
        """The same view of an engine someone else made (the Hugging Face Trainer through accelerate).

        ``model``: the AdaptedModel, when the engine wraps its inner transformers model (TRL's trainer)."""
        self = cls.__new__(cls)
        model = model if model is not None else engine.module
        refuse_unsupported(model, int(engine.zero_optimization_stage()))
        self._attach(model, engine, model_parameter_groups(engine.optimizer))
        return self

    def _attach(self, model: nn.Module, engine, group_parameters: list[list[torch.Tensor]]) -> None:
        self.model = model
        self.engine = engine
        self.optimizer = engine.optimizer  # DeepSpeed's ZeRO optimizer (its inner torch optimizer steps the partitions)
        self.group_parameters = group_parameters
        self.stage = int(engine.zero_optimization_stage())
        if self.stage == 3 and not getattr(model, "_paca_zero3_registered", False):
            registered = _register_base_parameters(model)
            for layer in model.adapter_layers().values():
                layer.mark_sharded()
            model._paca_zero3_registered = True
            logger.info("DeepSpeed ZeRO-3: %d base parameters gathered with their adapter layers", registered)
        logger.info("DeepSpeed ZeRO-%d engine over %d processes", self.stage, engine.world_size)

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer DeepSpeed steps (on flat partitions)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def model_param_groups(self) -> list[dict]:
        """The optimizer's param groups as they would be without DeepSpeed: live hyperparameters, model parameters."""
        return _ParameterGroupsView(self.group_parameters, self.inner_optimizer.param_groups).param_groups

    def parameters_in_order(self) -> list[torch.Tensor]:
        return [p for params in self.group_parameters for p in params]

    def after_step(self) -> None:
        """Run the global optimizer post-step hooks with the model's own parameters (see module doc)."""
        run_post_step_hooks(self.group_parameters, self.inner_optimizer.param_groups)

    # --- optimizer state, whole --------------------------------------------------------------------
    def _step_count(self) -> torch.Tensor | None:
        for state in self.inner_optimizer.state.values():
            if "step" in state:
                return state["step"].detach().clone()
        return None

    def full_optimizer_state(self) -> dict:
        """The optimizer's state dict in torch AdamW's single-process format (a collective under ZeRO-3)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        step = self._step_count()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for index, parameter in enumerate(self.parameters_in_order()):
            entry = {}
            for key in ADAM_STATE_KEYS:
                value = safe_get_full_optimizer_state(parameter, key) if step is not None else None
                if value is not None:
                    entry[key] = value.detach().to("cpu").reshape(parameter.ds_shape if is_partitioned(parameter) else parameter.shape).clone()
            if entry:
                entry["step"] = step.to("cpu").clone()  # one tensor per parameter: AdamW increments it in place
                state[index] = entry
        groups, first = [], 0
        for params, live in zip(self.group_parameters, self.inner_optimizer.param_groups):
            groups.append({**{k: v for k, v in live.items() if k != "params"}, "params": list(range(first, first + len(params)))})
            first += len(params)
        return {"state": state, "param_groups": groups}

    def load_optimizer_state_dict(self, state_dict: dict) -> None:
        """The inverse of :meth:`full_optimizer_state` (one saved by any process count, or by torch's AdamW in
        one process): whole per-parameter state into this engine's partitions, and the saved hyperparameters
        (the scheduled lr) into its live groups."""
        saved_groups = align_saved_groups(state_dict.get("param_groups", []), self.model_param_groups())
        state = {int(index): entry for index, entry in state_dict["state"].items()}
        pending = {
            parameter: state[int(index)]
            for saved, parameters in zip(saved_groups, self.group_parameters)
            for index, parameter in zip(saved["params"], parameters) if int(index) in state
        }
        for live, saved in zip(self.inner_optimizer.param_groups, saved_groups):
            live.update({key: saved[key] for key in SCHEDULED_HYPERPARAMETERS if key in saved})
        self.restore_optimizer_state(pending)

    def _flat_partitions(self) -> list[torch.Tensor]:
        """The fp32 flat partitions DeepSpeed's inner optimizer steps (ZeRO-3 and ZeRO-1/2 name them differently)."""
        for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
            flats = getattr(self.optimizer, name, None)
            if flats:
                return list(flats)
        return [p for group in self.inner_optimizer.param_groups for p in group["params"]]

    def restore_optimizer_state(self, pending: dict[torch.Tensor, dict[str, torch.Tensor]]) -> None:
        """Put whole per-parameter AdamW state (from a checkpoint) into DeepSpeed's partitions."""
        from deepspeed.utils import safe_set_full_optimizer_state

        steps = [entry["step"] for entry in pending.values() if "step" in entry]
        inner = self.inner_optimizer
        for flat in self._flat_partitions():  # torch AdamW creates its state lazily; make it now, as it would
            if flat not in inner.state or "exp_avg" not in inner.state[flat]:
                inner.state[flat] = {
                    "step": steps[0].detach().clone().to(torch.float32) if steps else torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format),
                }
        link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO-1/2 link each parameter's view into the flat state after its first step
            self.optimizer._hp_optimizer_states_linked = False
            link()
        for parameter, entry in pending.items():
            for key in ADAM_STATE_KEYS:
                if key in entry:
                    safe_set_full_optimizer_state(parameter, entry[key].to(torch.float32), key)


def model_parameter_groups(zero_optimizer) -> list[list[torch.Tensor]]:
    """The model's own parameters behind each param group of a ZeRO optimizer's inner torch optimizer.

    ZeRO-1/2 keep one list per group (``bit16_groups``); ZeRO-3 splits groups into sub-groups and maps each
    back (``sub_group_to_group_id``). Anything else steps the model's parameters directly.
    """
    inner = getattr(zero_optimizer, "optimizer", zero_optimizer)
    groups: list[list[torch.Tensor]] = [[] for _ in inner.param_groups]
    if hasattr(zero_optimizer, "fp16_groups") and hasattr(zero_optimizer, "sub_group_to_group_id"):
        for sub_group, parameters in enumerate(zero_optimizer.fp16_groups):
            groups[zero_optimizer.sub_group_to_group_id[sub_group]].extend(parameters)
    elif hasattr(zero_optimizer, "bit16_groups"):
        for index, parameters in enumerate(zero_optimizer.bit16_groups):
            groups[index].extend(parameters)
    else:
        groups = [list(group["params"]) for group in inner.param_groups]
    return groups


def match_saved_groups(saved_groups: list[dict], live_groups: list[dict]) -> list[int | None]:
    """For each of ``live_groups``, the index of the saved optimizer param group it continues (None: an empty
    live group), matched in order by parameter count with empty groups left out: DeepSpeed drops them, and
    the Hugging Face Trainer makes an empty no-decay group when every trainable tensor decays."""
    saved = iter([index for index, group in enumerate(saved_groups) if group["params"]])
    sources: list[int | None] = []
    for live in live_groups:
        if not live["params"]:
            sources.append(None)
            continue
        index = next(saved, None)
        if index is None or len(saved_groups[index]["params"]) != len(live["params"]):
            break
        sources.append(index)
    else:
        if next(saved, None) is None:
            return sources
    raise CheckpointError(
        f"The saved optimizer has groups of {[len(g['params']) for g in saved_groups]} parameters, this one "
        f"{[len(g['params']) for g in live_groups]}: the checkpoint was written for another adapter or optimizer setup."
    )


def align_saved_groups(saved_groups: list[dict], live_groups: list[dict]) -> list[dict]:
    """The saved param groups in ``live_groups``' layout (:func:`match_saved_groups`); an empty live group
    keeps its own hyperparameters."""
    return [
        saved_groups[source] if source is not None else {**{k: v for k, v in live.items() if k != "params"}, "params": []}
        for source, live in zip(match_saved_groups(saved_groups, live_groups), live_groups)
    ]


def align_scheduler_state(state: dict, saved_groups: list[dict], live_groups: list[dict]) -> dict:
    """A torch LR scheduler's state (per-group lists: ``base_lrs``, ``_last_lr``, ``lr_lambdas``) saved with
    ``saved_groups``, laid out for ``live_groups`` as :func:`align_saved_groups` lays out the optimizer."""
    sources = match_saved_groups(saved_groups, live_groups)
    aligned = dict(state)
    for key, fill in (("base_lrs", "initial_lr"), ("_last_lr", "lr"), ("lr_lambdas", None)):
        values = state.get(key)
        if isinstance(values, list) and len(values) == len(saved_groups):
            aligned[key] = [values[s] if s is not None else (live.get(fill, live.get("lr")) if fill else None)
                            for s, live in zip(sources, live_groups)]
    return aligned


def run_post_step_hooks(group_parameters: list[list[torch.Tensor]], live_groups: list[dict]) -> None:
    """torch's global optimizer post-step hooks (layers that update themselves after a step), called with the
    model's own parameters once DeepSpeed has copied the step into them.

    They also fire inside DeepSpeed's step, for its inner optimizer over flat partitions; there they find
    none of their layers' parameters and do nothing (and ZeRO-1/2 have not copied the new values back yet).
    """
    from torch.optim import optimizer as optim_module

    view = _ParameterGroupsView(group_parameters, live_groups)
    for hook in list(getattr(optim_module, "_global_optimizer_post_hooks", {}).values()):
        hook(view, (), {})


class _ParameterGroupsView:
    """What a global optimizer post-step hook reads: param groups holding the model's own parameters,
    with the live hyperparameters (lr after the schedule, betas, eps, weight decay) of DeepSpeed's groups."""

    def __init__(self, group_parameters: list[list[torch.Tensor]], live_groups: list[dict]):
        self.param_groups = [
            {**{k: v for k, v in live.items() if k != "params"}, "params": params}
            for params, live in zip(group_parameters, live_groups)
        ]


__all__ = [
    "INSTALL_HINT", "STAGES", "ZeroEngine", "align_saved_groups", "align_scheduler_state", "match_saved_groups", "model_parameter_groups", "run_post_step_hooks", "build_config", "config_stage", "deepspeed_available", "full_parameter",
    "gathered", "is_partitioned", "partition_bounds", "partitioned_layers", "require_deepspeed", "write_into_partitions",
]
