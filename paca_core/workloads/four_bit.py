"""Entries on a frozen 4-bit bitsandbytes base, read from the method registry (``Method.four_bit_form``)
and the peers (``Peer.four_bit_form``): ``qpaca`` is paca's, ``peft-qlora`` is peft-lora's.

Apart from :mod:`.specs` because the argument parsers list these names and need only the registry,
not the train flags.
"""
from __future__ import annotations

from ..methods import find_method, registered_methods
from .peers import PEERS, four_bit_peers


def four_bit_methods() -> dict[str, str]:
    """``{entry: method}`` for every registered method with a 4-bit form (``{"qpaca": "paca"}``)."""
    return {method.four_bit_form: method.name for method in registered_methods() if method.four_bit_form}


def four_bit_entries() -> tuple[str, ...]:
    """Entries on a frozen 4-bit bitsandbytes base: our methods' 4-bit forms, then the 4-bit peers."""
    return tuple(four_bit_methods()) + four_bit_peers()


def four_bit_forms() -> dict[str, str]:
    """``{entry: its 4-bit form}`` for every method and peer that has one (``{"paca": "qpaca", "peft-lora": "peft-qlora"}``)."""
    forms = {method.name: method.four_bit_form for method in registered_methods() if method.four_bit_form}
    forms.update({name: peer.four_bit_form for name, peer in PEERS.items() if peer.four_bit_form})
    return forms


def four_bit_form(entry: str) -> str | None:
    """The entry that runs ``entry`` on a 4-bit base (``paca`` -> ``qpaca``, ``peft-lora`` -> ``peft-qlora``), or None."""
    name = entry.strip().lower()
    if name in PEERS:
        return PEERS[name].four_bit_form
    method = find_method(name) if "+" not in name and "@" not in name else None
    return method.four_bit_form if method is not None else None
