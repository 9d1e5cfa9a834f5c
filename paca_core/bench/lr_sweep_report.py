"""Tables of a learning-rate sweep: improvement per method, rank, data set and lr, the lr the
worst-share rule (:mod:`.lr_rule`) picks for each method and rank, and what the CLI defaults give."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..files.atomic import write_bytes_atomic
from .lr_rule import DIVERGED, LrChoice, LrRuleError, average_best_lr, choose_lr

Group = tuple[str, "int | None"]  # (method, rank)


def improvement_tables(records: list[dict]) -> dict[Group, dict[str, dict[float, float]]]:
    """{(method, rank): {dataset: {lr: improvement}}} from finished runs (diverged → -inf)."""
    tables: dict[Group, dict[str, dict[float, float]]] = {}
    for r in records:
        if r.get("status") not in ("ok", "diverged") or r.get("alpha") is not None:
            continue
        value = r["improvement"] if r["status"] == "ok" else DIVERGED
        tables.setdefault((r["method"], r["rank"]), {}).setdefault(r["dataset"], {})[float(r["lr"])] = value
    return tables


def frozen_losses(records: list[dict]) -> dict[str, float]:
    return {r["dataset"]: r["held_out_loss_before"] for r in records if r.get("status") == "ok"}


def choices(records: list[dict], datasets: list[str]) -> dict[Group, LrChoice | str]:
    """The rule's pick per (method, rank) over the data sets it was run on (all of ``datasets`` for
    the default rank); a string says why there is none yet."""
    out: dict[Group, LrChoice | str] = {}
    for group, table in improvement_tables(records).items():
        try:
            out[group] = choose_lr(table)
        except LrRuleError as error:
            out[group] = str(error)
    return out


def _fmt_lr(lr: float | None) -> str:
    return "–" if lr is None else f"{lr:g}"


def _cell(improvement: float | None, share: float | None) -> str:
    if improvement is None:
        return "–"
    if improvement == DIVERGED:
        return "diverged"
    return f"{improvement:.4f}" + ("" if share is None else f" ({share:.2f})")


def group_markdown(group: Group, table: dict[str, dict[float, float]], choice: LrChoice | str, cli_lr: float | None) -> list[str]:
    """One (method, rank) block: rows = lr, cells = improvement (share of that data set's best)."""
    method, rank = group
    datasets = sorted(table)
    lrs = sorted({lr for by_lr in table.values() for lr in by_lr})
    lines = [f"#### {method}" + ("" if rank is None else f", r = {rank}"), ""]
    lines.append("| lr | " + " | ".join(datasets) + " | worst share |")
    lines.append("|---|" + "---|" * (len(datasets) + 1))
    chosen = choice.lr if isinstance(choice, LrChoice) else None
    best = {d: max(table[d].values()) for d in datasets}
    for lr in lrs:
        shares = choice.shares if isinstance(choice, LrChoice) else {}
        cells = [_cell(table[d].get(lr), table[d][lr] / best[d] if lr in table[d] and best[d] > 0 else None) for d in datasets]
        worst = min((shares[d][lr] for d in shares if lr in shares[d]), default=None)
        label = _fmt_lr(lr) + (" ← rule" if lr == chosen else "") + (" ← CLI default" if cli_lr is not None and abs(lr - cli_lr) < 1e-12 else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'–' if worst is None else f'{worst:.2f}'} |")
    if isinstance(choice, LrChoice):
        best = ", ".join(f"{d} {_fmt_lr(lr)}" for d, lr in sorted(choice.best_lr.items()))
        lines += ["", f"Best lr per data set: {best}; rule: **{_fmt_lr(choice.lr)}** (worst share {choice.worst_share:.2f}, on "
                  f"{choice.worst_dataset}); best average improvement: {_fmt_lr(average_best_lr(table))}."]
    else:
        lines += ["", f"No choice: {choice}."]
    return lines + [""]


def defaults_markdown(tables: dict, cli_default: Callable[[str, int | None], float], pairs: list[tuple[Group, Group]]) -> list[str]:
    """PaCA vs LoRA (or any pair) at the CLI defaults, per data set: the check users care about."""
    lines = ["| data set | " + " | ".join(f"{a[0]} r={a[1]} vs {b[0]} r={b[1]}" for a, b in pairs) + " |",
             "|---|" + "---|" * len(pairs)]
    datasets = sorted({d for t in tables.values() for d in t})
    for dataset in datasets:
        cells = []
        for a, b in pairs:
            values = []
            for method, rank in (a, b):
                lr = cli_default(method, rank)
                values.append(tables.get((method, rank), {}).get(dataset, {}).get(lr))
            if None in values:
                cells.append("–")
            else:
                cells.append(f"{values[0]:.4f} vs {values[1]:.4f} ({values[0] / values[1]:.2f}×)")
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(document: dict, cli_default: Callable[[str, int | None], float], pairs: list[tuple[Group, Group]]) -> str:
    records = document["records"]
    tables = improvement_tables(records)
    picks = choices(records, document["settings"].get("datasets", []))
    frozen = frozen_losses(records)
    s = document["settings"]
    lines = [
        "### Learning-rate sweep: held-out improvement over the frozen model",
        "",
        f"Command: `{document['command']}`",
        "",
        f"Model {'SmolLM2-135M-Instruct (the default)' if s['model'] == 'default' else s['model']}, {s['steps']} AdamW steps of batch {s['batch_size']} × {s['seq_len']} tokens, cosine with "
        f"{s['warmup_steps']} warm-up steps, seed {s['seed']}; held-out: the first {s['eval_examples']} examples of the 10 % "
        f"split. Cells: frozen loss − loss after (share of that data set's best). Worst share: over the data sets, for "
        f"the lrs run on all of them (the rule's candidates). {document.get('wall_s', 0) / 60:.0f} min of wall time in all.",
        "",
        "Frozen held-out loss: " + ", ".join(f"{d} {v:.4f}" for d, v in sorted(frozen.items())),
        "",
    ]
    for group in sorted(tables, key=lambda g: (g[0], g[1] or 0)):
        cli_lr = cli_default(*group)
        lines += group_markdown(group, tables[group], picks[group], cli_lr)
    lines += ["#### At the CLI defaults", ""] + defaults_markdown(tables, cli_default, pairs)
    failed = [r for r in records if r.get("status") not in ("ok", "diverged")]
    if failed:
        lines += ["Failed runs: " + "; ".join(f"{r['key']}: {r.get('reason', '')[:120]}" for r in failed), ""]
    return "\n".join(lines)


def summary(records: list[dict], datasets: list[str]) -> dict[str, dict]:
    """JSON-able rule output per (method, rank): what the harness prints as the chosen defaults."""
    out = {}
    for (method, rank), choice in choices(records, datasets).items():
        name = method if rank is None else f"{method} r={rank}"
        if isinstance(choice, LrChoice):
            out[name] = {"lr": choice.lr, "worst_share": round(choice.worst_share, 4), "worst_dataset": choice.worst_dataset,
                         "best_lr": choice.best_lr, "worst_share_by_lr": {f"{k:g}": round(v, 4) for k, v in choice.worst_shares().items()}}
        else:
            out[name] = {"lr": None, "why": choice}
    return out


def read_document(out: Path) -> dict:
    """The last sweep.json in ``out`` (empty if none): a resumed sweep adds its wall time to it."""
    path = out / "sweep.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write(out: Path, document: dict, cli_default: Callable[[str, int | None], float], pairs: list[tuple[Group, Group]]) -> None:
    """sweep.json (settings, every record, the rule's choices) and sweep.md, replaced atomically."""
    document = dict(document, chosen=summary(document["records"], document["settings"].get("datasets", [])))
    for name, text in (("sweep.json", json.dumps(document, indent=1, default=str)), ("sweep.md", markdown(document, cli_default, pairs))):
        write_bytes_atomic(out / name, text.encode())
