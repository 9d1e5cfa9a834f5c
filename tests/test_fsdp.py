"""FSDP2 (fully_shard) on 2 CPU processes with gloo: base weights and adapters sharded on dim 0.

* PaCA, LoRA, LoRA-FA and PaCA+full train exactly as one process does on the same global batch —
  for PaCA that includes the adapted columns each rank rewrites in its own row shard.
* The adapter saved by the sharded run (every rank gathers, rank 0 writes) loads in a single
  process and gives the single-process model's logits.
* The Trainer checkpoints under FSDP (gathered optimizer state) and a resumed run equals an
  uninterrupted one.
"""
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from paca_core import FullConfig, LoRAConfig, LoRAFAConfig, MEFTConfig, PaCAConfig, PacaModel, VeLoRAConfig, prepare_model
from paca_core.distributed.sharding import full_tensor, is_sharded, shard_model

from .conftest import tiny_llama

CONFIGS = {
    "paca": lambda: PaCAConfig(r=4),
    "lora": lambda: LoRAConfig(r=4),
    "lorafa": lambda: LoRAFAConfig(r=4),
    "paca+full": lambda: [PaCAConfig(r=4, target_modules=["q_proj", "v_proj"]), FullConfig(target_modules=["o_proj"])],
    "lora+velora": lambda: [LoRAConfig(r=4), VeLoRAConfig(num_groups=4)],
    # MEFT: the router is sharded; each process keeps a whole host copy of the rows (see test_distributed)
    "meft": lambda: MEFTConfig(num_rows=64, top_k=4, rows_per_step=64),
}
EXACT = ("paca", "lora", "lorafa", "paca+full", "meft")
STEPS, GLOBAL_BATCH, LENGTH = 3, 4, 12


def _batches():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 100, (GLOBAL_BATCH, LENGTH), generator=gen) for _ in range(STEPS)]


def _train(model, rank=0, world=1):
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    share = GLOBAL_BATCH // world
    for ids in _batches():
        local = ids[rank * share : (rank + 1) * share]
        model(input_ids=local, labels=local).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _snapshot(model):
    """Adapter tensors and every base weight as the forward sees them (PaCA: adapted columns), whole."""
    adapters = {f"{n}.{k}": full_tensor(t.detach()).clone() for n, layer in model.adapter_layers().items() for k, t in layer.adapter_state().items()}
    weights = {n: full_tensor(p.detach()).clone() for n, p in model.base_model.named_parameters()}
    return adapters, weights


def _fsdp_worker(rank, world, init_file, method, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = prepare_model(tiny_llama(seed=0), CONFIGS[method](), device="cpu")
        shard_model(model, torch.device("cpu"))
        assert all(is_sharded(p) for p in model.trainable_parameters())
        _train(model, rank, world)
        adapters, weights = _snapshot(model)
        model.save_pretrained(f"{out_dir}/adapter", is_main_process=rank == 0)
        torch.save({"adapters": adapters, "weights": weights}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(worker, directory, *args):
    init_file = tempfile.mktemp(dir=directory)  # a fresh rendezvous file in the test's own folder
    mp.start_processes(worker, args=(2, init_file, *args), nprocs=2, join=True, start_method="spawn")


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process_and_the_saved_adapter_loads_in_one(method, tmp_path):
    torch.manual_seed(0)
    single = prepare_model(tiny_llama(seed=0), CONFIGS[method](), device="cpu")
    _train(single)
    want_adapters, want_weights = _snapshot(single)

    _spawn(_fsdp_worker, tmp_path, method, str(tmp_path))
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)
    other = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for key, tensor in got["adapters"].items():  # gathered views agree on both ranks
        assert torch.equal(other["adapters"][key], tensor), key

    loaded = PacaModel.from_pretrained(tiny_llama(seed=0), tmp_path / "adapter")
    for key, tensor in _snapshot(loaded)[0].items():  # the file holds exactly what the sharded run trained
        assert torch.equal(tensor, got["adapters"][key]), key
    if method not in EXACT:  # VeLoRA: per-rank batch statistics; ranks agree, not bit-equal to one process
        return
    assert got["adapters"].keys() == want_adapters.keys()
    for key, tensor in want_adapters.items():
        torch.testing.assert_close(got["adapters"][key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    for name, tensor in want_weights.items():
        torch.testing.assert_close(got["weights"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    ids = torch.randint(0, 100, (2, LENGTH), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, single(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def _trainer_worker(rank, world, init_file, data, out_dir):
    from paca_core.train.trainer import Trainer, TrainingArguments

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        def trainer(steps, out):
            torch.manual_seed(0)
            model = prepare_model(tiny_llama(seed=0), PaCAConfig(r=4), device="cpu")
            args = TrainingArguments(output_dir=out, max_steps=steps, batch_size=2, lr=1e-2, scheduler="constant", progress=False, fsdp=True)
            return Trainer(model, args, data, torch.device("cpu"))

        straight = trainer(4, f"{out_dir}/straight")
        straight.train()
        first = trainer(2, f"{out_dir}/resumed")
        first.train()
        resumed = trainer(4, f"{out_dir}/resumed")
        resumed.resume_from(f"{out_dir}/resumed/checkpoint")
        assert resumed.state.step == 2
        resumed.train()
        result = {"straight": _snapshot(straight.model)[0], "resumed": _snapshot(resumed.model)[0]}
        torch.save(result, f"{out_dir}/trainer{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_trainer_under_fsdp_checkpoints_and_resumes_exactly(tmp_path):
    from paca_core.data.dataset import TokenizedData

    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 100, (16, LENGTH), generator=gen)
    data = TokenizedData(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids), source="random")
    _spawn(_trainer_worker, tmp_path, data, str(tmp_path))
    result = torch.load(tmp_path / "trainer0.pt", weights_only=False)
    for key, tensor in result["straight"].items():
        assert torch.equal(result["resumed"][key], tensor), key
    from paca_core.train.training_state import read_training_state

    state = read_training_state(tmp_path / "resumed" / "checkpoint")
    moments = [entry["exp_avg"] for entry in state["optimizer"]["state"].values()]
    assert moments and not any(is_sharded(m) for m in moments)  # saved whole: resumable with any process count
    assert {tuple(m.shape) for m in moments} == {(32, 4), (16, 4), (64, 4)}  # (out, r) of q/o/down, k/v, gate/up


def test_fsdp_refuses_what_it_cannot_shard_and_needs_a_process_group():
    model = prepare_model(tiny_llama(seed=0), PaCAConfig(r=4), device="cpu")
    with pytest.raises(RuntimeError, match="process group"):
        shard_model(model, torch.device("cpu"))
    from paca_core.train.trainer import Trainer, TrainingArguments
    from paca_core.data.dataset import TokenizedData

    ids = torch.zeros(8, LENGTH, dtype=torch.long)
    data = TokenizedData(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids), source="zeros")
    with pytest.raises(ValueError, match="torchrun"):
        Trainer(model, TrainingArguments(output_dir="unused", max_steps=1, fsdp=True, progress=False), data, torch.device("cpu"))


def test_fsdp_refuses_layers_it_cannot_shard(monkeypatch):
    """QPaCA's bitsandbytes 4-bit weights are not FSDP2 parameters: refused with a clear message."""
    pytest.importorskip("bitsandbytes")
    model = prepare_model(tiny_llama(seed=0), PaCAConfig(r=4, quantize="nf4"), device="cpu")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    with pytest.raises(NotImplementedError, match="QuantizedPaCALinear.*DDP"):
        shard_model(model, torch.device("cpu"))
