"""scripts/plan_vs_published.py: the published rows, the ratio arithmetic, issue 32's pass/fail rules, and a
replay of rows through ``paca plan`` (docs/plan-published.md)."""
from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "plan_vs_published.py"


def _load():
    spec = importlib.util.spec_from_file_location("plan_vs_published", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the module runs
    spec.loader.exec_module(module)
    return module


pvp = _load()
GIB = 1 << 30


# --- the rules -----------------------------------------------------------------------------------------


def test_peak_memory_within_ten_percent_either_way():
    assert pvp.judge("peak_memory", 110, 100).status == "pass"
    assert pvp.judge("peak_memory", 90, 100).status == "pass"
    high = pvp.judge("peak_memory", 111, 100)
    assert high.status == "fail" and high.ratio == pytest.approx(1.11) and "11 % high" in high.reason
    assert pvp.judge("peak_memory", 89, 100).status == "fail"


def test_a_maximum_may_be_cautious_never_optimistic_beyond_1_1x():
    cautious = pvp.judge("max_seq_len", 14_000, 28_454)
    assert cautious.status == "pass" and "cautious" in cautious.reason and cautious.ratio == pytest.approx(14_000 / 28_454)
    assert pvp.judge("max_seq_len", 31_299, 28_454).status == "pass"  # 1.09999
    optimistic = pvp.judge("max_seq_len", 34_304, 28_454)
    assert optimistic.status == "fail" and "optimistic" in optimistic.reason and optimistic.ratio == pytest.approx(1.2056, abs=1e-4)
    assert pvp.judge("max_batch_size", 20, 19).status == "pass"  # 1.053
    assert pvp.judge("max_batch_size", 21, 19).status == "fail"  # 1.105


def test_a_published_oom_at_every_size_needs_a_planned_zero():
    assert pvp.judge("max_seq_len", 0, 0).status == "pass"
    wrong = pvp.judge("max_seq_len", 64, 0)
    assert wrong.status == "fail" and wrong.ratio is None


def test_fits_must_agree_with_the_published_run():
    assert pvp.judge("fits", False, False).status == "pass"
    assert pvp.judge("fits", True, True).status == "pass"
    assert pvp.judge("fits", True, False).status == "fail"  # planned to fit, the run ran out of memory
    assert pvp.judge("fits", False, True).status == "fail"


def test_step_time_within_fifteen_percent():
    assert pvp.judge("step_time", 0.121, 0.1419).status == "pass"  # 0.853
    assert pvp.judge("step_time", 0.12, 0.1419).status == "fail"  # 0.846
    assert pvp.judge("step_time", 1.15, 1.0).status == "pass"
    assert pvp.judge("step_time", 1.16, 1.0).status == "fail"


def test_no_planned_figure_is_not_compared():
    assert pvp.judge("peak_memory", None, 100).status == "not compared"


# --- the arithmetic ------------------------------------------------------------------------------------


def test_published_units_and_throughput_become_bytes_and_seconds():
    gb = {"id": "x", "published": {"kind": "peak_memory", "value": 21.30, "unit": "GB", "figure": "allocated"}}
    gib = {"id": "x", "published": {"kind": "peak_memory", "value": 30.3, "unit": "GiB", "figure": "active"}}
    assert pvp.published_value(gb) == pytest.approx(21.30e9)
    assert pvp.published_value(gib) == pytest.approx(30.3 * GIB)
    # optimum-habana: 16 samples a step at 18.428 samples/s; 8 cards × 8 at 148.093 samples/s over all cards
    single = {"id": "a", "published": {"kind": "step_time", "throughput": 18.428, "throughput_unit": "samples/s", "samples_per_step": 16}}
    ddp = {"id": "b", "published": {"kind": "step_time", "throughput": 148.093, "throughput_unit": "samples/s", "samples_per_step": 64}}
    assert pvp.published_value(single) == pytest.approx(0.86824, abs=1e-5)
    assert pvp.published_value(ddp) == pytest.approx(0.43216, abs=1e-5)
    assert pvp.published_value({"id": "p", "published": {"kind": "step_time", "seconds": 0.1419}}) == 0.1419


def test_memory_figures_pick_the_matching_planned_peak():
    record = {"bytes": {"peak": 100, "allocated_peak": 101, "reserved_peak": 120}}
    row = lambda figure: {"id": "r", "published": {"kind": "peak_memory", "figure": figure}}  # noqa: E731
    assert pvp.predicted_value(row("allocated"), record)[:2] == (101, "bytes.allocated_peak")
    assert pvp.predicted_value(row("active"), record)[:2] == (101, "bytes.allocated_peak")
    assert pvp.predicted_value(row("reserved"), record)[:2] == (120, "bytes.reserved_peak")
    assert pvp.predicted_value(row("unknown"), record)[:2] == (120, "bytes.reserved_peak")
    older = {"bytes": {"peak": 100}}  # a planner without an allocator model: said, not hidden
    value, field, notes = pvp.predicted_value(row("reserved"), older)
    assert (value, field) == (100, "bytes.peak") and "no reserved_peak" in notes[0]


def test_section_replacement_keeps_the_rest_of_the_page():
    text = "head\n<!-- generated: results -->\nold\n<!-- end: results -->\ntail\n"
    assert pvp.replace_section(text, "results", "new\n") == "head\n<!-- generated: results -->\nnew\n<!-- end: results -->\ntail\n"
    with pytest.raises(ValueError):
        pvp.replace_section("no markers", "results", "x")


# --- the rows themselves -------------------------------------------------------------------------------


def test_rows_cover_issue_32s_minimum_and_cite_their_sources():
    rows = pvp.load_rows()
    sources = json.loads(pvp.SOURCES_FILE.read_text())["sources"]
    assert len(rows) >= 12
    assert len({r["source"] for r in rows}) >= 5
    kinds = {r["published"]["kind"] for r in rows}
    assert kinds == {"peak_memory", "max_seq_len", "max_batch_size", "fits", "step_time"}
    assert any(r["published"]["kind"] == "fits" and r["published"]["value"] is False for r in rows)  # published OOMs
    for row in rows:
        assert row["source"] in sources, row["id"]
        assert {"model", "method", "rank", "targets", "dtype", "seq_len", "micro_batch", "checkpointing", "attention",
                "sharding", "devices"} <= set(row["config"]), row["id"]
        pub = row["published"]
        assert pub.get("quote"), row["id"]
        if pub["kind"] == "peak_memory":
            assert pub["unit"] in pvp.UNITS and pub["figure"] in pvp.PEAK_FIELDS, row["id"]
        assert pvp.published_value(row) is not None


def test_every_row_command_is_a_valid_paca_plan_command():
    from paca_core.cli.dispatch import build_parser

    parser = build_parser()
    for row in pvp.load_rows():
        args = parser.parse_args(["plan", *row["plan"]])  # argparse exits on an unknown flag or value
        model = args.model
        if model.startswith("docs/"):
            assert (REPO / model).is_file(), row["id"]
        assert pvp.plan_command(row).startswith("paca plan --model ")
        assert shlex.split(pvp.plan_command(row))[2:] == row["plan"]


def test_the_page_lists_every_row_and_its_command():
    text = pvp.DOC_FILE.read_text()
    for row in pvp.load_rows():
        assert f"| {row['id']} |" in text, row["id"]
        assert pvp.plan_command(row) in text, row["id"]


# --- a replay through paca plan ------------------------------------------------------------------------


def test_rows_replay_through_paca_plan_and_are_judged(tmp_path):
    """Two rows on a tiny Llama config cut to one layer (cheap; the published figures are made up for the check): the
    plan's own record is read back, one passes and one fails by the rules above."""
    from tests.conftest import tiny_llama_config

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**tiny_llama_config().to_dict(), "model_type": "llama"}))
    base = ["--model", f"{config}-layers:1", "--methods", "peft-lora", "--rank", "4", "--device-profile", "a100-80g",
            "--seq-len", "32", "--batch-size", "1", "--no-search", "--dtype", "fp32"]
    common = {"source": "X", "what": "check", "config": {}, "plan": base}
    rows = [
        dict(common, id="fits", published={"kind": "fits", "value": True, "quote": "-"}),
        dict(common, id="oom", published={"kind": "fits", "value": False, "quote": "-"}),
    ]
    results = pvp.compare(rows, runner=pvp.run_plan_in_process, progress=lambda line: None)
    by_id = {r["id"]: r for r in results}
    assert by_id["fits"]["status"] == "pass" and by_id["fits"]["predicted"] is True
    assert by_id["oom"]["status"] == "fail"
    assert by_id["fits"]["plan_record"]["peak_bytes"] > 0
    table = pvp.results_markdown(results, {"commit": "abc", "local_changes": False, "run_at": "now"})
    assert "**1 pass, 1 fail, 0 not compared**" in table and "Planner as of `abc`" in table


@pytest.mark.slow
def test_the_script_replays_a_published_row(tmp_path):
    """The script as the doc runs it, on one real row (LitGPT's Llama 2 7B LoRA: a 7B plan without searches)."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--only", "G1", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads((tmp_path / "results.json").read_text())
    (result,) = document["results"]
    assert result["id"] == "G1" and result["published"] == pytest.approx(21.30e9)
    assert result["predicted"] and result["ratio"] == pytest.approx(result["predicted"] / 21.30e9)
    assert result["status"] in ("pass", "fail")
    assert document["planner"]["commit"]
    assert (tmp_path / "results.md").read_text().count("| G1 |") == 1


# --- issue 40: margins, contradictory rows, rounded step times ------------------------------------------


def test_a_rounded_step_time_is_judged_around_the_interval_it_rounds_from():
    row = {"id": "q", "published": {"kind": "step_time", "throughput": 1.5, "throughput_unit": "s/it", "micro_steps": 8,
                                    "rounding": 0.1}}
    published, precision = pvp.published_value(row), pvp.published_precision(row)
    assert published == pytest.approx(0.1875) and precision == pytest.approx(0.00625)
    assert pvp.judge("step_time", 0.219, published, precision).status == "pass"  # 1.55 / 8 x 1.15 = 0.2228
    assert pvp.judge("step_time", 0.224, published, precision).status == "fail"
    assert pvp.judge("step_time", 0.219, published).status == "fail"  # the same figure read as exact


def test_margins_come_from_the_worst_optimism_of_each_regime_and_skip_contradictory_rows():
    results = [
        {"id": "a", "regime": "4-bit base", "optimism": 0.05, "status": "pass"},
        {"id": "b", "regime": "4-bit base", "optimism": 0.12, "status": "fail"},
        {"id": "c", "regime": "16-bit, no checkpointing", "optimism": 0.0, "status": "pass"},
        {"id": "d", "regime": "16-bit, no checkpointing", "optimism": 0.31, "status": "contradictory"},
    ]
    margins = pvp.regime_margins(results)
    assert margins["4-bit base"]["fraction"] == pytest.approx(0.12) and margins["4-bit base"]["row"] == "b"
    assert margins["16-bit, no checkpointing"]["fraction"] == 0.0 and margins["16-bit, no checkpointing"]["rows"] == ["c"]


def test_optimism_is_the_share_of_the_limit_the_plan_missed():
    limit = 80 * GIB
    capacity = {"id": "u", "published": {"kind": "max_seq_len", "value": 932}, "plan": ["--seq-len", "8192"]}
    boundary = {"bytes": {"device_total": 72 * GIB}, "limit_bytes": limit}  # the run had no room left at 932 tokens
    assert pvp.optimism(capacity, {"bytes": {}}, boundary) == pytest.approx(0.1)
    assert pvp.optimism(capacity, {"bytes": {}}, {"bytes": {"device_total": 90 * GIB}, "limit_bytes": limit}) == 0.0
    oom = {"id": "o", "published": {"kind": "fits", "value": False}}
    assert pvp.optimism(oom, {"bytes": {"device_total": 60 * GIB}, "limit_bytes": limit}, None) == pytest.approx(0.25)
    peak = {"id": "p", "published": {"kind": "peak_memory", "value": 20, "unit": "GiB", "figure": "allocated"}}
    assert pvp.optimism(peak, {"bytes": {"allocated_peak": 18 * GIB}}, None) == pytest.approx(0.1)
    assert pvp.boundary_argv({"published": {"kind": "max_seq_len", "value": 932}, "plan": ["--seq-len", "8192"]}) == \
        ["--seq-len", "932", "--no-search"]


def test_the_contradictory_torchtune_pair_is_marked_with_its_reason():
    rows = {r["id"]: r for r in pvp.load_rows()}
    for row_id in ("T1", "T2"):
        assert "same setup" in rows[row_id]["contradictory"]
    assert not any(r.get("contradictory") for i, r in rows.items() if i not in ("T1", "T2"))


#: Time rows whose failure is explained in docs/plan-published.md and not yet fixed: Gaudi 3's profile figures (A2) and a
#: torch.compile FSDP run whose pairing with its command is unconfirmed (I2). Every other time row must hold the band.
TIME_ROWS_KNOWN_OUT_OF_BAND = {"A2": "Gaudi 3 profile", "I2": "FSDP + torch.compile, pairing unconfirmed"}


@pytest.mark.slow
def test_time_rows_replayed_through_paca_plan_hold_the_fifteen_percent_band(tmp_path):
    """Every single-device step-time row on an A100 profile (short to long sequences) replayed through paca plan in
    this process: within ±15 % of the published time (around the interval a rounded figure stands for)."""
    rows = [r for r in pvp.load_rows() if r["published"]["kind"] == "step_time" and r["id"] not in TIME_ROWS_KNOWN_OUT_OF_BAND
            and "a100-80g" in r["plan"] and "--world-size" not in r["plan"]]
    assert {r["id"] for r in rows} >= {"P2", "Q1", "Q6"}
    results = pvp.compare(rows, runner=pvp.run_plan_in_process, progress=lambda line: None)
    ratios = {r["id"]: round(r["ratio"], 3) for r in results}
    assert all(r["status"] == "pass" for r in results), ratios
