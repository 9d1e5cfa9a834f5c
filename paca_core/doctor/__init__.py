"""``paca doctor``: prove a machine's accelerator path in one command.
May import bench, workloads, files, flags and below (and ``backends``/``devices``); not cli.

:mod:`.command` (flags, torch-free), :mod:`.run` (the stages, their budgets and the deadline, proof.json and
proof.md written after every stage), :mod:`.stages` (what each stage does), :mod:`.worker` (one bench job in its
own process, with the allocator's reserved peak), :mod:`.report` (proof.md) and :mod:`.schema` (proof.json's
shape and its check).
"""
