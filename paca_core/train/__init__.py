"""A training run's loop, steps and state: the Trainer, one optimizer step (also through DeepSpeed), resumable state
and the trackers.

May import layers, methods, memory, distributed, files and data; not cli, plan or bench.
"""
