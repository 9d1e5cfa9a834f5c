"""``paca --help``, every subcommand's help and an argument error answer without importing torch, transformers or
peft (importing torch alone takes ~1.5 s); the time itself is measured by scripts/cli_startup.py, not here."""
from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "deepspeed")

PROBE = """
import sys
from paca_core.cli.dispatch import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = [m for m in {heavy!r} if m in sys.modules]
print("HEAVY:" + ",".join(heavy))
"""


@pytest.mark.parametrize("argv", [
    ["--help"], ["train", "--help"], ["merge", "--help"], ["export-peft", "--help"], ["bench", "--help"], ["plan", "--help"],
    ["train", "--no-such-flag"],
])
def test_help_and_argument_errors_import_no_heavy_package(argv):
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)], capture_output=True, text=True, timeout=120)
    line = [l for l in done.stdout.splitlines() if l.startswith("HEAVY:")]
    assert line, done.stderr[-2000:]
    assert line[-1] == "HEAVY:", f"{argv} imported {line[-1][6:]}"
    if "--help" in argv:
        assert "usage: paca" in done.stdout
