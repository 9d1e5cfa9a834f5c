"""The learning-rate sweep behind the CLI defaults: job expansion, the worst-share rule, the shipped
sweep data sets, a tiny end-to-end sweep that resumes, and why PaCA's alpha and lr are one knob."""
import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch

from paca_core.bench import lr_sweep, lr_sweep_report
from paca_core.bench.lr_rule import LrRuleError, average_best_lr, choose_lr
from paca_core.data.dataset import IGNORE_INDEX, load_dataset
from paca_core.errors import PacaConfigError

from .conftest import SAMPLE_TEXT, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("lr_sweep_script", ROOT / "scripts" / "lr_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lr_grid_expands_into_jobs_per_method_dataset_and_lr():
    grid = lr_sweep.parse_lr_grid(["2e-3,1e-3", "paca=1e-2,5e-3"])
    assert grid == {"*": [1e-3, 2e-3], "paca": [5e-3, 1e-2]}
    jobs = lr_sweep.expand_jobs(["paca", "lora+velora"], ["a.txt", "b.jsonl"], grid, {"paca": 16, "lora+velora": 8}.get)
    assert [(j.method, j.dataset, j.rank, j.lr) for j in jobs] == [
        ("paca", "a.txt", 16, 5e-3), ("paca", "a.txt", 16, 1e-2), ("paca", "b.jsonl", 16, 5e-3), ("paca", "b.jsonl", 16, 1e-2),
        ("lora+velora", "a.txt", 8, 1e-3), ("lora+velora", "a.txt", 8, 2e-3),
        ("lora+velora", "b.jsonl", 8, 1e-3), ("lora+velora", "b.jsonl", 8, 2e-3),
    ]
    assert len({j.key for j in jobs}) == len(jobs)
    for bad in (["paca="], ["1e-3,x"], ["-1e-3"], ["nan"]):
        with pytest.raises(PacaConfigError, match="lr-grid"):
            lr_sweep.parse_lr_grid(bad)
    with pytest.raises(PacaConfigError, match="no learning rates for 'lora'"):
        lr_sweep.expand_jobs(["lora"], ["a.txt"], {"paca": [1e-3]}, lambda m: 8)


def test_committed_plan_compares_paca_and_lora_per_dataset_first_then_4x_rank_then_the_rest():
    script = _script()
    jobs = script.plan(script.build_parser().parse_args([]))
    blocks = [key for i, key in enumerate((j.method, j.rank, j.dataset) for j in jobs) if i == 0 or key != (jobs[i - 1].method, jobs[i - 1].rank, jobs[i - 1].dataset)]
    assert blocks[:6] == [(m, r, d) for d in ("macbeth", "stdlib-functions", "reference-topics") for m, r in (("paca", 16), ("lora", 8))]
    assert blocks[6:10] == [(m, r, d) for d in ("macbeth", "stdlib-functions") for m, r in (("paca", 64), ("lora", 32))]
    assert [b[:2] for b in blocks[10:]] == [(m, r) for m, r in (("lora+velora", 8), ("lorafa", 8), ("meft", None)) for _ in range(3)]
    assert {j.lr for j in jobs if j.method == "meft"} == {5e-4, 1e-3, 2e-3}
    for name in lr_sweep.SHIPPED_DATASETS:
        assert lr_sweep.dataset_path(name).is_file()
    with pytest.raises(PacaConfigError, match="does not exist"):
        lr_sweep.dataset_path("no-such-data")


def test_grid_is_extended_where_a_datasets_best_lr_is_at_its_edge():
    assert [lr_sweep.ladder_step(lr, up=True) for lr in (1e-3, 2e-3, 5e-3)] == [2e-3, 5e-3, 1e-2]
    assert [lr_sweep.ladder_step(lr, up=False) for lr in (1e-3, 2e-3, 5e-3)] == [5e-4, 1e-3, 2e-3]
    jobs = lr_sweep.expand_jobs(["paca"], ["a", "b", "c"], {"*": [1e-3, 2e-3, 5e-3]}, lambda m: 16)

    def done(dataset, improvements):
        return [{"key": lr_sweep.SweepJob("paca", dataset, 16, lr).key, "status": "ok", "improvement": v}
                for lr, v in zip((1e-3, 2e-3, 5e-3), improvements)]

    records = done("a", [0.1, 0.2, 0.3]) + done("b", [0.3, 0.2, 0.1]) + done("c", [0.1, 0.3, 0.2])
    extra = lr_sweep.edge_extensions(jobs, records)
    assert [(j.dataset, j.lr) for j in extra] == [("a", 1e-2), ("b", 5e-4)]  # c's best is inside its grid
    assert lr_sweep.edge_extensions(jobs, records[:2]) == []  # a grid still running is left alone
    assert lr_sweep.edge_extensions(jobs + extra, records) == []  # already planned


def test_rule_pick_at_the_edge_of_the_common_lrs_gets_the_next_lr_run_everywhere():
    grid = {"*": [1e-3, 2e-3, 5e-3]}
    jobs = lr_sweep.expand_jobs(["lora"], ["a", "b"], grid, lambda m: 8) + [lr_sweep.SweepJob("lora", "a", 8, 1e-2)]
    improvement = {("a", 1e-3): 0.1, ("a", 2e-3): 0.2, ("a", 5e-3): 0.3, ("a", 1e-2): 0.4,
                   ("b", 1e-3): 0.1, ("b", 2e-3): 0.2, ("b", 5e-3): 0.25}
    records = [{"key": lr_sweep.SweepJob("lora", d, 8, lr).key, "status": "ok", "improvement": v} for (d, lr), v in improvement.items()]
    # The rule picks 5e-3, the largest lr run on both; a's extension found 1e-2 better there, so b needs 1e-2 too.
    assert [(j.dataset, j.lr) for j in lr_sweep.candidate_completions(jobs, records)] == [("b", 1e-2)]
    assert lr_sweep.candidate_completions(jobs, records[:-1]) == []  # b's grid is not finished
    improvement[("b", 2e-3)], improvement[("b", 5e-3)] = 0.3, 0.1  # now the pick (2e-3) is inside the common lrs
    records = [{"key": lr_sweep.SweepJob("lora", d, 8, lr).key, "status": "ok", "improvement": v} for (d, lr), v in improvement.items()]
    assert lr_sweep.candidate_completions(jobs, records) == []


# improvement[dataset][lr]: the average favours 5e-3 (A improves a lot there), but 5e-3 keeps only
# half of B's best, while 2e-3 keeps 60 % of A's best and all of B's.
SYNTHETIC = {"A": {1e-3: 0.50, 2e-3: 0.60, 5e-3: 1.00}, "B": {1e-3: 0.095, 2e-3: 0.10, 5e-3: 0.05}}


def test_rule_maximises_the_worst_share_not_the_average():
    assert average_best_lr(SYNTHETIC) == 5e-3
    choice = choose_lr(SYNTHETIC)
    assert choice.lr == 2e-3 and choice.worst_dataset == "A"
    assert choice.worst_share == pytest.approx(0.6)
    assert choice.best_lr == {"A": 5e-3, "B": 2e-3}
    assert choice.worst_shares() == pytest.approx({1e-3: 0.5, 2e-3: 0.6, 5e-3: 0.5})


def test_rule_edge_cases_diverged_ties_and_undefined_shares():
    diverged = {"A": {1e-3: 0.5, 1e-2: 1.0}, "B": {1e-3: 0.4, 1e-2: float("-inf")}}
    assert choose_lr(diverged).lr == 1e-3  # a run that diverged anywhere loses
    # Equal worst share (0.5): the higher mean share wins, then the smaller lr.
    tie = {"A": {1e-3: 0.5, 2e-3: 1.0, 4e-3: 0.5}, "B": {1e-3: 1.0, 2e-3: 0.5, 4e-3: 0.5}}
    assert choose_lr(tie).lr == 1e-3
    only_common = {"A": {1e-3: 1.0, 2e-3: 2.0, 9e-3: 9.0}, "B": {1e-3: 1.0, 2e-3: 0.5}}
    # 9e-3 was not run on B: not a candidate, but still A's best (the denominator of A's shares)
    assert choose_lr(only_common).shares["A"] == pytest.approx({1e-3: 1 / 9, 2e-3: 2 / 9})
    with pytest.raises(LrRuleError, match="improved"):
        choose_lr({"A": {1e-3: 0.1}, "B": {1e-3: -0.2}})
    with pytest.raises(LrRuleError, match="every data set"):
        choose_lr({"A": {1e-3: 0.1}, "B": {2e-3: 0.2}})


def test_shipped_sweep_datasets_load_and_prompt_tokens_get_no_loss(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    path = lr_sweep.dataset_path("stdlib-functions")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) >= 500 and all(set(r) == {"prompt", "response"} for r in records)
    data = load_dataset(path, tokenizer, 256)
    assert len(data) == len(records)
    for row in (0, 137, len(records) - 1):
        prompt = tokenizer(records[row]["prompt"] + "\n", add_special_tokens=False)["input_ids"]
        response = tokenizer(records[row]["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labels = data.labels[row]
        assert (labels[: len(prompt)] == IGNORE_INDEX).all()  # the prompt: no loss
        assert labels[len(prompt) : len(prompt) + len(response)].tolist() == response  # the response: loss on every token
        assert data.input_ids[row, : len(prompt)].tolist() == prompt
    topics = load_dataset(lr_sweep.dataset_path("reference-topics"), tokenizer, 128)
    assert len(topics) > 100 and bool((topics.labels == topics.input_ids).all())  # packed text: every token counts


def test_tiny_sweep_records_improvement_resumes_and_stops_at_the_deadline(tiny_model_dir, tmp_path):
    data = tmp_path / "train.txt"
    data.write_text(SAMPLE_TEXT)
    settings = lr_sweep.SweepSettings(model=str(tiny_model_dir), steps=2, seq_len=16, batch_size=2, warmup_steps=1, eval_examples=3)
    grid = lr_sweep.parse_lr_grid(["1e-3,1e-2"])
    jobs = lr_sweep.expand_jobs(["paca", "lora"], [str(data)], grid, {"paca": 8, "lora": 4}.get)
    out = tmp_path / "sweep"
    assert lr_sweep.run_sweep(jobs, settings, out, workers=0, deadline=time.time() - 1) == []  # budget spent: nothing starts
    records = lr_sweep.run_sweep(jobs[:3], settings, out, workers=0, extend_edges=False)
    assert [r["key"] for r in records] == [j.key for j in jobs[:3]] and all(r["status"] == "ok" for r in records)
    for r in records:
        assert r["improvement"] == pytest.approx(r["held_out_loss_before"] - r["held_out_loss"]) and r["held_out_examples"] == 3
    assert len({r["held_out_loss_before"] for r in records}) == 1  # one frozen loss per data set
    assert records[1]["improvement"] > records[0]["improvement"] > 0  # PaCA learns, and faster at 10x the lr
    records = lr_sweep.run_sweep(jobs, settings, out, workers=0, extend_edges=False)  # resumes: only the missing job runs
    assert len(records) == 4 and len((out / lr_sweep.RESULTS_FILE).read_text().splitlines()) == 4
    # PaCA's best (1e-2) is its grid's top edge: an extended sweep runs 2e-2 next, on that data set only.
    extended = lr_sweep.run_sweep(jobs[:2], settings, out, workers=0, deadline=None, extend_edges=True)
    assert extended[4]["key"] == lr_sweep.SweepJob("paca", str(data), 8, 2e-2).key
    document = {"command": "test", "settings": {**vars(settings), "datasets": [str(data)]}, "records": records[:4], "wall_s": 1.0}
    lr_sweep_report.write(out, document, lambda method, rank: 1e-2, [(("paca", 8), ("lora", 4))])
    text = (out / "sweep.md").read_text()
    assert "#### paca, r = 8" in text and "← rule" in text and "← CLI default" in text
    assert json.loads((out / "sweep.json").read_text())["chosen"]["paca r=8"]["lr"] == 1e-2


def _train_paca(alpha: float, lr: float, steps: int = 6) -> torch.Tensor:
    from paca_core import PaCAConfig, prepare_model

    model = prepare_model(tiny_llama(seed=0), PaCAConfig(r=4, alpha=alpha, target_modules="all-linear", seed=0))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr, eps=1e-12, weight_decay=0.0)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_paca_alpha_over_r_and_lr_are_one_knob_under_adam():
    """PaCA's weight change per step is (alpha/r)·(Adam's step on the delta), and Adam's step does
    not depend on the gradient's scale: alpha = 4r at lr x trains the same model as alpha = r at 4x
    (up to Adam's eps and gradient clipping, both off here). Why the defaults keep alpha = r."""
    frozen = _train_paca(alpha=4.0, lr=1e-3, steps=0)
    scaled = _train_paca(alpha=16.0, lr=1e-3)  # alpha = 4r, scaling 4
    plain = _train_paca(alpha=4.0, lr=4e-3)  # alpha = r, scaling 1, 4x the lr
    assert (scaled - frozen).abs().max() > 1e-2  # training moved the model
    assert torch.allclose(scaled, plain, atol=1e-4, rtol=1e-4)
    assert (_train_paca(alpha=4.0, lr=1e-3) - plain).abs().max() > 1e-2  # and the lr alone is not a no-op
    assert math.isfinite(float(plain.sum()))
