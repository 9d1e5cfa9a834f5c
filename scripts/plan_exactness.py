"""Fake-tensor plan vs the same trace on real CPU tensors, on a real model's shapes (docs/plan.md):

    python scripts/plan_exactness.py --methods qpaca,peft-qlora      # SmolLM2-135M shapes, 128 x 4, fp32

Builds the model twice from its config (fake tensors; real random weights), sets it up for each method
as `paca plan` does and traces one training step; prints both and whether every number is equal.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch

    from paca_core.workloads.specs import parse_method_spec
    from paca_core.plan import trace
    from paca_core.plan.shapes import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="paca,qpaca,peft-qlora")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=8, help="LoRA's rank; PaCA-style methods at 2x (matched parameters)")
    args = p.parse_args()
    config = load_config(args.model)
    all_equal = True
    for method in args.methods.split(","):
        spec = parse_method_spec(method)
        rows = {}
        for fake in (True, False):
            started = time.perf_counter()
            traced = trace.build(config, spec, spec.rank(args.rank, True), torch.float32, fake=fake)
            step, counts = trace.trace_step(traced, args.seq_len, args.batch_size)
            rows["fake" if fake else "real"] = dict(peak=step.peak_bytes, saved=step.saved_bytes, flops=step.flops,
                                                    bytes_moved=step.bytes_moved, kernels=step.kernels, **counts)
            print(json.dumps({"method": method, "tensors": "fake" if fake else "real",
                              "seconds": round(time.perf_counter() - started, 1), **rows["fake" if fake else "real"]}))
        equal = rows["fake"] == rows["real"]
        all_equal &= equal
        print(f"{method}: {'equal' if equal else 'DIFFERENT'}")
    return 0 if all_equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
