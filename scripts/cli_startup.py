"""How long ``paca --help`` and each subcommand's help take, from a fresh interpreter (median of N runs).

    python scripts/cli_startup.py [--runs 5]

The parser imports no torch, transformers or peft (tests/test_cli_startup.py checks that); this measures the
time a user waits. Compare with ``python -c "import torch"`` in the same run, printed last.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = [["--help"], ["train", "--help"], ["merge", "--help"], ["export-peft", "--help"], ["bench", "--help"], ["plan", "--help"]]


def seconds(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print("| command | median seconds |\n|---|---|")
    for argv in COMMANDS:
        print(f"| `paca {' '.join(argv)}` | {seconds([sys.executable, '-m', 'paca_core', *argv], args.runs):.2f} |")
    print(f"| `python -c 'import torch'` (for scale) | {seconds([sys.executable, '-c', 'import torch'], args.runs):.2f} |")


if __name__ == "__main__":
    main()
