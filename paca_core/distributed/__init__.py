"""Several processes: FSDP2 sharding of adapters and base weights, and DeepSpeed ZeRO's partitioned parameters.

May import devices and errors; layers call into it, never the other way round.
"""
