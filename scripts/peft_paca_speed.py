"""Our PaCA against PEFT's PaCA (peft >= 0.22) on the same model, shapes and columns, in one process.

    python scripts/peft_paca_speed.py --model smollm2-135m-shape:4 --seq-len 256 --batch-size 2 --repeats 9

For each dtype (fp32, bf16) and graph mode (eager, compile) it builds the model twice from the same seed, sets
one up as ``paca`` and the other as ``peft-paca`` exactly as ``paca bench`` does (``paca_core.workloads.prepare``:
PEFT's ``PacaConfig`` gets our columns through ``paca_indices_pattern`` and our scaling), checks that the two
give the same first loss, counts the bytes each keeps for backward (``saved_tensors_hooks``; storages of the
model's own parameters and buffers are not counted), then times training steps (forward, backward, AdamW)
alternating between the two (ABBA order per repeat) and reports the medians and their ratio. A shared machine
speeds up and slows down both alike only when they run interleaved, so only ratios within one run mean anything.

Results go to stdout as a markdown table and, with --out, as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import devices  # noqa: E402
from paca_core import extras  # noqa: E402
from paca_core.errors import PacaConfigError  # noqa: E402
from paca_core.memory.measure import count_saved_tensors  # noqa: E402
from paca_core.train.steps import train_step  # noqa: E402
from paca_core.workloads.models import build_model, parse_model, vocab_size  # noqa: E402
from paca_core.workloads.prepare import Prepared, prepare  # noqa: E402
from paca_core.workloads.specs import parse_method_spec  # noqa: E402

logger = logging.getLogger("peft_paca_speed")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ENTRIES = ("paca", "peft-paca")


def _prepared(entry: str, args: argparse.Namespace, dtype: torch.dtype, graph_mode: str) -> Prepared:
    """``entry`` set up as paca bench's worker sets it up (same seed: the same weights for both entries)."""
    device = torch.device("cpu")
    choice = parse_model(args.model)
    if args.vocab is not None and choice.kind == "synthetic":
        model = _synthetic_with_vocab(choice, args.vocab, dtype, args.seed)
    else:
        model, _ = build_model(choice, dtype, device, seed=args.seed)
    torch.manual_seed(args.seed)
    options = {"target_modules": args.target_modules}
    prepared = prepare(parse_method_spec(entry), model, args.rank, options, device, lr=args.lr)
    devices.apply_graph_mode(prepared.module, device, graph_mode)
    prepared.module.train()
    return prepared


def _synthetic_with_vocab(choice, vocab: int, dtype: torch.dtype, seed: int):
    """A synthetic shape with a smaller vocabulary: the LM head and loss, identical for both entries, would
    otherwise take most of a CPU step and hide the adapted layers (SmolLM2's head is 49152 x 576)."""
    from transformers import LlamaForCausalLM

    from paca_core.workloads.models import default_dtype, synthetic_config

    config = synthetic_config(choice)
    config.vocab_size = vocab
    torch.manual_seed(seed)
    with default_dtype(dtype):
        return LlamaForCausalLM(config).eval()


def _step(prepared: Prepared, ids: torch.Tensor, grad_accum: int = 1) -> float:
    """One optimizer step over ``grad_accum`` micro-batches (PEFT swaps its columns in and out per micro-batch; ours
    writes them once per optimizer step)."""
    return float(train_step(prepared.forward, [ids] * grad_accum, prepared.optimizer, torch.device("cpu"),
                            params=prepared.params, grad_accum=grad_accum).loss)


def _saved_bytes(prepared: Prepared, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for one forward (not the model's own parameters and buffers)."""
    with count_saved_tensors(prepared.module) as report:
        loss = prepared.forward(ids)
    loss.backward()
    prepared.optimizer.zero_grad(set_to_none=True)
    return report.activation_bytes


def compare(args: argparse.Namespace, dtype_name: str, graph_mode: str) -> dict:
    """One configuration: both entries built, checked against each other, counted and timed interleaved."""
    dtype = DTYPES[dtype_name]
    built = {entry: _prepared(entry, args, dtype, graph_mode) for entry in ENTRIES}
    vocab = vocab_size(built["paca"].module)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(args.seed + 1))
    saved = {entry: _saved_bytes(p, ids) for entry, p in built.items()} if graph_mode == "eager" else {}
    first = {entry: _step(p, ids) for entry, p in built.items()}  # also compiles, under compile
    for _ in range(args.warmup):
        for p in built.values():
            _step(p, ids, args.grad_accum)
    times: dict[str, list[float]] = {entry: [] for entry in ENTRIES}
    cpu_times: dict[str, list[float]] = {entry: [] for entry in ENTRIES}
    for repeat in range(args.repeats):
        order = ENTRIES if repeat % 2 == 0 else ENTRIES[::-1]  # ABBA: neither always runs first
        for entry in order:
            start, cpu_start = time.perf_counter(), time.process_time()
            _step(built[entry], ids, args.grad_accum)
            times[entry].append(time.perf_counter() - start)
            cpu_times[entry].append(time.process_time() - cpu_start)
    median = {entry: statistics.median(t) for entry, t in times.items()}
    cpu_median = {entry: statistics.median(t) for entry, t in cpu_times.items()}
    # Each repeat's two steps ran back to back: their ratio cancels the slow drifts of a shared machine.
    paired = statistics.median(ours / theirs for ours, theirs in zip(times["paca"], times["peft-paca"]))
    return {
        "dtype": dtype_name, "graph_mode": graph_mode, "first_loss": first, "saved_bytes": saved, "step_times_s": times,
        "step_cpu_times_s": cpu_times, "median_step_s": median, "median_step_cpu_s": cpu_median,
        "ratio_ours_over_peft": median["paca"] / median["peft-paca"], "paired_ratio_median": paired,
        "cpu_ratio_ours_over_peft": cpu_median["paca"] / cpu_median["peft-paca"],
        "tokens_per_s": {entry: args.grad_accum * args.batch_size * args.seq_len / m for entry, m in median.items()},
    }


def _machine() -> dict:
    """The CPU model, core count and ISA torch uses, for the report."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": torch.get_num_threads(), "isa": torch.backends.cpu.get_cpu_capability(),
            "platform": platform.platform(), "torch": torch.__version__, "peft": extras.installed_version("peft")}


def markdown(results: list[dict], machine: dict, args: argparse.Namespace) -> str:
    lines = [
        f"{machine['cpu']}, {machine['cores']} threads, torch ISA {machine['isa']}; torch {machine['torch']}, peft {machine['peft']}; "
        f"{args.model}{f' (vocab {args.vocab})' if args.vocab else ''}, batch {args.batch_size} x seq {args.seq_len}, r {args.rank}, {args.repeats} interleaved repeats (medians; CPU ms: this process's CPU time per step)",
        "",
        "| dtype | graph mode | ours step (ms) | PEFT PaCA step (ms) | ours / PEFT | ours CPU ms | PEFT CPU ms | ours / PEFT (CPU) "
        "| median of paired ours / PEFT | ours tokens/s | PEFT tokens/s | ours kept for backward (MiB) | PEFT kept for backward (MiB) "
        "| first loss ours / PEFT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, c, s, t, f = r["median_step_s"], r["median_step_cpu_s"], r["saved_bytes"], r["tokens_per_s"], r["first_loss"]
        saved = [f"{s[e] / 2**20:.2f}" if e in s else "(eager row)" for e in ENTRIES]
        lines.append(f"| {r['dtype']} | {r['graph_mode']} | {m['paca'] * 1e3:.1f} | {m['peft-paca'] * 1e3:.1f} | "
                     f"{r['ratio_ours_over_peft']:.3f} | {c['paca'] * 1e3:.1f} | {c['peft-paca'] * 1e3:.1f} | "
                     f"{r['cpu_ratio_ours_over_peft']:.3f} | {r['paired_ratio_median']:.3f} | {t['paca']:,.0f} | {t['peft-paca']:,.0f} | {saved[0]} | {saved[1]} | "
                     f"{f['paca']:.5f} / {f['peft-paca']:.5f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-shape:4", help="a paca bench --model (synthetic shape[:layers], 'default', a folder)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="a synthetic shape's vocabulary instead of its own (a smaller LM head, so the adapted layers dominate)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16, help="PaCA r (both)")
    parser.add_argument("--target-modules", default=None, help="as paca bench (default: the 7 LLaMA projections)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--graph-modes", default="eager,compile")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (both)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); on a shared box 1 thread makes the CPU-time columns steadier")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        extras.require_peft_paca("scripts/peft_paca_speed.py")
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        modes = [m.strip() for m in args.graph_modes.split(",") if m.strip()]
        unknown = [d for d in dtypes if d not in DTYPES] + [m for m in modes if m not in ("eager", "compile")]
        if unknown:
            raise PacaConfigError(f"unknown --dtypes/--graph-modes value(s): {', '.join(unknown)} (fp32, bf16; eager, compile)")
        choice = parse_model(args.model)
        if choice.kind == "path" and not Path(args.model).expanduser().is_dir():
            raise PacaConfigError(f"--model {args.model!r} is neither a synthetic shape, 'default' nor a model folder.")
        if min(args.seq_len, args.batch_size, args.rank, args.repeats, args.grad_accum) < 1 or args.warmup < 0:
            raise PacaConfigError("--seq-len, --batch-size, --rank, --grad-accum and --repeats must be >= 1, --warmup >= 0.")
    except PacaConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = _machine()
    results = []
    for graph_mode in modes:
        for dtype_name in dtypes:
            started = time.perf_counter()
            results.append(compare(args, dtype_name, graph_mode))
            logger.warning("%s %s done in %.0f s: ours/PEFT %.3f", dtype_name, graph_mode, time.perf_counter() - started,
                           results[-1]["ratio_ours_over_peft"])
    text = markdown(results, machine, args)
    print(text)
    if args.out is not None:
        args.out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "machine": machine, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
