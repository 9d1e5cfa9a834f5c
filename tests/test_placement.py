"""prepare_model leaves placement to the script's engine: without device= nothing moves, adapters are
created beside the weights they adapt, and a model loaded with an accelerate device_map (one decoder layer
offloaded to disk, its weights on meta behind hooks) prepares, trains and saves — or, for methods that
must write into an offloaded weight, refuses with a message naming the module."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from paca_core import FullConfig, LoRAConfig, LoRAFAConfig, MEFTConfig, PaCAConfig, PacaModel, VeLoRAConfig, prepare_model
from paca_core.surgery.placement import PlacementError
from paca_core.distributed.sharding import shard_model

from .conftest import tiny_llama
from .scripts.hf_trainer_run import Rows, recorded_moves

OFFLOADED = "model.layers.1"
DEVICE_MAP = {
    "model.embed_tokens": "cpu", "model.layers.0": "cpu", OFFLOADED: "disk", "model.norm": "cpu",
    "model.rotary_emb": "cpu", "lm_head": "cpu",
}
IDS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=0).save_pretrained(folder)
    return folder


def _dispatched(folder, offload_dir):
    """The saved model with OFFLOADED on disk: accelerate keeps its weights on meta and loads them per forward."""
    model = AutoModelForCausalLM.from_pretrained(folder, device_map=DEVICE_MAP, offload_folder=str(offload_dir))
    assert all(p.is_meta for n, p in model.named_parameters() if n.startswith(OFFLOADED + "."))
    return model


def _placement(model) -> dict[str, tuple[int, torch.device]]:
    named = [*model.named_parameters(), *model.named_buffers()]
    return {n.removeprefix("base_model.").replace(".base_layer", ""): (id(t), t.device) for n, t in named}


def _train_step(adapted) -> None:
    params = adapted.trainable_parameters()
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    loss = adapted(input_ids=IDS, labels=IDS).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, params))  # every adapter tensor learned, offloaded ones too


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize(
    "configs",
    [LoRAConfig(r=4), LoRAFAConfig(r=4), [LoRAConfig(r=4), VeLoRAConfig(num_groups=4)], MEFTConfig(num_rows=64, top_k=4)],
    ids=["lora", "lorafa", "lora+velora", "meft"],
)
def test_offloaded_model_prepares_trains_and_saves_without_moving(configs, saved_model, tmp_path):
    model = _dispatched(saved_model, tmp_path / "offload")
    before = _placement(model)
    with recorded_moves() as moves:
        adapted = prepare_model(model, configs)
    assert moves == []
    after = _placement(adapted)
    assert {n: after[n] for n in before} == before  # same tensors, same devices: offloaded weights stay on meta
    new = {n: device for n, (_, device) in after.items() if n not in before}
    assert new and all(device == torch.device("cpu") for device in new.values())  # hook's execution device
    assert any(n.startswith(OFFLOADED + ".") for n in new)

    _train_step(adapted)
    trained_on = _placement(adapted)
    assert {n: trained_on[n][1] for n in before} == {n: device for n, (_, device) in before.items()}  # meta stays meta
    adapted.save_pretrained(tmp_path / "adapter")
    trained = _logits(adapted)
    # Loaded into the same model held whole in memory: training on the offloaded layer used its real weights.
    whole = PacaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_model), tmp_path / "adapter")
    torch.testing.assert_close(_logits(whole), trained)
    again = PacaModel.from_pretrained(_dispatched(saved_model, tmp_path / "offload2"), tmp_path / "adapter")
    torch.testing.assert_close(_logits(again), trained)


def test_paca_on_resident_layers_beside_lora_on_the_offloaded_one(saved_model, tmp_path):
    configs = [PaCAConfig(r=4, target_modules=r"model\.layers\.0\..*_proj"), LoRAConfig(r=4, target_modules=rf"{OFFLOADED}\..*_proj")]
    adapted = prepare_model(_dispatched(saved_model, tmp_path / "offload"), configs)
    assert {layer.method for layer in adapted.adapter_layers().values()} == {"paca", "lora"}
    _train_step(adapted)
    adapted.save_pretrained(tmp_path / "adapter")
    whole = PacaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_model), tmp_path / "adapter")
    torch.testing.assert_close(_logits(whole), _logits(adapted))


@pytest.mark.parametrize(
    "config, reason",
    [
        (PaCAConfig(r=4), "PaCA writes its trained columns into the weight in place"),
        (FullConfig(target_modules=["down_proj"]), "Full fine-tuning updates the weight itself"),
    ],
    ids=["paca", "full"],
)
def test_methods_that_write_into_an_offloaded_weight_refuse_it(config, reason, saved_model, tmp_path):
    model = _dispatched(saved_model, tmp_path / "offload")
    before = _placement(model)
    with pytest.raises(PlacementError, match=reason) as error:
        prepare_model(model, config)
    message = str(error.value)
    assert f"{OFFLOADED}.mlp.down_proj" in message and "exclude_modules" in message and "device_map" in message
    assert _placement(model) == before and not any(p.requires_grad is False for p in model.parameters())  # untouched


def test_qpaca_refuses_an_offloaded_weight(saved_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(PlacementError, match=rf"{OFFLOADED}\..* QPaCA quantizes the weight once"):
        prepare_model(_dispatched(saved_model, tmp_path / "offload"), PaCAConfig(r=4, quantize="nf4"))


def test_pacatrainer_trains_and_saves_a_dispatched_model_where_it_is(saved_model, tmp_path):
    from transformers import TrainingArguments

    from paca_core.integrations.transformers import PacaTrainer

    adapted = prepare_model(_dispatched(saved_model, tmp_path / "offload"), LoRAConfig(r=4))
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], use_cpu=True, seed=0, save_steps=1,
    )
    PacaTrainer(model=adapted, args=args, train_dataset=Rows(4)).train()
    assert (tmp_path / "run" / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert all(p.is_meta for n, p in adapted.base_model.named_parameters() if n.startswith(OFFLOADED + ".") and "lora_" not in n)


def test_merging_into_offloaded_weights_is_refused(saved_model, tmp_path):
    adapted = prepare_model(_dispatched(saved_model, tmp_path / "offload"), LoRAConfig(r=4))
    with pytest.raises(PlacementError, match=rf"{OFFLOADED}\..*merge would be lost"):
        adapted.merge_and_unload()


def test_explicit_device_on_a_dispatched_model_is_refused(saved_model, tmp_path):
    with pytest.raises(PlacementError, match="without device= to keep the device_map placement"):
        prepare_model(_dispatched(saved_model, tmp_path / "offload"), LoRAConfig(r=4), device="cpu")


def test_fsdp_refuses_a_dispatched_model(saved_model, tmp_path):
    adapted = prepare_model(_dispatched(saved_model, tmp_path / "offload"), LoRAConfig(r=4))
    with pytest.raises(PlacementError, match="FSDP cannot shard a model loaded with a device_map"):
        shard_model(adapted, torch.device("cpu"))


def test_weights_on_meta_without_hooks_are_refused():
    with torch.device("meta"):
        model = tiny_llama(seed=0)
    with pytest.raises(PlacementError, match="no accelerate hook loads them.*Load real weights"):
        prepare_model(model, LoRAConfig(r=4))


def test_default_moves_nothing_and_ignores_paca_device(monkeypatch):
    """device=None: no Module.to call, $PACA_DEVICE is not read (a bogus value would raise if it were);
    device= still moves the model."""
    monkeypatch.setenv("PACA_DEVICE", "bogus")
    model = tiny_llama(seed=0)
    before = _placement(model)
    with recorded_moves() as moves:
        adapted = prepare_model(model, [PaCAConfig(r=4), FullConfig(target_modules=["lm_head"])])
    assert moves == [] and {n: _placement(adapted)[n] for n in before} == before
    other = tiny_llama(seed=0)
    with recorded_moves() as moves:
        prepare_model(other, LoRAConfig(r=4), device="cpu")
    assert [call[:2] for call in moves] == [["LlamaForCausalLM", ["cpu"]]]
