"""Training data in the forms users keep: conversations (``messages``, TRL's prompt/completion), datasets on disk
(``save_to_disk`` folders, DatasetDicts, parquet, arrow, csv), other column names, and packing.

The loss mask is checked token by token against an oracle written from the template by hand; packed rows are checked
to give each example the loss it has alone; every form trains through ``paca train`` and through ``PacaSFTTrainer``."""
from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

from paca_core.cli.dispatch import main
from paca_core.data.dataset import IGNORE_INDEX, DataError, load_dataset, parse_field_map, split_held_out
from paca_core.errors import PacaConfigError

from .conftest import refused_in_one_line as _refused, tiny_llama

datasets = pytest.importorskip("datasets")

#: A ChatML template like SmolLM2's (without its default system prompt): the incremental-rendering path.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
#: The same rendering with {% generation %} markers around each assistant turn: the tokenizer's own assistant mask.
CHATML_MARKED = ("{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
                 "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}"
                 "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
#: A template that hides earlier assistant turns once a later one follows: no way to mark the turns by increments.
REWRITES_EARLIER = ("{% for message in messages %}{% if message['role'] == 'assistant' and not loop.last %}"
                    "{{ '<|im_start|>assistant\nhidden<|im_end|>\n' }}{% else %}"
                    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
                    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

WORDS = ("be brief hello hi there how are you fine thanks bye see you soon what is the answer question two plus "
         "four six seven is a number red blue color sky grass hidden yes no ok").split()
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello how are you"},
    {"role": "user", "content": "fine thanks bye"},
    {"role": "assistant", "content": "bye see you soon"},
]


def chat_tokenizer(directory, template: str = CHATML):
    """A word-level tokenizer with ChatML's special tokens and a chat template, saved as an HF tokenizer folder."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + ["system", "user", "assistant"] + sorted(set(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = template
    fast.save_pretrained(directory)
    return fast


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny random LLaMA whose tokenizer has a chat template."""
    directory = tmp_path_factory.mktemp("tiny-chat-llama")
    tokenizer = chat_tokenizer(directory)
    model = tiny_llama(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       max_position_embeddings=128)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_model_dir)


def _expected(messages, trained_from: int = 0) -> list[tuple[str, bool]]:
    """The oracle: ChatML's tokens written out by hand, each with whether it is trained — an assistant turn's content
    and its end-of-turn token (as TRL's training templates mark them), never its header, system or user tokens."""
    tokens = []
    for index, message in enumerate(messages):
        trained = message["role"] == "assistant" and index >= trained_from
        tokens += [("<|im_start|>", False), (message["role"], False)]
        tokens += [(word, trained) for word in message["content"].split()] + [("<|im_end|>", trained)]
    return tokens


def _row(data, index: int, tokenizer) -> list[tuple[str, bool]]:
    ids, labels, mask = data.input_ids[index], data.labels[index], data.attention_mask[index]
    return [(tokenizer.convert_ids_to_tokens(int(i)), int(label) != IGNORE_INDEX) for i, label, m in zip(ids, labels, mask) if m]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --------------------------------------------------------------------------------------------
# the loss mask, token by token


@pytest.mark.parametrize("template", [CHATML, CHATML_MARKED], ids=["incremental-rendering", "generation-markers"])
def test_every_assistant_turn_and_only_those_is_trained(template, tmp_path):
    tokenizer = chat_tokenizer(tmp_path / "tok", template)
    data = load_dataset(_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 2), tokenizer, seq_len=64)
    assert _row(data, 0, tokenizer) == _expected(CONVERSATION)
    trained = [token for token, is_trained in _row(data, 0, tokenizer) if is_trained]
    assert trained == "hello how are you <|im_end|> bye see you soon <|im_end|>".split()  # both turns, each with its end
    assert (data.labels[0][data.labels[0] != IGNORE_INDEX] == data.input_ids[0][data.labels[0] != IGNORE_INDEX]).all()


@pytest.mark.parametrize("template", [CHATML, CHATML_MARKED], ids=["incremental-rendering", "generation-markers"])
def test_trl_conversational_prompt_completion_trains_the_completion_only(template, tmp_path):
    tokenizer = chat_tokenizer(tmp_path / "tok", template)
    prompt = CONVERSATION[:4]  # a few-shot prompt: its assistant turn is context, not a target
    completion = [{"role": "assistant", "content": "bye see you soon"}]
    data = load_dataset(_jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": completion}] * 2), tokenizer, seq_len=64)
    assert _row(data, 0, tokenizer) == _expected(prompt + completion, trained_from=len(prompt))


def test_trl_prompt_completion_strings_read_as_prompt_response(tokenizer, tmp_path):
    ours = load_dataset(_jsonl(tmp_path / "ours.jsonl", [{"prompt": "what is two plus four", "response": "six"}] * 2), tokenizer, 32)
    trl = load_dataset(_jsonl(tmp_path / "trl.jsonl", [{"prompt": "what is two plus four", "completion": "six"}] * 2), tokenizer, 32)
    assert torch.equal(ours.input_ids, trl.input_ids) and torch.equal(ours.labels, trl.labels)
    assert [t for t, trained in _row(trl, 0, tokenizer) if trained] == ["six", "<|im_end|>"]


def test_a_template_that_cannot_mark_the_turns_is_refused(tmp_path):
    tokenizer = chat_tokenizer(tmp_path / "tok", REWRITES_EARLIER)
    with pytest.raises(DataError, match=r"chat\.jsonl:1: the chat template cannot mark assistant turn 2"):
        load_dataset(_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}]), tokenizer, seq_len=64)
    single = [{"messages": CONVERSATION[:3]}]  # one assistant turn, last: nothing after it is rewritten
    assert load_dataset(_jsonl(tmp_path / "one.jsonl", single * 2), tokenizer, seq_len=64).target_tokens > 0


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant message to train on"),
    ({"messages": [{"content": "hi"}]}, "message 0 of 'messages' has no 'role'"),
    ({"messages": "hi"}, "must be a non-empty list of messages"),
    ({"prompt": [{"role": "user", "content": "hi"}], "completion": "hello"}, "must both be strings, or both lists"),
    ({"question": "hi"}, "has neither a 'text' string"),
])
def test_bad_conversations_are_named_by_line(record, message, tmp_path):
    from paca_core.data.dataset import check_data_file

    path = _jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, record])
    with pytest.raises(DataError, match="bad.jsonl:2"):
        check_data_file(path)
    with pytest.raises(DataError, match=message):
        check_data_file(path)


# --------------------------------------------------------------------------------------------
# datasets on disk, columns, splits


ROWS = [{"question": f"what is the color of the {thing}", "answer": color}
        for thing, color in [("sky", "blue"), ("grass", "red"), ("sky", "blue"), ("grass", "red")] * 4]


def _dataset(rows=ROWS):
    return datasets.Dataset.from_list(rows)


def _saved(kind: str, tmp_path):
    """``kind`` of dataset on disk holding ROWS (the DatasetDict's 'train' split holds them, 'test' one row)."""
    ds = _dataset()
    if kind == "folder":
        ds.save_to_disk(str(tmp_path / "folder"))
        return tmp_path / "folder"
    if kind == "dict":
        datasets.DatasetDict({"train": _dataset(ROWS[:2]), "mine": ds, "test": _dataset(ROWS[:2])}).save_to_disk(str(tmp_path / "dict"))
        return tmp_path / "dict"
    if kind == "parquet":
        ds.to_parquet(str(tmp_path / "d.parquet"))
        return tmp_path / "d.parquet"
    if kind == "csv":
        ds.to_csv(str(tmp_path / "d.csv"), index=False)
        return tmp_path / "d.csv"
    ds.save_to_disk(str(tmp_path / "for-arrow"))
    return next((tmp_path / "for-arrow").glob("*.arrow"))


@pytest.mark.parametrize("kind", ["folder", "dict", "parquet", "arrow", "csv"])
def test_datasets_on_disk_read_like_jsonl(kind, tokenizer, tmp_path):
    path = _saved(kind, tmp_path)
    fields = parse_field_map("prompt=question,response=answer")
    data = load_dataset(path, tokenizer, 32, split="mine" if kind == "dict" else "train", fields=fields)
    reference = load_dataset(_jsonl(tmp_path / "ref.jsonl", [{"prompt": r["question"], "response": r["answer"]} for r in ROWS]),
                             tokenizer, 32)
    assert torch.equal(data.input_ids, reference.input_ids) and torch.equal(data.labels, reference.labels)


def test_text_field_names_the_text_column(tokenizer, tmp_path):
    _dataset([{"body": "what is the answer", "messages": None}] * 4).to_parquet(str(tmp_path / "t.parquet"))
    data = load_dataset(tmp_path / "t.parquet", tokenizer, 4, fields=parse_field_map(None, "body"))
    assert data.target_tokens > 0 and data.info["records"] == {"text": 4}


def test_reading_leaves_nothing_in_the_datasets_cache(tokenizer, tmp_path, monkeypatch):
    import datasets.config

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    path = _saved("parquet", tmp_path)
    load_dataset(path, tokenizer, 32, fields=parse_field_map("prompt=question,response=answer"))
    assert not cache.exists() or not any(cache.rglob("*.arrow"))


def _argv(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu", "--steps", "2",
            "--seq-len", "32", "--batch-size", "2", "--rank", "4", "--lr", "1e-2", "--warmup-steps", "0", "--sample-tokens", "0",
            "--no-progress", *extra]


@pytest.mark.parametrize("kind, flags, message", [
    ("folder", ["--field-map", "prompt=query,response=answer"], "has no column 'query' (named for 'prompt'); its columns: "
                                                              "['question', 'answer']"),
    ("parquet", [], "has no column this run can train on"),
    ("csv", ["--text-field", "body"], "has no column 'body'"),
    ("dict", ["--data-split", "validation", "--field-map", "prompt=question,response=answer"],
     "holds the splits ['train', 'mine', 'test'], not 'validation'; choose one with --data-split"),
    ("folder", ["--field-map", "question=prompt"], "unknown field 'question' (write FIELD=COLUMN: prompt=question)"),
])
def test_bad_columns_and_splits_are_named_before_loading(kind, flags, message, chat_model_dir, tmp_path, no_load, caplog):
    line = _refused(_argv(chat_model_dir, _saved(kind, tmp_path), tmp_path / "out", *flags), caplog)
    assert message in line, line


def test_a_hub_dataset_id_is_refused_with_what_to_do(chat_model_dir, tmp_path, no_load, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _refused(_argv(chat_model_dir, "tatsu-lab/alpaca", tmp_path / "out"), caplog)
    assert "never downloads datasets" in line and "save_to_disk" in line, line


def test_without_the_datasets_library_the_extra_is_named(chat_model_dir, tmp_path, no_load, caplog, monkeypatch):
    path = _saved("parquet", tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a machine without paca-hal[data]
    line = _refused(_argv(chat_model_dir, path, tmp_path / "out"), caplog)
    assert "pip install 'paca-hal[data]'" in line, line


def test_conversations_need_a_chat_template_before_loading(tiny_model_dir, tmp_path, no_load, caplog):
    data = _jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 4)
    line = _refused(_argv(tiny_model_dir, data, tmp_path / "out"), caplog)  # the conftest tokenizer has no chat template
    assert "has no chat template" in line, line


def test_eval_data_from_a_dataset_dict_takes_its_held_out_split(tokenizer, tmp_path):
    path = _saved("dict", tmp_path)
    fields = parse_field_map("prompt=question,response=answer")
    held_out = load_dataset(path, tokenizer, 32, split=None, fields=fields)
    assert len(held_out) == 2  # the 'test' split


def test_field_map_syntax():
    assert parse_field_map("prompt=question, response=answer").column("prompt") == "question"
    assert parse_field_map(None, "body").column("text") == "body"
    for text, message in [("prompt", "FIELD=COLUMN"), ("prompt=a,prompt=b", "two columns"), ("response=a,completion=b", "either")]:
        with pytest.raises(PacaConfigError, match=message):
            parse_field_map(text)
    with pytest.raises(PacaConfigError, match="disagree"):
        parse_field_map("text=a", "b")


# --------------------------------------------------------------------------------------------
# packing


PAIRS = [{"prompt": p, "response": r} for p, r in [
    ("what is two plus four", "six"), ("what is the color of the sky", "blue"), ("hi", "hello"),
    ("how are you", "fine thanks"), ("what is seven", "a number"), ("what is red", "a color"),
    ("is the sky blue", "yes"), ("is the grass red", "no"),
]]


def _losses_per_example(model, data) -> dict[tuple[int, ...], float]:
    """Each example's summed next-token loss, keyed by its tokens: rows of one example each, or packed rows whose
    examples are told apart by where their positions restart."""
    with torch.no_grad():
        kwargs = {"position_ids": data.position_ids} if data.packed else {"attention_mask": data.attention_mask}
        logits = model(input_ids=data.input_ids, **kwargs).logits.float()
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), data.labels[:, 1:], ignore_index=IGNORE_INDEX,
                                                   reduction="none")
    losses = {}
    for row in range(len(data)):
        starts = (data.position_ids[row] == 0).nonzero().flatten().tolist() if data.packed else [0]
        ends = starts[1:] + [data.input_ids.shape[1]]
        for start, end in zip(starts, ends):
            if data.attention_mask[row, start:end].sum() == 0:
                continue  # the padding run
            length = int(data.attention_mask[row, start:end].sum())
            key = tuple(data.input_ids[row, start : start + length].tolist())
            losses[key] = float(token_loss[row, start : start + length - 1].sum())
    return losses


@pytest.mark.parametrize("attention", ["sdpa", pytest.param("eager", marks=pytest.mark.slow)])
def test_packed_and_unpacked_rows_give_each_example_the_same_loss(attention, tokenizer, tmp_path):
    from paca_core import PaCAConfig, prepare_model
    from paca_core.data.formats.packing import prepare_packed_attention
    from paca_core.train.steps import evaluate

    texts = [{"text": "red blue color sky"}, {"text": "see you soon ok"}]  # trained from their first token on
    path = _jsonl(tmp_path / "pairs.jsonl", PAIRS + [{"messages": CONVERSATION}] + texts)
    padded = load_dataset(path, tokenizer, 48)
    packed = load_dataset(path, tokenizer, 48, packing=True)
    assert len(packed) < len(padded) and packed.padding_share < padded.padding_share

    def targets(data):  # the labels the shifted loss reads: none lost or added at the example boundaries
        return int((data.labels[:, 1:] != IGNORE_INDEX).sum())

    assert targets(packed) == targets(padded)

    base = tiny_llama(seed=1, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, max_position_embeddings=128)
    base.config._attn_implementation = attention
    model = prepare_model(base, PaCAConfig(r=4, seed=1), device="cpu")
    prepare_packed_attention(model, micro_batch=2)
    model.train()  # the training forward: no KV cache, so the packed positions are read
    alone, together = _losses_per_example(model, padded), _losses_per_example(model, packed)
    assert len(alone) == len(PAIRS) + 1 + len(texts) and alone.keys() == together.keys()
    for key, loss in alone.items():
        assert together[key] == pytest.approx(loss, rel=1e-5, abs=1e-5)
    # The held-out loss (steps.evaluate: packed rows get position ids, chunked head or full logits) agrees too.
    for chunk in (None, 16):
        assert evaluate(model, packed, torch.device("cpu"), 2, loss_chunk_tokens=chunk) == pytest.approx(
            evaluate(model, padded, torch.device("cpu"), 2, loss_chunk_tokens=chunk), rel=1e-5)


def test_packed_batches_carry_positions_not_a_mask_and_keep_their_shape(tokenizer, tmp_path):
    packed = load_dataset(_jsonl(tmp_path / "pairs.jsonl", PAIRS * 3), tokenizer, 32, packing=True)
    batches = list(packed.batches(2, torch.arange(len(packed))))
    assert batches and all(set(b) == {"input_ids", "labels", "position_ids"} for b in batches)
    assert all(b["input_ids"].shape == (2, 32) for b in batches)
    for row in range(len(packed)):  # every example starts at position 0 and its first token is never a target
        starts = (packed.position_ids[row] == 0).nonzero().flatten()
        assert (packed.labels[row, starts] == IGNORE_INDEX).all()
    train, held_out = split_held_out(packed, 0.2, 0)
    assert train.packed and held_out.packed and len(train) + len(held_out) == len(packed)


def test_attention_that_cannot_keep_examples_apart_is_refused():
    from paca_core.data.formats.packing import packed_attention_problem, prepare_packed_attention

    model = tiny_llama()
    assert packed_attention_problem(model, 4) is None
    model.config._attn_implementation = "flash_attention_2"
    assert "batch of one row" in packed_attention_problem(model, 4) and packed_attention_problem(model, 1) is None
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(PacaConfigError, match="--packing cannot keep examples apart.*paged"):
        prepare_packed_attention(model, 1)
    model.config._attn_implementation = "sdpa"
    assert model.config.use_cache
    prepare_packed_attention(model, 4)
    assert not model.config.use_cache


def test_an_architecture_without_transformers_masks_is_refused():
    from paca_core.data.formats.packing import packed_attention_problem

    class OwnMask(torch.nn.Module):  # builds its own mask (as remote-code models may): nothing reads packed positions
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    assert "without transformers' masking utilities" in packed_attention_problem(OwnMask(), 1)


def test_packing_spends_most_tokens_on_data_and_reports_it(chat_model_dir, tmp_path, caplog):
    out = tmp_path / "run"
    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    with caplog.at_level(logging.INFO):
        assert main(_argv(chat_model_dir, data, out, "--packing", "--seq-len", "64")) == 0
    layout = json.loads((out / "metrics.json").read_text())["data_layout"]
    assert layout["packed"] and layout["padding_share_before_packing"] > 0.7 and layout["padding_share"] < 0.3
    assert "Packing: 32 examples" in caplog.text and "after" in caplog.text


# --------------------------------------------------------------------------------------------
# every form trains through paca train


FORMS = {
    "messages": ("chat.jsonl", lambda: [{"messages": CONVERSATION}] * 12, []),
    "trl-prompt-completion": ("pc.jsonl", lambda: [{"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:3]}] * 12, []),
    "messages-packed": ("chat.jsonl", lambda: [{"messages": CONVERSATION[:3]}] * 16, ["--packing"]),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_conversational_form_trains_through_paca_train(form, chat_model_dir, tmp_path):
    name, rows, flags = FORMS[form]
    out = tmp_path / "run"
    assert main(_argv(chat_model_dir, _jsonl(tmp_path / name, rows()), out, *flags)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["data_layout"]["records"] == {"conversation": 12 if form != "messages-packed" else 16}
    assert metrics["held_out_loss_after"] is not None and (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("kind, flags", [
    ("dict", ["--data-split", "mine"]),
    pytest.param("folder", [], marks=pytest.mark.slow),
    pytest.param("parquet", ["--packing"], marks=pytest.mark.slow),
    pytest.param("arrow", [], marks=pytest.mark.slow),
    pytest.param("csv", [], marks=pytest.mark.slow),
])
def test_each_dataset_on_disk_trains_through_paca_train(kind, flags, chat_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = _argv(chat_model_dir, _saved(kind, tmp_path), out, "--field-map", "prompt=question,response=answer", *flags)
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["data_layout"]["records"] == {"prompt/response": 16}


# --------------------------------------------------------------------------------------------
# ... and through PacaSFTTrainer


def _sft(model_dir, tokenizer, dataset, out, **config):
    trl = pytest.importorskip("trl")
    from paca_core import PaCAConfig, prepare_model
    from paca_core.integrations.trl import PacaSFTTrainer

    base = tiny_llama(seed=0, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      max_position_embeddings=128)
    args = trl.SFTConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
                         use_cpu=True, bf16=False, max_length=64, save_strategy="no", logging_steps=1, seed=0, **config)
    return PacaSFTTrainer(model=prepare_model(base, PaCAConfig(r=4), device="cpu"), args=args, train_dataset=dataset,
                          processing_class=tokenizer)


def _trained_tokens(tokenizer, example) -> list[str]:
    return [tokenizer.convert_ids_to_tokens(i) for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]


def test_sft_trainer_assistant_only_loss_marks_every_assistant_turn_without_generation_markers(chat_model_dir, tokenizer, tmp_path):
    dataset = _dataset([{"messages": CONVERSATION}] * 4)
    trainer = _sft(chat_model_dir, tokenizer, dataset, tmp_path / "sft", assistant_only_loss=True)
    example = trainer.train_dataset[0]
    tokens = [tokenizer.convert_ids_to_tokens(i) for i in example["input_ids"]]
    assert list(zip(tokens, [label != IGNORE_INDEX for label in example["labels"]])) == _expected(CONVERSATION)
    assert trainer.train().global_step == 2


def test_sft_trainer_conversational_prompt_completion_trains_the_completion(chat_model_dir, tokenizer, tmp_path):
    dataset = _dataset([{"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}] * 4)
    trainer = _sft(chat_model_dir, tokenizer, dataset, tmp_path / "sft")  # TRL's own completion mask
    assert _trained_tokens(tokenizer, trainer.train_dataset[0]) == "bye see you soon <|im_end|>".split()
    assert trainer.train().global_step == 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "packed"])
def test_sft_trainer_trains_datasets_on_disk_and_packed(kind, chat_model_dir, tokenizer, tmp_path):
    _dataset([{"messages": CONVERSATION}] * 8).save_to_disk(str(tmp_path / "chats"))
    dataset = datasets.load_from_disk(str(tmp_path / "chats"))
    trainer = _sft(chat_model_dir, tokenizer, dataset, tmp_path / "sft", assistant_only_loss=True, packing=kind == "packed")
    trained = [t for row in trainer.train_dataset for t in _trained_tokens(tokenizer, row)]
    assert trained and set(trained) <= set("hello how are you bye see soon <|im_end|>".split())
    assert trainer.train().global_step == 2


# --------------------------------------------------------------------------------------------
# the default model (SmolLM2's tokenizer and the README's example)


@pytest.mark.slow
def test_the_readme_conversation_example_on_the_default_model(tmp_path):
    from pathlib import Path

    from transformers import AutoTokenizer

    from paca_core.files import assets

    example = Path(__file__).resolve().parents[1] / "examples" / "chat.jsonl"
    tokenizer = AutoTokenizer.from_pretrained(assets.default_model_path())
    data = load_dataset(example, tokenizer, 256)
    first = json.loads(example.read_text().splitlines()[0])["messages"]
    trained = tokenizer.decode(data.input_ids[0][data.labels[0] != IGNORE_INDEX])
    replies = [m["content"] for m in first if m["role"] == "assistant"]
    assert trained == "".join(reply + "<|im_end|>\n" for reply in replies)  # SmolLM2's ChatML: each reply and its end
    out = tmp_path / "run"
    assert main(["train", "--data", str(example), "--packing", "--seq-len", "256", "--steps", "2", "--out", str(out),
                 "--device", "cpu", "--sample-tokens", "0", "--no-progress"]) == 0
    layout = json.loads((out / "metrics.json").read_text())["data_layout"]
    assert layout["packed"] and layout["padding_share"] < layout["padding_share_before_packing"]
