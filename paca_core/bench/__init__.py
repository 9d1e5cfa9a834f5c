"""``paca bench``: every method on the same model, shapes and device, one fresh process per method.
May import plan, workloads and everything below them; never doctor or cli.

Modules, one job each: :mod:`.command` (the subcommand's flags; cheap to import), :mod:`.run` (running
it: jobs, worker processes, the report), :mod:`.worker` (the subprocess that measures one entry),
:mod:`.search` (largest sequence length or batch under a memory budget), :mod:`.max_context` (the
longest sequence under a budget, planned then measured), :mod:`.report` (JSON, markdown and PNG
plots) and :mod:`.defaults` (what runs without ``--methods``). What an entry means and how its model
is set up are shared with ``paca plan`` and live in :mod:`paca_core.workloads`; bench may use the
planner, the planner never uses bench. The learning-rate sweep (:mod:`.lr_sweep`, :mod:`.lr_rule`,
:mod:`.lr_sweep_report`) reuses the worker's fine-tuning loop.
"""
