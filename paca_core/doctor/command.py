"""``paca doctor``'s flags. Torch-free: the CLI builds every subcommand's parser before it knows which one runs."""
from __future__ import annotations

import argparse

from ..flags.help_format import HelpFormatter

DESCRIPTION = """Prove this machine's accelerator: report the device and its software, then run the accelerator test
tier, a benchmark at Llama-3.2-1B's shapes, the planner against measured steps and the longest sequence that
fits, each stage timed and recorded (proof.json, proof.md) even when a later one fails. --quick: the device
and the fast part of the test tier (about a minute). --dry-run: every stage on the CPU with tiny shapes (it
checks the doctor itself; its figures are not a hardware measurement)."""

DEFAULT_DEADLINE_S = 420.0


def add_doctor_parser(sub) -> argparse.ArgumentParser:
    """Register ``paca doctor`` on the CLI's subparsers."""
    import devices  # the device flag lists the registered runtimes (torch-free)

    p = sub.add_parser("doctor", help="prove this machine's GPU/Gaudi/CPU path: device, accelerator tests, bench, planner, longest sequence",
                       description=DESCRIPTION, formatter_class=HelpFormatter, allow_abbrev=False)
    devices.add_device_argument(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the device and the accelerator tier's fast tests only (about a minute)")
    mode.add_argument("--dry-run", action="store_true", help="every stage on the CPU with tiny shapes (checks the doctor, measures nothing)")
    p.add_argument("--out", default="runs/doctor", help="folder for proof.json, proof.md and logs/ (a new or empty folder, or an "
                   "earlier paca doctor output with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier paca doctor output in --out (nothing else is ever replaced)")
    p.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                   help=f"seconds after which no stage or step starts (default {DEFAULT_DEADLINE_S:.0f}; each stage also has its own budget)")
    p.add_argument("--stages", default=None, help="comma-separated subset of device,tests,bench,planner,max_context (default: all; "
                   "--quick: device,tests)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler="paca_core.doctor.run:run_doctor")
    return p
