"""``paca bench``'s checks before it starts any worker: the model folders, the data and the options it will hand them.

A bench runs each entry in its own worker process and records a failing entry as a row of its table; so a bad
``--model``, ``--accuracy-model`` or ``--data`` used to fail in every worker, write a results folder of error rows and
exit 1, with the reason in a warning (in the worker's words, naming ``paca train``'s flags). Here each input is
checked once, before anything is written, with one line naming bench's own flag.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import PacaConfigError


def check_bench_inputs(args: argparse.Namespace) -> None:
    """Every input the mode reads: ``--model`` (a shape name, or a local model folder with a usable config.json),
    ``--accuracy-model`` and ``--data`` in accuracy modes, and the run's numbers; raises one line on the first problem."""
    from ..files.input_checks import read_model_config
    from ..workloads.models import parse_model

    accuracy = args.mode in ("accuracy", "both")
    if args.mode in ("speed", "both", "max-context") and parse_model(args.model).kind == "path":
        _check_model_folder(args.model, "--model", read_model_config)
    if accuracy:
        if parse_model(args.accuracy_model).kind == "path":
            _check_model_folder(args.accuracy_model, "--accuracy-model", read_model_config)
        if args.data != "default":
            from ..data.dataset import inspect_data

            inspect_data(Path(args.data), "--data")
        for flag in ("accuracy_steps", "accuracy_seq_len", "accuracy_batch_size", "accuracy_rank", "eval_every"):
            value = getattr(args, flag, None)
            if isinstance(value, int) and value < 1:
                raise PacaConfigError(f"--{flag.replace('_', '-')} must be at least 1 (got {value}).")
    for flag in ("steps", "search_step", "search_max"):
        value = getattr(args, flag, None)
        if isinstance(value, int) and value < 1:
            raise PacaConfigError(f"--{flag.replace('_', '-')} must be at least 1 (got {value}).")
    if getattr(args, "warmup_steps", 0) < 0:
        raise PacaConfigError(f"--warmup-steps must be 0 or more (got {args.warmup_steps}).")
    if getattr(args, "worker_timeout", 1) <= 0:
        raise PacaConfigError(f"--worker-timeout must be a positive number of seconds (got {args.worker_timeout:g}).")
    if args.lr is not None and not args.lr > 0:
        raise PacaConfigError(f"--lr must be a positive number (got {args.lr:g}).")


def _check_model_folder(text: str, flag: str, read_model_config) -> None:
    path = Path(text).expanduser()
    if not path.is_dir():
        what = "is a file, not a model folder" if path.exists() else "is not a model folder here (no such folder)"
        raise PacaConfigError(f"{flag} {text} {what}: pass a local Hugging Face model folder"
                              + (", or 'default'." if flag == "--accuracy-model" else ", or a shape name (paca bench --help)."))
    read_model_config(path, flag)


__all__ = ["check_bench_inputs"]
