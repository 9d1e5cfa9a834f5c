"""Does the held-out evaluation stay inside the memory the training step was sized for?

Trains a random LLaMA with a 32k vocabulary (where the logits dominate) for a few steps with ``paca train``,
once with the chunked loss (default) and once with ``--loss-chunk-tokens off``, each in a fresh process, and
prints each run's process peak (metrics.json ``peak_memory_bytes``: VmHWM on Linux, which covers the training
steps and the evaluation after them) beside the size of the full fp32 logits of one micro-batch. Before the
evaluation used the training micro-batch and the chunked loss, both runs peaked at the same value (the
evaluation's 8-example full logits set it); now the chunked run's peak must be lower by at least the logits.

    python scripts/eval_memory.py [--vocab 32000 --seq-len 512 --batch-size 2 --chunk 1024]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model(directory: Path, vocab: int, context: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    sys.path.insert(0, str(ROOT))
    from paca_core.files.assets import default_dataset_path

    text = default_dataset_path().read_text(encoding="utf-8")
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=vocab, max_position_embeddings=context, tie_word_embeddings=False,
                         eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id, pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)


def peak_of(model: Path, out: Path, chunk: str, seq_len: int, batch_size: int) -> int:
    command = [sys.executable, "-m", "paca_core", "train", "--model", str(model), "--out", str(out), "--device", "cpu", "--steps", "2",
               "--seq-len", str(seq_len), "--batch-size", str(batch_size), "--sample-tokens", "0", "--no-progress",
               "--eval-fraction", "0.2", "--loss-chunk-tokens", chunk]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())["peak_memory_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--chunk", default="1024", help="--loss-chunk-tokens of the chunked run (1024: paca train's default)")
    args = parser.parse_args()
    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build_model(model, args.vocab, args.seq_len)
        chunked = peak_of(model, Path(tmp) / "chunked", args.chunk, args.seq_len, args.batch_size)
        full = peak_of(model, Path(tmp) / "full", "off", args.seq_len, args.batch_size)
    logits = args.batch_size * args.seq_len * args.vocab * 4
    print(f"vocab {args.vocab}, {args.batch_size} x {args.seq_len} tokens: full fp32 logits of one micro-batch {logits / mib:,.0f} MiB")
    print(f"process peak, --loss-chunk-tokens {args.chunk} (train + eval): {chunked / mib:,.0f} MiB")
    print(f"process peak, --loss-chunk-tokens off:      {full / mib:,.0f} MiB")
    print(f"difference {(full - chunked) / mib:,.0f} MiB ({(full - chunked) / logits:.2f}x the logits)")


if __name__ == "__main__":
    main()
