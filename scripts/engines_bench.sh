#!/usr/bin/env bash
# One process vs DDP vs FSDP2 vs DeepSpeed ZeRO-2 vs ZeRO-3 on the real default model (docs/benchmarks.md §5):
# PaCA r=16, global batch 4 x 128 tokens, 10 steps, one core per process. Prints one table row per engine.
# usage: bash scripts/engines_bench.sh [OUT]   (default runs/engines)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/engines}
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=1
COMMON=(train --device cpu --steps 10 --sample-tokens 0 --no-progress --seq-len 128)
TWO=("$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m paca_core)
run() { local name=$1; shift; echo "== $name: $*" >&2; "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1; }
mkdir -p "$OUT"
run one-process "$PY" -m paca_core "${COMMON[@]}" --batch-size 4
run ddp "${TWO[@]}" "${COMMON[@]}" --batch-size 2
run fsdp2 "${TWO[@]}" "${COMMON[@]}" --batch-size 2 --fsdp
run zero2 "${TWO[@]}" "${COMMON[@]}" --batch-size 2 --deepspeed zero2
run zero3 "${TWO[@]}" "${COMMON[@]}" --batch-size 2 --deepspeed zero3
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| run | held-out loss before → after | training time | total time | peak RSS (rank 0) |")
print("|---|---|---|---|---|")
for name in ("one-process", "ddp", "fsdp2", "zero2", "zero3"):
    m = json.loads((out / name / "metrics.json").read_text())
    print(f"| {name} | {m['held_out_loss_before']:.4f} → {m['held_out_loss_after']:.4f} | "
          f"{m['train_seconds']:.1f} s | {m['total_seconds']:.1f} s | {m['peak_memory_bytes'] / 2**20:,.0f} MiB |")
PY
