"""``python -m paca_core``: the ``paca`` command, for launchers that take a module (torchrun, deepspeed, accelerate)."""
from .cli.dispatch import main

raise SystemExit(main())
