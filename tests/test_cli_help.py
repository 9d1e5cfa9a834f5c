"""``paca train --help`` a person can read (groups, real defaults once, examples), argument errors in the right
subcommand's words (no abbreviations), and ``merge``/``export-peft`` on the base model the adapter records."""
from __future__ import annotations

import re

import pytest
import torch

from paca_core.cli.dispatch import build_parser, main
from paca_core.flags.train_options import GROUP_TITLES


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def _refusal(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        main(list(argv))
    assert done.value.code == 2
    return capsys.readouterr().err


# --- paca train --help ------------------------------------------------------------------------------------------
def test_train_help_groups_every_option_under_a_heading_in_order(capsys):
    text = _help(capsys, "train")
    positions = [text.index(f"\n{title}:\n") for title in GROUP_TITLES]
    assert positions == sorted(positions)
    parser = build_parser().subcommands["train"]
    loose = [a.option_strings[0] for group in parser._action_groups if group.title not in GROUP_TITLES
             for a in group._group_actions if a.option_strings]
    assert sorted(loose) == ["--config", "-h"]  # only help and the config file stand outside the groups
    sections = {title: text[text.index(f"\n{title}:\n"):] for title in GROUP_TITLES}
    for title, flag in [("model and data", "--seq-len"), ("model and data", "--packing"), ("method", "--lora-dropout"),
                        ("optimisation", "--warmup-steps"), ("memory levers", "--gradient-checkpointing"),
                        ("device and distributed", "--fsdp"), ("output and logging", "--report-to")]:
        assert f"  {flag}" in sections[title].split("\n\n")[0], (title, flag)


def test_train_help_shows_real_defaults_once_and_documents_every_flag(capsys):
    text = _help(capsys, "train")
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: True)" not in text
    flat = " ".join(text.split())
    assert "(default: 128)" in flat and "(default: runs/paca)" in flat and "(default: none)" in flat
    assert len(re.findall(r"default:? 1024", flat)) == 1  # --loss-chunk-tokens says its default itself: not appended again
    warmup = flat[flat.index("--warmup-steps"):flat.index("--weight-decay")]
    assert "learning rate" in warmup and "(default: 5)" in warmup
    decay = flat[flat.index("--weight-decay WEIGHT_DECAY"):flat.index("--max-grad-norm")]
    assert "AdamW" in decay and "(default: 0.0)" in decay
    parser = build_parser().subcommands["train"]
    undocumented = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert undocumented == []


def test_train_help_gives_examples(capsys):
    text = _help(capsys, "train")
    examples = text[text.index("examples:"):]
    commands = [line.strip() for line in examples.splitlines() if line.strip().startswith(("paca train", "torchrun"))]
    assert 3 <= len(commands) <= 6
    assert any("--config" in c for c in commands) and any("--report-to" in line for line in examples.splitlines())


@pytest.mark.parametrize("command", ["plan", "merge", "export-peft", "bench"])
def test_other_commands_show_real_defaults(capsys, command):
    text = " ".join(_help(capsys, command).split())
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: True)" not in text
    expected = {"plan": "(default: llama-3.1-8b)", "bench": "(default: runs/bench)", "merge": "base_model",
                "export-peft": "base_model"}[command]
    assert expected in text


# --- argument errors ----------------------------------------------------------------------------------------------
def test_an_unknown_train_flag_prints_trains_usage(capsys):
    err = _refusal(capsys, "train", "--no-such-flag")
    assert err.startswith("usage: paca train") and "unrecognized arguments: --no-such-flag" in err
    assert "{train,merge" not in err  # not the top level's usage


def test_abbreviated_flags_are_refused_everywhere(capsys):
    err = _refusal(capsys, "train", "--seq", "12")
    assert err.startswith("usage: paca train") and "--seq 12" in err and "did you mean --seq-len" in err
    assert "usage: paca merge" in _refusal(capsys, "merge", "--adapt", "a", "--out", "o")
    assert "usage: paca plan" in _refusal(capsys, "plan", "--calib")
    parser = build_parser()
    assert parser.allow_abbrev is False
    assert all(sub.allow_abbrev is False for sub in parser.subcommands.values())


# --- merge / export-peft: the recorded base model -----------------------------------------------------------------
@pytest.fixture
def recorded_adapter(tiny_model_dir, tmp_path):
    """An adapter saved as paca train saves it: base_model and its fingerprint recorded; non-zero deltas."""
    from tests.conftest import randomise_paca_deltas

    from paca_core import PaCAConfig, prepare_model
    from paca_core.files.assets import load_model_and_tokenizer, model_fingerprint

    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    adapted = prepare_model(model, PaCAConfig(r=4), device="cpu")
    randomise_paca_deltas(adapted)
    adapter = tmp_path / "adapter"
    adapted.save_pretrained(adapter, base_model=str(tiny_model_dir), base_model_fingerprint=model_fingerprint(tiny_model_dir))
    return adapter


@pytest.fixture
def other_model_dir(tiny_model_dir, tmp_path):
    """A model of the same shapes and tokenizer as the tiny one, with other weights (so another fingerprint)."""
    from tests.conftest import tiny_llama
    from transformers import AutoTokenizer

    folder = tmp_path / "other-model"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.save_pretrained(folder)
    tiny_llama(seed=7, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
               pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    return folder


def test_merge_without_model_uses_the_base_the_adapter_records(recorded_adapter, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from paca_core import PacaModel
    from paca_core.files.assets import load_model_and_tokenizer

    merged_dir = tmp_path / "merged"
    assert main(["merge", "--adapter", str(recorded_adapter), "--out", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    adapted = PacaModel.from_pretrained(model, recorded_adapter, device="cpu")
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("command", ["merge", "export-peft"])
def test_a_base_with_another_fingerprint_is_refused_in_one_line(command, recorded_adapter, tiny_model_dir, other_model_dir,
                                                                tmp_path, no_load, caplog):
    with caplog.at_level("ERROR"):
        code = main([command, "--adapter", str(recorded_adapter), "--model", str(other_model_dir), "--out", str(tmp_path / "o")])
    assert code == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert f"trained on {tiny_model_dir}" in line and str(other_model_dir) in line and "\n" not in line
    assert not (tmp_path / "o").exists()


def test_a_recorded_base_whose_weights_changed_is_refused(recorded_adapter, tiny_model_dir, other_model_dir, tmp_path,
                                                          no_load, caplog):
    import json

    config = recorded_adapter / "adapter_config.json"
    document = json.loads(config.read_text())
    config.write_text(json.dumps({**document, "base_model": str(other_model_dir)}))  # as if that folder had been replaced
    with caplog.at_level("ERROR"):
        assert main(["merge", "--adapter", str(recorded_adapter), "--out", str(tmp_path / "o")]) == 2
    assert "recorded base model" in caplog.text and "fingerprint" in caplog.text


def test_an_adapter_without_a_recorded_base_asks_for_model(recorded_adapter, tmp_path, no_load, caplog):
    import json

    config = recorded_adapter / "adapter_config.json"
    document = json.loads(config.read_text())
    document.pop("base_model")
    config.write_text(json.dumps(document))
    with caplog.at_level("ERROR"):
        assert main(["export-peft", "--adapter", str(recorded_adapter), "--out", str(tmp_path / "o")]) == 2
    assert "pass --model" in caplog.text
