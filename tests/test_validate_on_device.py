"""scripts/validate_on_device.{sh,py}: the published configurations at reduced depth, planned and run for real.

No GPU or Gaudi here: these tests run its CPU path (``--device cpu`` on a tiny config), where allocated and
reserved are null with the reason, and check which configurations a device run would take."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from paca_core.errors import PacaConfigError
from paca_core.plan.shapes import describe, load_config
from tests.conftest import tiny_llama_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "validate_on_device.py"
SHELL = REPO / "scripts" / "validate_on_device.sh"


def _load():
    spec = importlib.util.spec_from_file_location("validate_on_device", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


vod = _load()


def _rows():
    return json.loads(vod.ROWS_FILE.read_text())["rows"]


def _tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**tiny_llama_config().to_dict(), "model_type": "llama"}))
    return path


# --- reduced depth in the planner's model loading --------------------------------------------------------


def test_layers_suffix_keeps_the_first_layers_of_any_model(tmp_path):
    full, reduced = describe(load_config("llama-3.1-8b")), describe(load_config("llama-3.1-8b-layers:4"))
    assert reduced["num_layers"] == 4
    assert reduced["layer_params"] == full["layer_params"] and reduced["embedding_params"] == full["embedding_params"]
    assert reduced["parameters"] == full["parameters"] - 28 * full["layer_params"]
    assert load_config(f"{_tiny_config(tmp_path)}-layers:1").num_hidden_layers == 1
    with pytest.raises(PacaConfigError, match="from 1 to 32"):
        load_config("llama-3.1-8b-layers:33")
    with pytest.raises(PacaConfigError, match="from 1 to 32"):
        load_config("llama-3.1-8b-layers:0")


# --- which configurations ------------------------------------------------------------------------------


def test_device_configurations_follow_the_rows_at_reduced_depth():
    rows = _rows()
    configs, skipped = vod.reduced_configs(rows, 4)
    by_row = {row_id: c for c in configs for row_id in c["rows"]}
    # sharded rows cannot run on one device; every other row is covered exactly once
    assert {s["id"] for s in skipped} == {r["id"] for r in rows if "--fsdp" in r["plan"] or "--zero" in r["plan"]}
    assert set(by_row) | {s["id"] for s in skipped} == {r["id"] for r in rows}
    u1 = by_row["U1"]
    assert u1["plan_args"][u1["plan_args"].index("--model") + 1] == "llama-3.1-8b-layers:4"
    assert u1["seq_len"] == 28454  # the published boundary, not the row's traced length
    assert "--memory-budget" not in by_row["U2"]["plan_args"] and "--no-search" not in by_row["P2"]["plan_args"]
    assert by_row["P1"] is by_row["P4"] and by_row["P1"]["batch_size"] == 19  # the same configuration runs once
    assert "--world-size" not in by_row["A3"]["plan_args"] and "DDP" in by_row["A3"]["note"]
    # a run cut short still reaches every source early
    first = [c["source"] for c in configs[: len({c["source"] for c in configs})]]
    assert len(set(first)) == len(first)


def test_profile_from_the_device_name():
    assert vod.profile_for("NVIDIA H100 80GB HBM3", 85e9, "cuda") == "h100-80g"
    assert vod.profile_for("NVIDIA A100-SXM4-40GB", 42e9, "cuda") == "a100-40g"
    assert vod.profile_for("NVIDIA A100-SXM4-80GB", 85e9, "cuda") == "a100-80g"
    assert vod.profile_for("GAUDI2 HL-225", None, "hpu") == "gaudi2"
    assert vod.profile_for("2-core CPU (x86_64)", None, "cpu") == "cpu"
    assert vod.profile_for("Some GPU", None, "cuda") is None


def test_ratios_are_planned_over_measured():
    planned = {"allocated_peak_bytes": 90, "reserved_peak_bytes": 110, "step_seconds": 0.5}
    measured = {"allocated_peak_bytes": 100, "reserved_peak_bytes": None, "median_step_s": 0.4}
    assert vod.ratios(planned, measured) == {"allocated": pytest.approx(0.9), "reserved": None, "step_time": pytest.approx(1.25)}


# --- the CPU path, end to end ----------------------------------------------------------------------------


def test_cpu_path_plans_and_trains_a_reduced_configuration(tmp_path):
    """LitGPT's row (PEFT LoRA q,v) and the PaCA authors' (PaCA), on a tiny config at one layer, in this process."""
    out = tmp_path / "out"
    code = vod.main(["--device", "cpu", "--only", "G1,P2,T4", "--model", str(_tiny_config(tmp_path)), "--layers", "1",
                     "--seq-len", "16", "--batch-size", "2", "--dtype", "fp32", "--steps", "2", "--warmup", "0",
                     "--out", str(out), "--in-process"])
    assert code == 0
    document = json.loads((out / "results.json").read_text())
    assert [s["id"] for s in document["skipped"]] == ["T4"]
    assert sorted(r["rows"][0] for r in document["results"]) == ["G1", "P2"]
    for result in document["results"]:
        assert result["status"] == "ok", result
        assert result["profile"] == "cpu" and result["device"] == "cpu"
        planned, measured = result["predicted"], result["measured"]
        assert planned["allocated_peak_bytes"] > 0 and planned["step_seconds"] > 0 and planned["dtype"] == "fp32"
        # the CPU runtime reports process RSS, not allocator bytes: null, with the reason
        assert measured["allocated_peak_bytes"] is None and "not allocator bytes" in measured["allocated_source"]
        assert measured["reserved_peak_bytes"] is None and measured["reserved_source"].startswith("null")
        assert measured["process_peak_bytes"] > 0
        assert len(measured["step_times_s"]) == 2 and measured["median_step_s"] > 0
        assert result["ratios"]["step_time"] == pytest.approx(planned["step_seconds"] / measured["median_step_s"], rel=1e-3)
    # an existing results.json is kept unless --overwrite
    with pytest.raises(SystemExit):
        vod.main(["--device", "cpu", "--only", "G1", "--out", str(out), "--in-process"])


@pytest.mark.slow
def test_shell_script_runs_the_cpu_path_in_worker_processes(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SHELL), "--device", "cpu", "--only", "G1", "--model", str(_tiny_config(tmp_path)),
                           "--layers", "1", "--seq-len", "16", "--batch-size", "1", "--dtype", "fp32", "--steps", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    (result,) = json.loads((out / "results.json").read_text())["results"]
    assert result["status"] == "ok" and result["measured"]["median_step_s"] > 0
    assert result["predicted"]["allocated_peak_bytes"] > 0
