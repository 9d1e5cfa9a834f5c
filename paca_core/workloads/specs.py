"""What an entry of ``paca bench --methods`` / ``paca plan --methods`` means.

Our methods use exactly the strings ``paca train --method`` accepts (parsed by the train flags and
:func:`paca_core.flags.train_options.build_configs`, so a registered method can be measured and planned at
once). Ranks, match factors, default learning rates, which method a peer stands for
(``Method.bench_peers``) and each method's 4-bit form (``Method.four_bit_form``: ``qpaca`` for paca)
come from the method registry (``paca_core/methods/``, :mod:`.four_bit`); the peers are in :mod:`.peers`.
An entry may add memory levers after ``@`` (:mod:`.levers`).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from .. import extras
from ..errors import PacaConfigError
from ..methods import get_method, learning_rate, parse_combination, primary_method, registered_methods
from ..flags.train_options import build_configs, train_parser
from .four_bit import four_bit_entries, four_bit_methods
from .levers import parse_levers
from .peers import PEERS, everyday_peers, needs_peft_paca


def peer_equivalents() -> dict[str, str]:
    """The ``paca train`` method each peer stands for (each method declares its ``bench_peers``)."""
    return {peer: method.name for method in registered_methods() for peer in method.bench_peers}


@dataclass(frozen=True)
class MethodSpec:
    """One entry. ``kind``: ``floor``, ``full``, ``peft`` (a PEFT LoRA-family peer) or ``ours`` (a
    ``paca train`` method string, or a registered method's 4-bit form)."""

    name: str
    kind: str
    #: The ``paca train`` method string that is set up (ours), or the one a peer stands for.
    equivalent: str
    #: Whether the method has a rank at all (floor, full and meft do not).
    uses_rank: bool
    #: r multiplier that matches LoRA's trainable parameters (2 for PaCA / LoRA-FA style methods).
    match_factor: int
    #: Memory levers on top of the method (``levers.LEVERS``), in that order; the name carries them after ``@``.
    levers: tuple[str, ...] = ()
    #: On a frozen 4-bit bitsandbytes base (``qpaca``, ``peft-qlora``): every linear but the head in 4 bits, as users run them.
    four_bit: bool = False

    @property
    def method(self) -> str:
        """The entry without its levers (``paca@gc`` → ``paca``)."""
        return self.name.split("@", 1)[0]

    def rank(self, lora_rank: int, match_params: bool) -> int | None:
        """The rank this method runs at when LoRA runs at ``lora_rank``."""
        if not self.uses_rank:
            return None
        return lora_rank * (self.match_factor if match_params else 1)

    def default_lr(self, rank: int | None = None) -> float:
        """``paca train``'s lr for the equivalent method at ``rank`` (its default rank when None)."""
        if self.kind == "floor":
            return 0.0
        return learning_rate(primary_method(parse_combination(self.equivalent)), rank)


def parse_method_spec(text: str) -> MethodSpec:
    """A :class:`MethodSpec` for an entry (peer name, 4-bit form or a ``paca train --method`` string),
    optionally with levers after ``@`` (``peft-lora@gc``, ``paca@all``)."""
    method, _, lever_text = text.strip().lower().partition("@")
    if not lever_text:
        return _parse_plain_spec(method)
    levers = parse_levers(lever_text)
    plain = _parse_plain_spec(method)
    if plain.kind == "floor" and "chunked-loss" in levers:
        raise PacaConfigError("floor trains nothing through its loss; it takes gc and offload, not chunked-loss.")
    return dataclasses.replace(plain, name=f"{plain.name}@{'+'.join(levers)}", levers=levers)


def _parse_plain_spec(text: str) -> MethodSpec:
    name = text.strip().lower()
    peer = PEERS.get(name)
    if peer is not None and peer.kind == "floor":
        return MethodSpec(name, "floor", "floor", uses_rank=False, match_factor=1)
    if peer is not None:
        equivalent = peer_equivalents().get(name)
        if equivalent is None:
            raise PacaConfigError(f"the peer {name!r} stands for no registered method (a method names it in bench_peers).")
        primary = primary_method(parse_combination(equivalent))
        return MethodSpec(name, peer.kind, equivalent, primary.uses_rank, primary.match_factor, four_bit=peer.four_bit)
    four_bit = four_bit_methods()
    if name in four_bit:
        method = get_method(four_bit[name])
        return MethodSpec(name, "ours", method.name, method.uses_rank, method.match_factor, four_bit=True)
    build_our_configs(name, rank=8)  # validates the string exactly as `paca train` does
    primary = primary_method(parse_combination(name))
    return MethodSpec(name, "ours", name, uses_rank=primary.uses_rank, match_factor=primary.match_factor)


def required_packages(specs: list[MethodSpec]) -> dict[str, str]:
    """``{module: which entry needs it}`` for the optional packages these entries import."""
    needs: dict[str, str] = {}
    for spec in specs:
        if spec.kind == "peft":
            needs.setdefault("peft", f"the PEFT peer '{spec.name}'")
        if spec.four_bit:
            needs.setdefault("bitsandbytes", f"the 4-bit entry '{spec.name}'")
    return needs


def require_peer_versions(specs: list[MethodSpec]) -> None:
    """Refuse, before any work, a PEFT PaCA peer (``peft-paca``, ``peft-qpaca``) when the installed peft has no
    PaCA (< 0.22): one line naming the version needed (:func:`paca_core.extras.require_peft_paca`)."""
    for spec in specs:
        if needs_peft_paca(spec.name):
            extras.require_peft_paca(spec.method)


def parse_method_list(text: str) -> list[MethodSpec]:
    """Comma-separated --methods into specs (duplicates are an error, so tables stay unambiguous)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise PacaConfigError("--methods is empty; list methods such as floor,peft-lora,paca.")
    if len(set(n.lower() for n in names)) != len(names):
        raise PacaConfigError(f"--methods lists a method twice: {text!r}.")
    specs = []
    for name in names:
        try:
            specs.append(parse_method_spec(name))
        except PacaConfigError as error:
            raise PacaConfigError(
                f"--methods entry {name!r} is not valid.{_suggestion(name)} Peers: {', '.join(everyday_peers() + four_bit_entries())}; "
                f"our methods: any `paca train --method` string ({error})"
            ) from None
    return specs


def _suggestion(name: str) -> str:
    """`` Did you mean 'peft-qlora'?`` for a near miss among the entries (``qlora``, ``lora-fa``), else ''."""
    import difflib

    from ..methods.registry import registered_methods

    candidates = [*everyday_peers(), *four_bit_entries(), *(m.name for m in registered_methods())]
    key = name.strip().lower()
    close = [c for c in candidates if c.endswith("-" + key)] or difflib.get_close_matches(key, candidates, n=2, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def train_namespace(method: str, rank: int, options: dict | None = None) -> argparse.Namespace:
    """The namespace ``paca train --method METHOD --rank RANK [options]`` would give (all its defaults).

    ``options`` maps train flags without dashes (``{"target_modules": "q_proj,v_proj"}``) to values;
    None values are left at the train parser's default.
    """
    argv = ["--method", method, "--rank", str(rank)]
    for key, value in (options or {}).items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return train_parser().parse_args(argv)


def build_our_configs(method: str, rank: int, options: dict | None = None) -> list:
    """Method configs for a ``paca train --method`` string, through the train CLI's own flags.

    Options that belong to a method outside the combination are dropped; a method in it gets its
    ``bench_options`` defaults (``+full``: --full-modules down_proj).
    """
    options = dict(options or {})
    methods = parse_combination(method)
    for other in registered_methods():
        if other.name not in {m.name for m in methods}:
            for key in other.options:
                options.pop(key, None)
    for member in methods:
        for key, value in member.bench_options.items():
            if not options.get(key):
                options[key] = value
    return build_configs(train_namespace(method, rank, options))
