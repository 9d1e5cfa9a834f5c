"""What lowers a training step's peak: the chunked LM-head loss, activation offload, 4-bit bases (bitsandbytes and its
fake stand-in for planning), and measuring saved bytes.

May import backends, devices, errors, base_config and layers; not train, cli, plan or bench.
"""
