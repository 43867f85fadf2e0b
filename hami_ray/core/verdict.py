"""Why a node cannot hold a request: typed reasons, and their aggregation into kube-scheduler-style text.

Not fitting is a result, not an exception, until the scheduler has looked at every node; then
:func:`unschedulable` turns the counts into :class:`Unschedulable`
("0/1213 nodes are available: 800 insufficient device memory, 413 device type mismatch").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from enum import StrEnum

from hami_ray.core.errors import Unschedulable


class Reason(StrEnum):
    """One reason per failing node: the first check, in this order, that no device passes."""

    NODE_GONE = "node not ready"
    VENDOR_MISMATCH = "no device of the requested vendor"
    TYPE_MISMATCH = "device type mismatch"
    ISOLATION_BELOW = "isolation below the requested grade"
    UUID_MISMATCH = "device uuid mismatch"
    UNHEALTHY = "unhealthy devices"
    INSUFFICIENT_CPU = "insufficient cpu"
    INSUFFICIENT_HOST_MEMORY = "insufficient memory"
    SLICES_EXHAUSTED = "device split count exhausted"
    EXCLUSIVE_CONFLICT = "exclusive device conflict"
    INSUFFICIENT_MEMORY = "insufficient device memory"
    INSUFFICIENT_CORES = "insufficient device cores"
    TOO_FEW_DEVICES = "insufficient device count"
    NUMA_MISMATCH = "no NUMA node with enough devices"


def unschedulable(total_nodes: int, reasons: Iterable[Reason] | Mapping[Reason, int] | Mapping[str, int], *,
                  never: bool = False) -> Unschedulable:
    """Aggregate per-node reasons (one per node, or already counted) into the exception a caller sees."""
    if isinstance(reasons, Mapping):
        counts = {str(r): n for r, n in reasons.items()}
    else:
        counts = dict(Counter(str(r) for r in reasons))
    return Unschedulable(total_nodes, counts, never=never)
