"""Run tracking: ``--report-to`` names, a missing library before any work, the loop reporting through one interface,
TensorBoard event files read back with TensorBoard's own reader, and W&B / MLflow in their offline modes (each
tested where its library is installed)."""
from __future__ import annotations

import json
import struct
import sys
import time

import pytest

from paca_core.cli.dispatch import main
from paca_core.files.outputs import MARKER_NAME
from paca_core.train.tracking import EVAL_LOSS, TRAIN_SCALARS, Tracker, parse_report_to, report_to_argument

TRAIN_KEYS = ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "train/peak_memory_mb")


def _train_flags(tiny_model_dir, data, out, *extra: str, eval_every: int = 2) -> list[str]:
    return ["train", "--device", "cpu", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--steps", "4",
            "--seq-len", "16", "--batch-size", "2", "--rank", "4", "--lr", "1e-2", "--warmup-steps", "1", "--log-every", "2",
            "--eval-every", str(eval_every), "--sample-tokens", "0", "--no-progress", "--dtype", "fp32", *extra]


def test_report_to_names():
    assert parse_report_to("none") == [] and parse_report_to("") == []
    assert parse_report_to("TensorBoard, wandb,tensorboard") == ["tensorboard", "wandb"]
    assert report_to_argument(" mlflow ,tensorboard") == "mlflow,tensorboard" and report_to_argument("none") == "none"
    for bad in ("neptune", "none,wandb"):
        with pytest.raises(ValueError, match="is not a tracker"):
            parse_report_to(bad)


def test_a_missing_tracker_library_is_one_line_before_any_work(monkeypatch, tiny_model_dir, sample_text_file, tmp_path, caplog,
                                                               no_load):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as on a machine without the extra
    out = tmp_path / "run"
    with caplog.at_level("ERROR"):
        assert main(_train_flags(tiny_model_dir, sample_text_file, out, "--report-to", "tensorboard,wandb")) == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "--report-to wandb" in line and "pip install 'paca-hal[wandb]'" in line and "\n" not in line
    assert not out.exists()


class RecordingTracker(Tracker):
    """A backend that keeps what it is told (the loop cannot tell it from a real one)."""

    name = "recording"

    def __init__(self):
        self.logged: list[tuple[int, dict]] = []
        self.finished = None

    def start(self, config):
        pass

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def finish(self, failed=False):
        self.finished = failed


@pytest.mark.parametrize("tracker, variable, value, expect", [
    ("wandb", "WANDB_DIR", "{model}", "$WANDB_DIR {model} is the --model"),
    ("wandb", "WANDB_DIR", "{model}/logs", "lies inside the --model"),
    ("mlflow", "MLFLOW_TRACKING_URI", "file://{model}/mlruns", "$MLFLOW_TRACKING_URI {model}/mlruns lies inside the --model"),
    ("mlflow", "MLFLOW_TRACKING_URI", "{model}/mlruns", "point $MLFLOW_TRACKING_URI elsewhere, or unset it"),
    ("mlflow", "MLFLOW_TRACKING_URI", "sqlite:///{model}/mlflow.db", "$MLFLOW_TRACKING_URI {model}/mlflow.db lies inside"),
])
def test_a_tracker_folder_set_by_the_environment_is_never_inside_an_input(tracker, variable, value, expect, monkeypatch,
                                                                         tiny_model_dir, sample_text_file, tmp_path, caplog,
                                                                         no_load):
    """``$WANDB_DIR`` and a local ``$MLFLOW_TRACKING_URI`` are written by the tracker's library: inside the model folder
    they would add files to what the run reads. Refused in one line before any weights load; the model unchanged."""
    pytest.importorskip(tracker)
    from .conftest import refused_in_one_line

    model = str(tiny_model_dir)
    before = sorted(p.name for p in tiny_model_dir.rglob("*"))
    monkeypatch.setenv(variable, value.format(model=model))
    line = refused_in_one_line(_train_flags(tiny_model_dir, sample_text_file, tmp_path / "run", "--report-to", tracker), caplog)
    assert expect.format(model=model) in line, line
    assert sorted(p.name for p in tiny_model_dir.rglob("*")) == before and not (tmp_path / "run").exists()


def test_a_tracker_folder_set_by_the_environment_elsewhere_or_a_server_is_accepted(monkeypatch, tmp_path):
    from paca_core.cli.train_preflight import check_tracker_folders

    args = type("Args", (), {"report_to": "wandb,mlflow"})()
    inputs = {"--model": str(tmp_path / "model"), "--data": str(tmp_path / "data.txt")}
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-logs"))
    for uri in ("http://127.0.0.1:5000", "databricks", f"file://{tmp_path}/mlruns", "sqlite:///:memory:"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        check_tracker_folders(args, inputs)  # nothing inside an input: no refusal
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "data.txt"))
    with pytest.raises(Exception, match="is the --data"):
        check_tracker_folders(args, inputs)


def test_the_loop_reports_each_window_and_evaluation_through_the_interface(tiny_model_dir, sample_text_file):
    from paca_core import PaCAConfig, prepare_model
    from paca_core.files.assets import load_model_and_tokenizer
    from paca_core.data.dataset import load_dataset, split_held_out
    from paca_core.train.trainer import Trainer, TrainingArguments

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    train, held_out = split_held_out(load_dataset(sample_text_file, tokenizer, 16), 0.2, 0)
    adapted = prepare_model(model, PaCAConfig(r=4), device="cpu")
    args = TrainingArguments(output_dir="unused", max_steps=6, batch_size=2, lr=1e-2, log_every=2, eval_every=3, progress=False)
    trainer = Trainer(adapted, args, train, "cpu")
    trainer.tracker, trainer.eval_data = RecordingTracker(), held_out
    trainer.save_checkpoint = lambda *a, **k: None  # nothing written: this test is about the reports
    trainer.train()
    train_points = [(step, m) for step, m in trainer.tracker.logged if "train/loss" in m]
    eval_points = [(step, m) for step, m in trainer.tracker.logged if EVAL_LOSS in m]
    assert [step for step, _ in train_points] == [2, 4, 6]
    assert all(set(m) == set(TRAIN_SCALARS.values()) for _, m in train_points)
    assert [m["train/loss"] for _, m in train_points] == [r["loss"] for r in trainer.state.history]
    assert [step for step, _ in eval_points] == [3, 6]
    assert [m[EVAL_LOSS] for _, m in eval_points] == [e["held_out_loss"] for e in trainer.state.evaluations]
    assert trainer.state.evaluations[-1]["held_out_loss"] == pytest.approx(trainer.evaluate(held_out))


def test_tensorboard_event_files_read_back_with_tensorboards_reader(tiny_model_dir, sample_text_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(_train_flags(tiny_model_dir, sample_text_file, out, "--report-to", "tensorboard")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "runs" in json.loads((out / MARKER_NAME).read_text())["entries"]
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert set(TRAIN_KEYS) | {EVAL_LOSS} <= set(scalars)
    assert [step for step, _ in scalars["train/loss"]] == [2, 4]
    assert [value for _, value in scalars["train/loss"]] == pytest.approx([r["loss"] for r in metrics["history"]])
    assert [value for _, value in scalars["train/learning_rate"]] == pytest.approx([r["lr"] for r in metrics["history"]])
    assert all(value > 0 for _, value in scalars["train/tokens_per_s"] + scalars["train/grad_norm"])
    # held-out loss: before training (step 0), then every --eval-every 2 steps; the last one is the run's "after"
    assert [step for step, _ in scalars[EVAL_LOSS]] == [0, 2, 4]
    assert scalars[EVAL_LOSS][0][1] == pytest.approx(metrics["held_out_loss_before"])
    assert scalars[EVAL_LOSS][-1][1] == pytest.approx(metrics["held_out_loss_after"])
    assert [e["step"] for e in metrics["evaluations"]] == [2, 4]


def test_overwrite_replaces_the_previous_runs_event_files(tiny_model_dir, sample_text_file, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    flags = _train_flags(tiny_model_dir, sample_text_file, out, "--report-to", "tensorboard", "--no-eval", eval_every=0)
    assert main(flags) == 0
    first = sorted(p.name for p in (out / "runs").iterdir())
    assert main(flags + ["--overwrite"]) == 0
    second = sorted(p.name for p in (out / "runs").iterdir())
    assert len(first) == len(second) == 1 and first != second


def _wandb_records(path):
    """The records of a W&B offline run file (.wandb: a LevelDB-style log of protobuf records, in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, position, block, chunk = path.read_bytes(), 7, 32768, b""  # 7: the file's ':W&B' header
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if position + 7 + length > len(data):
            return  # a chunk still being written
        chunk += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def _finished_wandb_records(path, timeout_s: float = 60.0) -> list:
    """The run file's records once W&B's own process has written its last ('exit') record: ``run.finish()`` returns
    before that process has flushed the file."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(_wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.25)


@pytest.mark.slow  # W&B runs its own service process
def test_wandb_offline_run(tiny_model_dir, sample_text_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main(_train_flags(tiny_model_dir, sample_text_file, out, "--report-to", "wandb", "--run-name", "tiny")) == 0
    assert "wandb" in json.loads((out / MARKER_NAME).read_text())["entries"]
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = _finished_wandb_records(run_file)
    history = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.append(items)
        elif record.WhichOneof("record_type") == "run":
            assert record.run.display_name == "tiny" and record.run.project == "paca-hal"
    metrics = json.loads((out / "metrics.json").read_text())
    train = [h for h in history if "train/loss" in h]
    assert [h["_step"] for h in train] == [2, 4] and all(set(TRAIN_KEYS) <= set(h) for h in train)
    assert [h["train/loss"] for h in train] == pytest.approx([r["loss"] for r in metrics["history"]])
    assert [h["_step"] for h in history if EVAL_LOSS in h] == [0, 2, 4]


def test_mlflow_local_file_store(tiny_model_dir, sample_text_file, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the tracker sets when unset; here it is restored after
    out = tmp_path / "run"
    assert main(_train_flags(tiny_model_dir, sample_text_file, out, "--report-to", "mlflow")) == 0
    assert "mlruns" in json.loads((out / MARKER_NAME).read_text())["entries"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("paca-hal").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["rank"] == "4" and run.data.params["report_to"] == "mlflow"
    metrics = json.loads((out / "metrics.json").read_text())
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [2, 4]
    assert [m.value for m in losses] == pytest.approx([r["loss"] for r in metrics["history"]])
    assert [m.step for m in client.get_metric_history(run.info.run_id, EVAL_LOSS)] == [0, 2, 4]
    assert set(TRAIN_KEYS) <= set(run.data.metrics)


def test_the_hf_trainers_own_report_to_works_with_a_prepared_model(tmp_path):
    """``PacaTrainer`` leaves ``report_to`` to transformers: its TensorBoard callback writes the run as for any model."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import TrainingArguments

    from paca_core import PaCAConfig, prepare_model
    from paca_core.integrations.transformers import PacaTrainer

    from .conftest import tiny_llama
    from .scripts.hf_trainer_run import Rows

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to=["tensorboard"], use_cpu=True, seed=0)
    trainer = PacaTrainer(model=prepare_model(tiny_llama(seed=0), PaCAConfig(r=4)), args=args, train_dataset=Rows())
    trainer.train()
    (folder,) = {path.parent for path in (tmp_path / "hf").rglob("events.out.tfevents.*")}  # <output_dir>/runs/...
    events = EventAccumulator(str(folder))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
