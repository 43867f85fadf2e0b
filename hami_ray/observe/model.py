"""What operators see: the cluster's status as one plain model, built from the ledger's snapshot, the
node actors' usage samples, the queue and FGD's fragmentation; rendered by :mod:`hami_ray.observe.view`,
exported by :mod:`hami_ray.observe.metrics`, printed by ``hami-ray status --json``.

Pure data and arithmetic (no Ray): the placement actor hands over the inputs as plain dicts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from hami_ray.core.grades import Isolation, strongest, weakest
from hami_ray.core.model import ClusterSnapshot, Lease


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SliceStatus(_Model):
    """One lease's part of one device: its owner, limits and what its processes use there."""

    lease_id: str
    owner: str
    state: str
    memory_mib: int
    cores: int
    memory_used_mib: int | None = None  # None: not sampled (yet)
    pids: tuple[int, ...] = ()
    isolation: str = Isolation.NONE.value  # the grade the slice holds (its weakest device's)
    note: str | None = None  # what changed under its isolation (the MPS daemon restarted)


class DeviceStatus(_Model):
    uuid: str
    index: int
    model: str
    vendor: str
    healthy: bool
    memory_mib: int  # capacity (after the node's memory scaling)
    memory_allocated_mib: int
    memory_used_mib: int | None  # what the device reports; None: not sampled
    core_capacity: int  # percent units (100 per device, after the node's core scaling)
    cores_allocated: int
    utilization: int | None  # percent of compute in use; None: not sampled
    slice_count: int
    split_count: int
    slices: tuple[SliceStatus, ...] = ()
    isolation: str = Isolation.NONE.value  # the grade of a shared slice here
    mig: bool = False  # a MIG instance (handed out whole)
    note: str | None = None  # why its grade is not stronger


class NodeStatus(_Model):
    name: str
    host: str = ""  # what operators call it: Ray's node name (its address by default) or the host name
    devices: tuple[DeviceStatus, ...]
    fragment_milli: float = 0.0  # FGD's F_n against the requests seen so far, milli-GPU
    idle_milli: float = 0.0
    isolation: str = Isolation.NONE.value  # the node's best grade
    enforcement: str = "ok"  # "degraded" while its node actor's enforcement cannot run or see processes
    enforcement_reason: str | None = None
    mps: Mapping[str, Any] | None = None  # the MPS daemon: running, pid, restarts, reason
    warnings: tuple[str, ...] = ()  # e.g. Ray also counts this node's GPUs (plain num_gpus tasks could land there)


class Waiting(_Model):
    """A request in the queue: who asked, for what, its team queue, and why it does not fit now."""

    owner: str
    request: str
    priority: int
    waited_s: float
    reason: str
    queue: str = "default"


class QueueStatus(_Model):
    """A team queue (:mod:`hami_ray.core.queues`): amounts are ``{"memory_mib", "cores", "devices"}``;
    ``limit`` has only the resources it bounds. ``preempted``: slices taken from it so far; ``reclaiming``:
    preemptions under way for its waiting work."""

    queue: str
    parent: str | None = None
    leaf: bool = True
    weight: float = 1.0
    preemptible: bool = True
    guaranteed: Mapping[str, int] = {}
    limit: Mapping[str, int] = {}
    used: Mapping[str, int] = {}
    borrowed: Mapping[str, int] = {}
    share: float = 0.0
    waiting: int = 0
    preempted: int = 0
    reclaiming: int = 0


class Summary(_Model):
    nodes: int
    devices: int
    healthy_devices: int
    memory_mib: int
    memory_allocated_mib: int
    memory_used_mib: int
    sampled_devices: int
    leases: int
    queue_depth: int
    fragmentation: float  # fragmented idle GPU share over idle GPU share (the FGD paper's ratio), 0-1

    @property
    def allocated_ratio(self) -> float:
        return self.memory_allocated_mib / self.memory_mib if self.memory_mib else 0.0

    @property
    def used_ratio(self) -> float:
        return self.memory_used_mib / self.memory_mib if self.memory_mib else 0.0


class ClusterStatus(_Model):
    """Everything ``hami-ray status`` shows. ``leases`` are the ledger's (for scripts that want them)."""

    taken_at: float
    summary: Summary
    nodes: tuple[NodeStatus, ...]
    leases: tuple[Lease, ...] = ()
    waiting: tuple[Waiting, ...] = ()
    lost: tuple[Lease, ...] = ()
    enforcement: Mapping[str, int] = {}  # action ("interrupted", "killed") -> count since the node actors started
    queues: tuple[QueueStatus, ...] = ()

    def node(self, name: str) -> NodeStatus:
        return next(n for n in self.nodes if n.name == name)

    def device(self, uuid: str) -> DeviceStatus:
        return next(d for n in self.nodes for d in n.devices if d.uuid == uuid)


def build_status(snapshot: ClusterSnapshot, *, usage: Mapping[str, Any] | None = None, queue_depth: int = 0,
                 waiting: Sequence[Mapping[str, Any]] = (), fragments: Mapping[str, tuple[float, float]] | None = None,
                 lost: Sequence[Lease] = (), enforcement: Mapping[str, int] | None = None,
                 isolation: Mapping[str, Any] | None = None, taken_at: float | None = None,
                 queues: Sequence[Mapping[str, Any]] = ()) -> ClusterStatus:
    """The status of a cluster.

    Args:
        snapshot: the ledger's nodes and live leases.
        usage: per node, its node actor's last sample: ``{"devices": [{"uuid", "used_mib",
            "utilization"}], "slices": [{"lease_id", "uuid", "used_mib"}]}``; missing nodes are unsampled.
        queue_depth: requests waiting.
        waiting: the first waiting requests (``owner``, ``request``, ``priority``, ``waited_s``, ``reason``).
        fragments: per node, ``(F_n, idle)`` in milli-GPU.
        lost: leases lost with their nodes.
        enforcement: action -> count.
        isolation: per node, its node actor's isolation status (``isolation``, ``enforcement``, ``reason``,
            ``devices``: uuid -> ``{"isolation", "note"}``, ``mps``, ``marks``: lease id -> note), its
            ``warnings`` and ``host`` (Ray's name for the node).
    """
    isolation = isolation or {}
    grades = {d.uuid: d for n in snapshot.nodes for d in n.devices}
    marks: dict[str, str] = {}
    notes: dict[str, str | None] = {}
    for node_iso in isolation.values():
        marks.update((node_iso or {}).get("marks") or {})
        for uuid, dev in ((node_iso or {}).get("devices") or {}).items():
            notes[str(uuid)] = (dev or {}).get("note")
    usage = usage or {}
    fragments = fragments or {}
    device_used: dict[str, tuple[int, int]] = {}
    slice_used: dict[tuple[str, str], int] = {}
    for sample in usage.values():
        for d in (sample or {}).get("devices", ()):
            device_used[str(d["uuid"])] = (int(d["used_mib"]), int(d.get("utilization", 0)))
        for s in (sample or {}).get("slices", ()):
            slice_used[(str(s["lease_id"]), str(s["uuid"]))] = int(s["used_mib"])
    by_device: dict[str, list[SliceStatus]] = {}
    for lease in snapshot.leases:
        grade = weakest(grades[g.uuid].grade_for(g.cores) for g in lease.allocation.devices if g.uuid in grades).value
        for grant in lease.allocation.devices:
            by_device.setdefault(grant.uuid, []).append(SliceStatus(
                lease_id=lease.lease_id, owner=lease.owner, state=str(lease.state.value), memory_mib=grant.memory_mib,
                cores=grant.cores, memory_used_mib=slice_used.get((lease.lease_id, grant.uuid)), pids=lease.pids,
                isolation=grade, note=marks.get(lease.lease_id)))
    nodes = []
    for node in snapshot.nodes:
        devices = []
        for dev in node.devices:
            held = by_device.get(dev.uuid, [])
            used = device_used.get(dev.uuid)
            devices.append(DeviceStatus(
                uuid=dev.uuid, index=dev.index, model=dev.model, vendor=dev.vendor, healthy=dev.healthy,
                memory_mib=dev.memory_capacity_mib, memory_allocated_mib=sum(s.memory_mib for s in held),
                memory_used_mib=None if used is None else used[0], core_capacity=dev.core_capacity,
                cores_allocated=sum(s.cores for s in held),
                utilization=None if used is None else used[1], slice_count=len(held), split_count=dev.split_count,
                slices=tuple(held), isolation=dev.isolation.value, mig=dev.mode.value == "mig",
                note=notes.get(dev.uuid)))
        frag, idle = fragments.get(node.name, (0.0, 0.0))
        node_iso = isolation.get(node.name) or {}
        nodes.append(NodeStatus(
            name=node.name, devices=tuple(devices), fragment_milli=frag, idle_milli=idle,
            isolation=strongest(d.isolation for d in node.devices).value,
            enforcement=str(node_iso.get("enforcement") or "ok"), enforcement_reason=node_iso.get("reason"),
            mps=node_iso.get("mps"), warnings=tuple(str(w) for w in node_iso.get("warnings") or ()),
            host=str(node_iso.get("host") or "")))
    all_devices = [d for n in nodes for d in n.devices]
    sampled = [d for d in all_devices if d.memory_used_mib is not None]
    idle_total = sum(n.idle_milli for n in nodes)
    summary = Summary(
        nodes=len(nodes), devices=len(all_devices), healthy_devices=sum(d.healthy for d in all_devices),
        memory_mib=sum(d.memory_mib for d in all_devices),
        memory_allocated_mib=sum(d.memory_allocated_mib for d in all_devices),
        memory_used_mib=sum(d.memory_used_mib or 0 for d in sampled), sampled_devices=len(sampled),
        leases=len(snapshot.leases), queue_depth=queue_depth,
        fragmentation=sum(n.fragment_milli for n in nodes) / idle_total if idle_total else 0.0)
    return ClusterStatus(taken_at=time.time() if taken_at is None else taken_at, summary=summary, nodes=tuple(nodes),
                         leases=snapshot.leases, waiting=tuple(Waiting(**w) for w in waiting), lost=tuple(lost),
                         enforcement=dict(enforcement or {}), queues=tuple(QueueStatus(**q) for q in queues))


def status_json(status: ClusterStatus) -> dict[str, Any]:
    """The snapshot for scripts (``hami-ray status --json``): nodes with their devices and slices, the
    summary, the waiting requests; tokens left out."""
    out = status.model_dump(mode="json", exclude={"leases", "lost"})
    out["summary"]["allocated_ratio"] = round(status.summary.allocated_ratio, 4)
    out["summary"]["used_ratio"] = round(status.summary.used_ratio, 4)
    out["lost"] = [{"lease_id": x.lease_id, "owner": x.owner, "node": x.allocation.node} for x in status.lost]
    return out


def status_from(data: Mapping[str, Any]) -> ClusterStatus:
    """The status from the placement actor's ``status()`` answer."""
    return build_status(
        ClusterSnapshot.model_validate(data["snapshot"]), usage=data.get("usage"),
        queue_depth=int(data.get("queue_depth", 0)), waiting=data.get("waiting", ()),
        fragments={k: (float(v[0]), float(v[1])) for k, v in (data.get("fragments") or {}).items()},
        lost=[Lease.model_validate(x) for x in data.get("lost", ())], enforcement=data.get("enforcement"),
        isolation=data.get("isolation"), queues=data.get("queues", ()))
