"""The placement service: the plain class behind the placement actor (no Ray in here).

It owns the cluster ledger and the scheduler, knows which node actor owns which node, and keeps the
team queues (:mod:`hami_ray.core.queues`: what each holds, its limit, its reclaims) and the requests
waiting for capacity (:mod:`hami_ray.core.waitlist`: a line per queue, lines served by fair share, each
line by priority then submission). The actor shell
(:mod:`hami_ray.runtime.placement`) adds the Ray calls: the two-phase reservation with the node actor
and the waiting itself.

Called by the placement actor, and by tests directly.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from hami_ray.core.errors import InvalidRequest, Unschedulable
from hami_ray.core.ids import new_lease_id
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import DEFAULT_QUEUE, K8S_NODE_LABEL, Allocation, ClusterSnapshot, Lease, LeaseState, Node, SliceRequest
from hami_ray.core.policies.fgd import FgdDevicePolicy
from hami_ray.core.policies.workload import TargetWorkload
from hami_ray.core.nomination import NOMINATION_S, Nominations
from hami_ray.core.queues import Preemption, QueueBook, QueueConfigError, QueueTree, Usage
from hami_ray.core.scheduler import Scheduler
from hami_ray.core.waitlist import WaitList


@dataclass(eq=False)
class Waiter:
    """A request in the wait list (:mod:`hami_ray.core.waitlist`): one task, actor, lane or pod, or a gang
    (``group``: all of these, or none). ``submitted``: the caller's clock when it asked (orders requests
    whose calls reached the async placement actor out of order)."""

    waiter_id: int
    request: SliceRequest
    owner: str
    submitted: float
    group: tuple[SliceRequest, ...] = ()
    strategy: str = ""
    queue: str = DEFAULT_QUEUE  # resolved against the queue definitions when it joined

    @property
    def key(self) -> str:
        return str(self.waiter_id)

    @property
    def requests(self) -> tuple[SliceRequest, ...]:
        return self.group or (self.request,)


@dataclass
class Reclaim:
    """A preemption under way: its victims got their notice and leave after the grace; ``waiter`` (the
    key of the request it makes room for) is placed once they are gone."""

    plan: Preemption
    waiter: str
    started: float


GANG_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # as Ray's placement groups


@dataclass(frozen=True)
class Plan:
    """A lease the ledger holds as ``reserved``, to be confirmed by ``node_id``'s node actor."""

    lease: Lease
    node_id: str


class PlacementService:
    """Ledger, scheduler and queue of one hami-ray cluster."""

    def __init__(self, scheduler_options: dict[str, object] | None = None, queues: QueueTree | None = None) -> None:
        self.ledger = Ledger()
        self.scheduler = Scheduler(self.ledger, **(scheduler_options or {}))  # type: ignore[arg-type]
        self.book = QueueBook(queues or QueueTree(), self.ledger)
        self.node_actor: dict[str, str] = {}  # node id -> node actor name
        self.waitlist = WaitList("queues")
        self._waiters: dict[str, Waiter] = {}
        self._lines: Counter[str] = Counter()  # queue -> requests waiting in its line
        self._seq = itertools.count()
        self.reclaims: dict[str, Reclaim] = {}  # victim lease id -> the preemption it is part of
        self.nominations = Nominations()  # waiter key -> the room its preemption makes
        self.grace_s = 10.0  # the preemption notice period (the placement actor sets its own)
        self.preempted: Counter[str] = Counter()  # queue -> slices preempted from it so far
        self.lost: list[Lease] = []
        self.workload = TargetWorkload()  # every request placed: what fragmentation is measured against

    # --- nodes -------------------------------------------------------------------------------
    def register_node(self, node: Node, actor_name: str, leases: Sequence[Lease] = ()) -> list[Lease]:
        """Add or refresh a node with the leases its node actor holds (its truth wins)."""
        for lease in self.ledger.leases_on(node.name):
            self._free(lease.lease_id)
        lost = self.ledger.add_node(node)
        for lease in lost:
            self.book.drop(lease.lease_id)
        self.node_actor[node.name] = actor_name
        for lease in leases:
            self._hold(self.ledger.allocate(lease))
        return lost

    def refresh_node(self, node: Node) -> list[Lease]:
        """A known node's devices changed (isolation grades, health): its leases stay where they still fit."""
        lost = self.ledger.add_node(node)
        for lease in lost:
            self.book.drop(lease.lease_id)
            self.reclaims.pop(lease.lease_id, None)
        self.lost.extend(lost)
        return lost

    def remove_node(self, node_id: str) -> list[Lease]:
        """A node left the cluster: its leases become ``lost`` (returned)."""
        self.node_actor.pop(node_id, None)
        lost = self.ledger.remove_node(node_id)
        for lease in lost:
            self.book.drop(lease.lease_id)
            self.reclaims.pop(lease.lease_id, None)
        self.lost.extend(lost)
        return lost

    # --- the ledger and the queue book move together ------------------------------------------
    def _hold(self, lease: Lease) -> Lease:
        """Count a lease the ledger holds in its queue's usage. A lease of a queue the definitions no longer
        have (a node actor's truth after the queues changed) counts in ``default``, so it is never lost."""
        if lease.queue not in self.book.tree:
            lease = self.ledger.update(lease.lease_id, queue=DEFAULT_QUEUE)
        self.book.hold(lease)
        return lease

    def _free(self, lease_id: str, token: str | None = None) -> Lease | None:
        lease = self.ledger.release(lease_id, token)
        self.book.drop(lease_id)
        self.reclaims.pop(lease_id, None)
        return lease

    # --- placement ---------------------------------------------------------------------------
    @contextmanager
    def others_nominated(self, me: str | None) -> Iterator[None]:
        """While placing (or planning a preemption) for ``me`` (a waiter key, a pod's lease id, None), hold
        the room preemptions freed for other waiters, so that it goes to them (victims still leaving hold it
        themselves). Waiters behind ``me`` in its own line are not held against it: it is served first."""
        leaving = {r.waiter for r in self.reclaims.values()}
        mine = self._waiters.get(me) if me is not None else None
        behind = [k for k, w in self._waiters.items() if mine is not None and k != me and w.queue == mine.queue]
        with self.nominations.holding_others(self.ledger, self.scheduler, me, time.time(), leaving, behind):
            yield

    def _placed_for(self, me: str | None) -> None:
        self.nominations.drop(me)

    def admit(self, requests: Sequence[SliceRequest]) -> str:
        """The queue ``requests`` are served from, checked: it exists and takes work, and they alone fit
        its limit (and its ancestors').

        Raises:
            InvalidRequest: an unknown queue, or a parent queue (naming the queues that take work).
            Unschedulable: ``never``: the request alone is over a limit (the reason names it).
        """
        queue = self.book.tree.resolve(requests[0].queue if requests else None)
        why = self.book.never_fits(queue, requests)
        if why is not None:
            raise Unschedulable(len(self.ledger.nodes), {why: len(self.ledger.nodes)}, never=True)
        return queue

    def _within_limit(self, queue: str, allocation: Allocation) -> None:
        why = self.book.over_limit(queue, allocation)
        if why is not None:
            raise Unschedulable(len(self.ledger.nodes), {why: len(self.ledger.nodes)})

    def plan(self, request: SliceRequest, owner: str, created_at: float,
             holder: Literal["process", "pod", "driver"] = "process", job: str = "", nominee: str | None = None,
             avoid: Collection[str] = (), lease_id: str | None = None) -> Plan:
        """Choose devices and hold them as ``reserved`` in the ledger, within the request's queue's limit.
        ``lease_id``: the caller's (a ticket that makes a retried call find its lease); default: a new one.

        Raises:
            Unschedulable: nothing fits now, or its queue is at its limit (``never`` if nothing ever could).
            InvalidRequest: the request can never be held by this cluster, or names an unknown queue.
        """
        queue = self.admit([request])
        self.scheduler.observe(request)
        self.workload.observe(request)
        with self.others_nominated(nominee):
            allocation = self.scheduler.place(request, avoid=avoid)
        self._within_limit(queue, allocation)
        self._placed_for(nominee)
        lease = Lease(lease_id=lease_id or new_lease_id(), owner=owner, allocation=allocation,
                      token=secrets.token_urlsafe(16), priority=request.priority, created_at=created_at,
                      holder=holder, job=job, queue=queue, preemptible=request.preemptible)
        return Plan(self._hold(self.ledger.allocate(lease)), allocation.node)

    def k8s_nodes(self) -> dict[str, str]:
        """Kubernetes node name -> node id, for the nodes whose node actor says where it runs."""
        return {node.labels[K8S_NODE_LABEL]: name for name, node in self.ledger.nodes.items()
                if node.labels.get(K8S_NODE_LABEL)}

    def pod_nodes(self, k8s_nodes: Sequence[str] | None) -> list[str]:
        """The node ids that may hold a pod: those running in Kubernetes (on ``k8s_nodes``; None: any)."""
        named = self.k8s_nodes()
        return [named[n] for n in (named if k8s_nodes is None else k8s_nodes) if n in named]

    def plan_pod(self, requests: Sequence[SliceRequest], owner: str, lease_id: str, token: str,
                 k8s_nodes: Sequence[str] | None, avoid: Collection[str] = ()) -> Plan:
        """A Kubernetes pod's containers on one node that runs in Kubernetes (``k8s_nodes``: only those
        Kubernetes nodes; None: any), held as ``reserved`` with ``holder="pod"``, within its queue's limit.

        Raises:
            Unschedulable, InvalidRequest: as :meth:`plan`; a node without a Kubernetes name never fits.
        """
        queue = self.admit(requests)
        allowed = self.pod_nodes(k8s_nodes)
        for request in requests:
            self.scheduler.observe(request)
            self.workload.observe(request)
        with self.others_nominated(lease_id):
            allocation = self.scheduler.place(requests, nodes=allowed, avoid=avoid)
        self._within_limit(queue, allocation)
        self._placed_for(lease_id)
        lease = Lease(lease_id=lease_id, owner=owner, allocation=allocation, token=token, holder="pod",
                      priority=max(r.priority for r in requests), created_at=time.time(), queue=queue,
                      preemptible=all(r.preemptible for r in requests))
        return Plan(self._hold(self.ledger.allocate(lease)), allocation.node)

    def adopt(self, lease: Lease) -> Lease:
        """Hold a lease placed elsewhere (a pod bound before this actor knew of it), in its queue."""
        return self._hold(self.ledger.allocate(lease))

    def confirm(self, lease: Lease) -> Lease:
        return self._hold(self.ledger.update(lease.lease_id, state=LeaseState.ACTIVE))

    def abort(self, lease_id: str) -> None:
        """The node actor refused the reservation: forget it."""
        self._free(lease_id)

    def release(self, lease_id: str, token: str | None) -> Lease | None:
        return self._free(lease_id, token)

    # --- queues ------------------------------------------------------------------------------
    def apply_queues(self, tree: QueueTree) -> None:
        """Swap the queue definitions; live leases and waiting requests keep their queues.

        Raises:
            QueueConfigError: a queue that holds live leases, or that waiting requests name, is missing
                from ``tree`` (the old definitions stay).
        """
        for queue, n in self._lines.items():
            if n and (queue not in tree or not tree.is_leaf(queue)):
                raise QueueConfigError(queue, "name", f"name {queue}: {n} request(s) wait in it; keep it (as a "
                                       "queue that takes work) until they are served")
        self.book.apply(tree)

    def queue_rows(self) -> list[dict[str, Any]]:
        """Per queue (every level): guaranteed, limit, used, borrowed, waiting, preempted and weight, for
        status views and metrics. Amounts are ``{"memory_mib", "cores", "devices"}``."""
        tree = self.book.tree
        waiting: Counter[str] = Counter()
        for queue, n in self._lines.items():
            for q in tree.ancestors(queue) if queue in tree else ():
                waiting[q] += n
        reclaiming: Counter[str] = Counter(r.plan.for_queue for r in self.reclaims.values())
        rows = []
        for name, spec in tree.specs.items():
            rows.append({"queue": name, "parent": tree.parent(name), "leaf": tree.is_leaf(name),
                         "weight": spec.weight, "preemptible": not tree.protected(name),
                         "guaranteed": _amounts(tree.guarantee(name)), "limit": {_FIELDS[r]: v for r, v in spec.limit.to_dict().items()},
                         "used": _amounts(self.book.usage(name)), "borrowed": _amounts(self.book.borrowed(name)),
                         "share": round(self.book.share(name), 4), "waiting": waiting[name],
                         "preempted": self.preempted[name], "reclaiming": reclaiming[name]})
        return rows

    # --- wait list ---------------------------------------------------------------------------
    def enqueue(self, request: SliceRequest, owner: str, submitted: float = 0.0,
                group: Sequence[SliceRequest] = (), strategy: str = "") -> Waiter:
        """Queue a request (or a gang: ``group``, one waiter for all of it) in its team queue's line;
        ``submitted`` (the caller's clock when it asked) orders it before later asks."""
        queue = self.book.tree.resolve((group[0] if group else request).queue)
        waiter = Waiter(next(self._seq), request, owner, submitted, tuple(group), strategy, queue)
        self.waitlist.add(waiter.key, waiter.requests, queue=queue, priority=request.priority, submitted=submitted,
                          strategy=strategy)
        self._waiters[waiter.key] = waiter
        self._lines[queue] += 1
        return waiter

    def remove(self, waiter: Waiter) -> None:
        """``waiter`` leaves the wait list (served, cancelled or failed), wherever it stands in it."""
        self.waitlist.remove(waiter.key)
        self.nominations.drop(waiter.key)
        if self._waiters.pop(waiter.key, None) is not None:
            self._lines[waiter.queue] -= 1

    def heads(self) -> list[tuple[Waiter, str | None]]:
        """The waiters that are next in their lines, in serving order, each with the reason its queue's
        limit holds it back (None: it may try now)."""
        return [(self._waiters[p.key], why) for p, why in self.waitlist.heads(self.book) if p.key in self._waiters]

    def head(self) -> Waiter | None:
        """The first waiter that may try now (None: nobody, or every line is held back by its limit)."""
        return next((w for w, why in self.heads() if why is None), None)

    def may_try(self, waiter: Waiter) -> bool:
        """``waiter`` is next in its line and its queue's limit does not hold it back."""
        return any(w is waiter and why is None for w, why in self.heads())

    def line_busy(self, queue: str) -> bool:
        """Somebody waits in ``queue``'s line (a new request of that queue goes behind, by priority)."""
        return self._lines[queue or DEFAULT_QUEUE] > 0

    def is_first(self, waiter: Waiter) -> bool:
        return self.head() is waiter

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    # --- preemption --------------------------------------------------------------------------
    def plan_preemption(self, waiter: Waiter) -> Preemption | None:
        """The slices to preempt so that ``waiter`` fits (reclaim for a queue under its guarantee, else a
        lower priority in its own queue), or None: none may go, or a preemption is already under way for
        it. The victims stay in the ledger until their node actors free them: nothing is double-booked.
        Gangs are not planned (:meth:`QueueBook.plan_preemption` places on one node)."""
        if waiter.group or any(r.waiter == waiter.key for r in self.reclaims.values()):
            return None
        queue = waiter.queue
        with self.others_nominated(waiter.key):  # never a plan that counts on room kept for another waiter
            plan = self.book.plan_preemption(self.scheduler, [waiter.request], queue, waiter.request.priority,
                                             spare=set(self.reclaims))  # those already leaving are not counted twice
        if plan is None:
            return None
        self.start_reclaim(plan, waiter.key, waiter.requests)
        return plan

    def start_reclaim(self, plan: Preemption, waiter: str, requests: Sequence[SliceRequest]) -> None:
        """Record ``plan`` as under way for ``waiter`` (a waiter key, or a pod's lease id): its victims are
        not planned again, status shows the reclaim, each victim's queue counts a preemption, and the room
        they leave is nominated for the waiter."""
        now = time.time()
        self.nominations.nominate(waiter, plan.node, requests, now + self.grace_s + NOMINATION_S)
        for victim in plan.victims:
            self.reclaims[victim.lease_id] = Reclaim(plan, waiter, now)
            self.preempted[victim.queue if victim.queue in self.book.tree else DEFAULT_QUEUE] += 1

    def reclaim_for(self, waiter: Waiter) -> Reclaim | None:
        """The preemption under way for ``waiter``, if any."""
        return next((r for r in self.reclaims.values() if r.waiter == waiter.key), None)

    def check(self, request: SliceRequest) -> None:
        """Fail fast on requests the cluster could never hold (instead of waiting forever).

        Raises:
            InvalidRequest: see :meth:`Scheduler.validate`; an unknown queue.
            Unschedulable: with ``never=True`` (a request over its queue's limit too).
        """
        self.scheduler.validate(request)
        self.admit([request])
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
        """The first ``limit`` waiting requests in serving order, each with its queue and why it waits: its
        queue's limit, a reclaim in progress for it, or why it does not fit now."""
        out: list[dict[str, object]] = []
        now = time.time()
        held = dict((p.key, why) for p, why in self.waitlist.heads(self.book))
        for pending in self.waitlist.ordered(self.book, limit):
            waiter = self._waiters.get(pending.key)
            if waiter is None:
                continue
            reclaim = self.reclaim_for(waiter)
            if held.get(pending.key):
                reason = str(held[pending.key])
            elif reclaim is not None:
                reason = f"{reclaim.plan.describe()} in progress"
            else:
                try:
                    if waiter.group:
                        self.ledger_probe_group(waiter.group, waiter.strategy)
                    else:
                        self.scheduler.place(waiter.request)
                    reason = "fits now: its turn is next" if pending.key in held else "behind others of its queue"
                except (Unschedulable, InvalidRequest) as exc:
                    reason = str(exc)
            what = waiter.request.describe() if not waiter.group else \
                f"gang of {len(waiter.group)} ({waiter.strategy}): {waiter.group[0].describe()}, ..."
            out.append({"owner": waiter.owner, "request": what, "priority": waiter.request.priority,
                        "queue": pending.queue, "waited_s": round(max(0.0, now - waiter.submitted), 3),
                        "reason": reason})
        return out

    # --- gangs --------------------------------------------------------------------------------
    def plan_group(self, requests: Sequence[SliceRequest], strategy: str, owner: str, created_at: float,
                   holder: Literal["process", "pod", "driver"] = "driver", job: str = "",
                   avoid: Collection[str] = ()) -> list[Plan]:
        """Hold every slice of a gang as ``reserved`` in the ledger, or none (all or nothing, in one step:
        no other request can take a slice between two of its bundles). ``avoid``: nodes none of it may go to
        (node actors that just refused, as :meth:`plan`'s).

        ``PACK``: one node if any holds them all, else wherever each fits; ``STRICT_PACK``: one node;
        ``SPREAD``: a node not used yet by this gang where one fits, else any; ``STRICT_SPREAD``: a different
        node for each.

        Raises:
            Unschedulable: the gang does not fit now (``never`` when it could not fit an empty cluster).
            InvalidRequest: a bundle is malformed, or the strategy unknown.
        """
        queue = self.admit(requests)
        for request in requests:
            self.scheduler.observe(request)
            self.workload.observe(request)

        def lease_for(index: int, allocation: Allocation) -> Lease:
            return Lease(lease_id=new_lease_id(), owner=f"{owner}[{index}]", allocation=allocation,
                         token=secrets.token_urlsafe(16), priority=requests[index].priority, created_at=created_at,
                         holder=holder, job=job, queue=queue, preemptible=requests[index].preemptible)

        with self.others_nominated(None):
            leases = self._place_group(self.scheduler, self.ledger, requests, strategy, lease_for, avoid)
        whole = Allocation(node=leases[0].allocation.node, slices=tuple(s for x in leases for s in x.allocation.slices))
        why = self.book.over_limit(queue, whole)  # the gang counts against its queue as one request
        if why is not None:
            for lease in leases:
                self.ledger.release(lease.lease_id)
            raise Unschedulable(len(self.ledger.nodes), {why: len(self.ledger.nodes)})
        return [Plan(self._hold(lease), lease.allocation.node) for lease in leases]

    def check_group(self, requests: Sequence[SliceRequest], strategy: str) -> None:
        """Fail at once when the gang could not fit even the empty cluster (instead of waiting forever).

        Raises:
            Unschedulable: with ``never=True``.
            InvalidRequest: see :meth:`plan_group`; the bundles name different queues (a gang is one request of
                one queue) or an unknown one.
        """
        for request in requests:
            self.scheduler.validate(request)
        if len({r.queue for r in requests}) > 1:
            raise InvalidRequest("queue", "a gang is served from one queue; its bundles name "
                                 f"{', '.join(sorted({r.queue for r in requests}))}")
        self.admit(requests)
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
                     lease_for: Callable[[int, Allocation], Lease], avoid: Collection[str] = ()) -> list[Lease]:
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
                    together = scheduler.place(list(requests), avoid=avoid)
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
                        allocation = scheduler.place(request, nodes=unused, avoid=avoid)
                    except Unschedulable:
                        if strategy == "STRICT_SPREAD":
                            raise
                        allocation = scheduler.place(request, avoid=avoid)
                else:
                    allocation = scheduler.place(request, avoid=avoid)
                hold(i, allocation)
                used.add(allocation.node)
            return held
        except BaseException:
            for lease in held:
                ledger.release(lease.lease_id)
            raise

    def snapshot(self) -> ClusterSnapshot:
        return self.ledger.snapshot()


_FIELDS = {"memory": "memory_mib", "cores": "cores", "devices": "devices"}  # a quota's YAML keys -> status keys


def _amounts(usage: Usage) -> dict[str, int]:
    return {"memory_mib": usage.memory_mib, "cores": usage.cores, "devices": usage.devices}
