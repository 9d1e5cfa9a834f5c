"""Workloads: one method entry set up on one model, ready to take training steps.
May import flags, files, methods, layers, memory and surgery; never plan or bench.

``paca bench`` measures a workload on real tensors and ``paca plan`` traces the same workload on fake
tensors; both build it here, so a plan and a measurement always describe the same step. This package
imports neither of them (``scripts/import_structure.py`` checks it).

Modules, one job each: :mod:`.specs` (what an entry string such as ``paca@gc`` or ``peft-lora`` means),
:mod:`.peers` (the baselines our methods are compared with), :mod:`.four_bit` (entries on a 4-bit
base, from the method registry), :mod:`.levers` (memory levers after ``@``),
:mod:`.models` (synthetic model shapes and real models), :mod:`.prepare` (a model set up for an entry:
what to call, what trains, its optimizer, its levers), :mod:`.accounting` (bytes a prepared entry holds),
:mod:`.byte_sizes` (``8GiB`` -> bytes) and :mod:`.plots` (matplotlib set-up shared by the reports).

Nothing is imported here, so ``import paca_core.workloads.levers`` stays cheap for argument parsers.
"""
