"""The ledger: which slices of which devices are held by which lease.

Invariants, per device (DESIGN, Core concepts), checked on every allocation and by
:meth:`Ledger.check_invariants`:

- sum of slice memory <= memory x memory_scaling
- sum of slice cores <= 100 x core_scaling
- number of slices <= split count
- a 100-core slice is exclusive: no other slice shares its device

Allocation is atomic (all devices of all slices, or nothing), release is idempotent, and the whole
ledger serialises to a :class:`ClusterSnapshot` (JSON) and restores exactly. Used by the scheduler, the
simulator, the placement actor and the Kubernetes bridge; pure and single-threaded (callers serialise).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from hami_ray.core.errors import InvariantViolation, LeaseNotFound, LeaseTokenMismatch
from hami_ray.core.index import CapacityIndex
from hami_ray.core.model import (
    Allocation,
    ClusterSnapshot,
    Device,
    DeviceGrant,
    Lease,
    LeaseState,
    Node,
)

RELEASED_MEMORY = 100_000  # released lease ids remembered, so a second release is a no-op


def slice_tag(grants: tuple[DeviceGrant, ...]) -> str:
    """The FGD artifact's affinity tag of a slice: ``share-gpu`` or ``<n>-gpu``."""
    if len(grants) == 1 and grants[0].cores < 100:
        return "share-gpu"
    return f"{len(grants)}-gpu"


@dataclass(frozen=True, slots=True)
class DeviceUsage:
    """Allocated totals on one device, as the ledger counts them."""

    uuid: str
    memory_mib: int
    cores: int
    slices: int
    memory_capacity_mib: int
    core_capacity: int
    slice_capacity: int

    @property
    def free_memory_mib(self) -> int:
        return self.memory_capacity_mib - self.memory_mib


class Ledger:
    """Per-device usage of a cluster and the leases that make it up."""

    def __init__(self, nodes: Iterable[Node] = ()) -> None:
        self.index = CapacityIndex()
        self._nodes: dict[str, Node] = {}
        self._where: dict[str, tuple[int, int]] = {}  # device uuid -> (row, col)
        self._devices: dict[str, Device] = {}
        self._leases: dict[str, Lease] = {}
        self._by_node: dict[str, set[str]] = {}
        self._released: OrderedDict[str, None] = OrderedDict()
        for node in nodes:
            self.add_node(node)

    # --- inventory ---------------------------------------------------------------------------
    @property
    def nodes(self) -> dict[str, Node]:
        return self._nodes

    def node(self, name: str) -> Node:
        return self._nodes[name]

    def device(self, uuid: str) -> Device:
        return self._devices[uuid]

    def add_node(self, node: Node) -> list[Lease]:
        """Add a node, or replace its inventory (a device plugin re-registered, a node actor restarted).

        Leases on devices that disappeared, or that no longer fit, become ``lost``; they are returned.

        Raises:
            InvariantViolation: a device uuid already belongs to another node.
        """
        for dev in node.devices:
            owner = self._where.get(dev.uuid)
            if owner is not None and self.index.names[owner[0]] != node.name:
                raise InvariantViolation(
                    f"device {dev.uuid} of node {node.name} is already registered on {self.index.names[owner[0]]}")
        old = self._nodes.get(node.name)
        if old is not None:
            for dev in old.devices:
                self._where.pop(dev.uuid, None)
                self._devices.pop(dev.uuid, None)
        self._nodes[node.name] = node
        row = self.index.put_node(node)
        for col, dev in enumerate(node.devices):
            self._where[dev.uuid] = (row, col)
            self._devices[dev.uuid] = dev
        lost: list[Lease] = []
        held = sorted(self._by_node.get(node.name, ()), key=lambda lid: self._leases[lid].created_at)
        self._by_node[node.name] = set()
        for lease_id in held:
            lease = self._leases.pop(lease_id)
            try:
                self._apply(lease, +1)
            except InvariantViolation:
                lost.append(lease.model_copy(update={"state": LeaseState.LOST}))
                self._remember(lease_id)
                continue
            self._leases[lease_id] = lease
            self._by_node[node.name].add(lease_id)
        return lost

    def remove_node(self, name: str) -> list[Lease]:
        """Remove a node; its leases become ``lost`` and are returned (their capacity is gone too)."""
        node = self._nodes.pop(name, None)
        if node is None:
            return []
        lost = []
        for lease_id in sorted(self._by_node.pop(name, ())):
            lease = self._leases.pop(lease_id)
            lost.append(lease.model_copy(update={"state": LeaseState.LOST}))
            self._remember(lease_id)
        for dev in node.devices:
            self._where.pop(dev.uuid, None)
            self._devices.pop(dev.uuid, None)
        self.index.drop_node(name)
        return lost

    # --- leases ------------------------------------------------------------------------------
    @property
    def leases(self) -> dict[str, Lease]:
        return self._leases

    def leases_on(self, node: str) -> list[Lease]:
        return [self._leases[i] for i in sorted(self._by_node.get(node, ()))]

    def allocate(self, lease: Lease) -> Lease:
        """Record a lease; all of its devices or none.

        Raises:
            InvariantViolation: the lease id is live already, the node or a device is unknown, or a
                device would exceed memory, cores, slices or exclusivity. The ledger is unchanged.
        """
        if lease.lease_id in self._leases:
            raise InvariantViolation(f"lease {lease.lease_id} is already held")
        if lease.allocation.node not in self._nodes:
            raise InvariantViolation(f"lease {lease.lease_id}: unknown node {lease.allocation.node}")
        if lease.state in (LeaseState.RELEASED, LeaseState.LOST):
            raise InvariantViolation(f"lease {lease.lease_id}: cannot allocate a {lease.state} lease")
        self._apply(lease, +1)
        self._leases[lease.lease_id] = lease
        self._by_node.setdefault(lease.allocation.node, set()).add(lease.lease_id)
        self._released.pop(lease.lease_id, None)
        return lease

    def update(self, lease_id: str, **changes: object) -> Lease:
        """Change a live lease's state (reserved/active), pids, owner or priority; never its allocation.

        Raises:
            LeaseNotFound: no such live lease.
            InvariantViolation: another field, or an ending state (use :meth:`release`).
        """
        unknown = set(changes) - {"state", "pids", "pid_starts", "owner", "priority"}
        if unknown:
            raise InvariantViolation(f"cannot change {sorted(unknown)} of a live lease; release and allocate again")
        if changes.get("state") in (LeaseState.RELEASED, LeaseState.LOST):
            raise InvariantViolation("a live lease ends through release() or remove_node(), not update()")
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(lease_id)
        new = lease.model_copy(update=changes)
        self._leases[lease_id] = new
        return new

    def release(self, lease_id: str, token: str | None = None) -> Lease | None:
        """Free a lease. Idempotent: releasing a released lease again returns None.

        ``token=None`` is for trusted internal callers (a node actor freeing a dead process's lease).

        Raises:
            LeaseTokenMismatch: a token was given and it is not the lease's.
            LeaseNotFound: the id was never allocated (nor recently released).
        """
        lease = self._leases.get(lease_id)
        if lease is None:
            if lease_id in self._released:
                return None
            raise LeaseNotFound(lease_id)
        if token is not None and token != lease.token:
            raise LeaseTokenMismatch(lease_id)
        self._apply(lease, -1)
        del self._leases[lease_id]
        self._by_node[lease.allocation.node].discard(lease_id)
        self._remember(lease_id)
        return lease.model_copy(update={"state": LeaseState.RELEASED})

    def _remember(self, lease_id: str) -> None:
        """Keep an ended lease's id so that releasing it again is a no-op (bounded memory)."""
        self._released[lease_id] = None
        while len(self._released) > RELEASED_MEMORY:
            self._released.popitem(last=False)

    # --- arithmetic --------------------------------------------------------------------------
    def _apply(self, lease: Lease, sign: int) -> None:
        alloc: Allocation = lease.allocation
        idx = self.index
        row = idx.rows[alloc.node]
        if sign > 0:
            self._check_fits(lease)
        for grant in alloc.devices:
            r, col = self._where[grant.uuid]
            idx.add_usage(r, col, grant.memory_mib, grant.cores, sign)
        for part in alloc.slices:
            if part:
                idx.add_tag(row, slice_tag(part), sign)
        idx.add_host(row, alloc.cpu_milli, alloc.host_memory_mib, sign)

    def _check_fits(self, lease: Lease) -> None:
        alloc = lease.allocation
        idx = self.index
        row = idx.rows[alloc.node]
        add: dict[str, list[int]] = {}
        for grant in alloc.devices:
            where = self._where.get(grant.uuid)
            if where is None or where[0] != row:
                raise InvariantViolation(f"lease {lease.lease_id}: device {grant.uuid} is not on {alloc.node}")
            acc = add.setdefault(grant.uuid, [0, 0, 0, 0])
            acc[0] += grant.memory_mib
            acc[1] += grant.cores
            acc[2] += 1
            acc[3] += int(grant.cores >= 100)
        for uuid, (mem, cores, slices, excl) in add.items():
            r, c = self._where[uuid]
            used_slices = int(idx.slot_used[r, c])
            if int(idx.mem_used[r, c]) + mem > int(idx.mem_cap[r, c]):
                raise InvariantViolation(f"lease {lease.lease_id}: device {uuid} memory over capacity")
            if int(idx.core_used[r, c]) + cores > int(idx.core_cap[r, c]):
                raise InvariantViolation(f"lease {lease.lease_id}: device {uuid} cores over capacity")
            if used_slices + slices > int(idx.slot_cap[r, c]):
                raise InvariantViolation(f"lease {lease.lease_id}: device {uuid} has no free slice")
            if (excl and used_slices + slices > 1) or (idx.excl[r, c] and slices):
                raise InvariantViolation(f"lease {lease.lease_id}: device {uuid} is held exclusively")
        cpu_cap, hmem_cap = int(idx.cpu_cap[row]), int(idx.hmem_cap[row])
        if cpu_cap and int(idx.cpu_used[row]) + alloc.cpu_milli > cpu_cap:
            raise InvariantViolation(f"lease {lease.lease_id}: node {alloc.node} CPU over capacity")
        if hmem_cap and int(idx.hmem_used[row]) + alloc.host_memory_mib > hmem_cap:
            raise InvariantViolation(f"lease {lease.lease_id}: node {alloc.node} host memory over capacity")

    # --- queries -----------------------------------------------------------------------------
    def where(self, uuid: str) -> tuple[int, int] | None:
        """(row, column) of a device in the index, or None."""
        return self._where.get(uuid)

    def uuid_at(self, row: int, col: int) -> str:
        return self._nodes[self.index.names[row]].devices[col].uuid

    def pair_score(self, row: int, a: int, b: int) -> int:
        devices = self._nodes[self.index.names[row]].devices
        return devices[a].links.get(devices[b].uuid, 0)

    def usage(self, uuid: str) -> DeviceUsage:
        r, c = self._where[uuid]
        idx = self.index
        return DeviceUsage(uuid, int(idx.mem_used[r, c]), int(idx.core_used[r, c]), int(idx.slot_used[r, c]),
                           int(idx.mem_cap[r, c]), int(idx.core_cap[r, c]), int(idx.slot_cap[r, c]))

    def check_invariants(self) -> None:
        """Recount usage from the leases and compare with the index; raise on any difference.

        Raises:
            InvariantViolation: a counter disagrees with its leases, or a device is over capacity.
        """
        expect: dict[str, list[int]] = {u: [0, 0, 0, 0] for u in self._devices}
        for lease in self._leases.values():
            for g in lease.allocation.devices:
                e = expect[g.uuid]
                e[0] += g.memory_mib
                e[1] += g.cores
                e[2] += 1
                e[3] += int(g.cores >= 100)
        for uuid, (mem, cores, slices, excl) in expect.items():
            u = self.usage(uuid)
            if (u.memory_mib, u.cores, u.slices) != (mem, cores, slices):
                raise InvariantViolation(f"device {uuid}: counters {u} disagree with leases {mem, cores, slices}")
            if mem > u.memory_capacity_mib or cores > u.core_capacity or slices > u.slice_capacity:
                raise InvariantViolation(f"device {uuid}: over capacity {u}")
            if excl and slices > 1:
                raise InvariantViolation(f"device {uuid}: exclusive slice shares its device")
            r, c = self._where[uuid]
            if bool(self.index.excl[r, c]) != bool(excl):
                raise InvariantViolation(f"device {uuid}: exclusive flag disagrees with leases")
        host: dict[str, list[int]] = {name: [0, 0] for name in self._nodes}
        for lease in self._leases.values():
            h = host[lease.allocation.node]
            h[0] += lease.allocation.cpu_milli
            h[1] += lease.allocation.host_memory_mib
        for name, (cpu, hmem) in host.items():
            row = self.index.rows[name]
            if (int(self.index.cpu_used[row]), int(self.index.hmem_used[row])) != (cpu, hmem):
                raise InvariantViolation(f"node {name}: host counters disagree with leases ({cpu}, {hmem})")
            idx = self.index
            for total, column in ((idx.node_mem_used, idx.mem_used), (idx.node_core_used, idx.core_used),
                                  (idx.node_slot_used, idx.slot_used)):
                if int(total[row]) != int(column[row].sum()):
                    raise InvariantViolation(f"node {name}: node totals disagree with its devices")

    # --- persistence -------------------------------------------------------------------------
    def snapshot(self) -> ClusterSnapshot:
        leases = sorted(self._leases.values(), key=lambda lease: (lease.created_at, lease.lease_id))
        return ClusterSnapshot(nodes=tuple(self._nodes[n] for n in sorted(self._nodes)), leases=tuple(leases))

    def to_json(self) -> str:
        return self.snapshot().model_dump_json()

    @classmethod
    def restore(cls, snapshot: ClusterSnapshot | str) -> Ledger:
        """Rebuild a ledger from :meth:`snapshot` (or its JSON); raises if it breaks an invariant."""
        if isinstance(snapshot, str):
            snapshot = ClusterSnapshot.model_validate_json(snapshot)
        ledger = cls(snapshot.nodes)
        for lease in snapshot.leases:
            ledger.allocate(lease)
        return ledger
