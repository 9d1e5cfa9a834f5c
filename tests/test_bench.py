"""`paca bench`: method specs, the memory search, exact CPU accounting, and a smoke run of the command."""
import json

import pytest

from paca_core.bench.defaults import DEFAULT_METHODS
from paca_core.bench.report import add_ratios
from paca_core.bench.search import search_max
from paca_core.bench.worker import run_job
from paca_core.errors import PacaConfigError
from paca_core.workloads.byte_sizes import parse_bytes
from paca_core.workloads.specs import build_our_configs, parse_method_list, parse_method_spec

# tiny shape (paca_core.workloads.models): d=32, FFN 64, 2 layers, vocab 128, untied head
D, FFN, LAYERS, VOCAB = 32, 64, 2, 128
B, T = 2, 16


def _param_count():
    attention = D * D * 2 + D * (D // 2) * 2  # q, o: d×d; k, v: 2 KV heads of 8 = 16 wide
    mlp = 3 * D * FFN
    norms = 2 * D
    return VOCAB * D * 2 + LAYERS * (attention + mlp + norms) + D


def test_method_specs_reuse_the_train_parser_and_match_params():
    specs = {s.name: s for s in parse_method_list(",".join(DEFAULT_METHODS))}
    assert specs["paca"].rank(8, match_params=True) == 16 and specs["paca"].rank(8, match_params=False) == 8
    assert specs["peft-lorafa"].rank(8, True) == 16 and specs["peft-lora"].rank(8, True) == 8
    assert specs["floor"].rank(8, True) is None and specs["meft"].rank(8, True) is None
    assert [c.method for c in build_our_configs("paca+full+velora", 4)] == ["paca", "full", "velora"]
    assert [c.method for c in build_our_configs("velora", 4)] == ["lora", "velora"]
    assert specs["paca"].default_lr() == 5e-3 and specs["peft-lora"].default_lr() == 5e-3
    assert specs["paca"].default_lr(64) == pytest.approx(1.25e-3) and parse_method_spec("qpaca").default_lr(64) == pytest.approx(1.25e-3)
    with pytest.raises(PacaConfigError, match="not valid"):
        parse_method_spec("dora")
    with pytest.raises(PacaConfigError, match="twice"):
        parse_method_list("paca,PACA")


def test_parse_bytes_and_search():
    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("512MB") == 512 * 10**6 and parse_bytes("1000") == 1000
    with pytest.raises(PacaConfigError):
        parse_bytes("lots")
    memory = lambda size: 1000 + 7 * size  # noqa: E731
    for answer in (64, 960, 12288):
        result = search_max(memory, start=256, budget=memory(answer) + 3, step=64, upper=1 << 16)
        assert result.best == answer and not result.capped
        assert len(result.probes) <= 2 * 16
    assert search_max(memory, 256, budget=10**12, step=64, upper=4096).capped
    assert search_max(memory, 256, budget=10, step=64).best == 0
    assert search_max(lambda size: None if size > 100 else size, 8, budget=10**9, step=1).best == 100  # None = OOM


def _speed(method, rank=None, **options):
    job = {"mode": "speed", "method": method, "rank": rank, "model": "tiny", "dtype": "fp32", "device": "cpu", "seq_len": T,
           "batch_size": B, "steps": 1, "warmup_steps": 0, "lr": 1e-3, "options": options}
    result = run_job(job)
    assert result["status"] == "ok", result
    return result


def test_cpu_accounting_matches_analytic_counts():
    """Parameter, gradient and AdamW-state bytes from the formulas, and activation differences the
    methods' definitions predict (LoRA keeps the d_in-wide input A reads; LoRA-FA and PaCA keep r
    numbers per token), on a tiny fp32 model with only down_proj adapted."""
    r, tokens, n_params = 4, B * T, _param_count()
    full = _speed("full")
    assert full["trainable_parameters"] == n_params
    counted = full["counted"]
    assert counted["gradient_bytes"] == 4 * n_params
    # AdamW: exp_avg + exp_avg_sq per element, and a 4-byte step counter per parameter tensor
    n_tensors = 2 + LAYERS * 9 + 1
    assert counted["optimizer_state_bytes"] == 8 * n_params + 4 * n_tensors

    floor = _speed("floor")
    assert floor["counted"]["gradient_bytes"] == floor["counted"]["optimizer_state_bytes"] == 0
    lora = _speed("lora", r, target_modules="down_proj")
    peft_lora = _speed("peft-lora", r, target_modules="down_proj")
    lorafa = _speed("lorafa", r, target_modules="down_proj")
    paca = _speed("paca", r, target_modules="down_proj")
    lora_params = LAYERS * r * (FFN + D)
    assert lora["trainable_parameters"] == peft_lora["trainable_parameters"] == lora_params
    assert lora["counted"]["gradient_bytes"] == 4 * lora_params
    assert lora["counted"]["optimizer_state_bytes"] == 8 * lora_params + 4 * 2 * LAYERS
    assert lora["counted"]["parameter_bytes"] == 4 * (n_params + lora_params) + floor["counted"]["parameter_bytes"] - 4 * n_params
    assert paca["trainable_parameters"] == lorafa["trainable_parameters"] == LAYERS * r * D
    # Ours and PEFT's LoRA keep the same tensors; LoRA keeps down_proj's FFN-wide input beyond LoRA-FA.
    assert lora["counted"]["saved_activation_bytes"] == peft_lora["counted"]["saved_activation_bytes"]
    assert lora["counted"]["saved_activation_bytes"] - lorafa["counted"]["saved_activation_bytes"] == LAYERS * tokens * FFN * 4
    assert paca["counted"]["saved_activation_bytes"] == lorafa["counted"]["saved_activation_bytes"]
    total = paca["counted"]
    assert total["total_bytes"] == sum(total[k] for k in ("saved_activation_bytes", "parameter_bytes", "gradient_bytes", "optimizer_state_bytes", "host_table_bytes"))

    # The report's ratios (the smoke run below checks them end to end without the floor's worker).
    for record, method in ((floor, "floor"), (peft_lora, "peft-lora"), (paca, "paca")):  # what the runner adds
        record.update(method=method, rank=r, group_rank=r, seq_len=T, batch_size=B)
    add_ratios([floor, peft_lora, paca])
    assert floor["vs_floor"]["memory"] == 1.0 and peft_lora["vs_peft_lora"]["step_time"] == 1.0
    saved = paca["counted"]["saved_activation_bytes"]
    assert paca["vs_floor"]["saved_activations"] == saved / floor["counted"]["saved_activation_bytes"]
    assert paca["vs_peft_lora"]["saved_activations"] == saved / peft_lora["counted"]["saved_activation_bytes"]
    assert paca["activations_over_floor_bytes"] == saved - floor["counted"]["saved_activation_bytes"]


def test_bench_smoke_run_writes_json_markdown_and_plots(tmp_path):
    from paca_core.cli.dispatch import main

    out = tmp_path / "bench"
    code = main([  # two entries: each is a worker process; the floor's ratios are checked in-process above
        "bench", "--model", "tiny", "--methods", "peft-lora,paca", "--seq-len", "16", "--batch-size", "2", "--rank", "4",
        "--steps", "2", "--warmup-steps", "0", "--device", "cpu", "--no-progress", "--out", str(out),
    ])
    assert code == 0
    document = json.loads((out / "bench.json").read_text())
    records = {r["method"]: r for r in document["speed"]}
    assert set(records) == {"peft-lora", "paca"} and all(r["status"] == "ok" for r in records.values())
    assert records["paca"]["rank"] == 8  # parameter-matched to LoRA r=4
    assert records["peft-lora"]["vs_peft_lora"]["step_time"] == 1.0 and "vs_floor" not in records["paca"]
    assert records["paca"]["vs_peft_lora"]["saved_activations"] < 1.0
    assert len(records["paca"]["step_times_s"]) == 2 and records["paca"]["tokens_per_s"] > 0
    markdown = (out / "bench.md").read_text()
    assert "| paca | 8 |" in markdown and "×PEFT LoRA" in markdown
    for name in ("step_time.png", "memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unavailable_and_bad_input_are_reported_not_raised(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    result = run_job({"mode": "speed", "method": "peft-lora", "rank": 2, "model": "tiny", "dtype": "fp32", "device": "cpu",
                      "seq_len": 8, "batch_size": 1, "steps": 1, "options": {}})
    assert result["status"] == "unavailable" and "peft" in result["reason"]
    monkeypatch.undo()
    result = run_job({"mode": "accuracy", "method": "paca", "rank": 2, "model": "tiny", "dtype": "fp32", "device": "cpu",
                      "seq_len": 8, "batch_size": 1, "steps": 1, "options": {}})
    assert result["status"] == "error" and "real weights" in result["reason"]


def test_search_confirms_a_planned_answer_with_two_probes_and_recovers_from_a_wrong_one():
    memory = lambda size: 1000 + 7 * size  # noqa: E731
    budget = memory(960) + 3
    exact = search_max(memory, start=256, budget=budget, step=64, upper=1 << 16, planned=960)
    assert exact.best == 960 and [p[0] for p in exact.probes] == [960, 1024]
    for wrong in (64, 640, 1280, 60000):  # a plan that is off either way still ends at the true answer
        result = search_max(memory, start=256, budget=budget, step=64, upper=1 << 16, planned=wrong)
        assert result.best == 960, (wrong, result.probes)
    assert search_max(memory, 256, budget=10**12, step=64, upper=4096, planned=4096).capped


@pytest.mark.slow
def test_bench_memory_budget_search_is_planned_then_confirmed(tmp_path):
    """On CPU the probe reports counted bytes; the plan of the same bytes is exact, so two probes suffice."""
    from paca_core.cli.dispatch import main

    out = tmp_path / "bench"
    code = main([
        "bench", "--model", "tiny", "--methods", "paca", "--seq-len", "16", "--batch-size", "2", "--rank", "4", "--steps", "1",
        "--warmup-steps", "0", "--mode", "speed", "--memory-budget", "3MiB", "--search", "batch", "--device", "cpu", "--out", str(out), "--no-progress",
    ])
    assert code == 0
    record = json.loads((out / "bench.json").read_text())["speed"][0]
    search = record["search"]
    assert search["best"] > 2 and len(search["probes"]) == 2, search
    assert search["probes"][0][2] and not search["probes"][1][2]


@pytest.fixture
def toy_with_bench_declarations():
    """tests/toy_method.py's method, registered with a bench flag and a 4-bit form of its own."""
    import dataclasses

    import paca_core

    from . import toy_method  # registers "toy" the first time it is imported

    method = dataclasses.replace(toy_method.METHOD, bench_flags=("toy_init",), four_bit_form="qtoy")
    yield paca_core.register_method(method, replace=True)
    paca_core.methods.unregister_method("toy")


def test_bench_flags_and_four_bit_forms_come_from_the_registration(toy_with_bench_declarations):
    """`paca bench` copies a method's declared bench flags, and its 4-bit form is an entry of bench and plan
    (``paca plan --quantize`` plans the method in it), without bench or plan naming the method."""
    import argparse
    import dataclasses

    from paca_core.bench.command import add_bench_parser
    from paca_core.plan.run import _quantized_methods
    from paca_core.workloads.four_bit import four_bit_entries, four_bit_form

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    assert parser.parse_args(["bench", "--toy-init", "0.25"]).toy_init == 0.25
    assert parser.parse_args(["bench"]).toy_init is None  # unset: each entry keeps paca train's default
    assert parser.parse_args(["bench", "--velora-groups", "8"]).velora_groups == 8  # the built-in methods' too
    spec = parse_method_spec("qtoy")
    assert (spec.kind, spec.equivalent, spec.four_bit, spec.uses_rank) == ("ours", "toy", True, False)
    assert four_bit_form("toy") == "qtoy" and four_bit_entries() == ("qpaca", "qtoy", "peft-qlora", "peft-qlora-16bit", "peft-qpaca")
    assert _quantized_methods(["toy", "lora", "paca", "peft-lora"], "nf4") == ["qtoy", "lora", "qpaca", "peft-qlora"]
    with pytest.raises(PacaConfigError, match="bench_flags"):
        dataclasses.replace(toy_with_bench_declarations, bench_flags=("not_an_option",))



@pytest.mark.parametrize("error", [RuntimeError("HPU out of memory: tried to allocate 2 GiB"), MemoryError()])
def test_a_worker_reports_any_devices_out_of_memory_as_oom(monkeypatch, error):
    """HPU and CPU report running out of memory as RuntimeError/MemoryError, not torch.OutOfMemoryError; the bench
    still records it as 'oom' (not 'error'), as the Trainer does (errors.is_out_of_memory)."""
    from paca_core.bench import worker

    def fails(job):
        raise error

    monkeypatch.setitem(worker.MODES, "speed", fails)
    result = worker.run_job({"mode": "speed"})
    assert result["status"] == "oom", result
