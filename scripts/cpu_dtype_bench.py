"""fp32 vs bf16 training steps of the main job's shape on this CPU, interleaved in one process.

The main job's step (the default model SmolLM2-135M-Instruct with real weights, PaCA at paca train's defaults,
4 x 128 tokens of the default data, AdamW) on an fp32 base and on a bf16 base, alternating one step of each per
round after one warm-up step each, so a busy machine slows both alike; prints every step and the median ratio.
What ``--dtype auto`` would pick here, and why, is printed first (docs/benchmarks.md, section 9).

    python scripts/cpu_dtype_bench.py [--rounds 8]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import devices
from paca_core.files import assets
from paca_core.cli.dispatch import build_parser
from paca_core.data.dataset import load_dataset
from paca_core.model import prepare_model
from paca_core.flags.train_options import build_configs

TOKENS = 4 * 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    rounds = parser.parse_args().rounds
    print(f"--dtype auto here: {devices.default_dtype_choice('cpu').reason}")
    path = assets.resolve_model_path("default")
    configs = build_configs(build_parser().parse_args(["train"]))
    runs = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model, tokenizer = assets.load_model_and_tokenizer(path, dtype=dtype)
        adapted = prepare_model(model, configs, device="cpu")
        runs[name] = (adapted, devices.make_adamw(adapted.trainable_parameters(), "cpu", lr=5e-3))
    batch = load_dataset(assets.default_dataset_path(), tokenizer, 128).input_ids[:4]

    def step(name: str) -> tuple[float, float]:
        adapted, optimizer = runs[name]
        started = time.perf_counter()
        loss = adapted(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started, loss.item()

    for name in runs:  # warm-up
        step(name)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(rounds):
        for name in runs:
            taken, loss = step(name)
            seconds[name].append(taken)
            load = open("/proc/loadavg").read().split()[0]
            print(f"round {index} {name}: {taken:.2f} s, loss {loss:.4f}, load {load}", flush=True)
    for name, values in seconds.items():
        print(f"{name}: median {statistics.median(values):.2f} s/step = {TOKENS / statistics.median(values):.0f} tokens/s")
    per_round = [f / b for f, b in zip(seconds["fp32"], seconds["bf16"])]
    print(f"bf16 / fp32 tokens/s: {statistics.median(seconds['fp32']) / statistics.median(seconds['bf16']):.2f} (medians); "
          f"per round {min(per_round):.2f}-{max(per_round):.2f}")


if __name__ == "__main__":
    main()
