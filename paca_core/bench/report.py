"""Turn bench results into ratios, a JSON file, a markdown report and PNG plots."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import devices

from ..workloads.four_bit import four_bit_entries
from ..workloads.plots import pyplot, subplot_grid

MIB = 2**20


def headline_memory(record: dict) -> int | None:
    """The memory figure compared across methods: exact counted bytes on CPU (RSS also counts the
    interpreter and libraries), the allocator peak on accelerators."""
    if record.get("status") != "ok":
        return None
    if devices.shares_host_memory(record.get("device", "cpu")):
        return record["counted"]["total_bytes"]
    return record.get("peak_memory_bytes")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


#: PEFT's own PaCA, the reference our PaCA entries are put beside; its 4-bit form for entries on a 4-bit base.
PEFT_PACA, PEFT_QPACA = "peft-paca", "peft-qpaca"


def add_ratios(records: list[dict]) -> None:
    """Ratios against PEFT LoRA (same shape and rank), against the floor (same shape) and, where the run has it,
    against PEFT's PaCA (``vs_peft_paca``: peft-paca, or peft-qpaca for an entry on a 4-bit base), in place."""
    ok = [r for r in records if r.get("status") == "ok"]
    peft = {(r["seq_len"], r["batch_size"], r.get("group_rank")): r for r in ok if r["method"] == "peft-lora"}
    floor = {(r["seq_len"], r["batch_size"]): r for r in ok if r["method"] == "floor"}
    peft_paca = {(r["method"], r["seq_len"], r["batch_size"], r.get("group_rank")): r for r in ok if r["method"] in (PEFT_PACA, PEFT_QPACA)}
    for record in ok:
        reference_peft = peft.get((record["seq_len"], record["batch_size"], record.get("group_rank")))
        reference_floor = floor.get((record["seq_len"], record["batch_size"]))
        four_bit = record["method"].split("@", 1)[0] in four_bit_entries()
        reference_paca = peft_paca.get((PEFT_QPACA if four_bit else PEFT_PACA, record["seq_len"], record["batch_size"], record.get("group_rank")))
        for name, reference in (("vs_peft_lora", reference_peft), ("vs_floor", reference_floor), ("vs_peft_paca", reference_paca)):
            if reference is None:
                continue
            record[name] = {
                "step_time": _ratio(record["median_step_s"], reference["median_step_s"]),
                "memory": _ratio(headline_memory(record), headline_memory(reference)),
                "peak_memory": _ratio(record["peak_memory_bytes"], reference["peak_memory_bytes"]),
                "saved_activations": _ratio(record["counted"]["saved_activation_bytes"], reference["counted"]["saved_activation_bytes"]),
            }
        if reference_floor is not None:
            record["activations_over_floor_bytes"] = (
                record["counted"]["saved_activation_bytes"] - reference_floor["counted"]["saved_activation_bytes"]
            )


def write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=2, default=str))


def _fmt(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:{spec}}{suffix}"


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / MIB:,.1f}"


def _status_text(record: dict) -> str:
    reason = (record.get("reason") or "").replace("|", "/").replace("\n", " ")
    return f"{record['status']}: {reason[:160]}"


def speed_groups(records: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["seq_len"], record["batch_size"], record.get("group_rank")), []).append(record)
    return groups


def speed_markdown(records: list[dict], search_kind: str | None = None) -> str:
    lines = []
    for (seq, batch, rank), group in speed_groups(records).items():
        device = next((r.get("device") for r in group if r.get("device")), "?")
        memory_kind = "counted bytes" if device != "?" and devices.shares_host_memory(device) else "device peak"
        # PEFT's PaCA in the group: ours beside it (step, peak memory, kept for backward), as beside PEFT LoRA
        paca_columns = any(r.get("vs_peft_paca") for r in group)
        lines += [
            f"#### seq {seq} × batch {batch}, LoRA rank {rank} ({device})",
            "",
            "| method | r | trainable params | step (ms) | tokens/s | peak MiB (device) | kept for backward MiB | over floor MiB "
            "| weights+grads+optim MiB | step ×PEFT LoRA | step ×floor | memory ×PEFT LoRA | memory ×floor |"
            + (" step ×PEFT PaCA | peak ×PEFT PaCA | kept for backward ×PEFT PaCA |" if paca_columns else "")
            + (f" max {search_kind} under budget |" if search_kind else ""),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if paca_columns else "") + ("---|" if search_kind else ""),
        ]
        for r in group:
            if r.get("status") != "ok":
                cells = [r["method"], _fmt(r.get("rank"), "d"), _status_text(r)] + ["–"] * (10 + 3 * paca_columns + bool(search_kind))
                lines.append("| " + " | ".join(cells) + " |")
                continue
            c = r["counted"]
            state = c["parameter_bytes"] + c["gradient_bytes"] + c["optimizer_state_bytes"] + c["host_table_bytes"]
            vp, vf = r.get("vs_peft_lora", {}), r.get("vs_floor", {})
            cells = [
                r["method"],
                _fmt(r.get("rank"), "d"),
                f"{r['trainable_parameters']:,}",
                _fmt(r["median_step_s"] * 1000, ".1f"),
                _fmt(r["tokens_per_s"], ",.0f"),
                _mib(r["peak_memory_bytes"]),
                _mib(c["saved_activation_bytes"]),
                _mib(r.get("activations_over_floor_bytes")),
                _mib(state),
                _fmt(vp.get("step_time"), ".2f", "×"),
                _fmt(vf.get("step_time"), ".2f", "×"),
                _fmt(vp.get("memory"), ".2f", "×"),
                _fmt(vf.get("memory"), ".2f", "×"),
            ]
            if paca_columns:
                vpp = r.get("vs_peft_paca", {})
                cells += [_fmt(vpp.get("step_time"), ".2f", "×"), _fmt(vpp.get("peak_memory"), ".2f", "×"),
                          _fmt(vpp.get("saved_activations"), ".2f", "×")]
            if search_kind:
                s = r.get("search")
                cells.append("–" if not s else (f"≥ {s['best']:,} (cap)" if s["capped"] else f"{s['best']:,}"))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Memory ratios use {memory_kind}." + (" ×PEFT PaCA: our PaCA entries over peft-paca (4-bit ones over "
                  "peft-qpaca): the device peak (VmHWM on CPU) and the counted bytes kept for backward." if paca_columns else ""), ""]
    return "\n".join(lines)


def accuracy_markdown(records: list[dict]) -> str:
    lines = [
        "| method | r | trainable params | lr | held-out loss before | held-out loss after | Δ | median step (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | {_fmt(r.get('rank'), 'd')} | {_status_text(r)} | – | – | – | – | – |")
            continue
        lines.append(
            f"| {r['method']} | {_fmt(r.get('rank'), 'd')} | {r['trainable_parameters']:,} | {_fmt(r.get('lr'), 'g')} | "
            f"{r['held_out_loss_before']:.4f} | {r['held_out_loss']:.4f} | {r['held_out_loss'] - r['held_out_loss_before']:+.4f} | "
            f"{_fmt(r.get('median_step_s'), '.2f')} |"
        )
    return "\n".join(lines)


def markdown_report(document: dict) -> str:
    env = document["environment"]
    lines = [
        "# paca bench",
        "",
        f"- command: `{document['command']}`",
        f"- device: {env['device_name']} ({env['device']}), graph mode {document['settings']['graph_mode']}, dtype {document['settings'].get('dtype')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- model: {document['settings']['model']}",
        "",
    ]
    if document.get("speed"):
        search = document["settings"].get("search")
        lines += ["## Speed and memory", "", speed_markdown(document["speed"], search if document["settings"].get("memory_budget") else None)]
    if document.get("accuracy"):
        a = document["settings"]["accuracy"]
        lines += [
            "## Held-out loss",
            "",
            f"{a['model']}, {a['steps']} steps of batch {a['batch_size']} × {a['seq_len']} tokens on {a['data']}.",
            "",
            accuracy_markdown(document["accuracy"]),
            "",
        ]
    return "\n".join(lines)


# --- plots ----------------------------------------------------------------------------------------


def plot_speed(records: list[dict], out_dir: Path) -> list[Path]:
    """step_time.png (median step per method) and memory.png (counted bytes stacked, device peak marked)."""
    plt = pyplot()
    groups = speed_groups(records)
    paths = []
    fig, axes = subplot_grid(plt, len(groups), 0.35 * max(len(g) for g in groups.values()) + 1.5)
    for ax, ((seq, batch, rank), group) in zip(axes, groups.items()):
        ok = [r for r in group if r.get("status") == "ok"]
        names = [r["method"] for r in ok]
        ax.barh(names, [r["median_step_s"] * 1000 for r in ok], color=["#c44" if n.startswith("peft") or n in ("floor", "full") else "#36a" for n in names])
        ax.invert_yaxis()
        ax.set_xlabel("median step time (ms)")
        ax.set_title(f"seq {seq} × batch {batch}, r {rank}")
    fig.suptitle("paca bench: step time (blue: paca-hal methods, red: peers)")
    fig.tight_layout()
    paths.append(out_dir / "step_time.png")
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)

    parts = [
        ("parameter_bytes", "weights", "#999"),
        ("gradient_bytes", "gradients", "#e90"),
        ("optimizer_state_bytes", "optimizer state", "#a5c"),
        ("host_table_bytes", "host rows (MEFT)", "#6b6"),
        ("saved_activation_bytes", "kept for backward", "#36a"),
    ]
    fig, axes = subplot_grid(plt, len(groups), 0.35 * max(len(g) for g in groups.values()) + 1.8)
    for ax, ((seq, batch, rank), group) in zip(axes, groups.items()):
        ok = [r for r in group if r.get("status") == "ok"]
        names = [r["method"] for r in ok]
        left = [0.0] * len(ok)
        for key, label, colour in parts:
            values = [r["counted"][key] / MIB for r in ok]
            ax.barh(names, values, left=left, label=label, color=colour)
            left = [a + b for a, b in zip(left, values)]
        ax.scatter([r["peak_memory_bytes"] / MIB for r in ok], names, marker="|", s=200, color="k", label="device peak (RSS on CPU)", zorder=3)
        ax.invert_yaxis()
        ax.set_xlabel("MiB")
        ax.set_title(f"seq {seq} × batch {batch}, r {rank}")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("paca bench: memory (bars: exact counted bytes)")
    fig.tight_layout()
    paths.append(out_dir / "memory.png")
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)
    return paths


def plot_loss_curves(records: list[dict], out_dir: Path) -> Path:
    """loss_curves.png: training loss per step (thin) and held-out loss (markers) per method."""
    plt = pyplot()
    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    for index, r in enumerate(x for x in records if x.get("status") == "ok"):
        colour = plt.cm.tab20(index % 20)
        if r["train_loss"]:
            train_ax.plot(range(1, len(r["train_loss"]) + 1), r["train_loss"], lw=1, color=colour, label=r["method"])
        steps, losses = zip(*r["held_out"])
        eval_ax.plot(steps, losses, marker="o", lw=1, color=colour, label=r["method"])
    train_ax.set(xlabel="step", ylabel="training loss", title="training loss")
    eval_ax.set(xlabel="step", ylabel="held-out loss", title="held-out loss")
    eval_ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "loss_curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
