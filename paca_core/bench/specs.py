"""What a ``paca bench --methods`` entry means.

Our own methods use exactly the strings ``paca train --method`` accepts (parsed by the train
parser and :func:`paca_core.cli.build_configs`, so a method added there is benchmarkable at once).
Peers are the baselines users would otherwise pick: the frozen-backbone floor, full fine-tuning,
and Hugging Face PEFT's LoRA, LoRA + VeLoRA and LoRA-FA; ``qpaca`` and ``peft-qlora`` put the
same methods on a 4-bit NF4 base (bitsandbytes) and run only when asked for.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..errors import PacaConfigError

#: Peers: frozen floor (nothing trainable, backward to the input), full fine-tuning, HF PEFT variants.
PEER_METHODS = ("floor", "full", "peft-lora", "peft-lora+velora", "peft-lorafa")
#: 4-bit entries; slow to set up and need bitsandbytes, so only run when listed in --methods.
OPTIONAL_METHODS = ("qpaca", "peft-qlora")
#: What ``paca bench`` measures when --methods is not given.
DEFAULT_METHODS = PEER_METHODS + ("lora", "lorafa", "velora", "paca", "paca+full+velora", "meft")

#: Methods whose trainable state is r·out per adapted layer (LoRA trains r·(in + out)): with
#: --match-params they get FACTOR × r so their trainable parameters are close to LoRA's at r.
HALF_STATE_PRIMARIES = ("paca", "lorafa")
#: Modules trained in full by '+full' methods unless --full-modules says otherwise.
DEFAULT_FULL_MODULES = "down_proj"
MATCH_FACTOR = 2
#: The ``paca train`` method each peer corresponds to (for its default learning rate).
PEER_EQUIVALENT = {
    "full": "full",
    "peft-lora": "lora",
    "peft-lora+velora": "lora",
    "peft-lorafa": "lorafa",
    "qpaca": "paca",
    "peft-qlora": "lora",
}


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

    def rank(self, lora_rank: int, match_params: bool) -> int | None:
        """The rank this method runs at when LoRA runs at ``lora_rank``."""
        if not self.uses_rank:
            return None
        return lora_rank * (self.match_factor if match_params else 1)

    def default_lr(self) -> float:
        from ..cli import DEFAULT_LR, _primary_method

        if self.kind == "floor":
            return 0.0
        parts = self.equivalent.split("+")
        return DEFAULT_LR[_primary_method(["lora", "velora"] if parts == ["velora"] else parts)]


def parse_method_spec(text: str) -> MethodSpec:
    """A :class:`MethodSpec` for a --methods entry (peer name or a ``paca train --method`` string)."""
    name = text.strip().lower()
    if name == "floor":
        return MethodSpec(name, "floor", "floor", uses_rank=False, match_factor=1)
    if name == "full":
        return MethodSpec(name, "full", "full", uses_rank=False, match_factor=1)
    if name in ("peft-lora", "peft-lora+velora", "peft-qlora"):
        kind = "quantized" if name == "peft-qlora" else "peft"
        return MethodSpec(name, kind, PEER_EQUIVALENT[name], uses_rank=True, match_factor=1)
    if name == "peft-lorafa":
        return MethodSpec(name, "peft", "lorafa", uses_rank=True, match_factor=MATCH_FACTOR)
    if name == "qpaca":
        return MethodSpec(name, "quantized", "paca", uses_rank=True, match_factor=MATCH_FACTOR)
    from ..cli import _primary_method

    configs = build_our_configs(name, rank=8)  # validates the string exactly as `paca train` does
    parts = [c.method for c in configs]
    primary = _primary_method(parts)
    return MethodSpec(
        name,
        "ours",
        name,
        uses_rank=primary not in ("meft", "full"),
        match_factor=MATCH_FACTOR if primary in HALF_STATE_PRIMARIES else 1,
    )


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
    from ..cli import build_parser

    argv = ["train", "--method", method, "--rank", str(rank)]
    for key, value in (options or {}).items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return build_parser().parse_args(argv)


def build_our_configs(method: str, rank: int, options: dict | None = None) -> list:
    """Method configs for a ``paca train --method`` string, through the train CLI's own parser."""
    from ..cli import build_configs

    options = dict(options or {})
    parts = method.split("+")
    if "full" not in parts:
        options.pop("full_modules", None)  # --full-modules belongs only to '+full' methods
    elif not options.get("full_modules"):
        options["full_modules"] = DEFAULT_FULL_MODULES
    return build_configs(train_namespace(method, rank, options))
