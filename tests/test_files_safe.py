"""A user's files are sacred: every output path case of train, merge and export-peft, each provoked on purpose,
with the user's files compared byte for byte afterwards. Refusals that need no weights must come before the
model loads: ``no_load`` makes any load fail the test."""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from paca_core import PaCAConfig, prepare_model
from paca_core.cli.dispatch import main
from paca_core.files.outputs import MARKER_NAME


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under ``root``, by relative path: compared before and after."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        found[str(path.relative_to(root))] = None if path.is_dir() else path.read_bytes()
    return found




@pytest.fixture
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from paca_core.files.assets import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    directory = tmp_path_factory.mktemp("trained") / "adapter"
    prepare_model(model, PaCAConfig(r=4), device="cpu").save_pretrained(directory)
    return directory


@pytest.fixture
def user_folder(tmp_path):
    folder = tmp_path / "thesis"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.txt").write_text("three years of work")
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return folder


def _run(argv, caplog) -> int:
    caplog.clear()
    with caplog.at_level("ERROR"):
        return main(argv)


def _error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


# --- export-peft and merge -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["export-peft", "merge"])
def test_a_folder_of_user_files_is_refused_and_left_byte_identical(command, tiny_model_dir, adapter_dir, user_folder, no_load, caplog):
    before = snapshot(user_folder.parent)
    code = _run([command, "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--out", str(user_folder)], caplog)
    assert code == 2
    (line,) = _error_lines(caplog)
    assert "did not write" in line and "thesis.txt" in line and "\n" not in line
    assert snapshot(user_folder.parent) == before


@pytest.mark.parametrize("command", ["export-peft", "merge"])
def test_the_base_model_folder_is_never_an_output(command, tiny_model_dir, adapter_dir, no_load, caplog):
    before = snapshot(tiny_model_dir)
    for out in (tiny_model_dir, tiny_model_dir / "sub"):
        assert _run([command, "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--out", str(out)], caplog) == 2
        assert "--model" in _error_lines(caplog)[0]
    assert snapshot(tiny_model_dir) == before


def test_export_into_the_adapter_it_reads_is_refused(tiny_model_dir, adapter_dir, no_load, caplog):
    before = snapshot(adapter_dir.parent)
    for out in (adapter_dir, adapter_dir.parent):
        assert _run(["export-peft", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--out", str(out)], caplog) == 2
    assert snapshot(adapter_dir.parent) == before


@pytest.mark.parametrize("command", ["export-peft", "merge"])
def test_an_existing_file_as_out_is_refused_and_nothing_is_left_beside_it(command, tiny_model_dir, adapter_dir, tmp_path, no_load, caplog):
    target = tmp_path / "notes.md"
    target.write_text("my notes")
    assert _run([command, "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--out", str(target)], caplog) == 2
    assert "is a file" in _error_lines(caplog)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md"] and target.read_text() == "my notes"


def test_out_dot_in_a_folder_of_user_files_is_refused(tiny_model_dir, adapter_dir, user_folder, monkeypatch, no_load, caplog):
    monkeypatch.chdir(user_folder)
    before = snapshot(user_folder)
    assert _run(["export-peft", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--out", "."], caplog) == 2
    assert snapshot(user_folder) == before


def test_export_writes_then_refuses_to_replace_without_overwrite(tiny_model_dir, adapter_dir, tmp_path, caplog):
    out = tmp_path / "lora"
    argv = ["export-peft", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--out", str(out)]
    assert _run(argv, caplog) == 0
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["command"] == "export-peft" and sorted(marker["entries"]) == ["adapter_config.json", "adapter_model.safetensors"]
    first = snapshot(out)
    assert _run(argv, caplog) == 2 and "--overwrite" in _error_lines(caplog)[0]
    assert snapshot(out) == first
    assert _run(argv + ["--overwrite"], caplog) == 0
    # A file a user puts into the output later makes it theirs: even --overwrite refuses it.
    (out / "my-eval.txt").write_text("keep me")
    assert _run(argv + ["--overwrite"], caplog) == 2 and "my-eval.txt" in _error_lines(caplog)[0]
    assert (out / "my-eval.txt").read_text() == "keep me"


def test_a_merge_output_is_not_an_export_output(tiny_model_dir, adapter_dir, tmp_path, caplog):
    out = tmp_path / "merged"
    assert _run(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--out", str(out)], caplog) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    before = snapshot(out)
    code = _run(["export-peft", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--out", str(out), "--overwrite"], caplog)
    assert code == 2 and "`paca merge` output" in _error_lines(caplog)[0]
    assert snapshot(out) == before


def test_disk_full_during_merge_leaves_the_previous_output_and_no_staging(tiny_model_dir, adapter_dir, tmp_path, monkeypatch, caplog):
    out = tmp_path / "merged"
    argv = ["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--out", str(out)]
    assert _run(argv, caplog) == 0
    before = snapshot(tmp_path)
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained

    def full_disk(self, directory, *args, **kwargs):
        (Path(directory) / "config.json").write_text("{}")  # half written, as a real full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(directory) / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    code = _run(argv + ["--overwrite"], caplog)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", original)
    assert code == 2
    (line,) = _error_lines(caplog)
    assert line.startswith("disk full while writing") and str(out) in line and "needed" in line and "free" in line
    assert snapshot(tmp_path) == before  # the old merge, whole; no staging folder


def test_merge_refuses_before_loading_when_the_disk_cannot_hold_it(tiny_model_dir, adapter_dir, tmp_path, monkeypatch, no_load, caplog):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
    assert _run(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--out", str(tmp_path / "m")], caplog) == 2
    assert "is needed but only" in _error_lines(caplog)[0]
    assert not (tmp_path / "m").exists()


def test_outputs_respect_the_umask(tiny_model_dir, adapter_dir, tmp_path, caplog):
    old = os.umask(0o022)
    try:
        out = tmp_path / "lora"
        assert _run(["export-peft", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--out", str(out)], caplog) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# --- train ---------------------------------------------------------------------------------------------------------
def _train(tiny_model_dir, data, out, *extra) -> list[str]:
    return ["train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--device", "cpu", "--steps", "2",
            "--seq-len", "16", "--batch-size", "2", "--sample-tokens", "0", "--no-progress", *extra]


def test_train_refuses_an_earlier_run_without_overwrite_and_replaces_it_with(tiny_model_dir, sample_text_file, tmp_path, caplog):
    out = tmp_path / "run"
    assert _run(_train(tiny_model_dir, sample_text_file, out, "--method", "lora"), caplog) == 0
    earlier = snapshot(out)
    assert set(json.loads((out / MARKER_NAME).read_text())["entries"]) == {"adapter", "checkpoint", "metrics.json", "config.yaml"}
    assert _run(_train(tiny_model_dir, sample_text_file, out), caplog) == 2
    assert "--overwrite" in _error_lines(caplog)[0] and "--resume" in _error_lines(caplog)[0]
    assert snapshot(out) == earlier
    assert _run(_train(tiny_model_dir, sample_text_file, out, "--overwrite"), caplog) == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["method"] == "paca"


@pytest.mark.parametrize("case", ["under-a-file", "is-a-file", "read-only", "data-inside", "model-inside"])
def test_train_refuses_an_unusable_out_before_loading(case, tiny_model_dir, sample_text_file, tmp_path, monkeypatch, no_load, caplog):
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("x")
    data = sample_text_file
    out = {"under-a-file": blocker / "run", "is-a-file": blocker, "read-only": tmp_path / "run",
           "data-inside": tmp_path, "model-inside": tiny_model_dir / "run"}[case]
    if case == "read-only":
        import paca_core.files.outputs as outputs

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)
    before = snapshot(tmp_path)
    assert _run(_train(tiny_model_dir, data, out), caplog) == 2
    (line,) = _error_lines(caplog)
    expected = {"under-a-file": "is a file", "is-a-file": "is a file", "read-only": "Read-only file system",
                "data-inside": "--data", "model-inside": "--model"}[case]
    assert expected in line, line
    assert snapshot(tmp_path) == before


def test_train_refuses_a_folder_of_user_files(tiny_model_dir, sample_text_file, user_folder, no_load, caplog):
    before = snapshot(user_folder)
    assert _run(_train(tiny_model_dir, sample_text_file, user_folder), caplog) == 2
    assert "did not write" in _error_lines(caplog)[0]
    assert snapshot(user_folder) == before


def test_a_legacy_run_folder_without_a_marker_is_recognised(tiny_model_dir, sample_text_file, tmp_path, caplog):
    out = tmp_path / "run"
    assert _run(_train(tiny_model_dir, sample_text_file, out), caplog) == 0
    (out / MARKER_NAME).unlink()  # as written by paca-hal before outputs carried a marker
    assert _run(_train(tiny_model_dir, sample_text_file, out), caplog) == 2
    assert "earlier paca-hal" in _error_lines(caplog)[0]
    assert _run(_train(tiny_model_dir, sample_text_file, out, "--overwrite"), caplog) == 0


# --- plan and bench ------------------------------------------------------------------------------------------------
def _plan(out, *extra) -> list[str]:
    return ["plan", "--model", "smollm2-135m", "--methods", "paca", "--device-profile", "h100-80g", "--seq-len", "64", "--batch-size", "1",
            "--no-search", "--workers", "1", "--out", str(out), *extra]


def test_plan_out_follows_the_policy(tmp_path, user_folder, caplog):
    note = tmp_path / "plan.txt"
    note.write_text("mine")
    assert _run(_plan(note), caplog) == 2 and "is a file" in _error_lines(caplog)[0]
    assert note.read_text() == "mine"
    before = snapshot(user_folder)
    assert _run(_plan(user_folder), caplog) == 2 and "did not write" in _error_lines(caplog)[0]
    assert snapshot(user_folder) == before
    out = tmp_path / "plan"
    assert _run(_plan(out), caplog) == 0
    assert json.loads((out / MARKER_NAME).read_text())["command"] == "plan" and (out / "plan.json").is_file()
    assert _run(_plan(out), caplog) == 2 and "--overwrite" in _error_lines(caplog)[0]
    assert _run(_plan(out, "--overwrite"), caplog) == 0


def test_bench_refuses_a_folder_of_user_files_before_any_worker(user_folder, monkeypatch, caplog):
    import paca_core.bench.run as bench_run

    def no_worker(*args, **kwargs):
        raise AssertionError("a worker ran before the refusal")

    monkeypatch.setattr(bench_run, "run_worker", no_worker)
    before = snapshot(user_folder)
    assert _run(["bench", "--model", "tiny", "--methods", "paca", "--out", str(user_folder)], caplog) == 2
    assert "did not write" in _error_lines(caplog)[0]
    assert snapshot(user_folder) == before


def test_a_relative_out_is_recognised_as_this_commands_output_next_time(tiny_model_dir, sample_text_file, tmp_path, monkeypatch, caplog):
    """The main job's default --out is relative (runs/paca): its second run must see its own earlier run."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert _run(_train(tiny_model_dir, sample_text_file, "runs/x"), caplog) == 0
    marker = json.loads((work / "runs" / "x" / MARKER_NAME).read_text())
    assert set(marker["entries"]) == {"adapter", "checkpoint", "metrics.json", "config.yaml"}
    assert _run(_train(tiny_model_dir, sample_text_file, "runs/x"), caplog) == 2
    assert "holds a previous `paca train` output" in _error_lines(caplog)[0]
    assert _run(_train(tiny_model_dir, sample_text_file, "runs/x", "--resume", "runs/x", "--steps", "3"), caplog) == 0
    assert _run(_train(tiny_model_dir, sample_text_file, "runs/x", "--overwrite"), caplog) == 0
