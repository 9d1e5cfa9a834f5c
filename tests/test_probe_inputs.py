"""Odd inputs tried on purpose, one parametrized case each: every output path, every resume, every malformed file and
flag. Each case names its input and the one line it expects, and checks that there was no traceback (``paca`` exits 2
with exactly one error line), that nothing the user or the command's inputs hold changed (every file under the test's
folder and the model, byte for byte) and, where the run goes ahead, that no user file was lost.

Refusals come before any weights load (``no_load``); the few cases that train run one or two steps of the tiny
random LLaMA. The rules behind the cases are in docs/reliability.md ("Odd inputs").
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from paca_core.cli.dispatch import main
from paca_core.files.outputs import MARKER_NAME

from .conftest import SAMPLE_TEXT, refused_in_one_line

TRAIN = ("train", "--model", "{model}", "--data", "{data}", "--device", "cpu", "--steps", "1", "--seq-len", "16", "--batch-size", "2",
         "--sample-tokens", "0", "--no-progress")
PLAN = ("plan", "--methods", "paca", "--device-profile", "cpu", "--seq-len", "64", "--batch-size", "1", "--no-search", "--workers", "1")
BENCH = ("bench", "--methods", "lora", "--no-progress")


@dataclass(frozen=True)
class Case:
    """One odd input: the argv (``{name}`` placeholders are the world's paths), the text its one line must hold, and
    what the world must look like first (``setup``: names of :data:`SETUPS`)."""

    name: str
    argv: tuple[str, ...]
    expect: str
    setup: tuple[str, ...] = ()
    needs: tuple[str, ...] = field(default=())  # optional modules


def case(name: str, argv, expect: str, *setup: str, needs: tuple[str, ...] = ()):
    return pytest.param(Case(name, tuple(argv), expect, setup, needs), id=name)


def train(*extra: str) -> tuple[str, ...]:
    return TRAIN + tuple(extra)


def write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


def marker(folder: Path, command: str, files: list[str]) -> None:
    """An output of ``command`` as the tool writes it: the files, and the marker listing them."""
    for name in files:
        write(folder / name, "ours")
    entries = sorted({name.split("/", 1)[0] for name in files})
    write(folder / MARKER_NAME, json.dumps({"tool": "paca-hal", "command": command, "entries": entries, "files": sorted(files)}))


def model_config(world: Path, name: str, change) -> None:
    """A copy of the tiny model whose config.json is ``change(fields)`` (a dict, or text written as is)."""
    folder = world / name
    shutil.copytree(world / "model", folder)
    fields = json.loads((folder / "config.json").read_text())
    changed = change(fields)
    write(folder / "config.json", changed if isinstance(changed, str) else json.dumps(changed))


def _chat_model(world: Path) -> None:
    folder = world / "chat"
    shutil.copytree(world / "model", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for message in messages %}<s>{{ message['role'] }} {{ message['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<s>assistant {% endif %}")
    write(folder / "tokenizer_config.json", json.dumps(config))


def _arrow(world: Path, kind: str) -> None:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    table = pa.table({"text": [SAMPLE_TEXT[:400], SAMPLE_TEXT[400:800]]})
    writer = ipc.new_file if kind == "file" else ipc.new_stream
    with writer(str(world / f"{kind}.arrow"), table.schema) as handle:
        handle.write_table(table)


def _parquet(world: Path, name: str, values) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": values}), str(world / name))


def _jsonl(world: Path, name: str, *rows) -> None:
    write(world / name, "".join(json.dumps(row) + "\n" for row in rows))


def _loop(world: Path) -> None:
    os.symlink(world / "loop-b", world / "loop")
    os.symlink(world / "loop", world / "loop-b")


def _messages(*turns) -> dict:
    return {"messages": [{"role": role, "content": text} for role, text in turns]}


SETUPS = {
    "run": lambda w: shutil.copytree(w / "_run", w / "run", symlinks=True),
    "loop": _loop,
    "chat": _chat_model,
    "file": lambda w: write(w / "notes.md", "my notes"),
    "home-x": lambda w: write(w / "home" / "x" / "diary.txt", "mine"),
    "note-in-adapter": lambda w: write(w / "run" / "adapter" / "notes.txt", "mine"),
    "note-in-checkpoint": lambda w: write(w / "run" / "checkpoint" / "notes.txt", "mine"),
    "deep-note": lambda w: write(w / "run" / "adapter" / "sub" / "deep" / "notes.txt", "mine"),
    "note-top": lambda w: write(w / "run" / "notes.txt", "mine"),
    "link-in-adapter": lambda w: os.symlink(w / "user" / "thesis.txt", w / "run" / "adapter" / "thesis-link"),
    "empty-dir-top": lambda w: (w / "run" / "mine").mkdir(),
    "note-in-runs": lambda w: write(w / "run" / "runs" / "notes.txt", "mine"),
    "merge-out": lambda w: marker(w / "merged", "merge", ["config.json", "model.safetensors"]),
    "merge-out-note": lambda w: (marker(w / "merged", "merge", ["config.json"]), write(w / "merged" / "sub" / "notes.txt", "mine")),
    "export-out": lambda w: marker(w / "exported", "export-peft", ["adapter_config.json", "adapter_model.safetensors"]),
    "plan-out-note": lambda w: (marker(w / "planned", "plan", ["plan.json", "figs/a.png"]), write(w / "planned" / "figs" / "mine.png", "m")),
    "bench-out-note": lambda w: (marker(w / "benched", "bench", ["bench.json", "logs/lora.log"]), write(w / "benched" / "logs" / "notes.txt", "m")),
    "tb-out": lambda w: marker(w / "tb", "train --logging-dir", ["events.out.tfevents.1.host.1.0"]),
    "tb-out-note": lambda w: (marker(w / "tb", "train --logging-dir", ["events.out.tfevents.1.host.1.0"]), write(w / "tb" / "notes.txt", "m")),
    "ckpt-copy": lambda w: shutil.copytree(w / "_run" / "checkpoint", w / "saved-ckpt"),
    "other-run": lambda w: shutil.copytree(w / "_run", w / "other", symlinks=True),
    "bad-json": lambda w: model_config(w, "broken", lambda c: "{not json"),
    "list-json": lambda w: model_config(w, "broken", lambda c: "[1, 2]"),
    "odd-heads": lambda w: model_config(w, "broken", lambda c: {**c, "hidden_size": 30}),
    "odd-kv": lambda w: model_config(w, "broken", lambda c: {**c, "num_key_value_heads": 3}),
    "only-type": lambda w: model_config(w, "broken", lambda c: {"model_type": "llama"}),
    "zero-hidden": lambda w: model_config(w, "broken", lambda c: {**c, "hidden_size": 0}),
    "text-hidden": lambda w: model_config(w, "broken", lambda c: {**c, "hidden_size": "32"}),
    "unknown-type": lambda w: model_config(w, "broken", lambda c: {**c, "model_type": "no-such-model"}),
    "no-config": lambda w: (shutil.copytree(w / "model", w / "broken"), (w / "broken" / "config.json").unlink()),
    "only-type-file": lambda w: write(w / "config.json", json.dumps({"model_type": "llama"})),
    "null.jsonl": lambda w: _jsonl(w, "bad.jsonl", {"text": "fine"}, {"text": None}),
    "list.jsonl": lambda w: _jsonl(w, "bad.jsonl", {"text": "fine"}, {"text": ["a", "b"]}),
    "number.jsonl": lambda w: _jsonl(w, "bad.jsonl", {"text": 3}),
    "struct.jsonl": lambda w: _jsonl(w, "bad.jsonl", {"text": {"body": "x"}}),
    "null-prompt.jsonl": lambda w: _jsonl(w, "bad.jsonl", {"prompt": None, "response": "r"}),
    "null-response.jsonl": lambda w: _jsonl(w, "bad.jsonl", {"prompt": "p", "response": None}),
    "struct-prompt.jsonl": lambda w: _jsonl(w, "bad.jsonl", {"prompt": {"q": 1}, "response": "r"}),
    "mixed-pair.jsonl": lambda w: _jsonl(w, "bad.jsonl", {"prompt": "p", "response": [{"role": "assistant", "content": "r"}]}),
    "messages-string.jsonl": lambda w: _jsonl(w, "bad.jsonl", {"messages": "hello"}),
    "message-no-role.jsonl": lambda w: _jsonl(w, "bad.jsonl", {"messages": [{"content": "hi"}]}),
    "message-no-content.jsonl": lambda w: _jsonl(w, "bad.jsonl", {"messages": [{"role": "user"}]}),
    "no-assistant.jsonl": lambda w: _jsonl(w, "bad.jsonl", _messages(("user", "hi"), ("user", "again"))),
    "assistant-first.jsonl": lambda w: _jsonl(w, "bad.jsonl", _messages(("assistant", "hi"), ("user", "yo"), ("assistant", "ok"))),
    "odd-role.jsonl": lambda w: _jsonl(w, "bad.jsonl", _messages(("user", "hi"), ("narrator", "meanwhile"), ("assistant", "yo"))),
    "tool-call.jsonl": lambda w: _jsonl(w, "bad.jsonl", {"messages": [
        {"role": "user", "content": "time?"}, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "clock"}}]},
        {"role": "tool", "content": "12:00"}, {"role": "assistant", "content": "noon"}]}),
    "blank.jsonl": lambda w: write(w / "bad.jsonl", "\n\n"),
    "array-line.jsonl": lambda w: write(w / "bad.jsonl", '{"text": "fine"}\n[1, 2]\n'),
    "null.parquet": lambda w: _parquet(w, "bad.parquet", ["fine", None]),
    "list.parquet": lambda w: _parquet(w, "bad.parquet", [["a"], ["b"]]),
    "struct.parquet": lambda w: _parquet(w, "bad.parquet", [{"a": 1}, {"a": 2}]),
    "header.csv": lambda w: write(w / "bad.csv", "text\n"),
    "empty.csv": lambda w: write(w / "bad.csv", ""),
    "quote.csv": lambda w: write(w / "bad.csv", 'text,n\n"fine",1\n"open,2\nthird,3\n'),
    "ragged.csv": lambda w: write(w / "bad.csv", "text,n\nfine,1\nthird,3,4,5\n"),
    "latin1.csv": lambda w: write(w / "bad.csv", b"text\ncaf\xe9\n"),
    "null.csv": lambda w: write(w / "bad.csv", "text,n\n,1\n"),
    "garbage.arrow": lambda w: write(w / "bad.arrow", b"ARROW1 this is not arrow at all"),
    "noise.arrow": lambda w: write(w / "bad.arrow", b"\x00\x01 not arrow"),
    "config-tilde": lambda w: write(w / "run.yaml", "out: ~/x\n"),
    "config-lr": lambda w: write(w / "run.yaml", "lr: -1.0e-3\n"),
    "config-overwrite": lambda w: write(w / "run.yaml", "overwrite: true\n"),
    "config-unknown": lambda w: write(w / "run.yaml", "learning_rate: 0.001\n"),
    "config-list": lambda w: write(w / "run.yaml", "- a\n- b\n"),
}

CASES = [
    # --- train --out: a new or empty folder, or an earlier run of paca train, at every depth --------------------------
    case("out-user-folder", train("--out", "{user}"), "did not write (sub, thesis.txt)"),
    case("out-earlier-run-no-flag", train("--out", "{run}"), "pass --overwrite", "run"),
    case("overwrite-note-in-adapter", train("--out", "{run}", "--overwrite"), "did not write (adapter/notes.txt)", "run", "note-in-adapter"),
    case("overwrite-note-in-checkpoint", train("--out", "{run}", "--overwrite"), "(checkpoint/notes.txt)", "run", "note-in-checkpoint"),
    case("resume-note-in-checkpoint", train("--out", "{run}", "--resume", "{run}", "--steps", "3"), "(checkpoint/notes.txt)", "run",
         "note-in-checkpoint"),
    case("overwrite-deep-note", train("--out", "{run}", "--overwrite"), "adapter/sub/deep/notes.txt", "run", "deep-note"),
    case("overwrite-note-top", train("--out", "{run}", "--overwrite"), "did not write (notes.txt)", "run", "note-top"),
    case("overwrite-user-link", train("--out", "{run}", "--overwrite"), "adapter/thesis-link", "run", "link-in-adapter"),
    case("overwrite-user-empty-dir", train("--out", "{run}", "--overwrite"), "did not write (mine)", "run", "empty-dir-top"),
    case("overwrite-note-in-tracker-dir", train("--out", "{run}", "--overwrite"), "did not write (runs)", "run", "note-in-runs"),
    case("out-is-model", train("--out", "{model}"), "is the --model"),
    case("out-inside-model", train("--out", "{model}/run"), "lies inside the --model"),
    case("out-holds-data", train("--out", "{world}"), "lies inside --out"),
    case("out-is-data-file", train("--out", "{data}"), "is a file, and this command writes a folder there"),
    case("out-is-file", train("--out", "{world}/notes.md"), "is a file", "file"),
    case("out-under-file", train("--out", "{world}/notes.md/run"), "is a file, not a folder", "file"),
    case("out-symlink-loop", train("--out", "{world}/loop"), "--out {world}/loop is a symbolic link loop", "loop"),
    case("out-empty", train("--out", ""), "--out is empty"),
    case("out-blank", train("--out", "  "), "--out is empty"),
    case("out-merge-output", train("--out", "{world}/merged", "--overwrite"), "holds a `paca merge` output", "merge-out"),
    case("out-export-output", train("--out", "{world}/exported", "--overwrite"), "holds a `paca export-peft` output", "export-out"),
    case("out-logging-dir-output", train("--out", "{world}/tb", "--overwrite"), "`paca train --logging-dir` output", "tb-out"),
    case("out-tilde-quoted", train("--out", "~/x"), "did not write (diary.txt)", "home-x"),
    case("out-tilde-config", train("--config", "{world}/run.yaml"), "did not write (diary.txt)", "config-tilde", "home-x"),
    # --- every other path a command writes follows --out's policy -----------------------------------------------------
    case("logging-dir-is-model", train("--out", "{world}/o", "--report-to", "tensorboard", "--logging-dir", "{model}"), "is the --model",
         needs=("tensorboard",)),
    case("logging-dir-inside-model", train("--out", "{world}/o", "--report-to", "tensorboard", "--logging-dir", "{model}/tb"),
         "lies inside the --model", needs=("tensorboard",)),
    case("logging-dir-user-folder", train("--out", "{world}/o", "--report-to", "tensorboard", "--logging-dir", "{user}"),
         "--logging-dir {user} already holds files this tool did not write", needs=("tensorboard",)),
    case("logging-dir-holds-data", train("--out", "{world}/o", "--report-to", "tensorboard", "--logging-dir", "{world}"),
         "lies inside --logging-dir", needs=("tensorboard",)),
    case("logging-dir-is-out", train("--out", "{world}/o", "--report-to", "tensorboard", "--logging-dir", "{world}/o"), "is --out itself",
         needs=("tensorboard",)),
    case("logging-dir-is-file", train("--out", "{world}/o", "--report-to", "tensorboard", "--logging-dir", "{world}/notes.md"), "is a file",
         "file", needs=("tensorboard",)),
    case("logging-dir-loop", train("--out", "{world}/o", "--report-to", "tensorboard", "--logging-dir", "{world}/loop"),
         "--logging-dir {world}/loop is a symbolic link loop", "loop", needs=("tensorboard",)),
    case("logging-dir-earlier-run", train("--out", "{world}/o", "--report-to", "tensorboard", "--logging-dir", "{run}"),
         "holds a `paca train` output, not a `paca train --logging-dir` one", "run", needs=("tensorboard",)),
    case("logging-dir-earlier-logs", train("--out", "{world}/o", "--report-to", "tensorboard", "--logging-dir", "{world}/tb"),
         "--logging-dir {world}/tb holds a previous", "tb-out", needs=("tensorboard",)),
    case("logging-dir-earlier-logs-note", train("--out", "{world}/o", "--overwrite", "--report-to", "tensorboard", "--logging-dir",
                                                "{world}/tb"), "did not write (notes.txt)", "tb-out-note", needs=("tensorboard",)),
    case("logging-dir-tilde", train("--out", "{world}/o", "--report-to", "tensorboard", "--logging-dir", "~/x"), "did not write (diary.txt)",
         "home-x", needs=("tensorboard",)),
    # --- merge / export-peft / plan / bench outputs -------------------------------------------------------------------
    case("merge-out-user-folder", ("merge", "--model", "{model}", "--adapter", "{run}/adapter", "--out", "{user}"), "did not write", "run"),
    case("merge-out-model", ("merge", "--model", "{model}", "--adapter", "{run}/adapter", "--out", "{model}"), "is the --model", "run"),
    case("merge-out-adapter", ("merge", "--model", "{model}", "--adapter", "{run}/adapter", "--out", "{run}/adapter/m"),
         "lies inside the --adapter", "run"),
    case("merge-out-loop", ("merge", "--model", "{model}", "--adapter", "{run}/adapter", "--out", "{world}/loop"), "symbolic link loop",
         "run", "loop"),
    case("merge-model-loop", ("merge", "--model", "{world}/loop", "--adapter", "{run}/adapter", "--out", "{world}/m"),
         "--model {world}/loop is a symbolic link loop", "run", "loop"),
    case("merge-out-nested-note", ("merge", "--model", "{model}", "--adapter", "{run}/adapter", "--out", "{world}/merged", "--overwrite"),
         "did not write (sub)", "run", "merge-out-note"),
    case("merge-out-export-output", ("merge", "--model", "{model}", "--adapter", "{run}/adapter", "--out", "{world}/exported",
                                     "--overwrite"), "holds a `paca export-peft` output", "run", "export-out"),
    case("merge-bad-config", ("merge", "--model", "{world}/broken", "--adapter", "{run}/adapter", "--out", "{world}/m"), "is not valid JSON",
         "run", "bad-json"),
    case("merge-odd-heads", ("merge", "--model", "{world}/broken", "--adapter", "{run}/adapter", "--out", "{world}/m"),
         "hidden_size 30 is not a multiple of num_attention_heads 4", "run", "odd-heads"),
    case("export-out-user-folder", ("export-peft", "--model", "{model}", "--adapter", "{run}/adapter", "--out", "{user}"), "did not write",
         "run"),
    case("export-out-loop", ("export-peft", "--model", "{model}", "--adapter", "{run}/adapter", "--out", "{world}/loop"),
         "symbolic link loop", "run", "loop"),
    case("plan-out-user-folder", PLAN + ("--model", "smollm2-135m", "--out", "{user}"), "did not write"),
    case("plan-out-nested-note", PLAN + ("--model", "smollm2-135m", "--out", "{world}/planned", "--overwrite"), "did not write (figs/mine.png)",
         "plan-out-note"),
    case("plan-out-loop", PLAN + ("--model", "smollm2-135m", "--out", "{world}/loop"), "symbolic link loop", "loop"),
    case("plan-out-inside-model", PLAN + ("--model", "{model}", "--out", "{model}/plan"), "lies inside the --model"),
    case("bench-out-user-folder", BENCH + ("--model", "tiny", "--out", "{user}"), "did not write"),
    case("bench-out-note-in-logs", BENCH + ("--model", "tiny", "--out", "{world}/benched", "--overwrite"), "did not write (logs/notes.txt)",
         "bench-out-note"),
    # --- resume: continue the folder named, and only when there is something to train ---------------------------------
    case("resume-nothing-to-do", train("--resume", "{run}", "--out", "{run}", "--steps", "1"), "already at step 1", "run"),
    case("resume-fewer-steps", train("--resume", "{run}", "--steps", "1"), "nothing to train; to train more, pass --steps above 1", "run"),
    case("resume-epochs-done", train("--resume", "{run}", "--steps", "0", "--epochs", "0.01"),
         "--epochs 0.01 is 1 step of this data", "run"),
    case("resume-missing", train("--resume", "{world}/nope", "--steps", "3"), "no such folder"),
    case("resume-user-folder", train("--resume", "{user}", "--steps", "3"), "is not a resumable checkpoint"),
    case("resume-with-overwrite", train("--resume", "{run}", "--overwrite", "--steps", "3"), "pass one of them", "run"),
    case("resume-other-method", train("--resume", "{run}", "--method", "lora", "--steps", "3"), "method: checkpoint 'paca' vs now 'lora'",
         "run"),
    case("resume-other-rank", train("--resume", "{run}", "--rank", "7", "--steps", "3"), "vs now 7", "run"),
    case("resume-loose-checkpoint", train("--resume", "{world}/saved-ckpt", "--steps", "3"), "pass --out for the continued run", "ckpt-copy"),
    case("resume-into-another-run", train("--resume", "{run}", "--out", "{world}/other", "--steps", "3"), "holds another run than --resume",
         "run", "other-run"),
    # --- a model's config.json ------------------------------------------------------------------------------------------
    case("train-bad-json", train("--model", "{world}/broken", "--out", "{world}/o"), "config.json is not valid JSON (line 1", "bad-json"),
    case("train-json-list", train("--model", "{world}/broken", "--out", "{world}/o"), "holds a JSON list, not an object", "list-json"),
    case("train-odd-heads", train("--model", "{world}/broken", "--out", "{world}/o"), "hidden_size 30 is not a multiple", "odd-heads"),
    case("train-odd-kv-heads", train("--model", "{world}/broken", "--out", "{world}/o"), "not a multiple of num_key_value_heads 3", "odd-kv"),
    case("train-only-model-type", train("--model", "{world}/broken", "--out", "{world}/o"), "does not give hidden_size", "only-type"),
    case("train-zero-hidden", train("--model", "{world}/broken", "--out", "{world}/o"), "hidden_size is 0", "zero-hidden"),
    case("train-text-hidden", train("--model", "{world}/broken", "--out", "{world}/o"), "hidden_size is '32'", "text-hidden"),
    case("train-no-config", train("--model", "{world}/broken", "--out", "{world}/o"), "has no config.json", "no-config"),
    case("train-model-loop", train("--model", "{world}/loop", "--out", "{world}/o"), "--model {world}/loop is a symbolic link loop", "loop"),
    case("train-model-missing", train("--model", "{world}/nope", "--out", "{world}/o"), "no such folder"),
    case("plan-odd-heads", PLAN + ("--model", "{world}/broken"), "hidden_size 30 is not a multiple", "odd-heads"),
    case("plan-odd-kv-heads", PLAN + ("--model", "{world}/broken"), "num_key_value_heads 3", "odd-kv"),
    case("plan-only-model-type-folder", PLAN + ("--model", "{world}/broken"), "does not give hidden_size", "only-type"),
    case("plan-only-model-type-file", PLAN + ("--model", "{world}/config.json"), "does not give hidden_size", "only-type-file"),
    case("plan-bad-json", PLAN + ("--model", "{world}/broken"), "is not valid JSON", "bad-json"),
    case("plan-unknown-type", PLAN + ("--model", "{world}/broken"), "'no-such-model', which the installed transformers", "unknown-type"),
    case("plan-model-empty", PLAN + ("--model", ""), "is neither a built-in model shape nor a local path"),
    case("bench-model-bad-json", BENCH + ("--model", "{world}/broken", "--out", "{world}/b"), "is not valid JSON", "bad-json"),
    case("bench-model-odd-heads", BENCH + ("--model", "{world}/broken", "--out", "{world}/b"), "hidden_size 30", "odd-heads"),
    case("bench-model-missing", BENCH + ("--model", "{world}/nope", "--out", "{world}/b"), "--model {world}/nope is not a model folder"),
    case("bench-accuracy-model-bad", BENCH + ("--mode", "accuracy", "--accuracy-model", "{world}/broken", "--out", "{world}/b"),
         "--accuracy-model {world}/broken: ", "bad-json"),
    case("bench-accuracy-model-missing", BENCH + ("--mode", "accuracy", "--accuracy-model", "{world}/nope", "--out", "{world}/b"),
         "--accuracy-model {world}/nope is not a model folder"),
    # --- flags: values that would do nothing, and messages in the flags' names ----------------------------------------
    case("lr-negative-exponent", train("--out", "{world}/o", "--lr", "-1e-3"), "--lr must be a positive number (got -0.001)"),
    case("lr-negative", train("--out", "{world}/o", "--lr", "-1"), "--lr must be a positive number"),
    case("lr-zero", train("--out", "{world}/o", "--lr", "0"), "--lr must be a positive number"),
    case("velora-groups-above-width", train("--out", "{world}/o", "--method", "lora+velora", "--velora-groups", "64"),
         "--velora-groups 64 is larger than"),
    case("velora-groups-zero", train("--out", "{world}/o", "--method", "lora+velora", "--velora-groups", "0"),
         "--velora-groups must be a positive integer"),
    case("meft-topk-too-large", train("--out", "{world}/o", "--method", "meft", "--meft-topk", "500"), "--meft-topk=500 exceeds"),
    case("meft-topk-zero", train("--out", "{world}/o", "--method", "meft", "--meft-topk", "0"), "MEFT --meft-topk must be a positive integer"),
    case("meft-rows-zero", train("--out", "{world}/o", "--method", "meft", "--meft-rows", "0"), "--meft-rows must be a positive integer"),
    case("plan-methods-empty", PLAN[:1] + ("--methods", ""), "--methods '' names nothing to plan"),
    case("plan-methods-commas", PLAN[:1] + ("--methods", " , "), "names nothing to plan"),
    case("plan-profile-empty", PLAN[:1] + ("--device-profile", ""), "--device-profile '' names nothing to plan"),
    case("plan-seq-len-empty", PLAN + ("--seq-len", ""), "--seq-len '': expected comma-separated positive integers"),
    case("plan-batch-zero", PLAN + ("--batch-size", "0"), "--batch-size '0'"),
    case("plan-rank-zero", PLAN + ("--rank", "0"), "--rank must be at least 1"),
    case("plan-world-zero", PLAN + ("--world-size", "0"), "--world-size must be at least 1"),
    case("bench-steps-zero", BENCH + ("--model", "tiny", "--steps", "0", "--out", "{world}/b"), "--steps must be at least 1"),
    case("bench-warmup-negative", BENCH + ("--model", "tiny", "--warmup-steps", "-1", "--out", "{world}/b"), "--warmup-steps must be 0"),
    case("bench-timeout-zero", BENCH + ("--model", "tiny", "--worker-timeout", "0", "--out", "{world}/b"), "--worker-timeout must be"),
    case("bench-lr-negative", BENCH + ("--model", "tiny", "--lr", "-1e-3", "--out", "{world}/b"), "--lr must be a positive number"),
    case("bench-accuracy-steps-zero", BENCH + ("--mode", "accuracy", "--accuracy-steps", "0", "--out", "{world}/b"),
         "--accuracy-steps must be at least 1"),
    case("config-negative-lr", train("--out", "{world}/o", "--config", "{world}/run.yaml"), "--lr must be a positive number", "config-lr"),
    case("config-overwrite", train("--out", "{world}/o", "--config", "{world}/run.yaml"), "is a command-line flag only", "config-overwrite"),
    case("config-unknown-key", train("--out", "{world}/o", "--config", "{world}/run.yaml"), "unknown key 'learning_rate'", "config-unknown"),
    case("config-not-mapping", train("--out", "{world}/o", "--config", "{world}/run.yaml"), "must hold a mapping", "config-list"),
    case("config-missing", train("--out", "{world}/o", "--config", "{world}/nope.yaml"), "no such file"),
    # --- data values -------------------------------------------------------------------------------------------------
    case("jsonl-null-text", train("--data", "{world}/bad.jsonl", "--out", "{world}/o"), "bad.jsonl:2: 'text' is null", "null.jsonl"),
    case("jsonl-list-text", train("--data", "{world}/bad.jsonl", "--out", "{world}/o"), "bad.jsonl:2: 'text' is a list", "list.jsonl"),
    case("jsonl-number-text", train("--data", "{world}/bad.jsonl", "--out", "{world}/o"), "'text' is a number", "number.jsonl"),
    case("jsonl-struct-text", train("--data", "{world}/bad.jsonl", "--out", "{world}/o"), "'text' is a struct", "struct.jsonl"),
    case("jsonl-null-prompt", train("--data", "{world}/bad.jsonl", "--out", "{world}/o"), "'prompt' is null", "null-prompt.jsonl"),
    case("jsonl-null-response", train("--data", "{world}/bad.jsonl", "--out", "{world}/o"), "'response' is null", "null-response.jsonl"),
    case("jsonl-struct-prompt", train("--data", "{world}/bad.jsonl", "--out", "{world}/o"), "(got a struct (object) and a string)", "struct-prompt.jsonl"),
    case("jsonl-string-and-messages", train("--data", "{world}/bad.jsonl", "--out", "{world}/o"), "must both be strings, or both lists",
         "mixed-pair.jsonl"),
    case("jsonl-messages-string", train("--data", "{world}/bad.jsonl", "--out", "{world}/o"), "must be a non-empty list of messages",
         "messages-string.jsonl"),
    case("jsonl-message-no-role", train("--data", "{world}/bad.jsonl", "--out", "{world}/o"), "has no 'role' string", "message-no-role.jsonl"),
    case("jsonl-message-no-content", train("--data", "{world}/bad.jsonl", "--out", "{world}/o"), "(user) has no 'content' string",
         "message-no-content.jsonl"),
    case("jsonl-no-assistant", train("--data", "{world}/bad.jsonl", "--out", "{world}/o"), "no assistant message to train on",
         "no-assistant.jsonl"),
    case("jsonl-assistant-first", train("--data", "{world}/bad.jsonl", "--out", "{world}/o"), "starts with an assistant turn",
         "assistant-first.jsonl"),
    case("jsonl-unknown-role", train("--model", "{world}/chat", "--data", "{world}/bad.jsonl", "--out", "{world}/o"),
         "has role 'narrator', which the chat template", "chat", "odd-role.jsonl"),
    case("jsonl-tool-call", train("--model", "{world}/chat", "--data", "{world}/bad.jsonl", "--out", "{world}/o"),
         "message 1 is a tool-call turn (tool_calls), and the chat template", "chat", "tool-call.jsonl"),
    case("jsonl-blank", train("--data", "{world}/bad.jsonl", "--out", "{world}/o"), "has no records", "blank.jsonl"),
    case("jsonl-array-line", train("--data", "{world}/bad.jsonl", "--out", "{world}/o"), "bad.jsonl:2 must be a JSON object", "array-line.jsonl"),
    case("eval-data-null", train("--eval-data", "{world}/bad.jsonl", "--out", "{world}/o"), "bad.jsonl:2: 'text' is null", "null.jsonl"),
    case("parquet-null", train("--data", "{world}/bad.parquet", "--out", "{world}/o"), "bad.parquet row 1: 'text' is null", "null.parquet",
         needs=("datasets",)),
    case("parquet-list", train("--data", "{world}/bad.parquet", "--out", "{world}/o"), "row 0: 'text' is a list", "list.parquet",
         needs=("datasets",)),
    case("parquet-struct", train("--data", "{world}/bad.parquet", "--out", "{world}/o"), "row 0: 'text' is a struct", "struct.parquet",
         needs=("datasets",)),
    case("csv-header-only", train("--data", "{world}/bad.csv", "--out", "{world}/o"), "bad.csv has a header (text) and no rows", "header.csv", needs=("datasets",)),
    case("csv-empty", train("--data", "{world}/bad.csv", "--out", "{world}/o"), "bad.csv is empty", "empty.csv", needs=("datasets",)),
    case("csv-open-quote", train("--data", "{world}/bad.csv", "--out", "{world}/o"), "bad.csv:4 is not valid CSV", "quote.csv",
         needs=("datasets",)),
    case("csv-ragged", train("--data", "{world}/bad.csv", "--out", "{world}/o"), "bad.csv:3 has 4 fields, and the header has 2", "ragged.csv",
         needs=("datasets",)),
    case("csv-latin1", train("--data", "{world}/bad.csv", "--out", "{world}/o"), "bad.csv is not UTF-8", "latin1.csv", needs=("datasets",)),
    case("csv-null-text", train("--data", "{world}/bad.csv", "--out", "{world}/o"), "bad.csv row 0: 'text' is null", "null.csv",
         needs=("datasets",)),
    case("arrow-garbage-file-magic", train("--data", "{world}/bad.arrow", "--out", "{world}/o"), "cannot be read as a .arrow file",
         "garbage.arrow", needs=("datasets",)),
    case("arrow-noise", train("--data", "{world}/bad.arrow", "--out", "{world}/o"), "cannot be read as a .arrow file", "noise.arrow",
         needs=("datasets",)),
    case("bench-data-null", BENCH + ("--mode", "accuracy", "--accuracy-model", "{model}", "--data", "{world}/bad.jsonl", "--out", "{world}/b"),
         "bad.jsonl:2: 'text' is null", "null.jsonl"),
]


@pytest.fixture(scope="module")
def earlier_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished one-step run (the default method and rank), copied into each world that needs it."""
    folder = tmp_path_factory.mktemp("probe-earlier")
    data = folder / "data.txt"
    data.write_text(SAMPLE_TEXT)
    out = folder / "run"
    argv = [a.format(model=tiny_model_dir, data=data) for a in TRAIN] + ["--out", str(out)]
    assert main(argv) == 0
    return out


@pytest.fixture
def world(tmp_path, tiny_model_dir, earlier_run, monkeypatch) -> dict[str, Path]:
    """The test's folder: data, a folder of the user's files, a home, the model (a copy); cwd and $HOME point into it."""
    root = tmp_path / "w"
    root.mkdir()
    write(root / "data.txt", SAMPLE_TEXT)
    write(root / "user" / "thesis.txt", "three years of work")
    write(root / "user" / "sub" / "data.csv", "a,b\n1,2\n")
    (root / "home").mkdir()
    shutil.copytree(tiny_model_dir, root / "model")
    shutil.copytree(earlier_run, root / "_run")
    monkeypatch.setenv("HOME", str(root / "home"))
    monkeypatch.chdir(root)
    return {"world": root, "model": root / "model", "data": root / "data.txt", "user": root / "user", "run": root / "run"}


def snapshot(root: Path) -> dict[str, object]:
    """Every file (bytes), link (target) and folder (None) under ``root``."""
    found: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = os.readlink(path)
        else:
            found[key] = None if path.is_dir() else path.read_bytes()
    return found


def _argv(c: Case, world: dict[str, Path]) -> list[str]:
    return [part.format(**world) for part in c.argv]


@pytest.mark.parametrize("c", CASES)
def test_an_odd_input_is_refused_in_one_line_and_changes_nothing(c: Case, world, no_load, caplog):
    for module in c.needs:
        pytest.importorskip(module)
    for name in c.setup:
        SETUPS[name](world["world"])
    before = snapshot(world["world"])
    line = refused_in_one_line(_argv(c, world), caplog)
    assert c.expect.format(**world) in line, line
    assert snapshot(world["world"]) == before  # inputs, the user's files and earlier outputs, byte for byte; nothing new


def test_probe_has_at_least_a_hundred_cases():
    assert len(CASES) >= 100 and len({c.values[0].name for c in CASES}) == len(CASES)


# --- inputs that are accepted: the run goes where the user meant, and loses nothing ------------------------------------
def test_quoted_tilde_out_goes_to_home_once(world, caplog):
    assert main([p.format(**world) for p in train("--out", "~/fresh")]) == 0
    home = world["world"] / "home" / "fresh"
    assert (home / "adapter" / "adapter_config.json").is_file() and (home / MARKER_NAME).is_file()
    assert not (world["world"] / "~").exists()
    assert str(home) in (home / "config.yaml").read_text()


def test_resume_without_out_continues_the_folder_it_names(world, caplog):
    SETUPS["run"](world["world"])
    user_before = snapshot(world["user"])
    assert main([p.format(**world) for p in train("--resume", "{run}", "--steps", "2")]) == 0
    assert json.loads((world["run"] / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert not (world["world"] / "runs").exists()
    assert snapshot(world["user"]) == user_before


def test_overwrite_replaces_only_the_earlier_runs_files_and_the_marker_lists_every_file(world, caplog):
    SETUPS["run"](world["world"])
    write(world["world"] / "beside.txt", "a user's file next to the run")
    assert main([p.format(**world) for p in train("--out", "{run}", "--overwrite", "--report-to", "none")]) == 0
    listed = json.loads((world["run"] / MARKER_NAME).read_text())
    on_disk = sorted(str(p.relative_to(world["run"])) for p in world["run"].rglob("*") if p.is_file() and p.name != MARKER_NAME)
    assert listed["files"] == on_disk and "checkpoint/trainer_state.json" in on_disk
    assert (world["world"] / "beside.txt").read_text() == "a user's file next to the run"


def test_an_arrow_file_in_the_ipc_file_format_is_read(world):
    pytest.importorskip("datasets")
    from paca_core.data.dataset import inspect_data

    for kind in ("file", "stream"):
        _arrow(world["world"], kind)
        assert inspect_data(world["world"] / f"{kind}.arrow").records == 2


def test_memory_budget_with_fixed_sizes_on_cpu_warns(world, no_load, caplog):
    with caplog.at_level("WARNING"), pytest.raises(AssertionError, match="loaded before"):
        main([p.format(**world) for p in train("--out", "{world}/o", "--memory-budget", "1GiB")])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("--memory-budget 1GiB does nothing in this run" in w for w in warnings), warnings
