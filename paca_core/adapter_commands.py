"""``paca merge`` and ``paca export-peft``: read a trained adapter and its base model, write one output folder.

Both check the adapter and ``--out`` (:mod:`paca_core.outputs`' policy) before the model loads, and publish their
output atomically: a crash or a full disk leaves the old state.
"""
from __future__ import annotations

import argparse


def _adapter_output(args: argparse.Namespace, command: str):
    """The checks of ``merge``/``export-peft`` that need no weights: the adapter's config, and ``--out`` against
    the output policy (not the model, the adapter or anything else already there)."""
    from . import assets
    from .checkpoint import read_adapter_config
    from .outputs import check_output

    read_adapter_config(args.adapter)  # a clear error before the model loads
    model_input = assets.default_model_folder() if args.model == "default" else args.model
    return check_output(args.out, command, overwrite=args.overwrite, inputs={"--model": model_input, "--adapter": args.adapter})


def _load_for_adapter(args):
    from . import assets
    from .model import PacaModel

    model, tokenizer = assets.load_model_and_tokenizer(assets.resolve_model_path(args.model))
    return PacaModel.from_pretrained(model, args.adapter, device="cpu"), tokenizer


def run_merge(args: argparse.Namespace) -> int:
    from . import assets
    from .outputs import check_free_space, publish_directory
    from .quantization import is_quantized_model, merge_and_dequantize

    target = _adapter_output(args, "merge")
    model_path = assets.resolve_model_path(args.model)
    needed = assets.weights_bytes(model_path)
    check_free_space(target.path.parent, needed)  # before loading: a merged copy is as large as the base
    paca_model, tokenizer = _load_for_adapter(args)
    # A 4-bit (QPaCA) base is written dequantized with the delta added: exact, and a plain HF model.
    merged = merge_and_dequantize(paca_model) if is_quantized_model(paca_model) else paca_model.merge_and_unload()
    with publish_directory(target, needed_bytes=needed) as staging:  # a crash or a full disk leaves the old state
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    print(f"Merged model written to {target.path}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .export import peft_lora_adapter, write_peft_lora
    from .outputs import publish_directory

    target = _adapter_output(args, "export-peft")
    paca_model, _ = _load_for_adapter(args)
    tensors, config = peft_lora_adapter(paca_model)
    with publish_directory(target, needed_bytes=sum(t.numel() * t.element_size() for t in tensors.values())) as staging:
        write_peft_lora(staging, tensors, config)
    print(f"PEFT LoRA adapter written to {target.path} (load with peft.PeftModel.from_pretrained)")
    return 0
