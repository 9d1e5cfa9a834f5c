#!/usr/bin/env python3
"""Replay published fine-tuning figures with ``paca plan`` and judge each against issue 32's targets.

    python scripts/plan_vs_published.py [--workers 2] [--only U1,T3] [--update-doc]

``docs/plan-published/rows.json`` is the one source of truth: one row per published figure, with the
configuration it was measured in and the ``paca plan`` arguments that replay it. Each distinct command
runs once, as ``paca plan ... --out TMP`` in its own process (``--workers`` at a time), and its plan.json
record is compared with the published figure:

* peak memory: within ±10 % (the planner's allocated peak against an allocated/active figure; its
  reserved peak, where it reports one, against a reserved, nvidia-smi or unknown figure);
* longest sequence / largest batch: never above 1.1× the published value (a plan may be cautious, never
  optimistic); a published OOM at every size needs a planned 0;
* fits: agrees with the published run (completed or OOM);
* step time: within ±15 % (throughput is turned into seconds per micro-step of every rank).

Writes ``docs/plan-published/results.json`` and ``results.md``; ``--update-doc`` rewrites the generated
sections of ``docs/plan-published.md`` (the configuration table, the commands, the results).
Everything it reports about the planner is simulated; the published figures are other people's
measurements, read in the sources listed in ``docs/plan-published/sources.json``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from paca_core.files.atomic import write_bytes_atomic  # noqa: E402  (torch-free)

ROWS_FILE = ROOT / "docs" / "plan-published" / "rows.json"
SOURCES_FILE = ROOT / "docs" / "plan-published" / "sources.json"
DOC_FILE = ROOT / "docs" / "plan-published.md"
GIB = 1 << 30

#: Issue 32's targets.
PEAK_TOLERANCE = 0.10
MAX_OVERSHOOT = 1.10
STEP_TOLERANCE = 0.15
TARGETS = {
    "peak_memory": "±10 %",
    "max_seq_len": "≤ 1.1×",
    "max_batch_size": "≤ 1.1×",
    "fits": "agrees",
    "step_time": "±15 %",
}
#: Which plan.json byte figure a published memory figure is compared with, best first. A planner without a
#: reserved figure falls back to its allocated peak (``peak``), and the result says so.
PEAK_FIELDS = {
    "allocated": ("allocated_peak", "peak"),
    "active": ("allocated_peak", "peak"),
    "reserved": ("reserved_peak", "allocated_peak", "peak"),
    "nvidia-smi": ("device_total", "reserved_peak", "allocated_peak", "peak"),
    "unknown": ("reserved_peak", "allocated_peak", "peak"),
}
UNITS = {"GiB": GIB, "GB": 10**9}


@dataclass
class Verdict:
    """One comparison: ``status`` is ``pass``, ``fail`` or ``not compared``; ``ratio`` is planned / published."""

    status: str
    ratio: float | None
    reason: str


def judge(kind: str, predicted, published, precision: float = 0.0) -> Verdict:
    """Issue 32's rule for one comparison (see the module docstring). ``predicted`` None: the plan gave no figure.
    ``precision``: half the last published digit (a step time of '1.5 s/it' stands for 1.45-1.55)."""
    if predicted is None:
        return Verdict("not compared", None, "the plan gave no figure for this comparison")
    if kind == "fits":
        agree = bool(predicted) == bool(published)
        said = "fits" if predicted else "does not fit"
        ran = "completed" if published else "ran out of memory"
        return Verdict("pass" if agree else "fail", None, f"plan {said}; the published run {ran}")
    if kind in ("max_seq_len", "max_batch_size"):
        if published == 0:
            ok = predicted == 0
            return Verdict("pass" if ok else "fail", None,
                           "published OOM at every size; " + ("the plan fits none" if ok else f"the plan fits up to {predicted} (optimistic)"))
        ratio = predicted / published
        if ratio > MAX_OVERSHOOT:
            return Verdict("fail", ratio, f"optimistic: {ratio:.2f}× the published value (limit {MAX_OVERSHOOT}×)")
        return Verdict("pass", ratio, f"cautious ({ratio:.2f}×)" if ratio < 1 - PEAK_TOLERANCE else f"within 10 % ({ratio:.2f}×)")
    if kind in ("peak_memory", "step_time"):
        tolerance = PEAK_TOLERANCE if kind == "peak_memory" else STEP_TOLERANCE
        if not published:
            return Verdict("not compared", None, "no published figure")
        ratio = predicted / published
        # A figure published to a few digits stands for every value it rounds from: the band is around that interval.
        low, high = published - precision, published + precision
        ok = low * (1 - tolerance) - 1e-12 <= predicted <= high * (1 + tolerance) + 1e-12
        word = "high" if ratio > 1 else "low"
        return Verdict("pass" if ok else "fail", ratio,
                       f"{abs(ratio - 1) * 100:.0f} % {word}" + ("" if ok else f" (target ±{tolerance * 100:.0f} %)"))
    raise ValueError(f"unknown comparison kind {kind!r}")


def published_value(row: dict):
    """The published figure in the planner's units: bytes, seconds, a count or a bool."""
    pub = row["published"]
    kind = pub["kind"]
    if kind == "peak_memory":
        return pub["value"] * UNITS[pub["unit"]]
    if kind == "step_time":
        if "seconds" in pub:
            return float(pub["seconds"])
        if pub.get("throughput_unit") == "s/it":  # seconds per optimizer step of micro_steps micro-batches
            return pub["throughput"] / pub["micro_steps"]
        if pub.get("throughput_unit") != "samples/s":
            raise ValueError(f"{row['id']}: step_time needs seconds or a samples/s throughput")
        return pub["samples_per_step"] / pub["throughput"]  # every rank's samples of one micro-step / all ranks' rate
    return pub["value"]


def published_precision(row: dict) -> float:
    """Half the last published digit, in the planner's units (0 where the figure is exact or not rounded)."""
    pub = row["published"]
    if pub["kind"] == "step_time" and pub.get("throughput_unit") == "s/it":
        return pub.get("rounding", 0.0) / 2 / pub["micro_steps"]
    return 0.0


def row_regime(row: dict) -> str:
    """The margin regime of a row's plan command (paca_core/plan/margin.py)."""
    from paca_core.plan.margin import regime
    from paca_core.workloads.four_bit import four_bit_entries

    argv = row["plan"]
    methods = argv[argv.index("--methods") + 1] if "--methods" in argv else ""
    # Every 4-bit entry (peft-qlora-16bit too), as the planner's fit_margin reads it from the entry, not a name list.
    four_bit = "--quantize" in argv or any(m.split("@")[0] in four_bit_entries() for m in methods.split(","))
    return regime(four_bit, "--gradient-checkpointing" in argv, "--fsdp" in argv or "--zero" in argv)


def boundary_argv(row: dict) -> list[str] | None:
    """For a published capacity (longest sequence, largest batch): the row's command at the published value, unsearched,
    so the planned device total there can be set against the limit (how much the plan left free where the run had none)."""
    pub = row["published"]
    flag = {"max_seq_len": "--seq-len", "max_batch_size": "--batch-size"}.get(pub["kind"])
    if flag is None or not pub["value"]:
        return None
    argv = list(row["plan"])
    argv[argv.index(flag) + 1] = str(pub["value"])
    return argv if "--no-search" in argv else argv + ["--no-search"]


def optimism(row: dict, record: dict | None, boundary: dict | None) -> float | None:
    """The share of the memory limit the plan missed on this row: what a fit decision's margin must cover for the row's
    published outcome to be predicted (0 where the plan is cautious; None where the row says nothing about memory).

    * peak memory: 1 - planned / published, where planned is below;
    * a capacity (longest sequence, largest batch): 1 - planned device total at the published value / the limit (the run
      had no room left there; the plan thought it had);
    * a published OOM the plan fits: 1 - planned device total / the limit."""
    pub = row["published"]
    kind = pub["kind"]
    if record is None:
        return None
    if kind == "peak_memory":
        planned, _, _ = predicted_value(row, record)
        return max(0.0, 1 - planned / published_value(row)) if planned else None
    if kind in ("max_seq_len", "max_batch_size") and boundary is not None:
        return max(0.0, 1 - boundary["bytes"]["device_total"] / boundary["limit_bytes"])
    if kind == "fits" and pub["value"] is False:
        return max(0.0, 1 - record["bytes"]["device_total"] / record["limit_bytes"])
    if kind in ("max_seq_len", "max_batch_size") and pub["value"] == 0:
        return max(0.0, 1 - record["bytes"]["device_total"] / record["limit_bytes"])
    return 0.0 if kind in ("fits", "max_seq_len", "max_batch_size") else None


def regime_margins(results: list[dict]) -> dict:
    """Per regime: the worst optimism of its compared rows (contradictory rows left out), and the row it came from."""
    regimes: dict[str, dict] = {}
    for r in results:
        if r.get("optimism") is None or r["status"] in ("not compared", "contradictory"):
            continue
        entry = regimes.setdefault(r["regime"], {"fraction": 0.0, "row": None, "rows": []})
        entry["rows"].append(r["id"])
        if r["optimism"] > entry["fraction"] or entry["row"] is None:
            entry["fraction"], entry["row"] = round(r["optimism"], 4), r["id"]
    for name, entry in regimes.items():
        entry["reason"] = (f"worst optimism measured on published rows of this regime: {entry['row']}" if entry["fraction"] > 0
                           else "no published row of this regime is optimistic")
    return regimes


def predicted_value(row: dict, record: dict) -> tuple[object, str, list[str]]:
    """(value, the plan.json field it came from, notes) for the row's comparison."""
    pub = row["published"]
    kind = pub["kind"]
    notes: list[str] = []
    if kind == "peak_memory":
        fields = PEAK_FIELDS[pub["figure"]]
        for name in fields:
            if record["bytes"].get(name) is not None:
                if name != fields[0]:
                    notes.append(f"the plan has no {fields[0]}: compared with bytes.{name}")
                return record["bytes"][name], f"bytes.{name}", notes
        return None, "bytes", notes
    if kind == "max_seq_len":
        if record.get("max_seq_len_is_context"):
            notes.append("the planned maximum is the model's context, not a memory limit")
        return record.get("max_seq_len"), "max_seq_len", notes
    if kind == "max_batch_size":
        return record.get("max_batch_size"), "max_batch_size", notes
    if kind == "fits":
        return record.get("fits"), "fits", notes
    if kind == "step_time":
        return record.get("step_seconds"), "step_seconds", notes
    raise ValueError(f"{row['id']}: unknown comparison kind {kind!r}")


def display(kind: str, value, unit: str | None = None) -> str:
    """A figure as the tables show it."""
    if value is None:
        return "–"
    if kind == "peak_memory":
        return f"{value / GIB:.1f} GiB" if unit != "GB" else f"{value / 1e9:.2f} GB ({value / GIB:.1f} GiB)"
    if kind == "step_time":
        return f"{value:.3f} s"
    if kind == "fits":
        return "fits" if value else "OOM"
    return "OOM at every size" if value == 0 else f"{value:,}"


def plan_argv(row: dict) -> list[str]:
    return list(row["plan"])


def plan_command(row: dict) -> str:
    """The row's command as a user types it."""
    return "paca plan " + " ".join(shlex.quote(a) for a in plan_argv(row))


def load_rows(path: Path = ROWS_FILE) -> list[dict]:
    rows = json.loads(Path(path).read_text(encoding="utf-8"))["rows"]
    seen = set()
    for row in rows:
        if row["id"] in seen:
            raise ValueError(f"{path}: row id {row['id']!r} appears twice")
        seen.add(row["id"])
        for flag in ("--device-profile", "--seq-len", "--batch-size"):
            values = [row["plan"][i + 1] for i, a in enumerate(row["plan"]) if a == flag]
            if len(values) != 1 or "," in values[0]:
                raise ValueError(f"{path}: row {row['id']} needs exactly one {flag} value (one record per row)")
    return rows


# --- running the plans --------------------------------------------------------------------------------


def run_plan_subprocess(argv: list[str], out: Path, timeout: float) -> tuple[dict | None, str]:
    """``paca plan ARGV --out OUT`` in a fresh process; (plan.json, its last output lines)."""
    command = [sys.executable, "-m", "paca_core", "plan", *argv, "--out", str(out), "--workers", "1"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-4:])
    plan = out / "plan.json"
    if done.returncode != 0 or not plan.is_file():
        return None, f"exit {done.returncode}: {tail}"
    return json.loads(plan.read_text()), tail


def run_plan_in_process(argv: list[str], out: Path, timeout: float) -> tuple[dict | None, str]:
    """The same through ``paca_core.cli.dispatch.main`` in this process (tests: no interpreter start-up)."""
    from paca_core.cli.dispatch import main

    code = main(["plan", *argv, "--out", str(out), "--workers", "1"])
    plan = out / "plan.json"
    if code != 0 or not plan.is_file():
        return None, f"exit {code}"
    return json.loads(plan.read_text()), ""


def compare(rows: list[dict], workers: int = 2, timeout: float = 900.0, runner=run_plan_subprocess,
            progress=print) -> list[dict]:
    """Plan every distinct command of ``rows`` (``workers`` at a time) and judge each row."""
    commands: dict[tuple, list[dict]] = {}
    for row in rows:
        commands.setdefault(tuple(plan_argv(row)), []).append(row)
        if boundary_argv(row) is not None:
            commands.setdefault(tuple(boundary_argv(row)), []).append({**row, "id": row["id"] + " (at the published value)"})
    plans: dict[tuple, tuple[dict | None, str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="plan-vs-published-") as tmp:
        def job(index_argv):
            index, argv = index_argv
            started = time.perf_counter()
            document, tail = runner(list(argv), Path(tmp) / f"plan-{index}", timeout)
            return argv, document, tail, time.perf_counter() - started

        jobs = list(enumerate(commands))
        pool_size = max(1, min(workers, len(jobs))) if runner is run_plan_subprocess else 1
        with concurrent.futures.ThreadPoolExecutor(max_workers=pool_size) as pool:
            for argv, document, tail, seconds in pool.map(job, jobs):
                plans[argv] = (document, tail, seconds)
                ids = ",".join(r["id"] for r in commands[argv])
                progress(f"[{ids}] {'planned' if document else 'FAILED'} in {seconds:.0f} s")
    results = []
    for row in rows:
        document, tail, seconds = plans[tuple(plan_argv(row))]
        boundary = plans.get(tuple(boundary_argv(row) or ()), (None,))[0]
        results.append(result_for(row, document, tail, seconds, boundary))
    return results


def result_for(row: dict, document: dict | None, tail: str, seconds: float, boundary: dict | None = None) -> dict:
    """One row's comparison from its plan.json (None: the plan failed); ``boundary``: the plan.json of the row's command
    at its published capacity (:func:`boundary_argv`), for its optimism. A row marked ``contradictory`` in rows.json is
    judged but counted apart, with the reason."""
    pub = row["published"]
    kind = pub["kind"]
    published = published_value(row)
    out = {
        "id": row["id"], "source": row["source"], "what": row["what"], "kind": kind, "target": TARGETS[kind],
        "published": published, "published_display": display(kind, published, pub.get("unit")),
        "published_figure": pub.get("figure"), "command": plan_command(row), "planner_seconds": round(seconds, 1),
        "unconfirmed": row.get("unconfirmed", []), "differences": row.get("differences", []),
        "regime": row_regime(row), "contradictory": row.get("contradictory"), "recipe": row.get("recipe"),
    }
    if document is None:
        verdict = Verdict("not compared", None, f"the plan failed: {tail}")
        return {**out, "predicted": None, "predicted_display": "–", "predicted_field": None, "notes": [], **asdict(verdict)}
    records = document["records"]
    if len(records) != 1:
        raise ValueError(f"{row['id']}: expected one plan record, got {len(records)}")
    record = records[0]
    predicted, field, notes = predicted_value(row, record)
    verdict = judge(kind, predicted, published, published_precision(row))
    boundary_record = boundary["records"][0] if boundary and boundary.get("records") else None
    out["optimism"] = optimism(row, record, boundary_record)
    if row.get("contradictory"):
        verdict = Verdict("contradictory", verdict.ratio, f"{verdict.status} ({verdict.reason}); left out of the count: {row['contradictory']}")
    context = {
        "peak_bytes": record["bytes"].get("peak"), "reserved_peak_bytes": record["bytes"].get("reserved_peak"),
        "fits": record.get("fits"), "usable_bytes": record.get("usable_bytes"), "step_seconds": record.get("step_seconds"),
        "rank": record.get("rank"), "layout": record.get("layout"),
    }
    return {**out, "predicted": predicted, "predicted_display": display(kind, predicted, pub.get("unit")),
            "predicted_field": field, "notes": notes, "plan_record": context,
            "environment": document.get("environment", {}), **asdict(verdict)}


# --- writing ------------------------------------------------------------------------------------------


def planner_identity() -> dict:
    """The commit the planner was run at (and whether its tree had local changes)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    status = git("status", "--porcelain", "--", "paca_core", "devices", "backends")
    return {"commit": git("rev-parse", "HEAD") or None, "local_changes": bool(status),
            "run_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def summary(results: list[dict]) -> dict:
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "not compared", "contradictory")}
    sources = sorted({r["source"] for r in results if r["status"] != "not compared"})
    return {**counts, "rows": len(results), "sources_compared": sources}


def results_markdown(results: list[dict], identity: dict) -> str:
    s = summary(results)
    commit = (identity.get("commit") or "unknown")[:12]
    lines = [
        f"Planner as of `{commit}`{' with local changes' if identity.get('local_changes') else ''}, run {identity['run_at']} "
        f"on this machine's CPU (simulated, not measured): **{s['pass']} pass, {s['fail']} fail, {s['not compared']} not compared** "
        f"of {s['rows'] - s['contradictory']} rows from {len(s['sources_compared'])} sources"
        + (f" ({s['contradictory']} contradictory rows shown apart, not counted)." if s["contradictory"] else "."),
        "",
        "| # | published setup | published | planned | planned / published | target | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "–"
        figure = f" ({r['published_figure']})" if r["kind"] == "peak_memory" else ""
        field = f" (`{r['predicted_field']}`)" if r["kind"] == "peak_memory" and r.get("predicted_field") else ""
        verdict = f"**{r['status']}**: {r['reason']}" if r["status"] == "fail" else f"{r['status']}: {r['reason']}"
        lines.append(f"| {r['id']} | {r['what']} | {r['published_display']}{figure} | {r['predicted_display']}{field} | {ratio} | "
                     f"{r['target']} | {verdict} |")
    notes = [f"- {r['id']}: {n}" for r in results for n in r.get("notes", [])]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def margins_markdown(results: list[dict], margins: dict) -> str:
    """The margin each regime's fit decisions keep, the row it comes from, and the rows still optimistic after it."""
    lines = ["| regime | margin kept by fit decisions | sized by | rows compared |", "|---|---|---|---|"]
    for name, entry in sorted(margins.items()):
        lines.append(f"| {name} | {entry['fraction']:.1%} | {entry['reason']} | {', '.join(entry['rows'])} |")
    still = [r for r in results if r.get("optimism") and round(r["optimism"], 4) > margins.get(r["regime"], {}).get("fraction", 0)]
    lines += ["", "Optimism per row (share of the limit the plan missed; 0: cautious): "
              + ", ".join(f"{r['id']} {r['optimism']:.1%}" for r in results if r.get("optimism") is not None) + "."]
    if still:
        lines += ["", "Still optimistic after the margin (the first things the device proof measures): "
                  + "; ".join(f"{r['id']} ({r['optimism']:.1%} of the limit missed, margin "
                              f"{margins.get(r['regime'], {}).get('fraction', 0):.1%}; {r['status']})" for r in still) + "."]
    else:
        lines += ["", "No compared row is optimistic beyond its regime's margin."]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return "–"
    return str(value).replace("|", "/")


def rows_markdown(rows: list[dict]) -> str:
    """The configuration table, generated from rows.json."""
    lines = ["| # | model | method | r (α) | targets | dtype | seq × micro-batch (GA) | checkpointing | attention | sharding | devices | published | source |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        c, pub = row["config"], row["published"]
        value = display(pub["kind"], published_value(row), pub.get("unit"))
        if pub["kind"] == "step_time" and "throughput" in pub:
            value = f"{pub['throughput']} {pub['throughput_unit']} → {value} per micro-step"
        elif pub["kind"] == "peak_memory":
            value = f"{pub['value']} {pub['unit']} ({pub['figure']})"
        elif pub["kind"] in ("max_seq_len", "max_batch_size"):
            value = f"{pub['kind'].replace('_', ' ')}: {value}"
        alpha = f" ({c['alpha']})" if c.get("alpha") else ""
        ga = f" ({c['grad_accum']})" if c.get("grad_accum") not in (None, 1) else ""
        lines.append(" | ".join([f"| {row['id']}", _cell(c["model"]), _cell(c["method"]), f"{c['rank']}{alpha}", _cell(c["targets"]),
                                 _cell(c["dtype"]), f"{_cell(c['seq_len'])} × {_cell(c['micro_batch'])}{_cell(ga) if ga else ''}",
                                 _cell(c["checkpointing"]), _cell(c["attention"]), _cell(c["sharding"]), _cell(c["devices"]),
                                 f"**{value}**", f"[{row['source']}] |"]))
    return "\n".join(lines) + "\n"


def commands_markdown(rows: list[dict]) -> str:
    lines = ["```bash"]
    for row in rows:
        lines.append(f"# {row['id']}: {row['what']}")
        lines.append(plan_command(row))
    lines.append("```")
    return "\n".join(lines) + "\n"


def replace_section(text: str, name: str, body: str) -> str:
    """Replace what lies between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->``."""
    begin, end = f"<!-- generated: {name} -->", f"<!-- end: {name} -->"
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"{DOC_FILE} needs one '{begin}' and one '{end}' line")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=Path, default=ROWS_FILE)
    parser.add_argument("--only", default=None, help="comma-separated row ids (default: every row)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="plans run side by side")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per plan")
    parser.add_argument("--out", type=Path, default=ROWS_FILE.parent, help="folder for results.json and results.md")
    parser.add_argument("--update-doc", action="store_true", help=f"rewrite the generated sections of {DOC_FILE.relative_to(ROOT)}")
    parser.add_argument("--in-process", action="store_true", help="plan in this process, one row at a time (no interpreter start-ups)")
    args = parser.parse_args(argv)
    rows = load_rows(args.rows)
    if args.only:
        wanted = {i.strip() for i in args.only.split(",") if i.strip()}
        unknown = wanted - {r["id"] for r in rows}
        if unknown:
            parser.error(f"--only: no row {', '.join(sorted(unknown))} in {args.rows}")
        rows = [r for r in rows if r["id"] in wanted]
    started = time.perf_counter()
    runner = run_plan_in_process if args.in_process else run_plan_subprocess
    results = compare(rows, workers=args.workers, timeout=args.timeout, runner=runner)
    identity = planner_identity()
    document = {"planner": identity, "targets": TARGETS, "summary": summary(results),
                "seconds": round(time.perf_counter() - started, 1), "results": results}
    table = results_markdown(results, identity)
    write_bytes_atomic(args.out / "results.json", (json.dumps(document, indent=1, default=str) + "\n").encode())
    write_bytes_atomic(args.out / "results.md", table.encode())
    margins = regime_margins(results)
    document["margins"] = margins
    write_bytes_atomic(args.out / "results.json", (json.dumps(document, indent=1, default=str) + "\n").encode())
    if args.update_doc:
        from paca_core.plan.margin import MARGINS_FILE

        if args.only:
            parser.error("--update-doc needs every row (the margins are sized from all of them)")
        write_bytes_atomic(MARGINS_FILE, (json.dumps({
            "_about": "Generated by scripts/plan_vs_published.py --update-doc: per regime, the share of the memory limit fit "
                      "decisions keep free (paca_core/plan/margin.py): the worst optimism measured on the published rows of that "
                      "regime (docs/plan-published.md). Sized from unpadded plans, so rerunning does not feed on itself.",
            "planner": identity, "regimes": margins}, indent=1) + "\n").encode())
        text = DOC_FILE.read_text(encoding="utf-8")
        text = replace_section(text, "margins", margins_markdown(results, margins))
        every_row = load_rows(args.rows)
        text = replace_section(text, "rows", rows_markdown(every_row))
        text = replace_section(text, "commands", commands_markdown(every_row))
        text = replace_section(text, "results", table)
        write_bytes_atomic(DOC_FILE, text.encode())
    print(table)
    s = document["summary"]
    print(f"{s['pass']} pass, {s['fail']} fail, {s['not compared']} not compared ({document['seconds']:.0f} s); "
          f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
