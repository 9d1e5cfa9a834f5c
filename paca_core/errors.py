"""Exceptions with messages that say what to do."""


class PacaConfigError(ValueError):
    """A configuration value or combination that cannot work."""


class TargetModuleError(ValueError):
    """``target_modules`` matched nothing, or matched a module we cannot adapt."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


class OutputPathError(PacaConfigError):
    """An output path would destroy something, cannot be written, or is not a folder; the message says what to do."""


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN/inf and the run was told to stop (``on_nan="stop"``)."""


class TrainingOutOfMemoryError(RuntimeError):
    """The device ran out of memory during training; the message lists what to change."""


OOM_LEVERS = (
    "lower --batch-size (and raise --grad-accum to keep the effective batch), shorten --seq-len, lower --rank, "
    "use --method paca or lorafa (they keep almost nothing per layer for backward) or add +velora to lora/full, "
    "move activations to host memory with --offload-activations decoder-layers (GPU/HPU), or use --dtype bf16"
)


def is_out_of_memory(error: BaseException) -> bool:
    """True for every device's out-of-memory error (CUDA's OutOfMemoryError, HPU/CPU RuntimeErrors)."""
    oom_type = getattr(__import__("torch"), "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    text = str(error).lower()
    return isinstance(error, (RuntimeError, MemoryError)) and ("out of memory" in text or isinstance(error, MemoryError))
