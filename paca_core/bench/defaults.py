"""What ``paca bench`` compares when ``--methods`` is not given (torch-free: the parser's help shows it)."""
from __future__ import annotations

from ..workloads.peers import default_peers

#: Speed and accuracy modes: every peer that runs without extras (PEFT's PaCA only when listed: peft >= 0.22), then our methods.
DEFAULT_METHODS = default_peers() + ("lora", "lorafa", "velora", "paca", "paca+full+velora", "meft")
#: ``--mode max-context``: PEFT LoRA as it comes, with HF gradient checkpointing and with a chunked
#: loss; PaCA as paca train runs it, and with every lever.
DEFAULT_ENTRIES = "peft-lora,peft-lora@gc,peft-lora@chunked-loss,paca,paca@all"
