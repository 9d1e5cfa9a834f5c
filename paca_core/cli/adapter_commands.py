"""``paca merge`` and ``paca export-peft``: read a trained adapter and its base model, write one output folder.

Both check the adapter and ``--out`` (:mod:`paca_core.files.outputs`' policy) before the model loads, and publish their
output atomically: a crash or a full disk leaves the old state. Without ``--model`` they use the base model the
adapter records (``base_model`` in its adapter_config.json, as ``paca train`` writes it), and either way refuse a
base whose weights' fingerprint differs from the recorded ``base_model_fingerprint``: an adapter folded into, or
exported for, another model would give a wrong model without any error.
"""
from __future__ import annotations

import argparse
import logging
import os

from ..errors import CheckpointError, PacaConfigError

logger = logging.getLogger(__name__)


def _adapter_output(args: argparse.Namespace, command: str):
    """The checks of ``merge``/``export-peft`` that need no weights: the adapter's config, ``--out`` against the output
    policy (not the model, the adapter or anything else already there), and the base model (``--model``, or the one
    the adapter records) against the fingerprint the adapter recorded. Returns the output target and the model folder."""
    from ..files import assets
    from ..files.checkpoint import read_adapter_config
    from ..files.outputs import check_output

    document = read_adapter_config(args.adapter)  # a clear error before the model loads
    model = base_model_for(document, args.model, args.adapter)
    model_input = assets.default_model_folder() if model == "default" else model
    target = check_output(args.out, command, overwrite=args.overwrite, inputs={"--model": model_input, "--adapter": args.adapter})
    model_path = assets.resolve_model_path(model)  # the default model is converted here, once
    from ..files.input_checks import read_model_config

    read_model_config(model_path)  # before the weights load: a damaged config.json named as such
    check_recorded_fingerprint(document, model_path, given=args.model is not None)
    return target, model_path


def base_model_for(document: dict, model: str | None, adapter: str) -> str:
    """``--model`` as given, or (left out) the base model the adapter records: its folder, or ``default`` for the
    embedded model's cache folder (rebuilt if the cache was cleared). One line when the adapter names none usable."""
    from ..files import assets

    if model is not None:
        return model
    recorded = document.get("base_model")
    if not recorded:
        raise PacaConfigError(f"{adapter} does not record the base model it was trained on: pass --model (its local folder, or "
                              "'default' for the embedded SmolLM2-135M-Instruct).")
    if os.path.abspath(os.path.expanduser(str(recorded))) == os.path.abspath(assets.default_model_folder()):
        return "default"
    if not os.path.isdir(os.path.expanduser(str(recorded))):
        raise PacaConfigError(f"{adapter} was trained on {recorded}, which is not a model folder on this machine: pass --model "
                              "with that model's local folder.")
    logger.info("Base model: %s (recorded in %s)", recorded, adapter)
    return str(recorded)


def check_recorded_fingerprint(document: dict, model_path: str, given: bool = True) -> None:
    """Refuse a base model whose weights' fingerprint (:func:`paca_core.files.assets.model_fingerprint`) is not the one the
    adapter recorded when it was trained: merging into, or exporting for, another model gives a wrong model silently."""
    from ..files import assets

    recorded = document.get("base_model_fingerprint")
    if not recorded:
        return  # written by save_pretrained without one (a script, or before paca-hal recorded it): the shape checks remain
    found = assets.model_fingerprint(model_path)
    if found is not None and found != recorded:
        where = "--model " + model_path if given else f"the recorded base model {model_path}"
        raise CheckpointError(f"this adapter was trained on {document.get('base_model') or 'another model'} (fingerprint {recorded}), "
                              f"not on {where} (fingerprint {found}): pass --model with the model it was trained on.")


def _load_for_adapter(args, model_path: str):
    from ..files import assets
    from ..model import PacaModel

    model, tokenizer = assets.load_model_and_tokenizer(model_path)
    return PacaModel.from_pretrained(model, args.adapter, device="cpu"), tokenizer


def run_merge(args: argparse.Namespace) -> int:
    from ..files import assets
    from ..files.outputs import check_free_space, publish_directory
    from ..memory.quantization import is_quantized_model, merge_and_dequantize

    target, model_path = _adapter_output(args, "merge")
    needed = assets.weights_bytes(model_path)
    check_free_space(target.path.parent, needed)  # before loading: a merged copy is as large as the base
    paca_model, tokenizer = _load_for_adapter(args, model_path)
    # A 4-bit (QPaCA) base is written dequantized with the delta added: exact, and a plain HF model.
    merged = merge_and_dequantize(paca_model) if is_quantized_model(paca_model) else paca_model.merge_and_unload()
    with publish_directory(target, needed_bytes=needed) as staging:  # a crash or a full disk leaves the old state
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    print(f"Merged model written to {target.path}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from ..files.checkpoint import read_adapter_config, saved_module_methods
    from ..files.export import check_exportable, check_methods_exportable, peft_adapter, write_peft_adapter
    from ..extras import require_peft_paca
    from ..files.outputs import publish_directory

    if args.format == "paca":
        require_peft_paca("export-peft --format paca")  # before the model loads
    document = read_adapter_config(args.adapter)
    check_methods_exportable(saved_module_methods(document), args.format)  # from the config alone, before any weights
    target, model_path = _adapter_output(args, "export-peft")
    paca_model, _ = _load_for_adapter(args, model_path)
    check_exportable(paca_model, args.format)
    tensors, config = peft_adapter(paca_model, args.format)
    with publish_directory(target, needed_bytes=sum(t.numel() * t.element_size() for t in tensors.values())) as staging:
        write_peft_adapter(staging, tensors, config)
    kind = "PaCA (peft >= 0.22)" if args.format == "paca" else "LoRA"
    print(f"PEFT {kind} adapter written to {target.path} (load with peft.PeftModel.from_pretrained)")
    return 0
