"""The placement service: the plain class behind the placement actor (no Ray in here).

It owns the cluster ledger and the scheduler, knows which node actor owns which node, and keeps the
queue of requests waiting for capacity (priority first, then arrival order). The actor shell
(:mod:`hami_ray.runtime.placement`) adds the Ray calls: the two-phase reservation with the node actor
and the waiting itself.

Called by the placement actor, and by tests directly.
"""

from __future__ import annotations

import heapq
import itertools
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from hami_ray.core.errors import InvalidRequest, Unschedulable
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import K8S_NODE_LABEL, Allocation, ClusterSnapshot, Lease, LeaseState, Node, SliceRequest
from hami_ray.core.policies.fgd import FgdDevicePolicy
from hami_ray.core.policies.workload import TargetWorkload
from hami_ray.core.scheduler import Scheduler


@dataclass(order=True)
class Waiter:
    """A request in the queue; ordering is (-priority, submitted, arrival): the caller's submission time
    orders requests whose calls reached the (async) placement actor out of order."""

    sort_key: tuple[int, float, int]
    request: SliceRequest = field(compare=False)
    owner: str = field(compare=False)
    group: tuple[SliceRequest, ...] = field(default=(), compare=False)  # a gang: all of these, or none
    strategy: str = field(default="", compare=False)

    @property
    def waiter_id(self) -> int:
        return self.sort_key[2]


GANG_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # as Ray's placement groups


@dataclass(frozen=True)
class Plan:
    """A lease the ledger holds as ``reserved``, to be confirmed by ``node_id``'s node actor."""

    lease: Lease
    node_id: str


class PlacementService:
    """Ledger, scheduler and queue of one hami-ray cluster."""

    def __init__(self, scheduler_options: dict[str, object] | None = None) -> None:
        self.ledger = Ledger()
        self.scheduler = Scheduler(self.ledger, **(scheduler_options or {}))  # type: ignore[arg-type]
        self.node_actor: dict[str, str] = {}  # node id -> node actor name
        self._queue: list[Waiter] = []
        self._seq = itertools.count()
        self._cancelled: set[int] = set()
        self.lost: list[Lease] = []
        self.workload = TargetWorkload()  # every request placed: what fragmentation is measured against

    # --- nodes -------------------------------------------------------------------------------
    def register_node(self, node: Node, actor_name: str, leases: Sequence[Lease] = ()) -> list[Lease]:
        """Add or refresh a node with the leases its node actor holds (its truth wins)."""
        for lease in self.ledger.leases_on(node.name):
            self.ledger.release(lease.lease_id)
        lost = self.ledger.add_node(node)
        self.node_actor[node.name] = actor_name
        for lease in leases:
            self.ledger.allocate(lease)
        return lost

    def remove_node(self, node_id: str) -> list[Lease]:
        """A node left the cluster: its leases become ``lost`` (returned)."""
        self.node_actor.pop(node_id, None)
        lost = self.ledger.remove_node(node_id)
        self.lost.extend(lost)
        return lost

    # --- placement ---------------------------------------------------------------------------
    def plan(self, request: SliceRequest, owner: str, created_at: float,
             holder: Literal["process", "pod", "driver"] = "process", job: str = "") -> Plan:
        """Choose devices and hold them as ``reserved`` in the ledger.

        Raises:
            Unschedulable: nothing fits now (``never`` if nothing ever could).
            InvalidRequest: the request can never be held by this cluster.
        """
        self.scheduler.observe(request)
        self.workload.observe(request)
        allocation = self.scheduler.place(request)
        lease = Lease(lease_id=f"lease-{secrets.token_hex(8)}", owner=owner, allocation=allocation,
                      token=secrets.token_urlsafe(16), priority=request.priority, created_at=created_at,
                      holder=holder, job=job)
        self.ledger.allocate(lease)
        return Plan(lease, allocation.node)

    def k8s_nodes(self) -> dict[str, str]:
        """Kubernetes node name -> node id, for the nodes whose node actor says where it runs."""
        return {node.labels[K8S_NODE_LABEL]: name for name, node in self.ledger.nodes.items()
                if node.labels.get(K8S_NODE_LABEL)}

    def pod_nodes(self, k8s_nodes: Sequence[str] | None) -> list[str]:
        """The node ids that may hold a pod: those running in Kubernetes (on ``k8s_nodes``; None: any)."""
        named = self.k8s_nodes()
        return [named[n] for n in (named if k8s_nodes is None else k8s_nodes) if n in named]

    def plan_pod(self, requests: Sequence[SliceRequest], owner: str, lease_id: str, token: str,
                 k8s_nodes: Sequence[str] | None) -> Plan:
        """A Kubernetes pod's containers on one node that runs in Kubernetes (``k8s_nodes``: only those
        Kubernetes nodes; None: any), held as ``reserved`` with ``holder="pod"``.

        Raises:
            Unschedulable, InvalidRequest: as :meth:`plan`; a node without a Kubernetes name never fits.
        """
        allowed = self.pod_nodes(k8s_nodes)
        for request in requests:
            self.scheduler.observe(request)
            self.workload.observe(request)
        allocation = self.scheduler.place(requests, nodes=allowed)
        lease = Lease(lease_id=lease_id, owner=owner, allocation=allocation, token=token, holder="pod",
                      priority=max(r.priority for r in requests), created_at=time.time())
        self.ledger.allocate(lease)
        return Plan(lease, allocation.node)

    def confirm(self, lease: Lease) -> Lease:
        return self.ledger.update(lease.lease_id, state=LeaseState.ACTIVE)

    def abort(self, lease_id: str) -> None:
        """The node actor refused the reservation: forget it."""
        self.ledger.release(lease_id)

    def release(self, lease_id: str, token: str | None) -> Lease | None:
        return self.ledger.release(lease_id, token)

    # --- queue -------------------------------------------------------------------------------
    def enqueue(self, request: SliceRequest, owner: str, submitted: float = 0.0,
                group: Sequence[SliceRequest] = (), strategy: str = "") -> Waiter:
        """Queue a request (or a gang: ``group``, one waiter for all of it); ``submitted`` (the caller's clock
        when it asked) orders it before later asks."""
        waiter = Waiter((-request.priority, submitted, next(self._seq)), request, owner, tuple(group), strategy)
        heapq.heappush(self._queue, waiter)
        return waiter

    def remove(self, waiter: Waiter) -> None:
        """``waiter`` leaves the queue (served, cancelled or failed), wherever it stands in it."""
        self._cancelled.add(waiter.waiter_id)

    def head(self) -> Waiter | None:
        """The next waiter in order (cancelled ones are dropped)."""
        while self._queue and self._queue[0].waiter_id in self._cancelled:
            self._cancelled.discard(heapq.heappop(self._queue).waiter_id)
        return self._queue[0] if self._queue else None

    def pop(self) -> Waiter:
        return heapq.heappop(self._queue)

    def is_first(self, waiter: Waiter) -> bool:
        return self.head() is waiter

    @property
    def queue_depth(self) -> int:
        return sum(1 for w in self._queue if w.waiter_id not in self._cancelled)

    def check(self, request: SliceRequest) -> None:
        """Fail fast on requests the cluster could never hold (instead of waiting forever).

        Raises:
            InvalidRequest: see :meth:`Scheduler.validate`.
            Unschedulable: with ``never=True``.
        """
        self.scheduler.validate(request)
        try:
            self.scheduler.place(request)
        except Unschedulable as exc:
            if exc.never:
                raise

    def lane_nodes(self, request: SliceRequest) -> list[tuple[str, tuple[str, ...]]]:
        """The nodes that could hold ``request`` once they are free, most free device memory first, each
        with the uuids of its devices the request may use: where a driver starts a worker for requests
        that have to wait (pinned there with ``include_uuids``).

        Raises:
            InvalidRequest: see :meth:`Scheduler.validate`.
            Unschedulable: with ``never=True``, as :meth:`check`.
        """
        self.check(request)
        found: list[tuple[int, str, tuple[str, ...]]] = []
        for name, node in self.ledger.nodes.items():
            try:
                Scheduler(Ledger([node])).place(request)
            except (Unschedulable, InvalidRequest):
                continue
            uuids = tuple(d.uuid for d in node.devices
                          if not request.include_uuids or d.uuid in request.include_uuids)
            free = sum(u.memory_capacity_mib - u.memory_mib for u in map(self.ledger.usage, uuids))
            found.append((-free, name, uuids))
        return [(name, uuids) for _, name, uuids in sorted(found)]

    def fragments(self) -> dict[str, tuple[float, float]]:
        """Per node, FGD's fragment amount and idle GPU share (milli) against the requests placed so far."""
        return FgdDevicePolicy(self.workload).fragments(self.scheduler.view)

    def waiting(self, limit: int = 10) -> list[dict[str, object]]:
        """The first ``limit`` waiting requests in order, each with why it does not fit now."""
        out: list[dict[str, object]] = []
        now = time.time()
        for waiter in sorted(w for w in self._queue if w.waiter_id not in self._cancelled)[:limit]:
            try:
                if waiter.group:
                    self.ledger_probe_group(waiter.group, waiter.strategy)
                else:
                    self.scheduler.place(waiter.request)
                reason = "fits now: its turn is next"
            except (Unschedulable, InvalidRequest) as exc:
                reason = str(exc)
            what = waiter.request.describe() if not waiter.group else \
                f"gang of {len(waiter.group)} ({waiter.strategy}): {waiter.group[0].describe()}, ..."
            out.append({"owner": waiter.owner, "request": what, "priority": waiter.request.priority,
                        "waited_s": round(max(0.0, now - waiter.sort_key[1]), 3), "reason": reason})
        return out

    # --- gangs --------------------------------------------------------------------------------
    def plan_group(self, requests: Sequence[SliceRequest], strategy: str, owner: str, created_at: float,
                   holder: Literal["process", "pod", "driver"] = "driver", job: str = "") -> list[Plan]:
        """Hold every slice of a gang as ``reserved`` in the ledger, or none (all or nothing, in one step:
        no other request can take a slice between two of its bundles).

        ``PACK``: one node if any holds them all, else wherever each fits; ``STRICT_PACK``: one node;
        ``SPREAD``: a node not used yet by this gang where one fits, else any; ``STRICT_SPREAD``: a different
        node for each.

        Raises:
            Unschedulable: the gang does not fit now (``never`` when it could not fit an empty cluster).
            InvalidRequest: a bundle is malformed, or the strategy unknown.
        """
        for request in requests:
            self.scheduler.observe(request)
            self.workload.observe(request)

        def lease_for(index: int, allocation: Allocation) -> Lease:
            return Lease(lease_id=f"lease-{secrets.token_hex(8)}", owner=f"{owner}[{index}]", allocation=allocation,
                         token=secrets.token_urlsafe(16), priority=requests[index].priority, created_at=created_at,
                         holder=holder, job=job)

        leases = self._place_group(self.scheduler, self.ledger, requests, strategy, lease_for)
        return [Plan(lease, lease.allocation.node) for lease in leases]

    def check_group(self, requests: Sequence[SliceRequest], strategy: str) -> None:
        """Fail at once when the gang could not fit even the empty cluster (instead of waiting forever).

        Raises:
            Unschedulable: with ``never=True``.
            InvalidRequest: see :meth:`plan_group`.
        """
        for request in requests:
            self.scheduler.validate(request)
        try:
            self.ledger_probe_group(requests, strategy, empty=True)
        except Unschedulable as exc:
            raise Unschedulable(exc.total_nodes, exc.reasons, never=True) from None

    def ledger_probe_group(self, requests: Sequence[SliceRequest], strategy: str, empty: bool = False) -> None:
        """Place the gang on a scratch copy of the cluster (now, or ``empty``); holds nothing.

        Raises:
            Unschedulable: it does not fit there.
        """
        scratch = Ledger(list(self.ledger.nodes.values()))
        if not empty:
            for lease in self.ledger.leases.values():
                scratch.allocate(lease)
        self._place_group(Scheduler(scratch), scratch, requests, strategy,
                          lambda i, a: Lease(lease_id=f"probe-{i}", owner="probe", allocation=a, token="-"))

    @staticmethod
    def _place_group(scheduler: Scheduler, ledger: Ledger, requests: Sequence[SliceRequest], strategy: str,
                     lease_for: Callable[[int, Allocation], Lease]) -> list[Lease]:
        if strategy not in GANG_STRATEGIES:
            raise InvalidRequest("strategy", f"unknown gang strategy {strategy!r} (known: {', '.join(GANG_STRATEGIES)})")
        if not requests:
            raise InvalidRequest("bundles", "a gang needs at least one slice")
        held: list[Lease] = []

        def hold(index: int, allocation: Allocation) -> None:
            held.append(ledger.allocate(lease_for(index, allocation)))

        try:
            if strategy in ("PACK", "STRICT_PACK"):
                try:
                    together = scheduler.place(list(requests))
                except Unschedulable:
                    if strategy == "STRICT_PACK":
                        raise
                else:
                    for i, part in enumerate(together.slices):
                        hold(i, Allocation(node=together.node, slices=(part,), cpu_milli=requests[i].cpu_milli,
                                           host_memory_mib=requests[i].host_memory_mib))
                    return held
            used: set[str] = set()
            for i, request in enumerate(requests):
                if strategy in ("SPREAD", "STRICT_SPREAD"):
                    unused = [name for name in ledger.nodes if name not in used]
                    try:
                        if not unused:
                            raise Unschedulable(0, {"no node left for this gang's next slice": 1})
                        allocation = scheduler.place(request, nodes=unused)
                    except Unschedulable:
                        if strategy == "STRICT_SPREAD":
                            raise
                        allocation = scheduler.place(request)
                else:
                    allocation = scheduler.place(request)
                hold(i, allocation)
                used.add(allocation.node)
            return held
        except BaseException:
            for lease in held:
                ledger.release(lease.lease_id)
            raise

    def snapshot(self) -> ClusterSnapshot:
        return self.ledger.snapshot()
