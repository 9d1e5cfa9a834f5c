"""``paca train --config``: the same keys as the flags, command-line flags win, bad keys and types are one line each,
and the config.yaml a run writes repeats it (same arguments, same losses)."""
from __future__ import annotations

import json

import pytest

from paca_core.cli import dispatch as cli
from paca_core.cli.dispatch import main
from paca_core.files.outputs import MARKER_NAME


def _parse(*argv: str):
    """What ``paca train`` would run with: argv parsed, its --config applied."""
    parser = cli.build_parser()
    argv = list(argv)
    return cli.apply_config(parser, argv, cli.parse_arguments(parser, argv))


def _train_flags(tiny_model_dir, data, out, steps=3):
    return ["train", "--device", "cpu", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--steps", str(steps),
            "--seq-len", "16", "--batch-size", "2", "--rank", "4", "--lr", "1e-2", "--warmup-steps", "1", "--log-every", "1",
            "--sample-tokens", "0", "--no-progress", "--dtype", "fp32"]


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_written_config_repeats_the_run(tiny_model_dir, sample_text_file, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    argv = _train_flags(tiny_model_dir, sample_text_file, first)
    assert main(argv) == 0
    config = first / "config.yaml"
    assert "config.yaml" in json.loads((first / MARKER_NAME).read_text())["entries"]  # the run folder lists it

    original, repeated = vars(_parse(*argv)), vars(_parse("train", "--config", str(config)))
    assert repeated.pop("config") == str(config) and original.pop("config") is None
    assert repeated == original  # every flag resolves to the same value (paths were absolute already)

    assert main(["train", "--config", str(config), "--out", str(second)]) == 0
    one, two = (json.loads((folder / "metrics.json").read_text()) for folder in (first, second))
    assert [r["loss"] for r in two["history"]] == [r["loss"] for r in one["history"]]
    assert two["held_out_loss_after"] == one["held_out_loss_after"]
    # Its own config.yaml differs only in --out (and the time it was written).
    body = [line for line in (second / "config.yaml").read_text().splitlines() if not line.startswith("#")]
    assert body == [line.replace(str(first), str(second)) for line in config.read_text().splitlines() if not line.startswith("#")]


def test_repeating_into_the_same_out_needs_overwrite_on_the_command_line(tiny_model_dir, sample_text_file, tmp_path, caplog):
    out = tmp_path / "run"
    assert main(_train_flags(tiny_model_dir, sample_text_file, out, steps=2)) == 0
    with caplog.at_level("ERROR"):
        assert main(["train", "--config", str(out / "config.yaml")]) == 2
    assert "--overwrite" in _errors(caplog)[0]
    assert main(["train", "--config", str(out / "config.yaml"), "--overwrite"]) == 0
    assert (out / "config.yaml").is_file() and (out / "adapter").is_dir()


def test_both_spellings_json_and_flags_override_the_file(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("seq-len: 32\nsteps: 7\nlr: 5e-4\nno_eval: true\nreport_to: [none]\ntarget_modules: [q_proj, v_proj]\n"
                         "loss_chunk_tokens: 256\nbatch_size: auto\n")
    args = _parse("train", "--config", str(yaml_file), "--steps", "3")
    assert (args.seq_len, args.steps, args.lr, args.no_eval) == (32, 3, 5e-4, True)  # --steps from the command line wins
    assert args.target_modules == "q_proj,v_proj" and args.loss_chunk_tokens == "256" and args.batch_size == "auto"
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"--rank": 12, "method": "lora", "eval_data": None}))
    args = _parse("train", "--config", str(json_file))
    assert (args.rank, args.method, args.eval_data, args.seq_len) == (12, "lora", None, 128)  # the rest: the flags' defaults


@pytest.mark.parametrize("content, message", [
    ("seq_lenn: 64\n", "unknown key 'seq_lenn' (did you mean 'seq_len'?)"),
    ("lerning_rate: 0.1\n", "unknown key 'lerning_rate'"),
    ("steps: many\n", "steps: expected a whole number, got 'many' (str)"),
    ("steps: 2.5\n", "steps: expected a whole number"),
    ("seq_len: long\n", "seq_len: expected a whole number or 'auto'"),
    ("no_eval: 'yes'\n", "no_eval: expected true or false"),
    ("dtype: fp64\n", "dtype: expected one of"),
    ("lr: [1, 2]\n", "lr: expected a number or null"),
    ("report_to: neptune\n", "report_to: expected"),
    ("overwrite: true\n", "'overwrite' is a command-line flag only"),
    ("seq_len: 8\nseq-len: 9\n", "are the same flag"),
    ("- seq_len\n", "must hold a mapping"),
    ("steps: [\n", "is not valid YAML"),
])
def test_bad_files_are_one_line_naming_the_key(tmp_path, caplog, no_load, content, message):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    with caplog.at_level("ERROR"):
        assert main(["train", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    (line,) = _errors(caplog)
    assert message in line and "\n" not in line and str(config) in line
    assert not (tmp_path / "out").exists()


def test_a_missing_or_foreign_file_is_refused(tmp_path, caplog, no_load):
    with caplog.at_level("ERROR"):
        assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
        (tmp_path / "run.toml").write_text("steps = 3\n")
        assert main(["train", "--config", str(tmp_path / "run.toml")]) == 2
    first, second = _errors(caplog)
    assert "no such file" in first and ".yaml, .yml or .json" in second
