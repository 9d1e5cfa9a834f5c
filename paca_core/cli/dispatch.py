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

from .._version import __version__

logger = logging.getLogger("paca_core")

__all__ = ["DEFAULT_LR", "DEFAULT_RANK", "DTYPES", "METHOD_HELP", "apply_config", "build_configs", "build_parser", "default_lr", "main",
           "parse_arguments"]

#: Names this module re-exports from where they live (read on first use, so importing the CLI stays light).
_FORWARDED = {
    "DEFAULT_LR": "paca_core.flags.train_options", "DEFAULT_RANK": "paca_core.flags.train_options", "DTYPES": "paca_core.flags.train_options",
    "build_configs": "paca_core.flags.train_options",
}


def __getattr__(name: str) -> Any:
    if name == "METHOD_HELP":  # read from the registry each time: methods registered later appear too
        from ..methods import method_help

        return method_help()
    if name in _FORWARDED:
        return getattr(importlib.import_module(_FORWARDED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_lr(method: str, rank: int | None = None) -> float:
    """The learning rate ``paca train --method METHOD --rank RANK`` uses without --lr."""
    from ..methods import default_lr as registry_default_lr

    return registry_default_lr(method, rank)


def _add_train_parser(sub) -> argparse.ArgumentParser:
    from ..flags.help_format import HelpFormatter
    from ..flags.train_options import TRAIN_DESCRIPTION, TRAIN_EXAMPLES, TRAIN_USAGE, add_train_arguments

    p = sub.add_parser(
        "train",
        help="fine-tune a causal LM (defaults: SmolLM2-135M-Instruct on Shakespeare's Macbeth, offline)",
        usage=TRAIN_USAGE, description=TRAIN_DESCRIPTION, epilog=TRAIN_EXAMPLES, formatter_class=HelpFormatter, allow_abbrev=False,
    )
    add_train_arguments(p)
    p.set_defaults(handler="paca_core.cli.train_command:run_train")
    return p


def _add_adapter_command(sub, name: str, help_text: str, out_help: str, handler: str) -> argparse.ArgumentParser:
    """A subcommand that reads a trained adapter and its base model and writes something to --out."""
    from ..flags.help_format import HelpFormatter

    p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--adapter", required=True, help="adapter folder: from paca train (<out>/adapter), or a PEFT PaCA adapter (peft >= 0.22)")
    p.add_argument("--model", default=None,
                   help="base model folder the adapter was trained on, or 'default' (the embedded SmolLM2-135M-Instruct). "
                   "Left out: the base model the adapter records (its adapter_config.json's base_model); a model whose "
                   "fingerprint differs from the recorded one is refused")
    p.add_argument("--out", required=True, help=out_help + "; a new or empty folder, or an earlier output of this command with --overwrite")
    p.add_argument("--overwrite", action="store_true", help=f"replace an earlier `paca {name}` output in --out (nothing else is ever replaced)")
    p.set_defaults(handler=handler)
    return p


class _Parser(argparse.ArgumentParser):
    """The ``paca`` parser, which knows its subcommands' parsers (an unknown flag is reported with its
    subcommand's usage; ``--config`` files set ``train``'s defaults)."""

    subcommands: dict[str, argparse.ArgumentParser]


def build_parser() -> argparse.ArgumentParser:
    from ..bench.command import add_bench_parser
    from ..doctor.command import add_doctor_parser
    from ..plan.command import add_plan_parser

    parser = _Parser(prog="paca", description="Memory-efficient fine-tuning on CPU, CUDA and Intel Gaudi.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"paca-hal {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The deepspeed launcher puts --local_rank=N before the subcommand (it sets LOCAL_RANK too, which is what we read).
    parser.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    _add_adapter_command(sub, "merge", "fold an adapter into its base model and save a plain HF model", "where to write the merged model",
                         "paca_core.cli.adapter_commands:run_merge")
    export = _add_adapter_command(sub, "export-peft", "write an adapter as a standard PEFT adapter: PEFT's PaCA or an exact LoRA",
                                  "where to write the PEFT adapter", "paca_core.cli.adapter_commands:run_export")
    export.add_argument("--format", default="lora", choices=("lora", "paca"),
                        help="lora (default): an exact rank-r LoRA adapter, for servers and tools that read LoRA but not PaCA "
                        "(vLLM, TGI, any peft); paca: PEFT's own PaCA format (peft >= 0.22), the same columns and deltas, to "
                        "keep training or merging with PEFT")
    add_bench_parser(sub)  # `paca bench`: every method measured side by side
    add_plan_parser(sub)  # `paca plan`: what fits and how fast on accelerators, simulated
    add_doctor_parser(sub)  # `paca doctor`: prove this machine's device path (paca_core/doctor/)
    parser.subcommands = dict(sub.choices)
    from ..files.input_checks import accept_negative_numbers

    for subcommand in parser.subcommands.values():
        accept_negative_numbers(subcommand)  # --lr -1e-3 is a value (refused by its range check), not a missing one
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; an unknown flag is refused with its subcommand's usage (argparse's subparsers hand unknown
    flags up to the top-level parser, whose usage says nothing about them)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        subcommand = getattr(parser, "subcommands", {}).get(getattr(args, "command", None), parser)
        subcommand.error(f"unrecognized arguments: {' '.join(unknown)}{_closest_flag(subcommand, unknown)}")
    return args


def _closest_flag(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """`` (did you mean --seq-len?)`` for the first unknown flag that is close to one (abbreviations are refused)."""
    import difflib

    flags = [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]  # no public list
    for text in unknown:
        if text.startswith("--"):
            name = text.split("=", 1)[0]
            close = [flag for flag in flags if flag.startswith(name)] or difflib.get_close_matches(name, flags, n=1)
            if close:
                return f" (did you mean {close[0]}?)"
    return ""


def apply_config(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace) -> argparse.Namespace:
    """``paca train --config FILE``: the file's values become ``train``'s defaults and ``argv`` is parsed again, so the
    flags on the command line win. Other commands, and train without --config, are returned as parsed."""
    if getattr(args, "config", None) is None or args.command != "train":
        return args
    from .run_config import apply_config_file

    apply_config_file(parser.subcommands["train"], args.config)
    return parse_arguments(parser, argv)


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

    from ..files.assets import AssetError
    from ..data.dataset import DataError
    from ..errors import CheckpointError, NonFiniteLossError, PacaConfigError, TargetModuleError, TrainingOutOfMemoryError

    return (AssetError, devices.DeviceUnavailableError, devices.InvalidDeviceError, PacaConfigError, TargetModuleError,
            CheckpointError, DataError, ValueError, NonFiniteLossError, TrainingOutOfMemoryError)


#: OS errors that are about the user's files or disk, not a bug: one line naming the path.
_FILE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR)


def _one_line(error: BaseException) -> str:
    from ..files.outputs import DiskFullError

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
    args = parse_arguments(parser, argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    expected = _expected_errors()
    try:
        from ..files.input_checks import expand_user_paths

        args = expand_user_paths(apply_config(parser, argv, args))  # '~/x' quoted or from a --config file: once, here
        return _handler(args)(args)
    except expected as error:
        _report(error, args.verbose)
        return 2
    except OSError as error:
        from ..files.outputs import DiskFullError, is_disk_full

        if not (isinstance(error, DiskFullError) or is_disk_full(error) or error.errno in _FILE_ERRNOS):
            raise
        _report(error, args.verbose, _one_line(error))
        return 2
    except ImportError as error:
        from ..extras import install_hint, missing_optional_module

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
