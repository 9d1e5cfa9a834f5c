"""What reads and writes a user's files: the output policy (new, empty or our own earlier output), atomic staging, the
default model and data assets, adapter checkpoints, and PEFT adapters (export as LoRA or PaCA, PEFT PaCA import).

May import errors, extras, surgery, distributed, methods and layers; not train, cli, plan or bench.
"""
