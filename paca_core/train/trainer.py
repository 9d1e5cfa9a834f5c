"""The training loop: fixed-shape steps, gradient accumulation, atomic resumable checkpoints,
Ctrl-C safety, held-out evaluation, a tqdm bar and a JSON metrics file."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

import devices

from ..files.atomic import atomic_directory, write_bytes_atomic
from ..files.checkpoint import adapter_state, config_differences, load_adapter_tensors, read_adapter_config, read_adapter_tensors, write_adapter_files
from ..data.dataset import TokenizedData
from ..errors import OOM_LEVERS, CheckpointError, NonFiniteLossError, TrainingOutOfMemoryError, is_out_of_memory
from ..distributed.sharding import full_tensor, gathered_optimizer_state, load_optimizer_state, shard_model
from .steps import deepspeed_train_step, evaluate, grads_to_none, train_step
from ..distributed.zero import ZeroEngine, build_config, require_deepspeed
from .training_state import (  # noqa: F401 - STATE_NAME, STATE_JSON, LEGACY_STATE_NAME: the file names, re-exported
    LEGACY_STATE_NAME,
    STATE_JSON,
    STATE_NAME,
    has_training_state,
    numpy_rng_state,
    python_rng_state,
    read_training_state,
    restore_numpy_rng,
    restore_python_rng,
    write_training_state,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainingArguments:
    """What the loop needs. ``max_steps`` counts optimizer steps; 0 means ``epochs`` full passes."""

    output_dir: str
    max_steps: int = 0
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 5
    save_every: int = 0
    #: Also evaluate the held-out data (``Trainer.eval_data``) every N optimizer steps; 0: never during training.
    eval_every: int = 0
    #: Examples per held-out batch; None: the training micro-batch, so evaluation stays inside the memory the
    #: run was sized for (``--batch-size auto`` plans the training step).
    eval_batch_size: int | None = None
    progress: bool = True
    #: What a NaN/inf loss or gradient norm does: "stop" (save the last good state, raise) or "skip"
    #: (drop that step's gradients, go on; stop after ``max_skipped_steps`` in a row).
    on_nan: str = "stop"
    max_skipped_steps: int = 10
    #: Under a multi-process launch, shard base weights and adapters with FSDP2 instead of
    #: replicating them with DDP (paca_core/distributed/sharding.py).
    fsdp: bool = False
    #: DeepSpeed ZeRO instead of DDP/FSDP: a stage name (zero1/zero2/zero3), a JSON path or a config dict
    #: (paca_core/distributed/zero.py). Needs a multi-process launch (torchrun, deepspeed, accelerate launch).
    deepspeed: str | dict | None = None

    def validate(self) -> None:
        problems = []
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.grad_accum < 1:
            problems.append(f"--grad-accum must be >= 1 (got {self.grad_accum})")
        if self.max_steps < 0:
            problems.append(f"--steps must be >= 0 (got {self.max_steps})")
        if self.max_steps == 0 and self.epochs <= 0:
            problems.append("set --steps or a positive --epochs")
        if self.log_every < 1:
            problems.append(f"--log-every must be at least 1 (got {self.log_every})")
        if self.save_every < 0:
            problems.append(f"--save-every must be 0 (save at the end only) or more (got {self.save_every})")
        if self.eval_every < 0:
            problems.append(f"--eval-every must be 0 (before and after training only) or more (got {self.eval_every})")
        if self.warmup_steps < 0:
            problems.append(f"--warmup-steps must be 0 or more (got {self.warmup_steps})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"--lr must be a positive number (got {self.lr})")
        if self.on_nan not in ("stop", "skip"):
            problems.append(f"--on-nan must be stop or skip (got {self.on_nan!r})")
        if self.max_skipped_steps < 1:
            problems.append(f"max_skipped_steps must be >= 1 (got {self.max_skipped_steps})")
        if self.scheduler not in ("cosine", "linear", "constant"):
            problems.append(f"scheduler must be cosine, linear or constant (got {self.scheduler!r})")
        if self.deepspeed is not None and self.fsdp:
            problems.append("--deepspeed and --fsdp are two engines for the same job: pass one of them")
        if self.deepspeed is not None and self.on_nan == "skip":
            problems.append("--on-nan skip is not available under --deepspeed (its engine applies every update it reduces); use --on-nan stop")
        if problems:
            raise ValueError("; ".join(problems) + ".")


def steps_per_epoch(args: TrainingArguments, examples: int, world_size: int = 1) -> int:
    """Optimizer steps in one pass over ``examples`` in whole global batches (at least one)."""
    global_batch = args.batch_size * world_size
    batches_per_epoch = examples // global_batch
    if batches_per_epoch == 0:
        raise ValueError(
            f"The training split has {examples} examples, fewer than one global batch ({global_batch}); "
            "use more data, a smaller --batch-size or a shorter --seq-len."
        )
    return max(1, batches_per_epoch // args.grad_accum)


def epochs_to_steps(epochs: float, per_epoch: int) -> int:
    """Optimizer steps in ``epochs`` passes of ``per_epoch`` steps (a started step counts; at least one)."""
    return max(1, math.ceil(epochs * per_epoch))


def planned_total_steps(args: TrainingArguments, examples: int, world_size: int = 1) -> int:
    """The run's optimizer steps in all: ``max_steps``, or ``epochs`` passes over ``examples``
    (``paca train`` asks before loading the weights, to refuse a resume with nothing left to train)."""
    per_epoch = steps_per_epoch(args, examples, world_size)
    return args.max_steps or epochs_to_steps(args.epochs, per_epoch)


@dataclass
class TrainerState:
    """Where training is; saved with every checkpoint so a resumed run continues exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    #: Held-out losses measured during training (``eval_every``): ``{"step", "held_out_loss"}``.
    evaluations: list[dict[str, float]] = field(default_factory=list)


def _lr_lambda(args: TrainingArguments, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if args.warmup_steps and step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        if args.scheduler == "constant":
            return 1.0
        progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if args.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Trainer:
    """Trains the trainable parameters of ``model`` (a :class:`~paca_core.model.PacaModel`) on fixed-length data."""

    def __init__(self, model, args: TrainingArguments, train_data: TokenizedData, device: torch.device):
        args.validate()
        self.model, self.args, self.train_data, self.device = model, args, train_data, device
        if getattr(train_data, "position_ids", None) is not None:  # packed rows: attention must stay inside each example
            from ..data.formats.packing import prepare_packed_attention

            prepare_packed_attention(model, args.batch_size)
        # Under torchrun/accelerate (torch.distributed initialised): DDP, and each rank takes its
        # share of every global batch of world × batch_size examples.
        self.rank, self.world_size = _process_group()
        self.sharded = args.fsdp
        self.zero: ZeroEngine | None = None  # DeepSpeed: made when training starts, after any resume
        self.zero_config: dict | None = None
        if args.deepspeed is not None:
            if not _distributed_initialized():
                raise ValueError(
                    "--deepspeed runs one process per device under a launcher, and this is a single process: launch with "
                    "torchrun --nproc-per-node N -m paca_core train ..., deepspeed --num_gpus N ..., or accelerate launch "
                    "--use_deepspeed; or drop --deepspeed."
                )
            require_deepspeed()
            self.zero_config = build_config(
                args.deepspeed, micro_batch_size=args.batch_size, grad_accum=args.grad_accum, world_size=self.world_size,
                max_grad_norm=args.max_grad_norm, dtype=_base_dtype(model),
            )
            self.network = model
        elif args.fsdp:
            if not _distributed_initialized():
                raise ValueError(
                    "--fsdp shards the model across processes, and this is a single process: launch with "
                    "torchrun --nproc-per-node N -m paca_core train ... (or accelerate launch), or drop --fsdp."
                )
            self.network = shard_model(model, device)  # in place; before the optimizer sees the (now sharded) parameters
        else:
            self.network = _data_parallel(model, device) if self.world_size > 1 else model
        self.global_batch = args.batch_size * self.world_size
        self.batches_per_epoch = len(train_data) // self.global_batch
        self.total_steps = planned_total_steps(args, len(train_data), self.world_size)
        params = model.trainable_parameters()
        if not params:
            raise ValueError("The model has no trainable parameters; prepare it with prepare_model first.")
        # The device's fused AdamW (Habana FusedAdamW, CUDA fused, CPU foreach); eps pinned to torch's default.
        self.optimizer = devices.make_adamw(params, device, lr=args.lr, eps=1e-8, weight_decay=args.weight_decay)
        # Captured graphs (HPU graphs) hold gradient tensors by address: zero them in place then.
        self._grads_to_none = grads_to_none(model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(args, self.total_steps))
        self.state = TrainerState()
        self.output_dir = Path(args.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoint"
        #: ``paca train``'s run folder (:class:`paca_core.files.outputs.RunFolder`): told before the first write into it.
        self.run_folder = None
        #: Recorded in every checkpoint's summary (the CLI puts the data file and the base model's fingerprint here).
        self.checkpoint_metadata: dict[str, Any] = {}
        #: The step of the last checkpoint this run wrote (None: nothing saved yet).
        self.last_saved_step: int | None = None
        #: Held-out data for ``eval_every`` (None: no evaluation during training).
        self.eval_data: TokenizedData | None = None
        #: Where rank 0 reports each log window and evaluation (:class:`paca_core.train.tracking.Tracker`; None: nowhere).
        self.tracker = None

    # --- data order: a pure function of (seed, epoch), so resuming needs only the position ---------
    def _epoch_order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.train_data), generator=torch.Generator().manual_seed(self.args.seed * 1000003 + epoch))

    def _micro_batches(self):
        while True:
            order = self._epoch_order(self.state.epoch)
            share = slice(self.rank * self.args.batch_size, (self.rank + 1) * self.args.batch_size)
            for batch in self.train_data.batches(self.global_batch, order, start=self.state.batch_in_epoch):
                self.state.batch_in_epoch += 1
                yield {key: value[share] for key, value in batch.items()}
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    # --- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path | None = None) -> Path:
        """Adapter + optimizer + scheduler + RNG + position, written atomically (the old one survives a crash)."""
        directory = Path(directory or self.checkpoint_dir)
        # FSDP: every rank takes part in gathering the shards. DDP: every rank holds the same state.
        # Either way rank 0 writes and the others wait for it.
        if self.zero is not None:  # collectives: every rank gathers
            tensors, optimizer_state = adapter_state(self.model), self.zero.full_optimizer_state()
        elif self.sharded:
            tensors, optimizer_state = adapter_state(self.model), gathered_optimizer_state(self.optimizer)
        elif self.rank == 0:
            tensors, optimizer_state = adapter_state(self.model), self.optimizer.state_dict()
        if self.rank != 0:
            torch.distributed.barrier()
            self.last_saved_step = self.state.step
            return directory
        training_state = {
            "optimizer": optimizer_state,
            "host_optimizer": self.model.host_optimizer_state(),  # MEFT's Adam state lives in host memory
            "scheduler": self.scheduler.state_dict(),
            "trainer": asdict(self.state),
            # Plain data only (safetensors + JSON): loading a checkpoint must never run code from it.
            "rng": {"torch": torch.get_rng_state(), "python": python_rng_state(), "numpy": numpy_rng_state()},
            "total_steps": self.total_steps,
        }
        if self.run_folder is not None and Path(os.path.abspath(directory)).parent == self.run_folder.path:
            self.run_folder.claim(directory.name)
        try:
            with atomic_directory(directory, owned=(LEGACY_STATE_NAME,)) as staging:  # a 0.1.0 state is rewritten in this format
                write_adapter_files(self.model, staging, tensors=tensors)
                # The shape too: the data position counts batches of it, so a resumed `--seq-len auto` run re-uses it.
                summary = {**self.checkpoint_metadata, "step": self.state.step, "total_steps": self.total_steps,
                           "seq_len": int(self.train_data.input_ids.shape[1]), "batch_size": self.args.batch_size}
                write_training_state(staging, training_state, summary=summary)
        except OSError as error:
            from ..files.outputs import disk_full_error, is_disk_full

            if not is_disk_full(error):
                raise
            needed = _tensor_bytes(tensors) + _tensor_bytes(training_state)
            raise disk_full_error(error, directory, needed) from error  # the previous checkpoint is whole
        logger.info("Checkpoint at step %d saved to %s", self.state.step, directory)
        if self.run_folder is not None and Path(os.path.abspath(directory)).parent == self.run_folder.path:
            self.run_folder.refresh()  # the marker lists the checkpoint's files: a crash now leaves a folder that is ours
        self.last_saved_step = self.state.step
        if self.world_size > 1:
            torch.distributed.barrier()
        return directory

    def resume_from(self, directory: str | Path, trust_checkpoint: bool = False) -> None:
        """Continue exactly where the checkpoint in ``directory`` (``<out>/checkpoint`` or ``<out>``) stopped.

        Nothing in the folder can run code: the state is safetensors + JSON. ``trust_checkpoint``: the user
        vouches for the folder, so an old (paca-hal 0.1.0) ``trainer_state.pt`` that needs unrestricted
        unpickling may be loaded (the CLI's ``--trust-checkpoint``); without it such a file is refused.
        """
        if self.zero is not None:
            raise CheckpointError("Resume before training starts: under DeepSpeed the checkpoint is loaded before the engine partitions the model.")
        directory = Path(directory)
        if has_training_state(directory / "checkpoint"):
            directory = directory / "checkpoint"
        if not has_training_state(directory):
            raise CheckpointError(
                f"{directory} has no {STATE_NAME} (or 0.1.0's {LEGACY_STATE_NAME}): it is not a resumable checkpoint "
                "(expected <out>/checkpoint)."
            )
        self._check_same_adapter(directory)
        # Read (and vet) the state before anything in the model or optimizer changes.
        state = read_training_state(directory, trust_checkpoint)
        load_adapter_tensors(self.model, read_adapter_tensors(directory), directory)
        try:
            self._apply_state(state)
        except (KeyError, TypeError) as error:
            raise CheckpointError(f"The training state in {directory} is incomplete ({type(error).__name__}: {error}); the checkpoint is corrupt.") from None
        logger.info("Resumed from %s at step %d", directory, self.state.step)

    def _check_same_adapter(self, directory: Path) -> None:
        """A checkpoint resumes only into the adapter configuration that wrote it."""
        document = read_adapter_config(directory)
        differences = config_differences(document["configs"], [c.to_dict() for c in self.model.configs])
        if differences:
            raise CheckpointError(f"Cannot resume from {directory}: the adapter config differs ({'; '.join(differences)}).")

    def _apply_state(self, state: dict[str, Any]) -> None:
        """Optimizer, host optimizer, scheduler, counters and RNGs from a read checkpoint state."""
        load_optimizer_state(self.optimizer, state["optimizer"])  # re-sharded under FSDP
        self.model.load_host_optimizer_state(state.get("host_optimizer") or {})
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = TrainerState(**state["trainer"])
        torch.set_rng_state(state["rng"]["torch"])
        restore_python_rng(state["rng"]["python"])
        restore_numpy_rng(state["rng"].get("numpy"))  # absent in 0.1.0 checkpoints
        if state.get("total_steps") != self.total_steps:
            logger.warning("Total steps changed from %s to %s; the learning-rate schedule follows the new total.", state.get("total_steps"), self.total_steps)

    # --- evaluation ------------------------------------------------------------------------------
    def evaluate(self, data: TokenizedData) -> float:
        """Mean next-token loss over every target token of ``data`` (:func:`paca_core.train.steps.evaluate`)."""
        return evaluate(self.model, data, self.device, self.args.eval_batch_size or self.args.batch_size,
                        progress=self.args.progress and self.rank == 0)

    # --- the loop --------------------------------------------------------------------------------
    def _install_stop_handlers(self) -> dict:
        """Ctrl-C / SIGTERM ask the loop to stop at the next step boundary (a second Ctrl-C aborts at once)."""

        def request_stop(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            logger.warning("Stopping after the current step and saving a checkpoint (Ctrl-C again to abort without saving).")

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread
                pass
        return previous

    def train(self) -> TrainerState:
        """Run until ``total_steps``; on Ctrl-C or SIGTERM save a checkpoint and raise KeyboardInterrupt."""
        args = self.args
        self._start_engine()
        self.model.train()
        micro_batches = self._micro_batches()
        self._stop_requested = False
        previous_handlers = self._install_stop_handlers()
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step", disable=not args.progress, dynamic_ncols=True)
        window_loss = torch.zeros((), device=self.device)
        window_grad_norm = torch.zeros((), device=self.device)  # summed like the loss: no host read until the log
        window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
        devices.reset_peak_memory_stats(self.device)
        try:
            skipped_in_a_row = 0
            while self.state.step < self.total_steps and not self._stop_requested:
                tokens: list[int] = []
                result = deepspeed_train_step(
                    self.zero,
                    lambda batch: self.network(**batch).loss,
                    self._on_device(micro_batches, tokens),
                    self.device,
                    args.grad_accum,
                    scheduler=self.scheduler,
                    should_apply=_finite,
                ) if self.zero is not None else train_step(
                    lambda batch: self.network(**batch).loss,
                    self._on_device(micro_batches, tokens),
                    self.optimizer,
                    self.device,
                    params=self.model.trainable_parameters(),
                    set_to_none=self._grads_to_none,
                    grad_accum=args.grad_accum,
                    max_grad_norm=args.max_grad_norm,
                    scheduler=self.scheduler,
                    should_apply=_finite,  # one host read per optimizer step, after the step boundary
                )
                window_tokens += sum(tokens)
                if not result.applied:
                    skipped_in_a_row += 1
                    self._drop_step(result.loss, skipped_in_a_row)
                    continue
                skipped_in_a_row = 0
                window_loss += result.loss
                if result.grad_norm is not None:
                    window_grad_norm += full_tensor(result.grad_norm).detach().float()
                self.state.step += 1
                window_steps += 1
                bar.update(1)
                if self.state.step % args.log_every == 0 or self.state.step == self.total_steps:
                    self._log_window(bar, window_loss, window_steps, window_tokens, time.perf_counter() - window_start,
                                     window_grad_norm if result.grad_norm is not None else None)
                    window_loss.zero_()
                    window_grad_norm.zero_()
                    window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
                if args.eval_every and self.eval_data is not None and self.state.step % args.eval_every == 0:
                    window_start += self._evaluate_during_training()  # the window's tokens/s leaves evaluation out
                if args.save_every and self.state.step % args.save_every == 0 and self.state.step < self.total_steps:
                    self.save_checkpoint()
        except Exception as error:
            if is_out_of_memory(error):  # nothing is saved: a half-applied step must not become a checkpoint
                raise TrainingOutOfMemoryError(
                    f"Out of memory on {self.device} at step {self.state.step + 1} ({error}). To fit: {OOM_LEVERS}. "
                    f"The last checkpoint (if any) is in {self.checkpoint_dir}."
                ) from error
            raise
        finally:
            bar.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        path = self.save_checkpoint()
        if self._stop_requested and self.state.step < self.total_steps:
            logger.warning("Interrupted at step %d: checkpoint saved to %s; continue with --resume %s", self.state.step, path, path)
            raise KeyboardInterrupt
        return self.state

    def _start_engine(self) -> None:
        """DeepSpeed: wrap the model now (a resumed checkpoint is already in it and the optimizer)."""
        if self.zero_config is not None and self.zero is None:
            self.zero = ZeroEngine(self.model, self.optimizer, self.zero_config)
            self.network = self.zero.engine

    def _on_device(self, micro_batches, tokens: list[int]):
        """The next micro-batches, moved to the device; counts their tokens into ``tokens``."""
        while True:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(micro_batches).items()}
            tokens.append(int(batch["input_ids"].numel()))  # packed rows carry no attention_mask
            yield batch

    def _drop_step(self, step_loss: torch.Tensor, in_a_row: int) -> None:
        """A NaN/inf step: its gradients never reach the weights. Stop or skip as configured."""
        self.optimizer.zero_grad(set_to_none=self._grads_to_none)
        self.model.discard_host_gradients()
        value = float(step_loss)
        step = self.state.step + 1
        if self.args.on_nan == "stop":
            path = self.save_checkpoint()
            raise NonFiniteLossError(
                f"Step {step}: the loss (or the gradient norm) is {value} — no update was applied. The last good state is "
                f"saved in {path}. Lower --lr, check the data for empty or corrupt examples, use --dtype fp32, or pass "
                "--on-nan skip to skip such steps."
            )
        self.state.skipped_steps += 1
        logger.warning("Step %d: non-finite loss/gradient (%s); skipped (%d in a row, %d in all).", step, value, in_a_row, self.state.skipped_steps)
        if in_a_row >= self.args.max_skipped_steps:
            path = self.save_checkpoint()
            raise NonFiniteLossError(
                f"{in_a_row} steps in a row had a non-finite loss or gradient; stopping (state saved in {path}). "
                "Lower --lr or check the data."
            )

    def _log_window(self, bar, window_loss: torch.Tensor, steps: int, tokens: int, elapsed: float,
                    window_grad_norm: torch.Tensor | None = None) -> None:
        mean_loss = float(window_loss) / steps  # the only host read, once per log window
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"Training loss became {mean_loss} at step {self.state.step}; lower --lr or check the data.")
        record = {
            "step": self.state.step,
            "loss": mean_loss,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "peak_memory_mb": devices.memory_stats(self.device).peak_bytes / 2**20,
        }
        if window_grad_norm is not None:  # clipping computes it (--max-grad-norm > 0); the mean over the window
            record["grad_norm"] = float(window_grad_norm) / steps
        self.state.history.append(record)
        self.state.tokens_seen += tokens
        if self.tracker is not None and self.rank == 0:
            self.tracker.log_train(record, self.state.step)
        bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", mem=f"{record['peak_memory_mb']:.0f}MB")
        logger.debug("step %d: %s", self.state.step, record)

    def _evaluate_during_training(self) -> float:
        """``eval_every``: the held-out loss now (every rank, so FSDP's collectives match), recorded and reported;
        returns the seconds it took."""
        started = time.perf_counter()
        loss = self.evaluate(self.eval_data)
        self.state.evaluations.append({"step": self.state.step, "held_out_loss": loss})
        logger.info("Step %d: held-out loss %.4f", self.state.step, loss)
        if self.tracker is not None and self.rank == 0:
            self.tracker.log_eval(loss, self.state.step)
        return time.perf_counter() - started


def _finite(loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
    check = torch.isfinite(loss)
    if grad_norm is not None:
        check = check & torch.isfinite(full_tensor(grad_norm))  # FSDP: the norm is a DTensor
    if _distributed_initialized():
        check = check.to(torch.int32)
        torch.distributed.all_reduce(check, op=torch.distributed.ReduceOp.MIN)  # every rank decides alike
    return bool(check)


def _distributed_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _base_dtype(model) -> torch.dtype:
    """The dtype of the model's frozen weights (what --dtype loaded), for DeepSpeed's precision sections."""
    frozen = [p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    return frozen[0] if frozen else torch.float32


def _process_group() -> tuple[int, int]:
    if _distributed_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _data_parallel(model, device: torch.device):
    """DDP over the adapted model: only trainable (adapter) parameters' gradients are all-reduced."""
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=devices.runtime_for(device).ddp_device_ids(device))


def _tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in a nested state (what a checkpoint write needs on disk, about)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    write_bytes_atomic(path, json.dumps(metrics, indent=2, default=str).encode())
