"""The ``--loss-chunk-tokens`` setting: its default and its parsing, apart from the chunked loss itself so that
building the ``paca`` argument parser imports no torch (:mod:`paca_core.memory.chunked_loss` re-exports these)."""
from __future__ import annotations

from ..errors import PacaConfigError

#: Tokens per chunk by default: logits of 1024 × 49,152 fp32 = 192 MiB (LLaMA-3: 501 MiB) at a time.
DEFAULT_LOSS_CHUNK_TOKENS = 1024


def check_chunk_tokens(chunk_tokens: int | None) -> int | None:
    """``chunk_tokens`` validated: None means off; a positive int is the chunk size."""
    if chunk_tokens is None:
        return None
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise PacaConfigError(
            f"loss_chunk_tokens must be a positive number of tokens (e.g. {DEFAULT_LOSS_CHUNK_TOKENS}) or None/'off' "
            f"to compute the whole logits at once; got {chunk_tokens!r}."
        )
    return chunk_tokens


def parse_loss_chunk_tokens(text: str) -> int | None:
    """``--loss-chunk-tokens``: a positive integer, or ``off``."""
    if str(text).strip().lower() in ("off", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise PacaConfigError(
            f"--loss-chunk-tokens takes a positive number of tokens (e.g. {DEFAULT_LOSS_CHUNK_TOKENS}) or 'off'; got {text!r}."
        ) from None
    return check_chunk_tokens(value)
