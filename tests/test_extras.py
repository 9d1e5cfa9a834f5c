"""Optional extras: a missing package is named with the extra to install, before any work and without a traceback."""
import logging
import sys

import pytest

from paca_core import extras
from paca_core.cli.dispatch import main


def _hide(monkeypatch, *modules):
    """Make ``import module`` fail (and find_spec report it absent), as on a machine without that extra."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_require_names_every_missing_package_and_its_extra(monkeypatch):
    _hide(monkeypatch, "peft", "bitsandbytes")
    with pytest.raises(extras.MissingExtraError) as caught:
        extras.require({"peft": "the PEFT peer", "bitsandbytes": "the 4-bit entry", "torch": "everything"})
    message = str(caught.value)
    assert "paca-hal[peft]" in message and "paca-hal[quant]" in message and "nothing was run" in message
    assert "torch" not in message
    extras.require({"torch": "everything"})  # present: no error


def test_bench_without_peft_names_the_extra_and_does_no_work(monkeypatch, tmp_path, caplog, capsys):
    _hide(monkeypatch, "peft")
    out = tmp_path / "bench"
    flags = ["bench", "--model", "tiny", "--methods", "floor,peft-lora,paca", "--steps", "1", "--device", "cpu",
             "--no-progress", "--out", str(out)]
    with caplog.at_level(logging.ERROR):
        assert main(flags) == 2
    assert "paca-hal[peft]" in caplog.text and "peft-lora" in caplog.text
    assert "Traceback" not in caplog.text + capsys.readouterr().err
    assert not out.exists()  # checked before anything was measured or written


def test_bench_quantized_entries_need_bitsandbytes_before_any_work(monkeypatch, tmp_path, caplog):
    _hide(monkeypatch, "bitsandbytes")
    out = tmp_path / "bench"
    with caplog.at_level(logging.ERROR):
        assert main(["bench", "--model", "tiny", "--methods", "paca,qpaca", "--device", "cpu", "--no-progress", "--out", str(out)]) == 2
    assert "paca-hal[quant]" in caplog.text and not out.exists()


@pytest.mark.slow
def test_bench_without_matplotlib_writes_json_and_markdown_and_says_how_to_get_plots(monkeypatch, tmp_path, capsys):
    _hide(monkeypatch, "matplotlib")  # the workers are fresh processes; only this process (which plots) lacks it
    out = tmp_path / "bench"
    code = main([
        "bench", "--model", "tiny", "--methods", "floor,paca", "--seq-len", "16", "--batch-size", "2", "--rank", "4",
        "--steps", "1", "--warmup-steps", "0", "--device", "cpu", "--no-progress", "--out", str(out),
    ])
    assert code == 0
    assert (out / "bench.json").is_file() and (out / "bench.md").is_file()
    assert not list(out.glob("*.png"))
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if "matplotlib is not installed" in line]
    assert len(notes) == 1 and "paca-hal[bench]" in notes[0]


def test_export_peft_without_peft_is_a_clear_error_not_a_traceback(monkeypatch, tiny_model_dir, tmp_path, caplog):
    from paca_core import PaCAConfig, prepare_model
    from paca_core.files.assets import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    prepare_model(model, PaCAConfig(r=4), device="cpu").save_pretrained(tmp_path / "adapter")
    _hide(monkeypatch, "peft")
    with caplog.at_level(logging.ERROR):
        code = main(["export-peft", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "lora")])
    assert code == 2 and "paca-hal[peft]" in caplog.text
    assert not (tmp_path / "lora").exists()


def test_an_import_error_that_is_not_an_optional_extra_keeps_its_traceback(monkeypatch):
    import paca_core.cli.dispatch as cli

    def broken(args):
        raise ModuleNotFoundError("No module named 'paca_core.nonexistent'", name="paca_core.nonexistent")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    for action in parser._subparsers._group_actions[0].choices.values():
        action.set_defaults(handler=broken)
    with pytest.raises(ModuleNotFoundError):
        main(["merge", "--adapter", "a", "--model", "m", "--out", "o"])


def test_missing_optional_module_follows_the_cause_chain():
    try:
        try:
            raise ModuleNotFoundError("No module named 'trl'", name="trl")
        except ImportError as inner:
            raise ImportError("paca_core.integrations.trl needs TRL: pip install 'paca-hal[trl]'") from inner
    except ImportError as outer:
        assert extras.missing_optional_module(outer) == "trl"
    assert extras.missing_optional_module(ImportError("x")) is None
    assert "paca-hal[gaudi]" in extras.install_hint("optimum.habana")
