"""PacaTrainer (transformers.Trainer) with ``TrainingArguments(deepspeed=...)`` on 2 CPU processes (gloo).

* Under ZeRO-2 and ZeRO-3, PaCA, LoRA, MEFT and PaCA through TRL's SFTTrainer train as one process without DeepSpeed does on the same
  global batch (4 steps, warmup + linear decay, clipping): adapters, every base weight (PaCA's adapted
  columns), MEFT's host rows; both ranks hold the same model.
* Checkpoints hold the gathered adapter and the whole AdamW state in safetensors (``paca_optimizer/``),
  not DeepSpeed's per-rank pickles or the frozen base; the ZeRO-3 adapter loads in one process with the
  same logits.
* Resume is exact: ZeRO-3 from its own checkpoint (bit for bit), one process without DeepSpeed from the
  ZeRO-3 checkpoint, and ZeRO-2 from a one-process checkpoint.

scripts/hf_deepspeed_run.py does the training; each launch here is a separate process (or two).
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paca_core import PacaModel
from paca_core.distributed import zero
from paca_core.errors import CheckpointError
from paca_core.distributed.zero import align_saved_groups, align_scheduler_state, match_saved_groups

from .conftest import tiny_llama

needs_deepspeed = pytest.mark.skipif(not zero.deepspeed_available(), reason="DeepSpeed is not installed (paca-hal[deepspeed])")

SCRIPT = Path(__file__).parent / "scripts" / "hf_deepspeed_run.py"
#: "sft": PaCA through PacaSFTTrainer (TRL's SFTTrainer, handed the inner transformers model)
METHODS = ("paca", "lora", "meft") + (("sft",) if importlib.util.find_spec("trl") else ())
STEPS, SAVE = 4, 2


def _launch(out: Path, stage: int, resume: str | None = None) -> Path:
    """One process with 4 examples per step (stage 0), or two with 2 each under ZeRO-``stage``."""
    args = [str(out), "4" if stage == 0 else "2", ",".join(METHODS), str(stage), str(STEPS), str(SAVE)] + ([resume] if resume else [])
    launcher = [sys.executable] if stage == 0 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    done = subprocess.run([*launcher, str(SCRIPT), *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out


def _final(run: Path, method: str, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(run / method / f"final-rank{rank}.pt", weights_only=True)


def _assert_close(got, want, what, exact=False):
    """Equal up to float reduction order (two ranks' mean vs one sum; see tests/test_deepspeed.py)."""
    assert got.keys() == want.keys(), what
    for key, tensor in want.items():
        if exact:
            assert torch.equal(got[key], tensor), f"{what}: {key}"
        else:
            torch.testing.assert_close(got[key], tensor, rtol=1e-5, atol=1e-5, msg=f"{what}: {key}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not zero.deepspeed_available():
        pytest.skip("DeepSpeed is not installed (paca-hal[deepspeed])")
    root = tmp_path_factory.mktemp("hf-deepspeed")
    return {name: _launch(root / name, stage) for name, stage in (("one", 0), ("zero2", 2), ("zero3", 3))}


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.slow
def test_hf_trainer_under_zero_equals_one_process_on_the_global_batch(runs, stage):
    for method in METHODS:
        got, other = _final(runs[f"zero{stage}"], method), _final(runs[f"zero{stage}"], method, rank=1)
        _assert_close(other, got, f"ZeRO-{stage} {method}: rank 1 vs rank 0", exact=True)
        want = _final(runs["one"], method)
        assert any(k.startswith("base.") for k in want) and any(k.startswith("adapter.") for k in want)
        _assert_close(got, want, f"ZeRO-{stage} {method} vs one process")


@needs_deepspeed
@pytest.mark.slow
def test_zero_checkpoints_hold_the_gathered_adapter_and_whole_optimizer_state_and_load_in_one_process(runs):
    checkpoint = runs["zero3"] / "paca" / f"checkpoint-{SAVE}"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert (checkpoint / "paca_optimizer" / "trainer_state.safetensors").is_file()
    assert not list(checkpoint.glob("global_step*")) and not (checkpoint / "model.safetensors").exists()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(3))
    for method in METHODS:
        if method == "sft":
            continue  # its model has the tokenizer's vocabulary; the same code path as "paca"
        loaded = PacaModel.from_pretrained(tiny_llama(seed=0), runs["zero3"] / method / "final", device="cpu").eval()
        single = PacaModel.from_pretrained(tiny_llama(seed=0), runs["one"] / method / "final", device="cpu").eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, single(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@needs_deepspeed
@pytest.mark.slow
def test_resume_is_exact_under_zero3_and_across_process_counts(runs, tmp_path):
    same = _launch(tmp_path / "zero3-resumed", 3, str(runs["zero3"] / "{method}" / f"checkpoint-{SAVE}"))
    to_one = _launch(tmp_path / "one-from-zero3", 0, str(runs["zero3"] / "{method}" / f"checkpoint-{SAVE}"))
    to_zero2 = _launch(tmp_path / "zero2-from-one", 2, str(runs["one"] / "{method}" / f"checkpoint-{SAVE}"))
    for method in METHODS:
        _assert_close(_final(same, method), _final(runs["zero3"], method), f"ZeRO-3 resumed {method}", exact=True)
        _assert_close(_final(to_one, method), _final(runs["zero3"], method), f"one process from ZeRO-3 {method}")
        _assert_close(_final(to_zero2, method), _final(runs["one"], method), f"ZeRO-2 from one process {method}")


# --- matching saved optimizer groups to live ones (pure functions) ------------------------------------------
def _groups(*sizes):
    return [{"lr": 0.1 * (i + 1), "initial_lr": 1.0 + i, "params": list(range(n))} for i, n in enumerate(sizes)]


def test_saved_groups_match_live_ones_ignoring_empty_groups():
    # transformers' Trainer: a decay group and an empty no-decay group; DeepSpeed keeps only the first
    assert match_saved_groups(_groups(14, 0), _groups(14)) == [0]
    assert match_saved_groups(_groups(14), _groups(14, 0)) == [0, None]
    aligned = align_saved_groups(_groups(14), _groups(14, 0))
    assert aligned[0]["lr"] == 0.1 and aligned[1]["params"] == [] and aligned[1]["lr"] == 0.2
    with pytest.raises(CheckpointError, match="another adapter"):
        match_saved_groups(_groups(14), _groups(12))
    with pytest.raises(CheckpointError, match="another adapter"):
        match_saved_groups(_groups(14, 2), _groups(14))


def test_scheduler_state_follows_the_optimizer_groups():
    saved = {"base_lrs": [1.0, 2.0], "_last_lr": [0.5, 1.0], "lr_lambdas": [None, None], "last_epoch": 2}
    aligned = align_scheduler_state(saved, _groups(14, 0), _groups(14))
    assert aligned == {"base_lrs": [1.0], "_last_lr": [0.5], "lr_lambdas": [None], "last_epoch": 2}
    back = align_scheduler_state({"base_lrs": [1.0], "_last_lr": [0.5], "last_epoch": 2}, _groups(14), _groups(14, 0))
    assert back["base_lrs"] == [1.0, 2.0] and back["_last_lr"] == [0.5, 0.2]
