"""Methods: one module per method, each registering a :class:`Method` with the registry.
May import layers, memory and surgery (and the top-level config modules); not files, train or anything above.

``paca_core/methods/<name>.py`` holds a method's config, layer factory, ``paca train`` flags, default
rank and learning rate, bench match factor, PEFT LoRA export and bench peers. Importing this package
registers the built-in methods; a method defined elsewhere registers with :func:`register_method`
or the ``paca_hal.methods`` entry-point group (see docs/ARCHITECTURE.md, "Adding a method").
"""
from .registry import (
    ENTRY_POINT_GROUP,
    CommonOptions,
    Method,
    RegistryView,
    ScaledAboveDefaultRank,
    default_lr,
    default_rank,
    external_method_modules,
    import_method_modules,
    find_method,
    get_method,
    learning_rate,
    load_entry_points,
    method_help,
    parse_combination,
    primary_method,
    primary_name,
    register_method,
    registered_methods,
    unregister_method,
)

# Built-in methods, in the order listings show them. Each registers itself on import.
from .paca import PaCAConfig  # noqa: E402
from .lora import LoRAConfig, LoRAFAConfig  # noqa: E402
from .full import FullConfig  # noqa: E402
from .velora import VeLoRAConfig  # noqa: E402
from .meft import MEFTConfig  # noqa: E402

__all__ = [
    "ENTRY_POINT_GROUP",
    "CommonOptions",
    "FullConfig",
    "LoRAConfig",
    "LoRAFAConfig",
    "MEFTConfig",
    "Method",
    "PaCAConfig",
    "RegistryView",
    "ScaledAboveDefaultRank",
    "VeLoRAConfig",
    "default_lr",
    "default_rank",
    "external_method_modules",
    "import_method_modules",
    "find_method",
    "get_method",
    "learning_rate",
    "load_entry_points",
    "method_help",
    "parse_combination",
    "primary_method",
    "primary_name",
    "register_method",
    "registered_methods",
    "unregister_method",
]
