"""The baselines our methods are compared with: the frozen floor, full fine-tuning and Hugging Face PEFT.

A peer is named here; which ``paca train`` method it stands for is declared by that method
(``Method.bench_peers``), so a peer with no registered method behind it cannot be run. Torch-free:
the ``paca bench`` parser lists these names.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    """One baseline. ``kind``: ``floor`` (nothing trains), ``full`` (every weight trains) or ``peft``."""

    name: str
    kind: str
    #: PEFT's VeLoRA on the LoRA inputs (it reads our velora method's options: ``velora_groups``, ``velora_init``).
    velora: bool = False
    #: PEFT's LoRA-FA optimizer (A frozen).
    lorafa: bool = False
    #: On a frozen 4-bit bitsandbytes base: slow to set up and needs bitsandbytes, so run only when asked for.
    four_bit: bool = False
    #: The entry that runs this peer on a 4-bit base (``paca plan --quantize``), if there is one.
    four_bit_form: str | None = None


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer("floor", "floor"),
        Peer("full", "full"),
        Peer("peft-lora", "peft", four_bit_form="peft-qlora"),
        Peer("peft-lora+velora", "peft", velora=True),
        Peer("peft-lorafa", "peft", lorafa=True),
        Peer("peft-qlora", "peft", four_bit=True),
    )
}


def everyday_peers() -> tuple[str, ...]:
    """Peers that run by default (every one not on a 4-bit base), in listing order."""
    return tuple(name for name, peer in PEERS.items() if not peer.four_bit)


def four_bit_peers() -> tuple[str, ...]:
    """Peers on a 4-bit base (run only when listed)."""
    return tuple(name for name, peer in PEERS.items() if peer.four_bit)
