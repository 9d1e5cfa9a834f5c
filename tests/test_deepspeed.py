"""DeepSpeed ZeRO 1/2/3 (paca_core/distributed/zero.py) on 2 CPU processes with gloo, through the Trainer ``paca train`` runs.

* Under ZeRO-2 and ZeRO-3, PaCA, LoRA, LoRA-FA, PaCA+full and MEFT train as one process does on the
  same global batch: adapters and every base weight, PaCA's adapted columns included (under ZeRO-3
  each rank writes them into its own flat partition of the weight).
* The adapter a ZeRO-3 run saves (gathered) loads in one process and gives the same logits.
* Two steps + checkpoint + resume equals four straight steps, under ZeRO-3 and in one process without
  DeepSpeed resuming the ZeRO-3 checkpoint (another process count).
* Bad input: contradicting batch sizes, a stage that is not 1/2/3, DeepSpeed missing, --deepspeed with --fsdp.
"""
import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from paca_core import FullConfig, LoRAConfig, LoRAFAConfig, MEFTConfig, PaCAConfig, PacaModel, prepare_model
from paca_core.data.dataset import TokenizedData
from paca_core.errors import PacaConfigError
from paca_core.distributed.sharding import full_tensor
from paca_core.train.trainer import Trainer, TrainingArguments
from paca_core.distributed import zero

from .conftest import tiny_llama

pytestmark = pytest.mark.skipif(not zero.deepspeed_available(), reason="DeepSpeed is not installed (paca-hal[deepspeed])")

CONFIGS = {
    "paca": lambda: PaCAConfig(r=4),
    "lora": lambda: LoRAConfig(r=4),
    "lorafa": lambda: LoRAFAConfig(r=4),
    "paca+full": lambda: [PaCAConfig(r=4, target_modules=["q_proj", "v_proj"]), FullConfig(target_modules=["o_proj"])],
    # rows_per_step = num_rows: no row is dropped, in one process or two, so the runs can be equal
    "meft": lambda: MEFTConfig(num_rows=64, top_k=4, rows_per_step=64),
}
STEPS, GLOBAL_BATCH, LENGTH = 3, 4, 12


def _data(examples=16, seed=5):
    ids = torch.randint(0, 100, (examples, LENGTH), generator=torch.Generator().manual_seed(seed))
    return TokenizedData(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids), source="random")


def _trainer(method, out, steps, world=1, deepspeed=None):
    torch.manual_seed(0)
    model = prepare_model(tiny_llama(seed=0), CONFIGS[method](), device="cpu")
    args = TrainingArguments(output_dir=out, max_steps=steps, batch_size=GLOBAL_BATCH // world, lr=1e-2, scheduler="constant",
                             progress=False, deepspeed=deepspeed)
    return Trainer(model, args, _data(), torch.device("cpu"))


def _snapshot(model):
    """Adapter tensors and every base weight as the forward sees them (PaCA: adapted columns), whole.
    A collective under ZeRO-3: every rank calls it."""
    adapters = {f"{n}.{k}": full_tensor(t).detach().clone() for n, layer in model.adapter_layers().items() for k, t in layer.adapter_state().items()}
    weights = {n: full_tensor(p).detach().clone() for n, p in model.base_model.named_parameters()}
    host = {f"{n}.{k}": v.clone() for n, layer in model.adapter_layers().items() if getattr(layer, "table", None) is not None
            for k, v in (("keys", layer.table.keys), ("values", layer.table.values))}
    return adapters, weights, host


def _init(rank, world, init_file):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _stage_config(stage):
    """ZeRO-3 with no persistent parameters: every weight of the tiny model is partitioned, as a real
    model's are (DeepSpeed keeps parameters under 1e5 elements whole by default; the resume test runs that way)."""
    if stage != 3:
        return f"zero{stage}"
    return {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def _equivalence_worker(rank, world, init_file, stage, out_dir):
    _init(rank, world, init_file)
    try:
        results = {}
        for method in CONFIGS:
            trainer = _trainer(method, f"{out_dir}/{method}", STEPS, world, deepspeed=_stage_config(stage))
            trainer.train()
            assert trainer.zero is not None and trainer.zero.stage == stage
            if stage == 3:  # partitioned between forwards: PaCA's write went into the flat partitions
                assert all(p.data.numel() == 0 for p in trainer.model.base_model.model.layers.parameters())
            results[method] = _snapshot(trainer.model)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(worker, directory, *args):
    init_file = tempfile.mktemp(dir=directory)
    mp.start_processes(worker, args=(2, init_file, *args), nprocs=2, join=True, start_method="spawn")


def _assert_close(got, want, what):
    """Equal up to float reduction order: every update here is ~1e-2 (lr), and AdamW's first steps divide
    by sqrt(v), which magnifies last-bit differences of a two-rank mean to ~1e-6; 1e-5 is 0.1 % of a step."""
    assert got.keys() == want.keys(), what
    for key, tensor in want.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-5, atol=1e-5, msg=f"{what}: {key}")


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.slow
def test_zero_on_two_processes_equals_one_process_and_the_adapter_loads_in_one(stage, tmp_path):
    _spawn(_equivalence_worker, tmp_path, stage, str(tmp_path))
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)
    other = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for method in CONFIGS:
        single = _trainer(method, str(tmp_path / f"single-{method}"), STEPS)
        single.train()
        want = _snapshot(single.model)
        for part, what in enumerate(("adapters", "base weights", "host rows")):
            for key, tensor in got[method][part].items():  # both ranks hold the same whole model
                assert torch.equal(other[method][part][key], tensor), f"{method} {what} {key}"
            _assert_close(got[method][part], want[part], f"ZeRO-{stage} {method} {what}")
        # The checkpoint the ZeRO run wrote (gathered, rank 0) loads in one process: the same logits.
        loaded = PacaModel.from_pretrained(tiny_llama(seed=0), tmp_path / method / "checkpoint")
        ids = torch.randint(0, 100, (2, LENGTH), generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, single.model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def _resume_worker(rank, world, init_file, out_dir):
    import shutil

    _init(rank, world, init_file)
    try:
        straight = _trainer("paca", f"{out_dir}/straight", 4, world, deepspeed="zero3")
        straight.train()
        _trainer("paca", f"{out_dir}/resumed", 2, world, deepspeed="zero3").train()
        if rank == 0:  # keep the step-2 checkpoint for the one-process resume
            shutil.copytree(f"{out_dir}/resumed/checkpoint", f"{out_dir}/step2/checkpoint")
        dist.barrier()
        resumed = _trainer("paca", f"{out_dir}/resumed", 4, world, deepspeed="zero3")
        resumed.resume_from(f"{out_dir}/resumed/checkpoint")
        assert resumed.state.step == 2
        resumed.train()
        torch.save({"straight": _snapshot(straight.model)[0], "resumed": _snapshot(resumed.model)[0]}, f"{out_dir}/resume{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_zero3_checkpoint_resumes_exactly_and_in_one_process_without_deepspeed(tmp_path):
    _spawn(_resume_worker, tmp_path, str(tmp_path))
    result = torch.load(tmp_path / "resume0.pt", weights_only=False)
    for key, tensor in result["straight"].items():
        assert torch.equal(result["resumed"][key], tensor), key
    # The ZeRO-3 checkpoint holds whole tensors in the single-process format: one process without
    # DeepSpeed resumes it (another process count) and ends where the ZeRO run did.
    one = _trainer("paca", str(tmp_path / "step2"), 4)
    one.resume_from(tmp_path / "step2" / "checkpoint")
    assert one.state.step == 2
    one.train()
    _assert_close(_snapshot(one.model)[0], result["straight"], "ZeRO-3 checkpoint resumed in one process")


# --- bad input -----------------------------------------------------------------------------------
def _config(spec, **overrides):
    values = dict(micro_batch_size=2, grad_accum=1, world_size=2, max_grad_norm=1.0, dtype=torch.float32)
    values.update(overrides)
    return zero.build_config(spec, **values)


def test_stage_names_expand_from_the_flags():
    config = _config("zero3", micro_batch_size=4, grad_accum=2, dtype=torch.bfloat16)
    assert config["zero_optimization"]["stage"] == 3
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"], config["train_batch_size"]) == (4, 2, 16)
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["gradient_clipping"] == 1.0


def test_a_users_json_gets_flags_only_in_auto_fields_and_contradictions_are_errors(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "train_micro_batch_size_per_gpu": "auto",
                                "gradient_accumulation_steps": 1, "bf16": {"enabled": "auto"}}))
    config = _config(str(path))
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["train_batch_size"] == 4
    assert config["zero_optimization"]["overlap_comm"] is True and config["bf16"]["enabled"] is False
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8, "train_batch_size": 16}))
    with pytest.raises(PacaConfigError, match=r"'train_micro_batch_size_per_gpu' is 8 but --batch-size means 2.*'train_batch_size' is 16"):
        _config(str(path))
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}))
    with pytest.raises(PacaConfigError, match="bf16.enabled.*--dtype bf16"):
        _config(str(path))
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(PacaConfigError, match="remove its 'optimizer' section"):
        _config(str(path))
    path.write_text("{not json")
    with pytest.raises(PacaConfigError, match="not valid JSON"):
        _config(str(path))


@pytest.mark.parametrize("stage", [0, 4, "two"])
def test_a_stage_that_is_not_1_2_or_3_is_refused(stage, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    with pytest.raises(PacaConfigError, match="ZeRO stage must be 1, 2 or 3"):
        _config(str(path))
    with pytest.raises(PacaConfigError, match="not a stage name"):
        _config("zero4")


def test_missing_deepspeed_says_how_to_install(monkeypatch):
    monkeypatch.setattr(zero, "deepspeed_available", lambda: False)
    with pytest.raises(PacaConfigError, match=r"paca-hal\[deepspeed\]"):
        zero.require_deepspeed()


def test_deepspeed_with_fsdp_or_in_one_process_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--deepspeed and --fsdp"):
        TrainingArguments(output_dir=str(tmp_path), max_steps=1, deepspeed="zero2", fsdp=True).validate()
    with pytest.raises(ValueError, match="--on-nan skip"):
        TrainingArguments(output_dir=str(tmp_path), max_steps=1, deepspeed="zero2", on_nan="skip").validate()
    with pytest.raises(ValueError, match="torchrun"):
        _trainer("paca", str(tmp_path), 1, deepspeed="zero2")


def _partitioned_load_worker(rank, world, init_file, out_dir):
    import deepspeed
    from transformers import LlamaForCausalLM  # noqa: F401 - the model class is imported before zero.Init patches
    # tensor creation, as from_pretrained does (importing it inside would import torch._dynamo under the patch)

    _init(rank, world, init_file)
    try:
        with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 2, "zero_optimization": {"stage": 3}}):
            base = tiny_llama(seed=0)  # as from_pretrained under TrainingArguments(deepspeed=<stage 3>)
        with pytest.raises(PacaConfigError, match="partitioned by DeepSpeed ZeRO-3 while loading"):
            prepare_model(base, PaCAConfig(r=4))
        open(f"{out_dir}/refused-rank{rank}", "w").close()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_model_partitioned_while_loading_is_refused_with_what_to_do(tmp_path):
    _spawn(_partitioned_load_worker, tmp_path, str(tmp_path))
    assert (tmp_path / "refused-rank0").is_file() and (tmp_path / "refused-rank1").is_file()
