"""``paca bench``: every method on the same model, shapes and device, one fresh process per method.

Modules, one job each: :mod:`.specs` (what a method string means), :mod:`.models` (named synthetic
model shapes and real models), :mod:`.worker` (the subprocess that measures one method),
:mod:`.search` (largest sequence length or batch under a memory budget), :mod:`.report` (JSON,
markdown and PNG plots) and :mod:`.command` (the CLI subcommand that runs it all).
"""
from .specs import DEFAULT_METHODS, OPTIONAL_METHODS, PEER_METHODS, MethodSpec, parse_method_spec

__all__ = ["DEFAULT_METHODS", "OPTIONAL_METHODS", "PEER_METHODS", "MethodSpec", "parse_method_spec"]
