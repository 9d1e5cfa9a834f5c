"""What every data module shares: the error type and the label that means "no loss here"."""
from __future__ import annotations

#: Label of a token that contributes no loss (prompts, system and user turns, padding): PyTorch's and HF's ignore index.
IGNORE_INDEX = -100


class DataError(ValueError):
    """The data is missing, empty or malformed; the message names the file and the line, row or column."""
