"""plan.md's table and plan's PNG plots (drawn with the matplotlib set-up the bench's plots use)."""
from __future__ import annotations

from pathlib import Path

from ..workloads.plots import pyplot, subplot_grid

GIB = 1 << 30


def _gib(value: int | None) -> str:
    return "–" if value is None else f"{value / GIB:.1f}"


def markdown_table(records: list[dict]) -> str:
    """One row per record: memory by kind (GiB per rank), whether it fits, the searched maxima and time. A
    longest sequence that is the model's context (not a memory limit) says "(context)".

    Memory columns: ``live peak`` (the tensors' bytes, as traced), ``allocated`` (``max_memory_allocated``:
    the allocator's blocks), ``reserved`` (``max_memory_reserved``: its segments) and ``device`` (reserved plus
    what the runtime holds outside the allocator: what nvidia-smi shows). ``fits`` compares ``device`` with
    the limit named under the table."""
    layouts = sorted({r.get("layout", "one process") for r in records})
    limits = sorted({f"{r['device_profile']}: {_gib(r['usable_bytes'])} GiB ({r.get('budget_source', 'limit')})" for r in records})
    lines = [
        f"Memory columns: GiB per rank ({', '.join(layouts)}); tokens/s: all ranks together; step s: one optimizer step.",
        "live peak: the step's tensors; allocated / reserved: the allocator's blocks / segments (torch.cuda.max_memory_allocated / "
        "max_memory_reserved); device: reserved + the runtime's own memory (CUDA context...), what nvidia-smi shows. "
        f"fits: device <= the limit per rank ({'; '.join(limits)}).",
        "",
        "| profile | method | seq × batch | r | trainable | weights GiB | grads GiB | optimizer GiB | saved act. GiB | live peak GiB | "
        "allocated GiB | reserved GiB | device GiB | fits | max seq (this batch) | max batch (this seq) | step s | tokens/s | bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        b = r["bytes"]
        host = f" (+{_gib(b['host'])} host)" if b.get("host") else ""
        lines.append(
            f"| {r['device_profile']} | {r['method']} | {r['seq_len']} × {r['batch_size']} | {r['rank'] or '–'} | {r['trainable_params'] / 1e6:.1f}M | "
            f"{_gib(b['weights'])} | {_gib(b['gradients'])} | {_gib(b['optimizer'])} | {_gib(b['saved_activations'])} | {_gib(b['peak'])}{host} | "
            f"{_gib(b.get('allocated_peak'))} | {_gib(b.get('reserved_peak'))} | {_gib(b.get('device_total'))} | "
            f"{'yes' if r['fits'] else '**no**'} | {_max_seq(r)} | "
            f"{r['max_batch_size'] if r['max_batch_size'] is not None else '–'} | {r['step_seconds']:.3f} | {r['tokens_per_second']:,.0f} | {r['bound']} |"
        )
    return "\n".join(lines)


def _max_seq(record: dict) -> str:
    if record["max_seq_len"] is None:
        return "–"
    return f"{record['max_seq_len']} (context)" if record.get("max_seq_len_is_context") else str(record["max_seq_len"])


def plot_plan(records: list[dict], out_dir: Path) -> list[Path]:
    """peak_memory.png (the device total 'fits' compares) and tokens_per_second.png: per profile and batch size, one
    line per method over seq len."""
    plt = pyplot()
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["device_profile"], r["batch_size"]), []).append(r)
    paths = []
    for key, label, ylabel in (("device_total", "peak_memory.png", "device GiB per rank (reserved + runtime)"),
                               ("tokens_per_second", "tokens_per_second.png", "tokens/s (simulated)")):
        fig, axes = subplot_grid(plt, len(groups), 3.6)
        for ax, ((profile, batch), group) in zip(axes, groups.items()):
            for method in dict.fromkeys(r["method"] for r in group):
                rows = sorted((r for r in group if r["method"] == method), key=lambda r: r["seq_len"])
                ys = [r["bytes"].get(key, r["bytes"]["peak"]) / GIB if key == "device_total" else r["tokens_per_second"] for r in rows]
                ax.plot([r["seq_len"] for r in rows], ys, marker="o", label=method)
            if key == "device_total":
                ax.axhline(group[0]["usable_bytes"] / GIB, color="k", linestyle="--", linewidth=0.8, label="limit")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{profile}, batch {batch}")
        axes[0].legend(fontsize=7)
        fig.suptitle("paca plan (simulated from traced steps and device profiles)")
        fig.tight_layout()
        paths.append(out_dir / label)
        fig.savefig(paths[-1], dpi=80)
        plt.close(fig)
    return paths
