"""How every ``paca`` subcommand's ``--help`` reads: each real default shown once, examples kept as written.

argparse's ``ArgumentDefaultsHelpFormatter`` appends ``(default: None)`` to every option without a default and
repeats a default the help text already states. This formatter appends ``(default: X)`` only where X is a value
a user would type (not None, not an off switch's False) and the help does not say its default itself; the
description and the epilog keep their line breaks (the examples). Torch-free: the CLI builds every parser.
"""
from __future__ import annotations

import argparse
import re

#: Help text that already states its default ("(default 1024)", "Default: the device's free memory").
_STATES_DEFAULT = re.compile(r"\(default\b|\bdefault:", re.IGNORECASE)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Real defaults once; description and epilog as written."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 32, width: int | None = None):
        super().__init__(prog, indent_increment=indent_increment, max_help_position=max_help_position, width=width)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.help is argparse.SUPPRESS or action.nargs == 0:
            return text  # a positional, a hidden flag, or an on/off switch (whose default is "not given")
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or default == "":
            return text
        if "%(default)" in text or _STATES_DEFAULT.search(text):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


__all__ = ["HelpFormatter"]
