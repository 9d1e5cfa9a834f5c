"""``paca doctor`` and scripts/prove_on_device.sh cannot rot: the wrapper's dry run (every stage on the CPU with tiny
shapes) must pass and write a proof.json of the documented shape; the shape check itself, the per-stage records
(a failing stage is recorded and the next still runs; the deadline skips what it cuts) and the refusals are checked
in-process."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from paca_core.cli.dispatch import main
from paca_core.doctor import stages as doctor_stages
from paca_core.doctor.schema import STAGES, STAGE, TOP_LEVEL, check_proof

from .conftest import refused_in_one_line

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``bash scripts/prove_on_device.sh --dry-run`` into a temporary $OUT, once for the module."""
    out = tmp_path_factory.mktemp("device-proof") / "proof"
    env = {**os.environ, "OUT": str(out), "PACA_WHEELS": str(out.parent / "no-wheels")}
    started = time.perf_counter()
    done = subprocess.run(["bash", str(REPO / "scripts" / "prove_on_device.sh"), "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=400)
    seconds = time.perf_counter() - started
    return done, out, seconds


def test_the_wrappers_dry_run_passes_every_stage_and_writes_a_proof_of_its_schema(dry_run):
    done, out, seconds = dry_run
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    proof = json.loads((out / "proof.json").read_text())
    assert check_proof(proof) == []
    # The hand check the schema module encodes, restated so a loosened schema cannot pass silently.
    for key, types in TOP_LEVEL.items():
        assert isinstance(proof[key], types), key
    assert proof["mode"] == "dry-run" and proof["dry_run"] is True and proof["hardware_measurement"] is False
    assert proof["device"] == "cpu" and proof["complete"] is True
    assert [s["name"] for s in proof["stages"]] == list(STAGES)
    for stage in proof["stages"]:
        assert set(STAGE) <= set(stage)
        assert stage["status"] == "ok", (stage["name"], stage["reason"], stage["result"].get("traceback"))
        assert 0 <= stage["seconds"] <= stage["budget_s"] + 5, stage["name"]
    results = {s["name"]: s["result"] for s in proof["stages"]}
    assert results["device"]["smoke"]["round_trip"]["error"] == 0
    assert results["tests"]["passed"] > 0 and results["tests"]["failed"] == 0
    bench = {e["entry"]: e for e in results["bench"]["entries"]}
    assert list(bench) == list(doctor_stages.BENCH_ENTRIES)
    for name in ("paca", "peft-lora", "lora", "lorafa", "velora", "meft"):
        assert bench[name]["status"] == "ok" and bench[name]["median_step_s"] > 0 and bench[name]["tokens_per_s"] > 0, name
    for entry in bench.values():
        assert entry["status"] == "ok" or entry["reason"], entry  # a skipped entry says why (bitsandbytes missing, say)
    assert "vs_peft_lora" in results["bench"]["claim"] and "dry run" in results["bench"]["claim"]["note"]
    assert results["planner"]["rows"] and all(r["status"] == "ok" for r in results["planner"]["rows"])
    assert results["planner"]["rows"][0]["predicted"]["step_s"] > 0 and results["planner"]["rows"][0]["measured"]["step_s"] > 0
    for entry in results["max_context"]["entries"]:
        assert entry["status"] == "skipped" or (entry["max_seq_len"] and entry["probes"]), entry
    text = (out / "proof.md").read_text()
    assert text.startswith("# paca doctor: dry-run on cpu") and "none of its figures is a hardware measurement" in text
    assert (out / "logs" / "accelerator-tier.log").is_file()
    assert seconds < 240, f"the dry run took {seconds:.0f} s"


def test_check_proof_names_what_is_missing_or_wrong(dry_run):
    proof = json.loads((dry_run[1] / "proof.json").read_text())
    broken = copy.deepcopy(proof)
    del broken["commit"]
    assert check_proof(broken) == ["proof has no 'commit'"]
    broken = copy.deepcopy(proof)
    broken["hardware_measurement"] = True
    assert "a dry run is marked as a hardware measurement" in check_proof(broken)
    broken = copy.deepcopy(proof)
    broken["stages"][1].update(status="failed", reason=None)
    problems = check_proof(broken)
    assert any("failed without a reason" in p for p in problems) and any("does not count the stages" in p for p in problems)
    broken = copy.deepcopy(proof)
    broken["stages"].reverse()
    assert any("out of order" in p for p in check_proof(broken))
    broken = copy.deepcopy(proof)
    broken["stages"][0]["seconds"] = "fast"
    assert check_proof(broken) == ["stages[0]['seconds'] is str, expected int/float"]


def _stage_raising(ctx):
    raise RuntimeError("the device fell over")


def test_a_failing_stage_is_recorded_and_the_next_one_still_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(doctor_stages.STAGE_FUNCTIONS, "device", _stage_raising)
    monkeypatch.setitem(doctor_stages.STAGE_FUNCTIONS, "bench", lambda ctx: {"checked": True})
    assert main(["doctor", "--dry-run", "--stages", "device,bench", "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    proof = json.loads((tmp_path / "out" / "proof.json").read_text())
    assert check_proof(proof) == []
    device, bench = proof["stages"]
    assert device["status"] == "failed" and device["reason"] == "RuntimeError: the device fell over"
    assert "the device fell over" in device["result"]["traceback"]
    assert bench["status"] == "ok" and bench["result"] == {"checked": True}
    assert proof["summary"] == {"ok": 1, "failed": 1, "skipped": 0, "timeout": 0}


def test_no_stage_starts_after_the_deadline(tmp_path, monkeypatch):
    def slow(ctx):
        time.sleep(1.5)
        return {"remaining_at_end": ctx.remaining()}

    monkeypatch.setitem(doctor_stages.STAGE_FUNCTIONS, "device", slow)
    assert main(["doctor", "--dry-run", "--stages", "device,planner", "--deadline", "1", "--out", str(tmp_path / "out")]) == 0
    proof = json.loads((tmp_path / "out" / "proof.json").read_text())
    device, planner = proof["stages"]
    assert device["status"] == "ok" and device["budget_s"] <= 1 and device["result"]["remaining_at_end"] == 0
    assert planner["status"] == "skipped" and "deadline (1 s)" in planner["reason"]


def test_skipped_stage_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor_stages, "PACKAGE_ROOT", tmp_path / "installed")  # no tests/ or scripts/: a pip install
    assert main(["doctor", "--dry-run", "--stages", "tests,planner", "--out", str(tmp_path / "out")]) == 0
    tests, planner = json.loads((tmp_path / "out" / "proof.json").read_text())["stages"]
    assert tests["status"] == planner["status"] == "skipped"
    assert "not in this installation" in tests["reason"] and "checkout" in planner["reason"]


@pytest.mark.parametrize("argv, message", [
    (["--dry-run", "--device", "cuda"], "--dry-run runs every stage on the CPU"),
    (["--dry-run", "--stages", "device,gpu"], "--stages 'device,gpu': choose from device, tests"),
    (["--dry-run", "--deadline", "0"], "--deadline must be a positive number"),
])
def test_bad_input_is_refused_in_one_line(argv, message, tmp_path, caplog):
    assert message in refused_in_one_line(["doctor", *argv, "--out", str(tmp_path / "out")], caplog)
    assert not (tmp_path / "out").exists()


def test_an_out_folder_holding_other_files_is_refused(tmp_path, caplog):
    (tmp_path / "mine.txt").write_text("keep")
    line = refused_in_one_line(["doctor", "--dry-run", "--stages", "device", "--out", str(tmp_path)], caplog)
    assert "already holds files this tool did not write (mine.txt)" in line
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_the_doctors_worker_writes_the_jobs_result_with_the_reserved_peak(tmp_path):
    """What a real run's bench stage starts (``python -m paca_core.doctor.worker JOB RESULT``), called in-process."""
    from paca_core.doctor import worker

    job = {"mode": "speed", "method": "paca", "rank": 2, "model": "tiny", "dtype": "fp32", "device": "cpu", "seq_len": 8,
           "batch_size": 1, "steps": 1, "warmup_steps": 0, "lr": 1e-3, "options": {}}
    job_path, result_path = tmp_path / "job.json", tmp_path / "result.json"
    job_path.write_text(json.dumps(job))
    assert worker.main([str(job_path), str(result_path)]) == 0
    result = json.loads(result_path.read_text())
    assert result["status"] == "ok" and result["median_step_s"] > 0 and "reserved_peak_bytes" in result
    assert worker.main([str(job_path)]) == 2  # a usage line, no traceback
