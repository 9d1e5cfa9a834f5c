"""What a ``paca bench --methods`` entry means.

Our own methods use exactly the strings ``paca train --method`` accepts (parsed by the train
flags and :func:`paca_core.train_options.build_configs`, so a registered method is benchmarkable at
once). Ranks, match factors, default learning rates and which method a peer stands for come from
the method registry (``paca_core/methods/``).
Peers are the baselines users would otherwise pick: the frozen-backbone floor, full fine-tuning,
and Hugging Face PEFT's LoRA, LoRA + VeLoRA and LoRA-FA; ``qpaca`` and ``peft-qlora`` put the
same methods on a 4-bit NF4 base (bitsandbytes) and run only when asked for.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..errors import PacaConfigError
from ..methods import learning_rate, parse_combination, primary_method, registered_methods
from ..train_options import build_configs, train_parser

#: Peers: frozen floor (nothing trainable, backward to the input), full fine-tuning, HF PEFT variants.
PEER_METHODS = ("floor", "full", "peft-lora", "peft-lora+velora", "peft-lorafa")
#: 4-bit entries; slow to set up and need bitsandbytes, so only run when listed in --methods.
OPTIONAL_METHODS = ("qpaca", "peft-qlora")
#: Memory levers an entry can add after ``@`` (``paca@gc+offload``): HF gradient checkpointing, the
#: LM head + loss in chunks (our chunked loss; for the peers, the same pure-torch "fused linear cross
#: entropy" around their model), and activation offload of the decoder layers.
LEVERS = ("gc", "chunked-loss", "offload")
#: ``@all``: every lever.
ALL_LEVERS = "all"
#: What ``paca bench`` measures when --methods is not given.
DEFAULT_METHODS = PEER_METHODS + ("lora", "lorafa", "velora", "paca", "paca+full+velora", "meft")

#: Modules trained in full by '+full' methods unless --full-modules says otherwise (the full method's bench default).
DEFAULT_FULL_MODULES = "down_proj"


def peer_equivalents() -> dict[str, str]:
    """The ``paca train`` method each peer stands for (each method declares its ``bench_peers``)."""
    return {peer: method.name for method in registered_methods() for peer in method.bench_peers}


@dataclass(frozen=True)
class MethodSpec:
    """One benchmark entry. ``kind``: floor, full, peft (PEFT LoRA family), ours (a ``paca train``
    method string), or quantized (qpaca / peft-qlora)."""

    name: str
    kind: str
    #: The ``paca train`` method (ours), or the one a peer corresponds to.
    equivalent: str
    #: Whether the method has a rank at all (floor, full and meft do not).
    uses_rank: bool
    #: r multiplier that matches LoRA's trainable parameters (2 for PaCA / LoRA-FA style methods).
    match_factor: int
    #: Memory levers on top of the method (``LEVERS``), in that order; the name carries them after ``@``.
    levers: tuple[str, ...] = ()

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


def _peer_kind(name: str) -> str:
    if name in ("floor", "full"):
        return name
    return "quantized" if name in OPTIONAL_METHODS else "peft"


def parse_levers(text: str) -> tuple[str, ...]:
    """``gc+offload`` → ``("gc", "offload")`` in ``LEVERS`` order; ``all`` → every lever."""
    names = [t.strip() for t in text.lower().split("+") if t.strip()]
    if names == [ALL_LEVERS]:
        return LEVERS
    unknown = [n for n in names if n not in LEVERS]
    if unknown or not names or len(set(names)) != len(names):
        raise PacaConfigError(f"levers {text!r}: write one or more of {', '.join(LEVERS)} joined by '+', or '{ALL_LEVERS}' "
                              "(e.g. paca@gc+offload).")
    return tuple(lever for lever in LEVERS if lever in names)


def parse_method_spec(text: str) -> MethodSpec:
    """A :class:`MethodSpec` for a --methods entry (peer name or a ``paca train --method`` string),
    optionally with levers after ``@`` (``peft-lora@gc``, ``paca@all``)."""
    method, _, lever_text = text.strip().lower().partition("@")
    if not lever_text:
        return _parse_plain_spec(method)
    levers = parse_levers(lever_text)
    plain = _parse_plain_spec(method)
    if plain.kind == "floor" and "chunked-loss" in levers:
        raise PacaConfigError("floor trains nothing through its loss; it takes gc and offload, not chunked-loss.")
    return MethodSpec(f"{plain.name}@{'+'.join(levers)}", plain.kind, plain.equivalent, plain.uses_rank, plain.match_factor, levers)


def _parse_plain_spec(text: str) -> MethodSpec:
    name = text.strip().lower()
    if name == "floor":
        return MethodSpec(name, "floor", "floor", uses_rank=False, match_factor=1)
    equivalents = peer_equivalents()
    if name in equivalents and name in PEER_METHODS + OPTIONAL_METHODS:
        primary = primary_method(parse_combination(equivalents[name]))
        return MethodSpec(name, _peer_kind(name), equivalents[name], uses_rank=primary.uses_rank, match_factor=primary.match_factor)
    build_our_configs(name, rank=8)  # validates the string exactly as `paca train` does
    primary = primary_method(parse_combination(name))
    return MethodSpec(name, "ours", name, uses_rank=primary.uses_rank, match_factor=primary.match_factor)


def required_packages(specs: list[MethodSpec]) -> dict[str, str]:
    """``{module: which entry needs it}`` for the optional packages these entries import."""
    needs: dict[str, str] = {}
    for spec in specs:
        if spec.name.startswith("peft-"):
            needs.setdefault("peft", f"the PEFT peer '{spec.name}'")
        if spec.kind == "quantized":
            needs.setdefault("bitsandbytes", f"the 4-bit entry '{spec.name}'")
    return needs


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
                f"--methods entry {name!r} is not valid ({error}). Peers: {', '.join(PEER_METHODS + OPTIONAL_METHODS)}; "
                "our methods: any `paca train --method` string."
            ) from None
    return specs


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
