"""Where the Kubernetes bridge's devices and leases live: one engine, two sources.

- :class:`AnnotationInventory` (``--inventory annotations``): HAMi's node register annotations
  (``hami.io/node-nvidia-register`` and the other vendors' keys) fill a ledger in this process; the pods'
  allocation annotations are its leases. hami-ray replaces hami-scheduler in a cluster that runs HAMi's
  device plugins.
- :class:`RayInventory` (``--ray-address``): the placement actor's ledger, shared with Ray tasks. Node
  actors say which Kubernetes node they run on (``$HAMI_RAY_K8S_NODE``); a pod's lease is held there as
  ``holder="pod"`` until the bridge frees it.

A pod's lease id is ``pod-<uid>``, its token the pod's uid. Its requests carry its queue, priority and
preemptibility (:mod:`hami_ray.k8s.queueing`), and so does its Lease.

Team queues (issue 14): the inventory that holds the ledger counts each queue's usage
(:class:`~hami_ray.core.queues.QueueBook`) and plans preemptions over it; the bridge orders waiting pods
by that book and evicts the pod victims of a plan. :class:`AnnotationInventory` does all of it in this
process; :class:`RayInventory` leaves it to the placement actor (not wired yet: see its methods).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from typing import Any, Protocol

from hami_ray.core.codec import devices_from_register
from hami_ray.core.errors import HamiRayError, TemporaryError
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import (DEFAULT_QUEUE, Allocation, ClusterSnapshot, DeviceGrant, Lease, LeaseState, Node,
                                 SliceRequest)
from hami_ray.core.queues import Preemption, QueueBook, QueueTree
from hami_ray.core.scheduler import Scheduler
from hami_ray.core.vendors import NVIDIA_SCORE_ANNOTATION, NVIDIA_VENDOR, VENDORS, Vendor

log = logging.getLogger(__name__)


DOUBT_S = 30.0  # after the placement actor restarted or a release failed: how long its pods' leases are re-read
RECHECK_EVERY_S = 300.0  # and otherwise, how often (a pod's slice held by nothing is found within that)


def lease_id_of(uid: str) -> str:
    return f"pod-{uid}"


class Inventory(Protocol):
    """What the bridge needs of a ledger. Allocations name Kubernetes nodes."""

    def set_node(self, name: str, annotations: dict[str, str]) -> bool:
        """A Kubernetes node and its annotations (added or changed); True if its devices changed. Raises
        HamiRayError on a register annotation that does not parse (the node is then left out)."""

    def remove_node(self, name: str) -> None: ...

    def place(self, uid: str, owner: str, requests: Sequence[SliceRequest], nodes: Collection[str]) -> Allocation:
        """Hold the slices of a pod's containers on one of ``nodes``, in the queue, priority and
        preemptibility the requests carry. Raises Unschedulable/InvalidRequest, or TemporaryError when the
        queue's limit holds them back."""

    def fits(self, requests: Sequence[SliceRequest], nodes: Collection[str]) -> bool:
        """Whether the requests would fit one of ``nodes`` now (holds nothing; True where it cannot tell).
        A pod that fits only nodes with a bind in flight waits for their locks instead of preempting."""

    def adopt(self, uid: str, owner: str, node: str, slices: Sequence[Sequence[DeviceGrant]], *,
              queue: str = DEFAULT_QUEUE, priority: int = 0, preemptible: bool = True,
              created_at: float = 0.0) -> bool:
        """Hold what a pod was given before (its allocation annotation); False if ``node`` is unknown here.
        Raises HamiRayError when the slices cannot be held there."""

    def release(self, uid: str) -> bool:
        """Free the pod's slices; False if they were not held. Raises what the ledger's owner raised (the
        placement actor restarting): the pod then still holds them here, and :meth:`recheck` says so."""

    def holds(self, uid: str) -> bool: ...

    def recheck(self) -> bool:
        """Read again what the ledger holds for pods, where it lives elsewhere and may hold what this bridge
        freed (the placement actor restarted and rebuilt its ledger from its node actors, a release failed),
        if that is due; True if it was read, so the bridge frees the slices of pods that are gone again."""

    def held(self) -> set[str]:
        """The uids of the pods holding leases."""

    def changes(self) -> int:
        """Moves when capacity was freed by somebody else (Ray tasks): waiting pods are tried again."""

    def snapshot(self) -> ClusterSnapshot: ...

    def validate(self, requests: Sequence[SliceRequest]) -> None:
        """Refuse requests no device or node here could ever hold, whatever its load (a pod told at once
        instead of blocking its queue's line). Raises InvalidRequest."""

    def set_queues(self, tree: QueueTree) -> None:
        """Use these queue definitions from now on; live leases keep their queues.

        Raises:
            QueueConfigError: a queue that still holds leases is missing (the old definitions stay).
        """

    def queue_book(self) -> QueueBook | None:
        """The per-queue usage waiting pods are ordered and admitted by (over this inventory's ledger), or
        None where the ledger is elsewhere (Ray: the placement actor's)."""

    def plan_preemption(self, uid: str, requests: Sequence[SliceRequest], nodes: Collection[str],
                        spare: Collection[str]) -> Preemption | None:
        """The slices (pods', and with Ray, tasks') whose release would let the pod ``uid``'s ``requests``
        (their queue and priority) fit on one of ``nodes``, never taking a lease id in ``spare``; None when
        no plan exists. Plans only: nothing is freed."""

    def preempt(self, plan: Preemption) -> list[str]:
        """Start ``plan``: victims this inventory stops itself (Ray tasks and actors: ``SlicePreempted``
        through their node actor) are told; returns the uids of the pod victims, which the bridge evicts.
        Their leases stay held until each victim is gone, so nothing is double-booked."""


class AnnotationInventory:
    """A ledger in this process, its nodes from HAMi's register annotations (every vendor's key)."""

    def __init__(self, vendors: Sequence[Vendor] = VENDORS) -> None:
        self.ledger = Ledger()
        self.scheduler = Scheduler(self.ledger)
        self.vendors = tuple(v for v in vendors if v.register)
        self._seen: dict[str, tuple[str | None, ...]] = {}  # node -> the annotations it was built from
        self.book = QueueBook(QueueTree(), self.ledger)  # `default` alone until set_queues

    def set_node(self, name: str, annotations: dict[str, str]) -> bool:
        key = (annotations.get(NVIDIA_SCORE_ANNOTATION), *(annotations.get(v.register or "") for v in self.vendors))
        if self._seen.get(name) == key and name in self.ledger.nodes:
            return False  # a heartbeat: nothing that matters here changed
        devices: list[Any] = []
        for vendor in self.vendors:
            value = annotations.get(vendor.register or "")
            if value is None:
                continue
            score = annotations.get(NVIDIA_SCORE_ANNOTATION) if vendor is NVIDIA_VENDOR else None
            try:
                devices.extend(devices_from_register(value, score, vendor=vendor.type_word))
            except HamiRayError:
                self._seen.pop(name, None)
                self.remove_node(name)
                raise
        self._seen[name] = key
        new = Node(name=name, devices=tuple(devices))
        if name in self.ledger.nodes and self.ledger.node(name) == new:
            return False
        for lost in self.ledger.add_node(new):
            self.book.drop(lost.lease_id)
        return True

    def remove_node(self, name: str) -> None:
        self._seen.pop(name, None)
        if name in self.ledger.nodes:
            for lost in self.ledger.remove_node(name):
                self.book.drop(lost.lease_id)

    def place(self, uid: str, owner: str, requests: Sequence[SliceRequest], nodes: Collection[str]) -> Allocation:
        allocation = self.scheduler.place(requests, nodes=nodes)
        first = requests[0]
        why = self.book.over_limit(first.queue, allocation)  # its least size was checked; this is what it takes
        if why is not None:
            raise TemporaryError(why)
        lease = self.ledger.allocate(Lease(
            lease_id=lease_id_of(uid), owner=owner, token=uid, allocation=allocation, state=LeaseState.ACTIVE,
            holder="pod", queue=first.queue, priority=first.priority,
            preemptible=all(r.preemptible for r in requests), created_at=time.time()))
        self.book.hold(lease)
        return allocation

    def fits(self, requests: Sequence[SliceRequest], nodes: Collection[str]) -> bool:
        try:
            return any(why is None for why in self.scheduler.verdicts(requests, list(nodes)).values())
        except HamiRayError:
            return False

    def adopt(self, uid: str, owner: str, node: str, slices: Sequence[Sequence[DeviceGrant]], *,
              queue: str = DEFAULT_QUEUE, priority: int = 0, preemptible: bool = True,
              created_at: float = 0.0) -> bool:
        if node not in self.ledger.nodes:
            return False
        if lease_id_of(uid) not in self.ledger.leases:
            if queue not in self.book.tree:  # a namespace naming a queue not defined (yet): counted somewhere
                log.warning("pod %s: queue %r is not defined; its slices count in %s", owner, queue, DEFAULT_QUEUE)
                queue = DEFAULT_QUEUE
            lease = self.ledger.allocate(Lease(
                lease_id=lease_id_of(uid), owner=owner, token=uid, state=LeaseState.ACTIVE,
                allocation=Allocation(node=node, slices=tuple(tuple(c) for c in slices)), holder="pod",
                queue=queue, priority=priority, preemptible=preemptible, created_at=created_at))
            self.book.hold(lease)
        return True

    def release(self, uid: str) -> bool:
        if not self.holds(uid):
            return False
        self.book.drop(lease_id_of(uid))
        return self.ledger.release(lease_id_of(uid)) is not None

    def holds(self, uid: str) -> bool:
        return lease_id_of(uid) in self.ledger.leases

    def recheck(self) -> bool:
        return False  # the ledger is this process's own

    def held(self) -> set[str]:
        return {lid.removeprefix("pod-") for lid in self.ledger.leases if lid.startswith("pod-")}

    def changes(self) -> int:
        return 0  # nobody else frees slices here

    def snapshot(self) -> ClusterSnapshot:
        return self.ledger.snapshot()

    def validate(self, requests: Sequence[SliceRequest]) -> None:
        for request in requests:
            self.scheduler.validate(request)

    def set_queues(self, tree: QueueTree) -> None:
        self.book.apply(tree)

    def queue_book(self) -> QueueBook | None:
        return self.book

    def plan_preemption(self, uid: str, requests: Sequence[SliceRequest], nodes: Collection[str],
                        spare: Collection[str]) -> Preemption | None:
        first = requests[0]
        return self.book.plan_preemption(self.scheduler, requests, first.queue, first.priority, nodes=nodes,
                                         spare=spare)

    def preempt(self, plan: Preemption) -> list[str]:
        return [v.lease_id.removeprefix("pod-") for v in plan.victims if v.lease_id.startswith("pod-")]


class RayInventory:
    """The placement actor's ledger (Ray tasks and pods in one). Calls are Ray calls, answered in
    milliseconds; Ray nodes without a Kubernetes node name never get pods."""

    def __init__(self, placement: Any) -> None:
        import ray  # noqa: PLC0415 - only this inventory needs Ray

        self._ray = ray
        self._task_error = ray.exceptions.RayTaskError
        self.placement = placement
        self._held: dict[str, str] = {}  # uid -> Kubernetes node
        self._incarnation: str | None = None  # the placement actor's, as last seen
        self._doubt_until = 0.0  # monotonic: until then, the pods' leases are read again every recheck
        self._checked_at = time.monotonic()
        self.sync()

    def _get(self, ref: Any) -> Any:
        """``ray.get``, with the placement actor's own errors (Unschedulable, InvalidRequest) raised as
        themselves, their message intact (it becomes the pod's FailedScheduling event)."""
        try:
            return self._ray.get(ref)
        except self._task_error as exc:
            if isinstance(exc.cause, HamiRayError):
                raise exc.cause from None
            raise

    def sync(self) -> dict[str, Any]:
        """What the placement actor holds for pods (after a restart of either side)."""
        state: dict[str, Any] = self._ray.get(self.placement.pod_leases.remote())
        self._held = {lid.removeprefix("pod-"): node for lid, node in state["leases"].items()}
        self._saw(state["incarnation"])
        self._checked_at = time.monotonic()
        return state

    def _saw(self, incarnation: str) -> None:
        if self._incarnation is not None and incarnation != self._incarnation:
            self._doubt("the placement actor restarted")
        self._incarnation = incarnation

    def _doubt(self, why: str) -> None:
        """The placement actor may hold pods' slices this bridge freed: read its pods' leases again, every
        recheck, for :data:`DOUBT_S` (a node actor that answers the restarted actor late brings its leases
        late)."""
        log.info("%s: the pods' leases are read again for %.0f s", why, DOUBT_S)
        self._doubt_until = time.monotonic() + DOUBT_S

    def recheck(self) -> bool:
        now = time.monotonic()
        if now >= self._doubt_until and now - self._checked_at < RECHECK_EVERY_S:
            return False
        self.sync()
        return True

    def set_node(self, name: str, annotations: dict[str, str]) -> bool:
        """Nothing to read: the node actors report the devices."""
        return False

    def remove_node(self, name: str) -> None:
        """The node actor's Ray node leaving is what removes its devices."""

    def place(self, uid: str, owner: str, requests: Sequence[SliceRequest], nodes: Collection[str]) -> Allocation:
        grant = self._get(self.placement.place_pod.remote(
            [r.model_dump(mode="json") for r in requests], owner, lease_id_of(uid), uid, sorted(nodes)))
        lease = Lease.model_validate(grant["lease"])
        self._held[uid] = grant["k8s_node"]
        return lease.allocation.model_copy(update={"node": grant["k8s_node"]})

    def fits(self, requests: Sequence[SliceRequest], nodes: Collection[str]) -> bool:
        """Not asked of the placement actor (it would be one more Ray call per waiting pod): assumed."""
        return True

    def adopt(self, uid: str, owner: str, node: str, slices: Sequence[Sequence[DeviceGrant]], *,
              queue: str = DEFAULT_QUEUE, priority: int = 0, preemptible: bool = True,
              created_at: float = 0.0) -> bool:
        ok = bool(self._get(self.placement.adopt_pod.remote(
            lease_id_of(uid), uid, owner, node, [[g.model_dump(mode="json") for g in c] for c in slices],
            queue, priority, preemptible)))
        if ok:
            self._held[uid] = node
        return ok

    def release(self, uid: str) -> bool:
        if uid not in self._held:
            return False
        try:
            freed = bool(self._ray.get(self.placement.release_pod.remote(lease_id_of(uid))))
        except Exception:  # still held: the placement actor may have freed it or not (it died answering)
            self._doubt(f"pod {uid}'s slices not freed")
            raise
        del self._held[uid]
        if not freed:  # a restarted actor that has not heard from the node actor holding it yet
            self._doubt(f"pod {uid}'s slices were not held by the placement actor")
        return freed

    def holds(self, uid: str) -> bool:
        return uid in self._held

    def held(self) -> set[str]:
        return set(self._held)

    def changes(self) -> int:
        answer = self._ray.get(self.placement.pod_changes.remote())
        self._saw(answer["incarnation"])
        return int(answer["changes"])

    def snapshot(self) -> ClusterSnapshot:
        snap = ClusterSnapshot.model_validate(self._ray.get(self.placement.status.remote())["snapshot"])
        return snap

    # Team queues live in the placement actor (``hami-ray queues apply``), which orders Ray tasks and pods
    # in one book and checks a pod's queue limit when it places it; it plans preemptions for pods too.
    def validate(self, requests: Sequence[SliceRequest]) -> None:
        """Nothing here: the placement actor refuses such a request when it is placed."""

    def set_queues(self, tree: QueueTree) -> None:
        raise NotImplementedError("with the Ray inventory the placement actor keeps the queue definitions: "
                                  "apply them with `hami-ray queues apply FILE`, not the bridge's --queues")

    def queue_book(self) -> QueueBook | None:
        return None

    def plan_preemption(self, uid: str, requests: Sequence[SliceRequest], nodes: Collection[str],
                        spare: Collection[str]) -> Preemption | None:
        """The placement actor plans over its ledger (pods and Ray work) and starts the plan at once: Ray
        victims get their notice now, so :meth:`preempt` only names the pods to evict."""
        answer = self._get(self.placement.preempt_for_pod.remote(
            lease_id_of(uid), [r.model_dump(mode="json") for r in requests], sorted(nodes), sorted(spare)))
        if answer is None:
            return None
        plan = answer["plan"]
        return Preemption(tuple(Lease.model_validate(v) for v in plan["victims"]), plan["node"], plan["reason"],
                          plan["for_queue"])

    def preempt(self, plan: Preemption) -> list[str]:
        return [v.lease_id.removeprefix("pod-") for v in plan.victims if v.holder == "pod"]
