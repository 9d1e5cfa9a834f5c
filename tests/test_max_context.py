"""Memory levers on bench entries (``method@gc+chunked-loss+offload``) and ``paca bench --mode max-context``."""
import json

import pytest
import torch

from paca_core.bench.max_context import SEQ_STEP, measured_peak, planned_longest, search_entry
from paca_core.errors import PacaConfigError
from paca_core.workloads.levers import LEVERS
from paca_core.workloads.models import parse_model, synthetic_config
from paca_core.workloads.specs import parse_method_spec

try:
    import peft  # noqa: F401

    HAVE_PEFT = True
except ImportError:
    HAVE_PEFT = False
needs_peft = pytest.mark.skipif(not HAVE_PEFT, reason="HF PEFT is not installed")


def _tiny_config(context: int = 512, layers: int = 8):
    config = synthetic_config(parse_model(f"tiny:{layers}"))
    config.max_position_embeddings = context
    return config


def test_levers_parse_into_the_entry_name_in_one_order():
    spec = parse_method_spec("paca@offload+gc")
    assert spec.name == "paca@gc+offload" and spec.levers == ("gc", "offload") and spec.method == "paca"
    assert parse_method_spec("paca@all").levers == LEVERS
    assert parse_method_spec("paca").levers == () and parse_method_spec("paca").method == "paca"
    assert parse_method_spec("paca@gc").rank(8, True) == 16  # the method's own rank rule
    for bad, needle in (("paca@turbo", "gc, chunked-loss, offload"), ("paca@gc+gc", "joined by"),
                        ("floor@chunked-loss", "floor")):
        with pytest.raises(PacaConfigError, match=needle):
            parse_method_spec(bad)


@pytest.mark.parametrize("method", ["paca", pytest.param("peft-lora", marks=needs_peft)])
def test_levers_keep_the_step_exact(method):
    """Gradient checkpointing, the chunked loss (ours, or the pure-torch one around a PEFT model) and offload
    change memory, not results: same loss and gradients as the plain entry, to fp32 rounding."""
    from paca_core.bench.worker import _setup

    def grads(entry):
        job = {"mode": "speed", "method": entry, "rank": 4, "model": "tiny", "dtype": "fp32", "device": "cpu",
               "seq_len": 16, "batch_size": 2, "seed": 0}
        _, _, _, prepared, _ = _setup(job)
        prepared.module.train()
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        loss = prepared.forward(ids)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in prepared.params]

    plain_loss, plain = grads(method)
    for levers in ("gc", "chunked-loss", "offload", "all"):
        loss, got = grads(f"{method}@{levers}")
        torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
        for a, b in zip(got, plain):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_levers_lengthen_the_planned_context():
    config = _tiny_config(4096)  # 8 layers: checkpointing frees more than one layer's recompute costs
    budget = 6 * 2**20
    plain, _ = planned_longest(config, parse_method_spec("paca"), 1, budget, torch.float32, 4)
    levered, _ = planned_longest(config, parse_method_spec("paca@gc"), 1, budget, torch.float32, 4)
    assert 0 < plain < levered


@pytest.mark.slow
def test_max_context_search_is_the_measured_longest_length():
    """The answer is the longest multiple of 64 whose real step fits: brute force over measured peaks agrees."""
    config = _tiny_config(1024)
    spec = parse_method_spec("paca@gc")
    rank = spec.rank(4, True)
    peaks = {s: measured_peak(config, spec, s, 1, torch.float32, rank) for s in range(SEQ_STEP, 1024 + 1, SEQ_STEP)}
    budget = (peaks[384] + peaks[448]) // 2
    result = search_entry(config, spec, 1, budget, torch.float32, 4)
    brute = max(s for s, p in peaks.items() if p <= budget)
    assert result.measured == result.planned == brute
    assert result.measured_peak_bytes == peaks[brute] <= budget
    assert [p[0] for p in result.probes] == [brute, brute + SEQ_STEP] and not result.probes[1][2]


@pytest.mark.slow
def test_cli_max_context_writes_ratios(tmp_path):
    from paca_core.cli.dispatch import main

    out = tmp_path / "mc"
    rc = main(["bench", "--mode", "max-context", "--model", "tiny:8", "--methods", "paca,paca@gc", "--batch-size", "1",
               "--rank", "4", "--memory-budget", "6MiB", "--out", str(out), "--no-progress"])
    assert rc == 0
    document = json.loads((out / "bench.json").read_text())
    records = {r["method"]: r for r in document["max_context"]}
    assert set(records) == {"paca", "paca@gc"}
    for record in records.values():
        assert record["max_seq_len"] >= SEQ_STEP and record["peak_bytes"] <= 6 * 2**20
    assert records["paca@gc"]["max_seq_len"] > records["paca"]["max_seq_len"]
    assert "longest seq (measured)" in (out / "bench.md").read_text()


@pytest.mark.parametrize("argv,needle", [
    (["--methods", "floor,paca"], "floor"),
    (["--methods", "paca"], "--memory-budget"),
])
def test_cli_max_context_bad_input(argv, needle, tmp_path, caplog):
    from paca_core.cli.dispatch import main

    command = ["bench", "--mode", "max-context", "--model", "tiny", "--out", str(tmp_path)] + argv
    if "floor,paca" in argv:
        command += ["--memory-budget", "6MiB"]
    with caplog.at_level("ERROR"):
        assert main(command) == 2
    assert needle in caplog.text
