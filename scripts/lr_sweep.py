"""Regenerate the table behind the CLI's default learning rates (docs/methods.md), with one command:

    python scripts/lr_sweep.py                  # the committed plan; writes runs/lr-sweep/{results.jsonl,sweep.json,sweep.md}

Every method is fine-tuned on the real default model (SmolLM2-135M-Instruct) over an lr grid on
three shipped data sets of different kinds (paca_core/data/README.md), PaCA and LoRA also at 4× their
default rank, and each run's held-out improvement over the frozen model is recorded. The defaults
come from :func:`paca_core.bench.lr_rule.choose_lr`: the lr that keeps the largest share of each
data set's best result on the *worst* data set. Runs go in priority order (PaCA and LoRA first);
results are appended as each run ends, so rerunning with the same --out resumes, and --max-minutes
stops starting new runs after a budget. Flags change the plan (see --help).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paca_core.bench import lr_sweep, lr_sweep_report  # noqa: E402
from paca_core.cli.dispatch import DEFAULT_RANK, default_lr  # noqa: E402
from paca_core.methods import primary_name  # noqa: E402

METHODS = "paca,lora,lora+velora,lorafa,meft"
DATASETS = "macbeth,stdlib-functions,reference-topics"
#: 1-2-5 grids around where each method's best lr was expected; "*" for the others. A grid whose
#: best lr on a data set is at its edge is extended there, one ladder step at a time (lr_sweep.edge_extensions).
LR_GRID = ["1e-3,2e-3,5e-3", "meft=5e-4,1e-3,2e-3"]
#: At 4x rank the same grids (then extended where the best lr is at an edge), so both ranks are
#: measured on the same lrs.
RANK_LR_GRID = LR_GRID
#: Pairs compared at the CLI defaults (PaCA at 2r has LoRA's trainable parameters at r).
PAIRS = [(("paca", 16), ("lora", 8)), (("paca", 64), ("lora", 32))]


def _rank(method: str) -> int | None:
    primary = primary_name([p for p in method.split("+") if p] if method != "velora" else ["lora", "velora"])
    return None if primary in ("meft", "full") else DEFAULT_RANK[primary]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default=METHODS, help="paca train --method strings, comma-separated")
    p.add_argument("--data", default=DATASETS, help=f"shipped data sets {sorted(lr_sweep.SHIPPED_DATASETS)} or local files, comma-separated")
    p.add_argument("--lr-grid", action="append", default=None, help=f"[METHOD=]LR,LR,... (repeatable); default {LR_GRID}")
    p.add_argument("--rank-scale", type=int, default=4, help="also run --rank-methods at this multiple of their default rank (1: no)")
    p.add_argument("--rank-methods", default="paca,lora")
    p.add_argument("--rank-data", default="macbeth,stdlib-functions", help="data sets for the scaled-rank runs")
    p.add_argument("--rank-lr-grid", action="append", default=None, help=f"grid at the scaled rank; default {RANK_LR_GRID}")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-examples", type=int, default=32, help="held-out examples evaluated (first of the 10 %% split)")
    p.add_argument("--model", default="default", help="'default' or a local model folder with a tokenizer")
    p.add_argument("--workers", type=int, default=2, help="processes running runs side by side (0: this process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (more than the free cores slows all down)")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new run after this many minutes (finished runs are kept)")
    p.add_argument("--out", type=Path, default=Path("runs/lr-sweep"))
    p.add_argument("--no-extend", dest="extend", action="store_false", help="do not extend a grid whose best lr is at its edge")
    p.add_argument("--report-only", action="store_true", help="rebuild sweep.json / sweep.md from results.jsonl, run nothing")
    return p


def plan(args: argparse.Namespace) -> list[lr_sweep.SweepJob]:
    """Priority order: --rank-methods at their default rank, one data set at a time (so PaCA and LoRA
    are compared on a data set as early as possible), then at --rank-scale x on --rank-data, then the
    other methods one at a time."""
    methods, datasets = _split(args.methods), _split(args.data)
    first = [m for m in methods if m in _split(args.rank_methods)]
    for name in set(datasets + _split(args.rank_data)):
        lr_sweep.dataset_path(name)  # a missing file fails now, not after an hour
    grid = _with_cli_default(lr_sweep.parse_lr_grid(args.lr_grid or LR_GRID), methods, _rank)
    jobs = [job for d in datasets for job in lr_sweep.expand_jobs(first, [d], grid, _rank)]
    if args.rank_scale != 1:
        scaled = lambda m: None if _rank(m) is None else _rank(m) * args.rank_scale  # noqa: E731
        rank_grid = _with_cli_default(lr_sweep.parse_lr_grid(args.rank_lr_grid or RANK_LR_GRID), first, scaled)
        jobs += [job for d in _split(args.rank_data) for job in lr_sweep.expand_jobs(first, [d], rank_grid, scaled)]
    return jobs + lr_sweep.expand_jobs([m for m in methods if m not in first], datasets, grid, _rank)


def _with_cli_default(grid: dict[str, list[float]], methods: list[str], rank_of) -> dict[str, list[float]]:
    """Each method's grid plus the lr ``paca train`` uses at that rank, so the table always shows
    what a user who passes no --lr gets (the CLI's lr may depend on the rank)."""
    out = dict(grid)
    for method in methods:
        lrs = grid.get(method.lower(), grid.get("*", []))
        out[method.lower()] = sorted(set(lrs) | {default_lr(method, rank_of(method))})
    return out


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    jobs = plan(args)
    settings = lr_sweep.SweepSettings(model=args.model, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                                      eval_examples=args.eval_examples)
    command = "python scripts/lr_sweep.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    started = time.time()
    previous = lr_sweep_report.read_document(args.out)

    def write(records: list[dict]) -> None:
        document = {  # --report-only keeps the command and wall time of the runs
            "command": previous.get("command", command) if args.report_only else command,
            "settings": {**vars(settings), "datasets": _split(args.data)},
            "plan": [j.key for j in jobs], "records": records,
            "wall_s": previous.get("wall_s", 0.0) + (0.0 if args.report_only else time.time() - started),
        }
        lr_sweep_report.write(args.out, document, default_lr, PAIRS)

    if args.report_only:
        write(lr_sweep.read_results(args.out))
    else:
        print(f"{len(jobs)} runs planned; results in {args.out}/")
        lr_sweep.run_sweep(jobs, settings, args.out, workers=args.workers, threads=args.threads, on_result=write,
                           deadline=None if args.max_minutes is None else started + 60 * args.max_minutes, extend_edges=args.extend)
        write(lr_sweep.read_results(args.out))
    print((args.out / "sweep.md").read_text())
    print("Chosen by the worst-share rule (lr per method and rank):")
    for name, choice in lr_sweep_report.summary(lr_sweep.read_results(args.out), _split(args.data)).items():
        print(f"  {name:24s} " + (f"lr {choice['lr']:g} (worst share {choice['worst_share']:.2f} on {choice['worst_dataset']})"
                                   if choice["lr"] is not None else choice["why"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
