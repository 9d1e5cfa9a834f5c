"""Resumable training state on disk, in forms that cannot run code when read.

A checkpoint folder is something people share, so reading it must never execute anything from it.
Pickles can (unrestricted ``torch.load`` runs whatever the file asks), and even torch's
restricted loader (``weights_only=True``) has had published bypasses up to torch 2.9
(CVE-2025-32434, fixed in 2.6; CVE-2026-24747, fixed in 2.10) — and we support torch >= 2.4. So:

* the state is written as ``trainer_state.safetensors`` (every tensor: optimizer moments, MEFT's host
  Adam state, the torch and NumPy RNG states) + ``trainer_state.json`` (everything else: counters,
  optimizer hyper-parameters, scheduler state, the Python RNG state as plain ints), read with
  safetensors and ``json`` only, on every torch version;
* ``trainer_state.pt`` from paca-hal 0.1.0 (a ``torch.save`` pickle) is read with
  ``weights_only=True`` on torch >= 2.10, and refused with a :class:`CheckpointError` when that is not
  enough (or on older torch) unless the user says they trust the file (``--trust-checkpoint``,
  ``trust_checkpoint=True``). There is no silent fallback to unrestricted unpickling.
"""
from __future__ import annotations

import json
import logging
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..errors import CheckpointError

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.safetensors"  # the tensors
STATE_JSON = "trainer_state.json"  # the rest, and where each tensor goes
LEGACY_STATE_NAME = "trainer_state.pt"  # paca-hal 0.1.0: one torch.save pickle
STATE_FORMAT = "paca-hal trainer state"
STATE_FORMAT_VERSION = 2  # 1 was the pickle

#: torch.load(weights_only=True) has no published bypass from this version on (CVE-2026-24747 was fixed in 2.10).
SOUND_RESTRICTED_LOADER = (2, 10)

# Tags for what JSON cannot say directly. A JSON object with exactly one key that is a tag is tagged.
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_TAGS = (_TENSOR, _TUPLE, _ITEMS)
_SCALARS = (str, int, float, bool, type(None))


# --- nested state <-> (tensors, JSON) -----------------------------------------------------------------
def encode_state(value: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split nested dicts/lists/tuples into a JSON-able tree and a flat ``{key: tensor}`` map.

    Only plain data is accepted, so what is written can be read back without unpickling anything.
    Tensors are moved to the CPU; one tensor object reached twice is stored once.
    """
    tensors: dict[str, torch.Tensor] = {}
    keys_by_id: dict[int, str] = {}
    storages: set[int] = set()

    def add_tensor(tensor: torch.Tensor, path: str) -> str:
        if id(tensor) in keys_by_id:
            return keys_by_id[id(tensor)]
        key = path or "tensor"
        while key in tensors:
            key += "'"
        data = tensor.detach().to("cpu").contiguous()
        storage = data.untyped_storage().data_ptr()
        if data.numel() and storage in storages:  # safetensors refuses tensors that share memory
            data = data.clone()
        storages.add(data.untyped_storage().data_ptr())
        tensors[key] = data
        keys_by_id[id(tensor)] = key
        return key

    def encode(item: Any, path: str) -> Any:
        if type(item) in (torch.Tensor, torch.nn.Parameter):
            return {_TENSOR: add_tensor(item, path)}
        if type(item) in _SCALARS:
            return item
        if _is_numpy_scalar(item):  # e.g. a metric computed with NumPy: a plain number once written
            return encode(item.item(), path)
        if type(item) is tuple:
            return {_TUPLE: [encode(v, _join(path, i)) for i, v in enumerate(item)]}
        if type(item) is list:
            return [encode(v, _join(path, i)) for i, v in enumerate(item)]
        if isinstance(item, dict) and type(item).__module__ in ("builtins", "collections"):
            plain = all(type(k) is str for k in item) and not (len(item) == 1 and next(iter(item)) in _TAGS)
            if plain:
                return {k: encode(v, _join(path, k)) for k, v in item.items()}
            for k in item:
                if type(k) not in _SCALARS:
                    raise CheckpointError(f"Cannot save training state: {path or 'the state'} has a key of type {type(k).__name__}.")
            return {_ITEMS: [[k, encode(v, _join(path, k))] for k, v in item.items()]}
        raise CheckpointError(
            f"Cannot save training state: {path or 'the state'} is a {type(item).__module__}.{type(item).__qualname__}. "
            "Resumable state may hold tensors, numbers, strings, booleans, None, lists, tuples and dicts only "
            "(so that loading it never runs code); convert it to those first."
        )

    return encode(value, ""), tensors


def _is_numpy_scalar(item: Any) -> bool:
    return type(item).__module__ == "numpy" and getattr(item, "shape", None) == () and hasattr(item, "item")


def _join(path: str, part: Any) -> str:
    return f"{path}.{part}" if path else str(part)


def decode_state(document: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(document, list):
        return [decode_state(v, tensors) for v in document]
    if not isinstance(document, dict):
        return document
    if len(document) == 1 and next(iter(document)) in _TAGS:
        (tag, body), = document.items()
        if tag == _TENSOR:
            if body not in tensors:
                raise CheckpointError(f"The training state refers to tensor {body!r}, which is not in {STATE_NAME}; the checkpoint is corrupt.")
            return tensors[body]
        if tag == _TUPLE:
            return tuple(decode_state(v, tensors) for v in body)
        return {k: decode_state(v, tensors) for k, v in body}
    return {k: decode_state(v, tensors) for k, v in document.items()}


# --- writing and reading a checkpoint's training state --------------------------------------------------
def write_training_state(directory: Path, state: dict[str, Any], summary: dict[str, Any] | None = None) -> None:
    """Write ``state`` as :data:`STATE_NAME` + :data:`STATE_JSON` into ``directory`` (callers make it atomic).

    ``summary``: small top-level fields for people and scripts (e.g. ``step``), beside the full state.
    """
    document, tensors = encode_state(state)
    directory = Path(directory)
    save_file(tensors, str(directory / STATE_NAME), metadata={"format": STATE_FORMAT, "format_version": str(STATE_FORMAT_VERSION)})
    header = {"format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION, "library_version": __version__}
    (directory / STATE_JSON).write_text(json.dumps({**header, **(summary or {}), "state": document}))


def trust_hint_for(directory: Path) -> str:
    """How a user vouches for the checkpoint in ``directory``: the CLI flag and the Python keyword."""
    return f"`paca train --resume {directory} --trust-checkpoint` (Python: `Trainer.resume_from(..., trust_checkpoint=True)`)"


def has_training_state(directory: Path) -> bool:
    """Whether ``directory`` holds resumable state, in the current or the 0.1.0 format."""
    directory = Path(directory)
    return (directory / STATE_NAME).is_file() or (directory / LEGACY_STATE_NAME).is_file()


def read_summary(directory: str | Path) -> dict[str, Any]:
    """The small top-level fields of a checkpoint's :data:`STATE_JSON` (step, shape, data, base-model fingerprint),
    without the state itself; empty when the file is absent or unreadable. Reads JSON only."""
    try:
        document = json.loads((Path(directory) / STATE_JSON).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(document, dict):
        return {}
    return {key: value for key, value in document.items() if key != "state"}


def recorded_shape(directory: str | Path) -> dict[str, int] | None:
    """``{"seq_len", "batch_size"}`` a checkpoint was trained at (its :data:`STATE_JSON` summary), so a resumed
    ``--seq-len auto`` run keeps the shape its data position counts in; None when the checkpoint does not say
    (written before paca-hal recorded it, or a 0.1.0 pickle). Reads JSON only."""
    try:
        document = json.loads((Path(directory) / STATE_JSON).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    shape = {key: document.get(key) for key in ("seq_len", "batch_size")}
    return shape if all(isinstance(v, int) and v > 0 for v in shape.values()) else None


def read_training_state(directory: str | Path, trust_checkpoint: bool = False, trust_hint: str | None = None) -> dict[str, Any]:
    """The state :func:`write_training_state` wrote, or a 0.1.0 ``trainer_state.pt`` read as safely as it can be.

    ``trust_checkpoint``: the user vouches for the folder, so a 0.1.0 pickle that the restricted loader
    cannot read may be unpickled in full. ``trust_hint``: how to say that, for the error message.
    """
    directory = Path(directory)
    if (directory / STATE_NAME).is_file():
        return _read_current(directory)
    legacy = directory / LEGACY_STATE_NAME
    if legacy.is_file():
        hint = trust_hint or trust_hint_for(directory)
        state = read_legacy_pickle(legacy, trust_checkpoint, hint)
        if not isinstance(state, dict):
            raise CheckpointError(f"{legacy} holds a {type(state).__name__}, not a training state; the checkpoint is corrupt.")
        return state
    raise CheckpointError(f"{directory} has no {STATE_NAME} (or {LEGACY_STATE_NAME}): it is not a resumable checkpoint.")


def _read_current(directory: Path) -> dict[str, Any]:
    try:
        tensors = load_file(str(directory / STATE_NAME), device="cpu")
        document = json.loads((directory / STATE_JSON).read_text())
    except (OSError, SafetensorError, ValueError, RecursionError) as error:  # missing, truncated or foreign files
        raise CheckpointError(f"The training state in {directory} cannot be read ({error}); the checkpoint is corrupt.") from None
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{directory / STATE_JSON} is not a paca-hal training state; the checkpoint is corrupt.")
    if document.get("format_version") != STATE_FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} holds training state format {document.get('format_version')!r}; this paca-hal "
            f"({__version__}) reads format {STATE_FORMAT_VERSION}. Resume it with the paca-hal version that wrote it."
        )
    try:
        state = decode_state(document.get("state"), tensors)
    except (TypeError, ValueError, RecursionError) as error:  # a malformed tag
        raise CheckpointError(f"{directory / STATE_JSON} is malformed ({error}); the checkpoint is corrupt.") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{directory / STATE_JSON} has no training state; the checkpoint is corrupt.")
    return state


# --- paca-hal 0.1.0 pickles -------------------------------------------------------------------------------
def restricted_loader_is_sound() -> bool:
    """Whether this torch's ``weights_only=True`` loader has no published bypass (torch >= 2.10)."""
    from torch.torch_version import TorchVersion

    return TorchVersion(torch.__version__) >= SOUND_RESTRICTED_LOADER


def read_legacy_pickle(path: Path, trusted: bool, trust_hint: str) -> Any:
    """A ``torch.save`` file from paca-hal 0.1.0: restricted loading, or full unpickling only when ``trusted``.

    ``trust_hint`` says how the user vouches for the file (the CLI flag or the Python keyword), in backticks.
    """
    if not zipfile.is_zipfile(path):  # every torch.save since torch 1.6 is a zip archive
        raise CheckpointError(f"{path} is not a torch checkpoint archive (truncated or foreign file); the checkpoint is corrupt.")
    if trusted:
        logger.warning("Unpickling %s without restrictions because the checkpoint was marked as trusted.", path)
        return _torch_load(path, restricted=False)
    if not restricted_loader_is_sound():
        raise CheckpointError(
            f"{path} is in paca-hal 0.1.0's pickle format, and this torch ({torch.__version__}) has published ways to run "
            "code through torch.load(weights_only=True) (CVE-2025-32434, CVE-2026-24747; fixed in torch 2.10), so it is not "
            f"loaded unless you trust who made it. If you do, resume with {trust_hint}; or resume it once under "
            "torch >= 2.10, which rewrites it as safetensors + JSON."
        )
    try:
        return _torch_load(path, restricted=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} is an old-format (paca-hal 0.1.0) checkpoint that cannot be read safely: it needs unrestricted "
            f"unpickling, which can run arbitrary code ({reason}). It was refused. Only if you trust who made it, "
            f"resume with {trust_hint}."
        ) from None
    except Exception as error:  # noqa: BLE001 - truncated archive, bad storage: report as corruption
        raise CheckpointError(f"{path} cannot be read ({error}); the checkpoint is corrupt.") from None


def _torch_load(path: Path, restricted: bool) -> Any:
    """The one ``torch.load`` of resumable state: restricted unless the user vouched for the file."""
    return torch.load(path, map_location="cpu", weights_only=restricted)


# --- RNG states as plain data ------------------------------------------------------------------------------
def python_rng_state() -> dict[str, Any]:
    """``random.getstate()`` as plain ints (it is a tuple holding a tuple: not JSON)."""
    version, internal, gauss_next = random.getstate()
    return {"version": version, "internal": list(internal), "gauss_next": gauss_next}


def restore_python_rng(saved: Any) -> None:
    """Set Python's RNG from :func:`python_rng_state` (or 0.1.0's raw ``random.getstate()`` tuple)."""
    try:
        if isinstance(saved, dict):
            saved = (saved["version"], saved["internal"], saved["gauss_next"])
        version, internal, gauss_next = saved
        if not all(type(v) is int for v in internal):
            raise TypeError("the internal state must be ints")
        random.setstate((int(version), tuple(internal), None if gauss_next is None else float(gauss_next)))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"The saved Python RNG state is invalid ({error}); the checkpoint is corrupt.") from None


def numpy_rng_state() -> dict[str, Any] | None:
    """NumPy's global RNG state as plain data and a tensor, or None without NumPy."""
    try:
        import numpy as np
    except ImportError:
        return None
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "kind": str(kind),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def restore_numpy_rng(saved: dict[str, Any] | None) -> None:
    """Set NumPy's global RNG from :func:`numpy_rng_state` (nothing to do if it was not saved)."""
    if saved is None:
        return
    try:
        import numpy as np
    except ImportError:
        logger.warning("The checkpoint holds a NumPy RNG state but NumPy is not installed; it is not restored.")
        return
    try:
        keys = np.asarray(saved["keys"].numpy(), dtype=np.uint32)
        np.random.set_state((saved["kind"], keys, int(saved["position"]), int(saved["has_gauss"]), float(saved["cached_gaussian"])))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"The saved NumPy RNG state is invalid ({error}); the checkpoint is corrupt.") from None


# --- MEFT's host optimizer state as one safetensors file (Hugging Face Trainer checkpoints) -----------------
HOST_STATE_SEPARATOR = "/"  # module names and state keys use dots, never slashes


def write_host_state(path: Path, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """``{layer: {key: tensor}}`` as one safetensors file, written atomically."""
    from ..files.atomic import atomic_file

    tensors = {}
    for layer, entries in state.items():
        for key, tensor in entries.items():
            if HOST_STATE_SEPARATOR in layer or HOST_STATE_SEPARATOR in key:
                raise CheckpointError(f"Cannot save host optimizer state: {layer!r}/{key!r} contains {HOST_STATE_SEPARATOR!r}.")
            tensors[f"{layer}{HOST_STATE_SEPARATOR}{key}"] = tensor.detach().to("cpu").contiguous()
    with atomic_file(path) as staging:
        save_file(tensors, str(staging), metadata={"format": "paca-hal host optimizer state"})


def read_host_state(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Inverse of :func:`write_host_state` (safetensors only: nothing in the file can run)."""
    try:
        tensors = load_file(str(path), device="cpu")
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}); the checkpoint is corrupt.") from None
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        layer, separator, key = name.rpartition(HOST_STATE_SEPARATOR)
        if not separator:
            raise CheckpointError(f"{path} has an unexpected entry {name!r}; the checkpoint is corrupt.")
        state.setdefault(layer, {})[key] = tensor
    return state


def check_host_state(state: Any, path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``state`` if it has the ``{layer: {key: tensor}}`` shape host optimizer state has; else CheckpointError."""
    valid = isinstance(state, dict) and all(
        isinstance(layer, str) and isinstance(entries, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in entries.items())
        for layer, entries in state.items()
    )
    if not valid:
        raise CheckpointError(f"{path} is not host optimizer state ({{layer: {{name: tensor}}}}); the checkpoint is corrupt.")
    return state
