"""The ``paca`` command line: the dispatcher (:mod:`.dispatch`, the ``paca`` entry point) and the train, merge and
export-peft commands with their preflight checks; plan, bench and doctor keep their commands in their own packages.

May import every other package of paca_core; nothing in paca_core imports it.
"""
from .dispatch import main

__all__ = ["main"]
