"""Check `paca plan` against this CPU (docs/plan.md), with one command:

    python scripts/validate_plan.py            # writes runs/plan-validation/{report.md,report.json}

1. Peak: for three sequence lengths, a subprocess builds the default model's architecture
   (SmolLM2-135M, fp32, real CPU tensors), sets up PaCA, runs a 1 x 2 step to create the optimizer
   state, resets the kernel's peak-RSS counter (/proc/self/clear_refs) and runs one step at the shape. The RSS growth
   of that step is compared with the plan's predicted growth (traced peak minus what was live before
   the step), and the tracker on the same real tensors with the fake-tensor plan.
2. Time: `paca plan --device-profile cpu --calibrate` and `paca bench --mode speed` on the same
   shapes in the same session; predicted / measured step time per method.

Run it on an idle machine: both halves measure this CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = "floor,full,peft-lora,lora,lorafa,velora,paca"


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_child(seq_len: int, batch_size: int, method: str) -> dict:
    """In a fresh process: RSS growth of one real step vs the plan of the same step."""
    import torch

    from paca_core.plan.shapes import load_config
    from paca_core.plan.trace import build, phased_step, trace_step
    from paca_core.workloads.specs import parse_method_spec

    torch.set_num_threads(2)
    config = load_config("smollm2-135m")
    spec = parse_method_spec(method)
    rank = spec.rank(8, True)
    planned, _ = trace_step(build(config, spec, rank, torch.float32, fake=True), seq_len, batch_size)
    real = build(config, spec, rank, torch.float32, fake=False)
    ids = torch.zeros((batch_size, seq_len), dtype=torch.long)
    # No warm-up step at this shape: memory a previous step freed stays in the process's heap (RSS) and
    # would hide this step's growth. build() already ran a 1 x 2 step, so the optimizer state exists.
    before = _rss_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    phased_step(real.prepared, ids)
    growth = _rss_kib("VmHWM") * 1024 - before
    tracked, _ = trace_step(real, seq_len, batch_size)
    return {
        "seq_len": seq_len, "batch_size": batch_size, "method": method,
        "planned_peak": planned.peak_bytes, "planned_baseline": planned.baseline_bytes,
        "planned_growth": planned.peak_bytes - planned.baseline_bytes,
        "tracked_real_peak": tracked.peak_bytes, "rss_growth": growth,
    }


#: glibc's malloc as configured: its mmap threshold grows after large frees, so big blocks are then
#: carved from the heap and stay resident after free. Fixed at 64 KiB, every large block is its own
#: mapping, returned to the OS when freed: RSS then follows live bytes (what a caching device allocator
#: reports as allocated).
ALLOCATORS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=65536": {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}}


def run_peak(seq_lens: list[int], batch_size: int, method: str) -> list[dict]:
    rows = []
    for allocator, env in ALLOCATORS.items():
        for seq in seq_lens:
            out = subprocess.run([sys.executable, __file__, "--child", str(seq), str(batch_size), method], capture_output=True,
                                 text=True, check=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false", **env))
            rows.append(dict(json.loads(out.stdout.strip().splitlines()[-1]), allocator=allocator))
    return rows


def run_time(out: Path, seq_len: int, batch_size: int, steps: int) -> list[dict]:
    bench_dir, plan_dir = out / "bench", out / "plan"
    paca = [sys.executable, "-m", "paca_core"]
    subprocess.run(paca + ["plan", "--model", "smollm2-135m", "--methods", METHODS, "--device-profile", "cpu", "--calibrate",
                           "--dtype", "fp32", "--seq-len", str(seq_len), "--batch-size", str(batch_size), "--no-search",
                           "--out", str(plan_dir)], check=True)
    subprocess.run(paca + ["bench", "--mode", "speed", "--model", "default", "--device", "cpu", "--methods", METHODS,
                           "--seq-len", str(seq_len), "--batch-size", str(batch_size), "--steps", str(steps), "--out", str(bench_dir)], check=True)
    plan = {r["method"]: r for r in json.loads((plan_dir / "plan.json").read_text())["records"]}
    bench = json.loads((bench_dir / "bench.json").read_text())
    rows = []
    for record in bench["speed"]:
        if record.get("status") != "ok" or record["method"] not in plan:
            continue
        predicted = plan[record["method"]]["step_seconds"]
        measured = record["median_step_s"]
        rows.append({"method": record["method"], "predicted_s": predicted, "measured_s": measured, "ratio": predicted / measured,
                     "bound": plan[record["method"]]["bound"], "kernels": plan[record["method"]]["kernels"]})
    return rows


def report(peak_rows: list[dict], time_rows: list[dict]) -> str:
    mib = 1 << 20
    lines = ["### Peak: plan vs real tensors vs RSS growth (SmolLM2-135M shapes, fp32, PaCA r=16)", "",
             "| host allocator | seq × batch | planned peak (fake) | tracker on real tensors | planned growth of the step | RSS growth of the step | RSS / planned |",
             "|---|---|---|---|---|---|---|"]
    for r in peak_rows:
        lines.append(f"| {r['allocator']} | {r['seq_len']} × {r['batch_size']} | {r['planned_peak'] / mib:.1f} MiB | {r['tracked_real_peak'] / mib:.1f} MiB | "
                     f"{r['planned_growth'] / mib:.1f} MiB | {r['rss_growth'] / mib:.1f} MiB | {r['rss_growth'] / r['planned_growth']:.3f} |")
    if time_rows:
        lines += ["", "### Step time: plan on the calibrated cpu profile vs paca bench, same shapes, same session", "",
                  "| method | predicted s | measured s (median) | predicted / measured | bound (plan) | kernels |", "|---|---|---|---|---|---|"]
        for r in time_rows:
            lines.append(f"| {r['method']} | {r['predicted_s']:.3f} | {r['measured_s']:.3f} | {r['ratio']:.2f} | {r['bound']} | {r['kernels']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(peak_child(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", default="128,512,1024")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--method", default="paca", help="method of the peak check")
    p.add_argument("--time-seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--out", type=Path, default=Path("runs/plan-validation"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    peak_rows = run_peak([int(s) for s in args.seq_lens.split(",")], args.batch_size, args.method)
    time_rows = [] if args.skip_time else run_time(args.out, args.time_seq_len, args.batch_size, args.steps)
    (args.out / "report.json").write_text(json.dumps({"peak": peak_rows, "time": time_rows}, indent=1))
    text = report(peak_rows, time_rows)
    (args.out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
