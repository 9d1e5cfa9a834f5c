"""The ``paca`` command: parse the arguments, run one subcommand, turn its failures into one line each.

Subcommands live in their own modules (``train_command``, ``adapter_commands``, ``bench.command``,
``plan.command``), imported only when they run, so ``paca --help`` and a refused argument answer at once.
Ctrl-C at any point (imports included) exits 130 without a traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from typing import Any

from ._version import __version__

logger = logging.getLogger("paca_core")

__all__ = ["DEFAULT_LR", "DEFAULT_RANK", "DTYPES", "METHOD_HELP", "build_configs", "build_parser", "default_lr", "main"]

#: Names this module re-exports from where they live (read on first use, so importing the CLI stays light).
_FORWARDED = {
    "DEFAULT_LR": "paca_core.train_options", "DEFAULT_RANK": "paca_core.train_options", "DTYPES": "paca_core.train_options",
    "build_configs": "paca_core.train_options",
}


def __getattr__(name: str) -> Any:
    if name == "METHOD_HELP":  # read from the registry each time: methods registered later appear too
        from .methods import method_help

        return method_help()
    if name in _FORWARDED:
        return getattr(importlib.import_module(_FORWARDED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_lr(method: str, rank: int | None = None) -> float:
    """The learning rate ``paca train --method METHOD --rank RANK`` uses without --lr."""
    from .methods import default_lr as registry_default_lr

    return registry_default_lr(method, rank)


def _add_train_parser(sub) -> None:
    from .train_options import add_train_arguments

    p = sub.add_parser(
        "train",
        help="fine-tune a causal LM (defaults: SmolLM2-135M-Instruct on Shakespeare's Macbeth, offline)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_train_arguments(p)
    p.add_argument("--out", default="runs/paca",
                   help="output folder: adapter/, checkpoint/, metrics.json. Must be new, empty, or an earlier run's folder "
                   "with --overwrite (replace it) or --resume (continue it); a folder holding anything else is refused")
    p.add_argument("--overwrite", action="store_true", help="replace the earlier paca train run in --out (nothing else is ever replaced)")
    p.add_argument("--resume", default=None, help="continue from a checkpoint folder (<out>/checkpoint or <out>)")
    p.add_argument(
        "--trust-checkpoint", action="store_true",
        help="with --resume: you trust who made the checkpoint, so an old (0.1.0) trainer_state.pt that cannot be read "
        "safely may be unpickled in full (which can run code from it). Never needed for checkpoints from this version",
    )
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: only at the end / on Ctrl-C)")
    p.add_argument("--log-every", type=int, default=5, help="steps per progress/metrics record")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out loss before and after training (as --eval-fraction 0)")
    p.add_argument("--sample-tokens", type=int, default=40, help="tokens generated for the before/after sample (0: skip)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--on-nan", default="stop", choices=["stop", "skip"],
        help="a NaN/inf loss or gradient norm: stop (save the last good state and exit) or skip that step",
    )
    p.add_argument(
        "--fsdp", action="store_true",
        help="under torchrun/accelerate launch: shard base weights and adapters across processes with FSDP2 "
        "(default: DDP, a full copy per process)",
    )
    p.add_argument(
        "--deepspeed", default=None, metavar="zero1|zero2|zero3|PATH.json",
        help="train under DeepSpeed ZeRO (launch with torchrun, deepspeed or accelerate launch; needs paca-hal[deepspeed]). "
        "A stage name expands to a config from these flags (micro-batch --batch-size, --grad-accum, --max-grad-norm, bf16 "
        "when --dtype is bf16); in your JSON these flags fill only \"auto\" fields, and a value that contradicts them is an "
        "error. zero3 partitions base weights too. `accelerate launch --use_deepspeed` sets it for you",
    )
    # The deepspeed launcher passes --local_rank=N to the script (it sets LOCAL_RANK too, which is what we read).
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(handler="paca_core.train_command:run_train")


def _add_adapter_command(sub, name: str, help_text: str, out_help: str, handler: str) -> None:
    """A subcommand that reads a trained adapter and its base model and writes something to --out."""
    p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--adapter", required=True, help="adapter folder (from paca train: <out>/adapter)")
    p.add_argument("--model", default="default", help="base model folder the adapter was trained on ('default': the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help=out_help + "; a new or empty folder, or an earlier output of this command with --overwrite")
    p.add_argument("--overwrite", action="store_true", help=f"replace an earlier `paca {name}` output in --out (nothing else is ever replaced)")
    p.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    from .bench.command import add_bench_parser
    from .plan.command import add_plan_parser

    parser = argparse.ArgumentParser(prog="paca", description="Memory-efficient fine-tuning on CPU, CUDA and Intel Gaudi.")
    parser.add_argument("--version", action="version", version=f"paca-hal {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The deepspeed launcher puts --local_rank=N before the subcommand (it sets LOCAL_RANK too, which is what we read).
    parser.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    _add_adapter_command(sub, "merge", "fold an adapter into its base model and save a plain HF model", "where to write the merged model",
                         "paca_core.adapter_commands:run_merge")
    _add_adapter_command(sub, "export-peft", "write a PaCA/LoRA adapter as a standard PEFT LoRA adapter", "where to write the PEFT adapter",
                         "paca_core.adapter_commands:run_export")
    add_bench_parser(sub)  # `paca bench`: every method measured side by side
    add_plan_parser(sub)  # `paca plan`: what fits and how fast on accelerators, simulated
    return parser


def _handler(args: argparse.Namespace):
    """The subcommand's function: a ``module:function`` name resolved now, or a callable (plug-ins may set one)."""
    handler = args.handler
    if callable(handler):
        return handler
    module, _, function = handler.partition(":")
    return getattr(importlib.import_module(module), function)


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The failures that get one line (they say what to do), not a traceback."""
    import devices

    from .assets import AssetError
    from .dataset import DataError
    from .errors import CheckpointError, NonFiniteLossError, PacaConfigError, TargetModuleError, TrainingOutOfMemoryError

    return (AssetError, devices.DeviceUnavailableError, devices.InvalidDeviceError, PacaConfigError, TargetModuleError,
            CheckpointError, DataError, ValueError, NonFiniteLossError, TrainingOutOfMemoryError)


#: OS errors that are about the user's files or disk, not a bug: one line naming the path.
_FILE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR)


def _one_line(error: BaseException) -> str:
    from .outputs import DiskFullError

    if isinstance(error, DiskFullError):
        return error.strerror
    if isinstance(error, OSError) and error.errno in _FILE_ERRNOS:
        where = f" {error.filename}" if error.filename else ""
        return f"cannot write{where}: {error.strerror or error}"
    return str(error).split("\n")[0] if isinstance(error, OSError) else str(error)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before a subcommand's own handling (e.g. while importing torch): no traceback
        print("Interrupted.", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    expected = _expected_errors()
    try:
        return _handler(args)(args)
    except expected as error:
        _report(error, args.verbose)
        return 2
    except OSError as error:
        from .outputs import DiskFullError, is_disk_full

        if not (isinstance(error, DiskFullError) or is_disk_full(error) or error.errno in _FILE_ERRNOS):
            raise
        _report(error, args.verbose, _one_line(error))
        return 2
    except ImportError as error:
        from .extras import install_hint, missing_optional_module

        module = missing_optional_module(error)
        if module is None:
            raise  # not an optional extra: a real bug, keep its traceback
        if "paca-hal[" in str(error):  # already says what to install
            logger.error("%s", error)
        else:
            logger.error("%s needs the optional package '%s', which is not installed: %s", args.command, module, install_hint(module))
        return 2


def _report(error: BaseException, verbose: bool, text: str | None = None) -> None:
    if verbose:
        logger.exception("%s", text or error)
    else:
        logger.error("%s", text or error)


if __name__ == "__main__":
    raise SystemExit(main())
