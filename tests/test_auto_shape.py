"""``paca train --seq-len auto`` / ``--batch-size auto`` / ``--memory-budget``: the largest shape whose traced
step fits, chosen before anything loads; and the devices' free-memory figure it defaults to."""
from __future__ import annotations

import json
import logging
import types

import pytest
import torch

import devices
from paca_core.cli.dispatch import main
from paca_core.errors import PacaConfigError
from paca_core.methods import PaCAConfig
from paca_core.plan.auto_shape import MAX_AUTO_BATCH, ShapePeaks, choose_shape, choose_with_tracer, parse_budget
from paca_core.plan.preflight import LEVERS, planned_peak, step_tracer
from paca_core.flags.train_options import build_configs, int_or_auto, train_parser

from .conftest import build_tiny_tokenizer, tiny_llama, tiny_llama_config

CONFIGS = [PaCAConfig(r=4, seed=0)]


@pytest.fixture(scope="module")
def long_context_config(tmp_path_factory):
    """A model folder with only config.json (nothing to load) and a context long enough to search."""
    folder = tmp_path_factory.mktemp("long-context")
    tiny_llama_config(max_position_embeddings=2048, vocab_size=2048).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def deep_long_context_config(tmp_path_factory):
    """Four layers: with two, recomputing one layer in backward costs about what checkpointing saves."""
    folder = tmp_path_factory.mktemp("deep-long-context")
    tiny_llama_config(max_position_embeddings=2048, vocab_size=2048, num_hidden_layers=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    """A loadable tiny LLaMA + tokenizer whose context (512) leaves room above the smallest auto length."""
    folder = tmp_path_factory.mktemp("long-context-model")
    tokenizer = build_tiny_tokenizer(folder)
    tiny_llama(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
               pad_token_id=tokenizer.pad_token_id, max_position_embeddings=512).save_pretrained(folder)
    return folder


# --- argparse and the budget ---------------------------------------------------------------------------
def test_seq_len_and_batch_size_take_a_number_or_auto():
    args = train_parser().parse_args([])
    assert (args.seq_len, args.batch_size, args.memory_budget) == (128, 4, None)  # the defaults stay numbers
    args = train_parser().parse_args(["--seq-len", "256", "--batch-size", "AUTO", "--memory-budget", "24GiB"])
    assert (args.seq_len, args.batch_size) == (256, "auto")
    assert int_or_auto(" auto ") == "auto" and int_or_auto("7") == 7
    with pytest.raises(Exception, match="whole number, or 'auto'"):
        int_or_auto("long")
    assert parse_budget("24GiB") == 24 * 2**30 and parse_budget("80e9") == 80 * 10**9 and parse_budget("512MB") == 512 * 10**6
    with pytest.raises(PacaConfigError, match="--memory-budget.*8GiB, 512MiB, 16GB or a number of bytes"):
        parse_budget("plenty")


# --- the choice: exactly the largest planned shape that fits ---------------------------------------------
@pytest.mark.slow
def test_auto_picks_exactly_the_largest_shape_whose_planned_peak_fits(long_context_config):
    tracer = step_tracer(long_context_config, "paca", CONFIGS, torch.float32)
    peaks = ShapePeaks(tracer)
    context, static = peaks.context(), peaks.static_bytes()
    # The selection's peaks are planned_peak's (the figure `paca train --plan-check` and `paca plan` report).
    assert peaks(256, 2) == planned_peak(long_context_config, "paca", CONFIGS, 256, 2, torch.float32)

    budget = peaks(256, 2)
    exact = choose_shape(peaks, "auto", 2, budget, context, static)
    assert (exact.seq_len, exact.batch_size, exact.peak_bytes, exact.chosen) == (256, 2, budget, ("seq_len",))
    assert choose_shape(peaks, "auto", 2, budget - 1, context, static).seq_len == 192

    budget = peaks(128, 3)
    assert choose_shape(peaks, 128, "auto", budget, context, static).batch_size == 3
    assert choose_shape(peaks, 128, "auto", budget - 1, context, static).batch_size == 2

    # Both: the length first at batch 1, then the batch at that length.
    budget = peaks(320, 1)
    both = choose_shape(peaks, "auto", "auto", budget, context, static)
    assert (both.seq_len, both.batch_size, both.chosen) == (320, 1, ("seq_len", "batch_size"))
    # Capped by the context (seq) and by MAX_AUTO_BATCH (batch).
    assert choose_shape(peaks, "auto", 1, 1 << 50, context, static).seq_len == 2048
    assert choose_shape(lambda s, b: b, 64, "auto", 1 << 50, context).batch_size == MAX_AUTO_BATCH


@pytest.mark.slow
def test_on_an_accelerator_the_choice_counts_what_the_device_holds(long_context_config):
    """On cuda/hpu, auto and --plan-check count the allocator's reserve and the runtime's own memory, as `paca plan`'s
    fits does: never a longer sequence than the live bytes alone would give, and a strictly larger peak."""
    tracer = step_tracer(long_context_config, "paca", CONFIGS, torch.bfloat16)
    live, on_cuda = ShapePeaks(tracer)(128, 1), ShapePeaks(tracer, device_type="cuda")(128, 1)
    assert on_cuda > live + 256 * 2**20  # at least the CUDA context beyond the live bytes
    assert ShapePeaks(tracer, device_type="hpu")(128, 1) > live
    assert ShapePeaks(tracer, device_type="no-such-device")(128, 1) == live  # no profile: live bytes, as before
    budget = on_cuda
    assert choose_with_tracer(tracer, "auto", 1, budget, device_type="cuda").seq_len == 128
    assert choose_with_tracer(tracer, "auto", 1, budget).seq_len > 128


@pytest.mark.slow
def test_checkpointing_and_chunked_loss_buy_a_longer_auto_seq_len(deep_long_context_config):
    """The levers the run uses are traced: under one budget, each gives a longer sequence than neither."""
    folder = deep_long_context_config
    budget = planned_peak(folder, "paca", CONFIGS, 512, 2, torch.float32)

    def longest(**levers) -> int:
        tracer = step_tracer(folder, "paca", CONFIGS, torch.float32, **levers)
        return choose_with_tracer(tracer, "auto", 2, budget).seq_len

    plain = longest(loss_chunk_tokens=None)
    assert plain == 512
    assert longest(gradient_checkpointing=True) > plain
    assert longest(loss_chunk_tokens=64) > plain


def test_nothing_fits_names_the_smallest_setting_and_the_levers(long_context_config):
    tracer = step_tracer(long_context_config, "paca", CONFIGS, torch.float32)
    smallest = ShapePeaks(tracer)(64, 2)
    with pytest.raises(PacaConfigError) as error:
        choose_with_tracer(tracer, "auto", 2, smallest - 1)
    message = str(error.value)
    assert "--seq-len 64 at --batch-size 2" in message and LEVERS in message and "Nothing was loaded" in message
    with pytest.raises(PacaConfigError, match="--seq-len 64 at --batch-size 1"):
        choose_with_tracer(tracer, 64, "auto", ShapePeaks(tracer)(64, 1) - 1)


# --- paca train ---------------------------------------------------------------------------------------
def _train_args(model_dir, data, out, *extra: str) -> list[str]:
    return ["train", "--device", "cpu", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--rank", "4",
            "--steps", "2", "--no-progress", "--sample-tokens", "0", "--log-every", "1", *extra]


def _cli_peak(model_dir, seq_len: int, batch_size: int) -> int:
    """The planned peak of the step `paca train --rank 4` on CPU runs (fp32, default chunked loss)."""
    from paca_core.memory.chunked_loss import parse_loss_chunk_tokens

    args = train_parser().parse_args(["--rank", "4"])
    return planned_peak(model_dir, "paca", build_configs(args), seq_len, batch_size, torch.float32,
                        loss_chunk_tokens=parse_loss_chunk_tokens(args.loss_chunk_tokens), include_host=True)


def test_paca_train_seq_len_auto_trains_at_the_chosen_length_and_a_resume_keeps_it(
        long_context_model, sample_text_file, tmp_path, caplog):
    budget = _cli_peak(long_context_model, 128, 2)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="paca_core"):
        assert main(_train_args(long_context_model, sample_text_file, out, "--seq-len", "auto", "--batch-size", "2",
                                "--memory-budget", str(budget))) == 0
    chosen = [r.getMessage() for r in caplog.records if "(auto)" in r.getMessage()]
    assert len(chosen) == 1 and "--seq-len 128 (auto) at --batch-size 2" in chosen[0] and "paca plan's trace" in chosen[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seq_len"] == 128 and metrics["training"]["batch_size"] == 2 and metrics["steps"] == 2
    assert metrics["auto_shape"]["planned_peak_bytes"] <= metrics["auto_shape"]["memory_budget_bytes"] == budget
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert (state["seq_len"], state["batch_size"]) == (128, 2)

    # A resume with auto re-uses the checkpoint's shape instead of planning (this budget fits nothing).
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="paca_core"):
        assert main(_train_args(long_context_model, sample_text_file, out, "--seq-len", "auto", "--batch-size", "auto",
                                "--memory-budget", "1000", "--steps", "3", "--resume", str(out))) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["seq_len"] == 128 and metrics["training"]["batch_size"] == 2
    assert metrics["auto_shape"]["source"].startswith("checkpoint")
    assert any("as the checkpoint recorded" in r.getMessage() for r in caplog.records)

    # A checkpoint that does not record its shape: auto on resume asks for the numbers.
    state_file = out / "checkpoint" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["seq_len"], state["batch_size"]
    state_file.write_text(json.dumps(state))
    caplog.clear()
    assert main(_train_args(long_context_model, sample_text_file, out, "--seq-len", "auto", "--resume", str(out), "--steps", "4")) == 2
    assert any("Pass the run's --seq-len and --batch-size" in r.getMessage() for r in caplog.records)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if paca train loads a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("paca_core.files.assets.load_model", refuse)


def test_paca_train_auto_with_nothing_that_fits_exits_2_before_loading(long_context_model, sample_text_file, tmp_path,
                                                                       caplog, no_loading):
    budget = _cli_peak(long_context_model, 64, 4) - 1
    assert main(_train_args(long_context_model, sample_text_file, tmp_path / "run", "--seq-len", "auto",
                            "--memory-budget", str(budget))) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "--seq-len 64 at --batch-size 4" in errors[0] and LEVERS in errors[0]
    caplog.clear()
    assert main(_train_args(long_context_model, sample_text_file, tmp_path / "run", "--batch-size", "auto",
                            "--memory-budget", "a lot")) == 2
    assert any("8GiB, 512MiB, 16GB or a number of bytes" in r.getMessage() for r in caplog.records)


def test_paca_train_auto_where_the_planner_cannot_trace_asks_for_numbers(long_context_model, sample_text_file, tmp_path,
                                                                          caplog, no_loading, monkeypatch):
    from paca_core.plan.planner import MethodTracer

    def untraceable(self, seq_len, batch_size):
        raise NotImplementedError("aten::exotic has no fake-tensor kernel")

    monkeypatch.setattr(MethodTracer, "measure", untraceable)
    assert main(_train_args(long_context_model, sample_text_file, tmp_path / "run", "--batch-size", "auto",
                            "--memory-budget", "1GiB")) == 2
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert "cannot trace" in message and "aten::exotic" in message and "explicit numbers" in message


def test_default_budget_is_the_free_memory_split_between_local_processes(monkeypatch):
    from paca_core.cli.train_command import _batch_within_data, _default_budget

    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: 8 * 2**30)
    monkeypatch.setattr(devices, "local_world_size", lambda: 4)
    assert _default_budget(torch.device("cpu"), 1) == 2 * 2**30  # host memory is shared by the machine's processes
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: None)
    with pytest.raises(PacaConfigError, match="--memory-budget"):
        _default_budget(torch.device("cpu"), 1)
    assert _batch_within_data(300, 40, 2) == 20 and _batch_within_data(3, 40, 2) == 3


# --- devices: free memory -----------------------------------------------------------------------------
def test_cpu_free_memory_is_a_positive_share_of_the_total():
    free = devices.free_memory_bytes("cpu")
    assert isinstance(free, int) and 0 < free <= devices.memory_stats("cpu").total_bytes


def test_cuda_and_hpu_free_memory_come_from_their_runtimes(monkeypatch):
    from devices.cuda import CudaRuntime
    from devices.hpu import HpuRuntime

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**30, 80 * 2**30))
    assert CudaRuntime().free_bytes(torch.device("cuda", 0)) == 3 * 2**30
    stand_in = types.SimpleNamespace(memory_stats=lambda device=None: {"Limit": 96 * 2**30, "InUse": 10 * 2**30})
    monkeypatch.setattr(torch, "hpu", stand_in, raising=False)
    assert HpuRuntime().free_bytes(torch.device("hpu")) == 86 * 2**30
    stand_in.memory_stats = lambda device=None: {"InUse": 0}
    assert HpuRuntime().free_bytes(torch.device("hpu")) is None  # no Limit: the runtime cannot tell


def test_a_runtime_that_cannot_tell_free_memory_says_none():
    from devices.runtime import DeviceRuntime

    assert DeviceRuntime.free_bytes(object(), torch.device("cpu")) is None
