"""Planning what fits and how fast on accelerators, by tracing a real training step on fake tensors.
May import workloads, flags, train, files, layers and memory; never bench, doctor or cli."""
