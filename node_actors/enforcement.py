"""Slice usage and the over-quota watch: the arithmetic of enforcement (DESIGN, Isolation 5).

HAMi-core caps allocations inside a process that preloads it; this layer needs no cooperation. From a
backend's per-process sample it computes what each slice uses on each of its devices (the memory held
by the lease's processes, summed, since HAMi-core's limit is per slice and device, summed across
processes: hami.md §3), and tracks for how long a slice has been over its limit plus a tolerance.
:class:`QuotaWatch` only decides; :class:`node_actors.agent.NodeAgent` stops processes and frees leases.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from node_actors.backends.base import DeviceSample, UsageSample

if TYPE_CHECKING:  # duck-typed at run time: the GPU conformance suite passes plain objects, without pydantic
    from hami_ray.core.model import Lease


@dataclass(frozen=True, slots=True)
class SliceUsage:
    """What one lease's processes hold on one of its devices."""

    lease_id: str
    uuid: str
    limit_mib: int
    used_mib: int
    by_pid: tuple[tuple[int, int], ...] = ()  # (pid, MiB), largest first

    @property
    def top_pid(self) -> int | None:
        """The process holding the most memory on the device, or None when none holds any."""
        return self.by_pid[0][0] if self.by_pid else None


@dataclass(frozen=True, slots=True)
class NodeSample:
    """One enforcement sample of a node: devices as the backend saw them, slices as leases use them."""

    devices: tuple[DeviceSample, ...]
    slices: tuple[SliceUsage, ...]

    def slice(self, lease_id: str, uuid: str) -> SliceUsage | None:
        return next((s for s in self.slices if s.lease_id == lease_id and s.uuid == uuid), None)


def slice_usage(leases: Iterable[Lease], sample: UsageSample,
                members: Mapping[str, Iterable[int]] | None = None) -> list[SliceUsage]:
    """Per lease and device: the slice limit and the memory the lease's processes hold there.

    A lease's processes are ``members[lease_id]`` (its workers and all their descendants, in the sample's
    pid numbering) where given, else its registered pids. A lease that holds one device in several slices
    (a pod's containers) gets their sum as its limit.

    Example: a lease with pid 42 and an 8192 MiB grant on ``GPU-0``, and a sample where pid 42 holds
    9000 MiB there, gives ``SliceUsage("l1", "GPU-0", 8192, 9000, ((42, 9000),))``.
    """
    per_device = {d.uuid: sample.per_process(d.uuid) for d in sample.devices}
    for p in sample.processes:
        per_device.setdefault(p.uuid, sample.per_process(p.uuid))
    out = []
    for lease in leases:
        limits: dict[str, int] = {}
        for grant in lease.allocation.devices:
            limits[grant.uuid] = limits.get(grant.uuid, 0) + grant.memory_mib
        for uuid, limit in limits.items():
            held = per_device.get(uuid, {})
            pids = set(lease.pids) if members is None else set(members.get(lease.lease_id, lease.pids))
            mine = sorted(((pid, held[pid]) for pid in pids if pid in held), key=lambda x: (-x[1], x[0]))
            out.append(SliceUsage(lease.lease_id, uuid, limit, sum(m for _, m in mine), tuple(mine)))
    return out


class QuotaWatch:
    """Remembers since when each (lease, device) has been over its limit + tolerance.

    Args:
        tolerance_mib: MiB over the limit that still count as within it.
        grace_s: a slice must stay over for longer than this before it is due.
    """

    def __init__(self, tolerance_mib: int, grace_s: float) -> None:
        self.tolerance_mib = tolerance_mib
        self.grace_s = grace_s
        self._over_since: dict[tuple[str, str], float] = {}

    def over(self, usage: SliceUsage) -> bool:
        return usage.used_mib > usage.limit_mib + self.tolerance_mib

    def due(self, usages: Iterable[SliceUsage], now: float) -> list[SliceUsage]:
        """Slices that have been over for longer than the grace period at ``now``.

        A slice seen under its limit, or not seen at all, starts over: the grace period counts one
        continuous stretch.
        """
        still: dict[tuple[str, str], float] = {}
        out = []
        for usage in usages:
            if not self.over(usage):
                continue
            key = (usage.lease_id, usage.uuid)
            since = self._over_since.get(key, now)
            still[key] = since
            if now - since > self.grace_s:
                out.append(usage)
        self._over_since = still
        return out

    def forget(self, lease_id: str) -> None:
        """Drop a lease's history (it was freed)."""
        self._over_since = {k: v for k, v in self._over_since.items() if k[0] != lease_id}
