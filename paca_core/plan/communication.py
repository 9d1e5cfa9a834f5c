"""Communication of one training step over ``--world-size`` ranks: bytes, seconds and what is left exposed.

What each layout sends (per step, per rank; S is a collective's payload, N the ranks):

* **DDP** (N replicas): every trainable gradient is all-reduced, in DDP's 25 MiB buckets.
* **FSDP2 and ZeRO-3** (weights sharded): each unit's (a decoder layer, plus the rest of the model as the root)
  weights are all-gathered in forward and again in backward (``reshard_after_forward``, DeepSpeed's default
  alike), and its gradients reduce-scattered in backward.
* **ZeRO-1 and ZeRO-2**: gradients reduce-scattered after backward, then the updated trainable parameters
  all-gathered after the optimizer step (DeepSpeed's 5e8-element buckets).

Cost of one collective, a ring over the links of :attr:`devices.profiles.DeviceProfile.interconnect`: an
all-reduce moves ``2 (N-1)/N x S`` per rank, an all-gather or reduce-scatter ``(N-1)/N x S``, at the link's
bandwidth times its achieved share (``bus_efficiency``), plus a latency per collective. Within a node (N at most
``devices_per_node``) that link is the intra-node one (NVLink/NVSwitch, Gaudi's scale-up RoCE ports). Beyond, ranks
fill nodes of ``devices_per_node`` and the collective is hierarchical, as NCCL and HCCL run it: the ring inside the
node, and across nodes only each device's 1/``devices_per_node`` share on its own inter-node port; the two stages
pipeline, so the slower one counts, plus the inter-node latency.

Overlap rule (stated, simple): DDP's bucketed all-reduce runs during backward, except the last bucket, which
starts when backward ends: exposed = max(last bucket, all-reduce time - backward compute). FSDP2/ZeRO-3 prefetch
the next unit's all-gather during the current unit's compute: exposed = max(first unit's all-gather, forward
all-gathers - forward compute) + max(last unit's reduce-scatter, backward all-gathers + reduce-scatters - backward
compute). ZeRO-1/2 as paca train configures them (DeepSpeed's ``overlap_comm`` defaults to false below stage 3)
overlap nothing: all of it is exposed. With the optimizer state sharded (ZeRO, FSDP2), each rank's optimizer
kernels move 1/N of the bytes: their roofline time is divided by N (their launches are not).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

#: torch DDP's default gradient bucket (``bucket_cap_mb=25``).
DDP_BUCKET_BYTES = 25 * 2**20
#: DeepSpeed ZeRO-1/2's default ``reduce_bucket_size`` and ``allgather_bucket_size``, in elements.
ZERO_BUCKET_ELEMENTS = 500_000_000
#: Ring traffic per rank of each collective, as a multiple of its payload, over ``n`` ranks.
RING_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
               "reduce_scatter": lambda n: (n - 1) / n}
OVERLAP_RULE = {
    "ddp": "bucketed all-reduce overlaps backward; the last bucket is exposed",
    "weights_sharded": "all-gathers prefetched under forward/backward compute, reduce-scatters under backward; the first "
                       "all-gather and last reduce-scatter exposed",
    "zero12": "nothing overlapped (DeepSpeed's overlap_comm is off below stage 3)",
}


@dataclass(frozen=True)
class Collective:
    """``calls`` collectives of one kind, each of ``payload`` bytes (the tensor all ranks hold when it is done)."""

    kind: str
    payload: float
    calls: int
    what: str


def layout_kind(settings) -> str | None:
    """Which communication pattern :class:`~.planner.PlanSettings` names (None: one process)."""
    if settings.world_size <= 1:
        return None
    if settings.fsdp or settings.zero == 3:
        return "weights_sharded"
    if settings.zero in (1, 2):
        return "zero12"
    return "ddp"


def _buckets(total: float, bucket: float, kind: str, what: str) -> list[Collective]:
    if total <= 0:
        return []
    full, rest = divmod(total, bucket)
    out = [Collective(kind, bucket, int(full), what)] if full else []
    return out + ([Collective(kind, rest, 1, what)] if rest else [])


def collectives(settings, gradient_bytes: int, weight_bytes: int, layer_weight_bytes: int, layers: int,
                trainable_params: int) -> dict[str, list[Collective]]:
    """The step's collectives, grouped by the compute they may overlap ("forward", "backward", "after": none)."""
    kind = layout_kind(settings)
    if kind is None:
        return {}
    if kind == "ddp":
        return {"backward": _buckets(gradient_bytes, DDP_BUCKET_BYTES, "all_reduce", "trainable gradients")}
    if kind == "zero12":
        element = gradient_bytes / trainable_params if trainable_params else 2.0
        bucket = ZERO_BUCKET_ELEMENTS * element
        return {"after": _buckets(gradient_bytes, bucket, "reduce_scatter", "trainable gradients")
                + _buckets(gradient_bytes, bucket, "all_gather", "updated trainable parameters")}
    # Weights sharded: one unit per decoder layer plus the root (embeddings, final norm, head). Gradients are
    # split in proportion to the units' weights.
    root = max(0, weight_bytes - layers * layer_weight_bytes)
    units = [(layer_weight_bytes, layers)] + ([(root, 1)] if root else [])
    share = (lambda w: gradient_bytes * w / weight_bytes) if weight_bytes else (lambda w: 0.0)
    gathers = [Collective("all_gather", w, n, "sharded weights") for w, n in units if w]
    scatters = [Collective("reduce_scatter", share(w), n, "gradients") for w, n in units if share(w)]
    return {"forward": gathers, "backward": gathers + scatters}


def collective_seconds(kind: str, payload: float, world_size: int, interconnect) -> float:
    """One collective of ``payload`` bytes over ``world_size`` ranks on the profile's links (module docstring)."""
    if world_size <= 1 or payload <= 0:
        return 0.0
    factor = RING_FACTOR[kind]
    efficiency = interconnect["bus_efficiency"]
    per_node = int(min(world_size, interconnect["devices_per_node"]))
    nodes = math.ceil(world_size / interconnect["devices_per_node"])
    intra = factor(per_node) * payload / (interconnect["intra_node_bandwidth"] * efficiency) if per_node > 1 else 0.0
    if nodes <= 1:
        return intra + interconnect["intra_node_latency_s"]
    inter = factor(nodes) * (payload / per_node) / (interconnect["inter_node_bandwidth"] * efficiency)
    return max(intra, inter) + interconnect["inter_node_latency_s"]


def per_rank_bytes(groups: dict[str, list[Collective]], world_size: int) -> float:
    """Bytes each rank sends in the step (ring traffic: 2(N-1)/N of an all-reduce's payload, (N-1)/N otherwise)."""
    return sum(RING_FACTOR[c.kind](world_size) * c.payload * c.calls for group in groups.values() for c in group)


def step_communication(settings, profile, timing: dict, gradient_bytes: int, weight_bytes: int, layer_weight_bytes: int,
                       layers: int, trainable_params: int) -> dict:
    """Per-rank step time with communication: ``timing`` is the traced step's (:func:`.estimate.estimate_time`,
    extended to full depth: ``step_seconds``, ``phase_seconds``, ``phase_kernels``). Returns the plan.json fields:
    ``step_seconds`` (compute, with the rank's share of a sharded optimizer, plus exposed communication) and
    ``communication`` (bytes per rank, seconds, exposed seconds, collectives, links, overlap rule), or None for
    ``communication`` on one process."""
    kind = layout_kind(settings)
    n = settings.world_size
    compute = timing["step_seconds"]
    phases, kernels = timing.get("phase_seconds", {}), timing.get("phase_kernels", {})
    if kind is None:
        return {"step_seconds": compute, "compute_seconds_per_rank": compute, "communication": None}
    # Sharded optimizer state: each rank updates 1/N of it (its launches stay whole).
    sharded = ["optimizer"] + (["column_write"] if kind == "weights_sharded" else []) if kind != "ddp" else []
    for phase in sharded:
        launches = kernels.get(phase, 0) * profile.launch_overhead_s
        compute -= (phases.get(phase, 0.0) - launches) * (1 - 1 / n)
    groups = collectives(settings, gradient_bytes, weight_bytes, layer_weight_bytes, layers, trainable_params)
    sent = per_rank_bytes(groups, n)
    if not profile.interconnect:
        return {"step_seconds": compute, "compute_seconds_per_rank": compute,
                "communication": {"bytes_per_rank": sent, "seconds": None, "exposed_seconds": None,
                                  "note": f"profile {profile.name} has no interconnect figures: communication time not modelled"}}
    links = profile.interconnect

    def seconds(group: list[Collective]) -> float:
        return sum(c.calls * collective_seconds(c.kind, c.payload, n, links) for c in group)

    def one(c: Collective | None) -> float:
        return collective_seconds(c.kind, c.payload, n, links) if c else 0.0

    total = sum(seconds(group) for group in groups.values())
    forward, backward = phases.get("forward", 0.0), phases.get("backward", 0.0)
    if kind == "ddp":
        bucket = groups["backward"][-1] if groups["backward"] else None
        exposed = max(one(bucket), total - backward) if bucket else 0.0
    elif kind == "zero12":
        exposed = total
    else:
        gathers = groups["forward"]
        first_gather = one(gathers[-1] if len(gathers) > 1 else (gathers[0] if gathers else None))  # the root unit runs first
        scatters = [c for c in groups["backward"] if c.kind == "reduce_scatter"]
        last_scatter = one(scatters[-1] if scatters else None)
        exposed = (max(first_gather, seconds(gathers) - forward)
                   + max(last_scatter, seconds(groups["backward"]) - backward))
    nodes = math.ceil(n / links["devices_per_node"])
    return {
        "step_seconds": compute + exposed,
        "compute_seconds_per_rank": compute,
        "communication": {
            "bytes_per_rank": sent,
            "seconds": total,
            "exposed_seconds": exposed,
            "nodes": nodes,
            "link": "intra-node" if nodes == 1 else "intra-node, then inter-node (hierarchical)",
            "overlap_rule": OVERLAP_RULE[kind],
            "collectives": [dict(asdict(c), overlaps=phase) for phase, group in groups.items() for c in group],
        },
    }


__all__ = ["Collective", "DDP_BUCKET_BYTES", "OVERLAP_RULE", "collective_seconds", "collectives", "layout_kind",
           "per_rank_bytes", "step_communication"]
