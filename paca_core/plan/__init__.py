"""Planning what fits and how fast on accelerators, by tracing a real training step on fake tensors."""
