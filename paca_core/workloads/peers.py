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
    #: The PEFT tuner a ``peft`` peer builds: ``lora`` (``LoraConfig``) or ``paca`` (``PacaConfig``, peft >= 0.22).
    tuner: str = "lora"
    #: PEFT's VeLoRA on the LoRA inputs (it reads our velora method's options: ``velora_groups``, ``velora_init``).
    velora: bool = False
    #: PEFT's LoRA-FA optimizer (A frozen).
    lorafa: bool = False
    #: On a frozen 4-bit bitsandbytes base: slow to set up and needs bitsandbytes, so run only when asked for.
    four_bit: bool = False
    #: The entry that runs this peer on a 4-bit base (``paca plan --quantize``), if there is one.
    four_bit_form: str | None = None
    #: On a 4-bit base: upcast the layers left in 16 bits (norms, embeddings, head) to fp32, as PEFT's
    #: ``prepare_model_for_kbit_training`` does. False keeps them in the model's dtype, as programs that do not
    #: call it run QLoRA (torchtune, LitGPT, LLaMA-Factory): a published row compares against its program's recipe.
    upcast: bool = True


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer("floor", "floor"),
        Peer("full", "full"),
        Peer("peft-lora", "peft", four_bit_form="peft-qlora"),
        Peer("peft-lora+velora", "peft", velora=True),
        Peer("peft-lorafa", "peft", lorafa=True),
        Peer("peft-qlora", "peft", four_bit=True),
        Peer("peft-qlora-16bit", "peft", four_bit=True, upcast=False),
        Peer("peft-paca", "peft", tuner="paca", four_bit_form="peft-qpaca"),
        Peer("peft-qpaca", "peft", tuner="paca", four_bit=True, upcast=False),
    )
}


def everyday_peers() -> tuple[str, ...]:
    """Peers that run by default (every one not on a 4-bit base), in listing order."""
    return tuple(name for name, peer in PEERS.items() if not peer.four_bit)


def default_peers() -> tuple[str, ...]:
    """The everyday peers ``paca bench`` runs without ``--methods``: not PEFT's PaCA, which needs peft >= 0.22
    (a default run must not depend on the installed peft's release; list ``peft-paca`` to compare with it)."""
    return tuple(name for name in everyday_peers() if PEERS[name].tuner != "paca")


def needs_peft_paca(name: str) -> bool:
    """Whether the entry ``name`` (levers after ``@`` allowed) is a peer built on PEFT's PaCA."""
    peer = PEERS.get(name.strip().lower().split("@", 1)[0])
    return peer is not None and peer.kind == "peft" and peer.tuner == "paca"


def four_bit_peers() -> tuple[str, ...]:
    """Peers on a 4-bit base (run only when listed)."""
    return tuple(name for name, peer in PEERS.items() if peer.four_bit)
