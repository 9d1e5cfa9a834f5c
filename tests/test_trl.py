"""TRL's SFTTrainer trains a prepared model (PacaSFTTrainer): its fused-LM-head forward runs through our
layers, checkpoints hold only the adapter (plus MEFT's host state), and resuming is exact."""
import pytest
import torch
from huggingface_hub import ModelCard

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from paca_core import MEFTConfig, PaCAConfig, PacaModel, prepare_model  # noqa: E402
from paca_core.integrations.transformers import HOST_STATE_NAME  # noqa: E402
from paca_core.integrations.trl import PacaSFTTrainer  # noqa: E402

from .conftest import SAMPLE_TEXT, build_tiny_tokenizer, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _model(tokenizer, config):
    base = tiny_llama(seed=0, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return prepare_model(base, config, device="cpu")


def _trainer(model, tokenizer, out, steps):
    lines = [line for line in SAMPLE_TEXT.splitlines() if line.strip()]
    args = trl.SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, max_length=32, lr_scheduler_type="constant", seed=0,
        bf16=False,  # SFTConfig defaults to bf16 autocast; fp32 here so the loaded adapter can be compared exactly
    )
    return PacaSFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": lines}), processing_class=tokenizer)


@pytest.mark.parametrize("config", [PaCAConfig(r=4), pytest.param(MEFTConfig(num_rows=64, top_k=4), marks=pytest.mark.slow)], ids=["paca", "meft"])
def test_sft_trainer_trains_checkpoints_the_adapter_and_resumes_exactly(config, tokenizer, tmp_path):
    straight = _model(tokenizer, config)
    result = _trainer(straight, tokenizer, tmp_path / "run", steps=4).train()
    assert result.global_step == 4 and result.training_loss > 0

    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "adapter_config.json").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # not the whole model
    assert (checkpoint / HOST_STATE_NAME).is_file() == isinstance(config, MEFTConfig)
    card = ModelCard.load(tmp_path / "run" / "README.md")  # TRL writes it with every checkpoint
    assert card.data.library_name == "paca-hal" and {"paca-hal", config.method} <= set(card.data.tags)

    resumed = _model(tokenizer, config)
    _trainer(resumed, tokenizer, tmp_path / "run", steps=4).train(resume_from_checkpoint=str(checkpoint))
    ids = torch.randint(0, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(5))
    untrained = _model(tokenizer, config)
    loaded = PacaModel.from_pretrained(
        tiny_llama(seed=0, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        tmp_path / "run" / "checkpoint-4",
    )
    for model in (straight, resumed, untrained, loaded):
        model.eval()
    with torch.no_grad():
        want = straight(input_ids=ids).logits
        assert not torch.allclose(untrained(input_ids=ids).logits, want)  # training changed the adapter
        torch.testing.assert_close(resumed(input_ids=ids).logits, want)
        torch.testing.assert_close(loaded(input_ids=ids).logits, want)


def test_sft_trainer_refuses_what_it_cannot_train(tokenizer):
    with pytest.raises(TypeError, match="prepare_model"):
        PacaSFTTrainer(model=tiny_llama(seed=0), args=trl.SFTConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False))
    model = _model(tokenizer, PaCAConfig(r=4))
    with pytest.raises(ValueError, match="peft_config"):
        PacaSFTTrainer(model=model, args=trl.SFTConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False), peft_config=object())
