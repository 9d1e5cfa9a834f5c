"""proof.md: the short, human-readable side of proof.json (the JSON holds every figure)."""
from __future__ import annotations

from typing import Any

from ..files.outputs import format_size

GiB = float(1 << 30)


def _gib(value: Any) -> str:
    return "–" if value is None else f"{value / GiB:.2f}"


def _s(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return "–" if value is None else f"{value * 100:+.0f} %"


def markdown(proof: dict) -> str:
    """The proof as a page: what ran where, each stage's outcome, and the main figures."""
    lines = [f"# paca doctor: {proof['mode']} on {proof['device']}", ""]
    if proof["dry_run"]:
        lines += ["**Dry run: every stage on the CPU with tiny shapes. It checks the doctor; none of its figures is a hardware "
                  "measurement.**", ""]
    lines += [f"- paca-hal {proof['version']}, commit {proof['commit'] or 'unknown'}; started {proof['started_at']}, "
              f"{proof['seconds']:.0f} s of a {proof['deadline_s']:.0f} s deadline; complete: {'yes' if proof['complete'] else 'no'}",
              f"- command: `{proof['command']}`",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in proof["environment"]["packages"].items() if v), "",
              "| stage | status | seconds | budget s | reason |", "|---|---|---|---|---|"]
    for stage in proof["stages"]:
        reason = (stage["reason"] or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {stage['name']} | {stage['status']} | {stage['seconds']:.1f} | {stage['budget_s']:.0f} | {reason[:200]} |")
    stages = {s["name"]: s for s in proof["stages"]}
    for name, writer in (("device", _device), ("tests", _tests), ("bench", _bench), ("planner", _planner), ("max_context", _context)):
        if name in stages and stages[name]["result"]:
            try:
                lines += ["", *writer(stages[name]["result"])]
            except (KeyError, TypeError, ValueError) as error:  # a partial result (a stage cut short): proof.json has it all
                lines += ["", f"({name}: its result is in proof.json; this page could not show it: {type(error).__name__} {error})"]
    return "\n".join(lines) + "\n"


def _device(result: dict) -> list[str]:
    info = result.get("describe", {})
    extras = ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("name",) and v is not None)
    modes = ", ".join(m["name"] + ("" if m["available"] else " (not available)") for m in result.get("graph_modes", []))
    return ["## Device", "", f"- {info.get('name', result.get('device'))}: {extras}",
            f"- memory: {_gib(result.get('memory', {}).get('total_bytes'))} GiB total, {_gib(result.get('free_bytes'))} GiB free; "
            f"dtype {result.get('default_dtype')}; backend {result.get('backend')}; collectives {result.get('distributed_backend')}",
            f"- graph modes: {modes} (default {result.get('default_graph_mode')})"]


def _tests(result: dict) -> list[str]:
    lines = ["## Accelerator test tier", "",
             f"- `pytest -m '{result.get('marker')}'` on {result.get('device')}: {result.get('passed', '?')} passed, "
             f"{result.get('failed', '?')} failed, {result.get('errors', '?')} errors, {result.get('skipped', '?')} skipped "
             f"({result.get('seconds', '?')} s)"]
    lines += [f"- {f['kind']}: `{f['test']}`: {f['message'][:160]}" for f in result.get("failures", [])[:10]]
    return lines


def _bench(result: dict) -> list[str]:
    lines = ["## Bench", "", f"{result['model']}, seq {result['seq_len']} × batch {result['batch_size']}, {result['dtype']}, LoRA rank "
             f"{result['lora_rank']} (PaCA and LoRA-FA at 2r: the same trainable parameters)", "",
             "| entry | status | step s | tokens/s | peak allocated GiB | peak reserved GiB |", "|---|---|---|---|---|---|"]
    for r in result["entries"]:
        if r["status"] == "ok":
            lines.append(f"| {r['entry']} | ok | {_s(r['median_step_s'])} | {r['tokens_per_s']:,.0f} | {_gib(r['peak_allocated_bytes'])} | "
                         f"{_gib(r.get('reserved_peak_bytes'))} |")
        else:
            lines.append(f"| {r['entry']} | {r['status']}: {(r.get('reason') or '')[:120]} | – | – | – | – |")
    claim = result.get("claim", {})
    lines += ["", "The paper's claim (PaCA vs LoRA: -22 % time, -16 % memory):", ""]
    for reference in ("peft-lora", "lora"):
        figures = claim.get("vs_" + reference.replace("-", "_"), {})
        if "verdict" in figures:
            lines.append(f"- vs {reference}: {figures['verdict']} ({figures.get('reason', '')})")
            continue
        parts = [f"{name} {_pct(-f['reduction']) if 'reduction' in f else '–'} ({f['verdict']})" for name, f in figures.items()]
        lines.append(f"- vs {reference}: " + "; ".join(parts))
    if claim.get("setup_note"):
        lines.append(f"- setup: {claim['setup_note']}")
    if claim.get("note"):
        lines.append(f"- {claim['note']}")
    return lines


def _planner(result: dict) -> list[str]:
    lines = ["## Planner: predicted / measured", "",
             "| rows | status | allocated GiB | reserved GiB | device total GiB | step s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        p, m = r["predicted"], r["measured"]
        lines.append(f"| {','.join(r['rows'])} | {r['status']} | {_gib(p['allocated_bytes'])} / {_gib(m['allocated_bytes'])} | "
                     f"{_gib(p['reserved_bytes'])} / {_gib(m['reserved_bytes'])} | {_gib(p['device_total_bytes'])} / "
                     f"{_gib(m['device_total_bytes'])} | {_s(p['step_s'])} / {_s(m['step_s'])} |")
    return lines


def _context(result: dict) -> list[str]:
    lines = ["## Longest sequence that fits", "", f"{result['model']}, batch {result['batch_size']}, {result['dtype']}; budget "
             f"{format_size(result['budget_bytes'])} ({result['budget_source']}); steps of {result['step']} tokens", "",
             "| entry | longest seq | probes | note |", "|---|---|---|---|"]
    for r in result["entries"]:
        note = r.get("reason") or ("reached the cap" if r.get("capped") else "")
        lines.append(f"| {r['entry']} | {r.get('max_seq_len') if r.get('max_seq_len') is not None else '–'} | {len(r.get('probes', []))} | "
                     f"{note[:120]} |")
    ratio = result.get("paca_over_peft_lora_gc")
    lines.append("")
    lines.append(f"PaCA@all / PEFT LoRA@gc: {'–' if ratio is None else f'{ratio:.2f}×'} (paper: {result.get('paper')})")
    return lines
