"""transformers.Trainer trains a prepared model: adapter-only checkpoints, resume, eval loss; MEFT's
host-memory state travels in its checkpoints too."""
import pytest
import torch
from transformers import TrainingArguments

from paca_core import MEFTConfig, PaCAConfig, PacaModel, prepare_model
from paca_core.integrations.transformers import HOST_STATE_NAME, PacaTrainer

from .conftest import tiny_llama
from .scripts.hf_trainer_run import Rows


def _args(out, steps):
    return TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=1e-2, save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        lr_scheduler_type="constant",
    )


def _train(config, out, steps, resume=None):
    model = prepare_model(tiny_llama(seed=0), config, device="cpu")
    trainer = PacaTrainer(model=model, args=_args(out, steps), train_dataset=Rows(), eval_dataset=Rows(8))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


@pytest.mark.parametrize("config", [PaCAConfig(r=4), MEFTConfig(num_rows=64, top_k=4)], ids=["paca", "meft"])
def test_trainer_checkpoints_hold_the_adapter_and_resume_exactly(config, tmp_path):
    straight, trainer = _train(config, tmp_path / "a", steps=4)
    assert trainer.evaluate()["eval_loss"] > 0  # the dataset columns reached the wrapped model
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "adapter_config.json").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # the frozen base is not copied into every checkpoint
    assert (checkpoint / HOST_STATE_NAME).is_file() == isinstance(config, MEFTConfig)

    resumed, _ = _train(config, tmp_path / "a", steps=4, resume=str(checkpoint))
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(5))
    straight.eval(), resumed.eval()
    with torch.no_grad():
        torch.testing.assert_close(resumed(input_ids=ids).logits, straight(input_ids=ids).logits)

    loaded = PacaModel.from_pretrained(tiny_llama(seed=0), tmp_path / "a" / "checkpoint-4", device="cpu")
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, straight(input_ids=ids).logits)


@pytest.mark.slow
def test_trainer_under_torchrun_ddp_equals_one_process_on_the_global_batch(tmp_path):
    """`torchrun --nproc-per-node 2` (DDP, gloo) with 2 examples per process trains the adapter one process
    trains with 4; rank 0 writes the adapter checkpoint. Each rank prepares its model without device= and
    the Trainer, not prepare_model, places it on that rank's device."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = os.path.join(os.path.dirname(__file__), "scripts", "hf_trainer_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {
        "one": [sys.executable, script, str(tmp_path / "one"), "4"],
        "two": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                script, str(tmp_path / "two"), "2"],
    }
    for command in runs.values():
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        _assert_placed_by_the_trainer(json.loads((tmp_path / "two" / f"placement-rank{rank}.json").read_text()))
    one = load_file(str(tmp_path / "one" / "checkpoint-3" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "checkpoint-3" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)


def _assert_placed_by_the_trainer(report: dict) -> None:
    """prepare_model moved nothing (no Module.to call, every tensor the same object on the same device, each
    adapter beside its weight); the Trainer moved the model to the rank's device and everything is there."""
    assert report["prepare_moves"] == [] and report["changed_by_prepare"] == []
    assert report["adapter_devices"] and all(delta == weight for delta, weight in report["adapter_devices"].values())
    assert ["AdaptedModel", [report["args_device"]], {}] in report["trainer_moves"], report["trainer_moves"]
    assert report["devices_after_trainer"] == [report["rank_device"]]


def test_model_card_names_paca_hal_and_the_method(tmp_path):
    """The README.md the Trainer writes (and pushes to the Hub) says library_name paca-hal, tags the
    methods, and tells how to load the adapter; writing it twice does not repeat anything."""
    from huggingface_hub import ModelCard

    from paca_core import LoRAConfig, VeLoRAConfig

    model = prepare_model(tiny_llama(seed=0), [LoRAConfig(r=4), VeLoRAConfig(num_groups=4)])
    trainer = PacaTrainer(model=model, args=_args(tmp_path, 1), train_dataset=Rows())
    trainer.create_model_card(model_name="tiny")
    trainer.create_model_card(model_name="tiny", tags=["mine"])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "paca-hal"
    assert {"paca-hal", "lora", "velora", "mine"} <= set(card.data.tags)
    assert len(card.data.tags) == len(set(card.data.tags))
    assert card.text.count("## paca-hal adapter") == 1 and "`lora+velora`" in card.text
    assert "PacaModel.from_pretrained" in card.text
