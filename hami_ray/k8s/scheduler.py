"""hami-ray as ``hami-scheduler`` for pods: HAMi-compatible placement, annotations and binding.

The bridge keeps every node, namespace and pod by list-then-watch (:class:`~hami_ray.k8s.kubeapi.Informer`,
plain JSON) and reacts to each change:

- a node's register annotations fill the inventory (a node whose annotation does not parse is left out,
  with a warning event on it, once);
- a namespace names its pods' team queue (:func:`hami_ray.k8s.queueing.namespace_queue`);
- a pod that is bound (by us, another replica, HAMi's scheduler or before a restart) holds what its
  allocation annotations say, in its namespace's queue; one that is deleted, Succeeded or Failed frees its
  lease (never earlier: an evicted pod holds its slices until it is gone). The first lists are taken in
  whole before anything is placed, so a restarted bridge has rebuilt its ledger from the annotations
  before it binds anything new;
- a pending pod of this scheduler is served by the :class:`~hami_ray.k8s.podqueue.PodQueue`: in its
  queue's line, ordered by the queues' shares, then priority, then creation; cycles place the heads'
  containers (init containers first, as HAMi resolves them: :func:`hami_ray.core.hami.pod_requests`) on one
  node with the core engine, start preemptions (evictions) for heads that do not fit, and say why the
  others wait.

Binding is one ``pods/binding`` call that carries HAMi's annotations (``hami.io/vgpu-node``,
``hami.io/vgpu-time``, the vendors' ``...-devices-to-allocate`` and ``...-devices-allocated``,
``hami.io/bind-phase``, ``hami.io/bind-time``; the API server writes the Binding's annotations onto the pod
with its node, so there is no moment where one is there without the other). A 409 (bound meanwhile)
reads the pod again and keeps what it says instead of ours. A ``Scheduled`` event follows each binding.
Before it, the pod gets the label ``hami.io/vgpu-node=<node>`` (HAMi's vGPUmonitor selects pods by it) and,
on a node whose device plugin is HAMi's, HAMi's node lock (``bind_mode``, :mod:`hami_ray.k8s.nodelock`;
the calls: :mod:`hami_ray.k8s.binder`):
placement then passes over nodes with a bind in flight for the best node without one, and a pod waits
for a lock only when no other node fits it; a lock found taken at bind time sends the pod back to be
placed again at once. A pod whose requests are read with HAMi's meaning rather than as written
(``gpumem: 0``, memory in MiB and percent together) gets a ``HAMiRequestReinterpreted`` event, once.
Cycles run when something changed (a pod arrived, a slice was freed, a node, a namespace or the queue
definitions changed) and every minute anyway; nothing stops the loop. Events and conditions are written
off the binding path.

Inventory (:mod:`hami_ray.k8s.inventory`): HAMi's node register annotations, or the Ray placement
actor's ledger (pods and Ray tasks in one).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from hami_ray.core.errors import HamiRayError, TemporaryError, Unschedulable
from hami_ray.core.hami import ContainerRequest, HamiConfig, pod_requests
from hami_ray.core.model import DEFAULT_QUEUE, Allocation, SliceRequest
from hami_ray.k8s import nodelock
from hami_ray.k8s.annotations import NODE_ANNOTATION, allocated, binding_annotations
from hami_ray.k8s.binder import Binder
from hami_ray.k8s.inventory import AnnotationInventory, Inventory
from hami_ray.k8s.kubeapi import Informer, KubeApi, follow_all, owner_of, pod_path, timestamp
from hami_ray.k8s.nodelock import LOCKED, BindMode, NodeLocks
from hami_ray.k8s.nodefit import NodeInfo
from hami_ray.k8s.podqueue import Call, PodQueue
from hami_ray.k8s.queueing import QueueFile, held_since, pod_terms, with_terms

log = logging.getLogger(__name__)

SCHEDULER_NAME = "hami-scheduler"
COMPONENT = "hami-ray-scheduler"
CHANGES_POLL_S = 1.0  # how often the inventory is asked whether somebody else freed slices (Ray tasks)
RECHECK_S = 2.0  # how often the inventory is asked whether what it holds for pods must be read again
REINTERPRETED = "HAMiRequestReinterpreted"  # the event a pod read with HAMi's meaning gets


@dataclass
class PassStats:
    bound: int = 0
    unschedulable: int = 0
    invalid: int = 0
    released: int = 0
    skipped_nodes: list[str] = field(default_factory=list)


class PodScheduler:
    """Places and binds the pods whose ``schedulerName`` is ``scheduler_name``.

    :meth:`run_once` is one pass (list, one scheduling cycle, bind and evict in this thread); :meth:`run`
    follows the cluster by watch until stopped, binding and evicting from a pool of threads. ``queues``:
    the team queue definitions (read again when the file changes); without it only ``default`` exists.
    ``changes``, :meth:`changed`, :meth:`wake`, :meth:`placed`, :meth:`place`, :meth:`note`, :meth:`event`
    and :meth:`condition` are for its :attr:`podqueue`, under :attr:`lock`. ``bind_mode``: whether binds
    take HAMi's node lock (:class:`~hami_ray.k8s.nodelock.BindMode`; ``hami-ray k8s scheduler`` says
    ``auto``, this class ``direct``: a test cluster's nodes carry HAMi's register annotation with no device
    plugin to release a lock); ``lock_timeout_s``: HAMi's node lock timeout.
    """

    def __init__(self, api: client.ApiClient, *, scheduler_name: str = SCHEDULER_NAME,
                 config: HamiConfig | None = None, inventory: Inventory | None = None, quiet: bool = False,
                 queue: bool = True, queues: QueueFile | None = None, bind_mode: BindMode | str = BindMode.DIRECT,
                 lock_timeout_s: float = nodelock.LOCK_TIMEOUT_S) -> None:
        self.kube = KubeApi(api)
        self.scheduler_name = scheduler_name
        self.config = config or HamiConfig()
        self.inventory: Inventory = inventory if inventory is not None else AnnotationInventory()
        self.quiet = quiet  # read-only (status): no events, no conditions
        self.queue = queue  # False: follow the cluster only (extender mode: kube-scheduler decides when)
        if queues is not None:
            self.inventory.set_queues(queues.tree)
        self.podqueue = PodQueue(self, queues)
        self.stats = PassStats()
        self.pods: dict[str, dict[str, Any]] = {}  # uid -> pod, as the API server has it
        self.nodes: dict[str, NodeInfo] = {}  # what the filters read of each node; nodes left out are not here
        self.changes = 0  # cluster changes seen (slices freed, nodes, namespaces or queues changed)
        self._open: list[str] | None = None  # the nodes without cordon or taints (cached until a node changes)
        self._skipped: dict[str, str] = {}  # node -> why its register annotation was refused
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._in_flight: set[str] = set()  # uids whose binding call is under way
        self._bound_on: dict[str, str] = {}  # uid -> node, for every bound live pod (spreads device-less pods)
        self._per_node: Counter[str] = Counter()
        self.locks = NodeLocks(BindMode(bind_mode), lock_timeout_s)  # HAMi's node locks, as placement sees them
        self._names: dict[tuple[str, str], str] = {}  # (namespace, name) -> uid, for every live pod seen
        self._waits_for_lock: set[str] = set()  # uids that fit only nodes with a bind in flight
        self._reinterpreted: set[str] = set()  # uids told how HAMi's meaning read their requests
        self.binder = Binder(self)
        self._dirty = False  # a cycle is due
        self._outside = self.inventory.changes()
        self._outside_at = time.monotonic()
        self._swept_at = 0.0
        self._rechecked_at = time.monotonic()
        self._pool: ThreadPoolExecutor | None = None  # run(): bindings and evictions, several at once
        self._notes: ThreadPoolExecutor | None = None  # run(): events and conditions, off the binding path
        self.pod_informer = Informer(self.kube, "/api/v1/pods", self._on_pod, "pods")
        self.node_informer = Informer(self.kube, "/api/v1/nodes", self._on_node, "nodes")
        self.namespace_informer = Informer(self.kube, "/api/v1/namespaces", self._on_namespace, "namespaces")

    @property
    def lock(self) -> threading.RLock:
        """Guards the caches and the inventory (the watch threads hold it while they apply a change)."""
        return self._lock

    @property
    def ledger(self) -> Any:
        """The annotation inventory's ledger (tests and status read it)."""
        return getattr(self.inventory, "ledger")

    def open_nodes(self) -> list[str]:
        """The nodes without cordon or taints (cached until a node changes)."""
        if self._open is None:
            self._open = [n for n, info in self.nodes.items() if info.open]
        return self._open

    @staticmethod
    def owner(pod: dict[str, Any]) -> str:
        return owner_of(pod)

    def changed(self) -> None:
        """The cluster changed in a way that may let waiting pods fit: a cycle is due."""
        self.changes += 1
        self.wake()

    def wake(self) -> None:
        """A cycle is due (a pod to serve)."""
        self._dirty = True
        self._cond.notify()

    def placed(self, uid: str) -> None:
        """The pod's slices are held (or were, before): its binding is under way."""
        self._in_flight.add(uid)

    # --- following the cluster -----------------------------------------------------------------
    def _on_node(self, kind: str, node: dict[str, Any]) -> None:
        meta = node["metadata"]
        name = meta["name"]
        with self._lock:
            if kind == "DELETED":
                self.nodes.pop(name, None)
                self._open = None
                self._skipped.pop(name, None)
                self.locks.forget(name)
                self.inventory.remove_node(name)
                self.changed()
                return
            if self.locks.observe(name, meta):  # a lock came or went: pods waiting for it may go now
                self.changed()
            annotations = meta.get("annotations") or {}
            old = self.nodes.get(name)
            try:
                changed = self.inventory.set_node(name, annotations)
            except HamiRayError as exc:
                self.nodes.pop(name, None)
                self._open = None
                if self._skipped.get(name) != str(exc):
                    self._skipped[name] = str(exc)
                    self.note(self.event, node, "Warning", "InvalidRegisterAnnotation", str(exc), "Node")
                return
            self._skipped.pop(name, None)
            info = NodeInfo.of(node)
            self.nodes[name] = info
            if changed or old != info:
                self._open = None
                self.changed()

    def _on_namespace(self, kind: str, namespace: dict[str, Any]) -> None:
        with self._lock:
            if self.podqueue.on_namespace(kind, namespace):
                self.changed()

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        spec = pod.get("spec") or {}
        with self._lock:
            if kind == "DELETED" or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                if kind == "DELETED":
                    self.binder.seen_bound(pod, None)
                    self.pods.pop(uid, None)
                    self._names.pop((meta.get("namespace"), meta.get("name")), None)
                    self._reinterpreted.discard(uid)
                    self._waits_for_lock.discard(uid)
                    if self.locks.names(meta.get("namespace"), meta.get("name")):
                        self.changed()  # its node's lock is dangling now: free for others
                else:
                    self.pods[uid] = pod
                self.podqueue.forget(uid)
                node = self._bound_on.pop(uid, None)
                if node is not None:
                    self._per_node[node] -= 1
                if self.free(uid):
                    self.stats.released += 1
                return
            self.pods[uid] = pod
            self._names[(meta.get("namespace"), meta.get("name"))] = uid
            node = spec.get("nodeName")
            if node:
                self.binder.seen_bound(pod, node)
                self.podqueue.forget(uid)
                if uid not in self._bound_on:
                    self._bound_on[uid] = node
                    self._per_node[node] += 1
                if not self.inventory.holds(uid) and uid not in self._in_flight:
                    self._adopt(pod, node)
                return
            if spec.get("schedulerName") != self.scheduler_name or meta.get("deletionTimestamp"):
                return
            if uid in self._in_flight:
                return
            placed_on = (meta.get("annotations") or {}).get(NODE_ANNOTATION)
            if placed_on and not self.inventory.holds(uid):  # annotated, never bound (HAMi's two steps)
                self._adopt(pod, placed_on)
            if self.queue:
                self.podqueue.seen(pod)

    def free_gone(self) -> list[str]:
        """Free the slices held for pods that are gone or finished (the uids returned). Run once the first
        lists are in: a pod deleted while no bridge ran (this one restarting) sends this bridge no event,
        and with a ledger it shares (the placement actor's) its slices would be held for ever."""
        with self._lock:
            live = {uid for uid, pod in self.pods.items()
                    if (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")}
            gone = sorted(self.inventory.held() - live - self._in_flight)
            for uid in gone:
                if self.free(uid):
                    self.stats.released += 1
                    log.info("pod %s is gone: its slices are freed", uid)
            return gone

    def free(self, uid: str) -> bool:
        """Free the pod's slices if they are held; True if they were. Under the lock. A release that fails
        (the placement actor restarting) leaves them held here, and they are freed again when the
        inventory's recheck is next due (:meth:`_time_passed`), if the pod is gone by then."""
        if not self.inventory.holds(uid):
            return False
        try:
            freed = self.inventory.release(uid)
        except Exception as exc:  # noqa: BLE001 - the placement actor restarting: freed at the next recheck
            log.warning("pod %s: its slices were not freed (%s); tried again", uid, exc)
            return False
        if freed:
            self.changed()
        return freed

    def _adopt(self, pod: dict[str, Any], node: str) -> None:
        """Hold what the pod's allocation annotations say it was given on ``node``, in its namespace's queue."""
        try:
            slices = [c for c in allocated(pod["metadata"].get("annotations") or {}) if c]
            if not slices:
                return
            try:
                priority, preemptible = pod_terms(pod)
            except HamiRayError:  # a bad opt-out annotation: preemptible, as without one
                priority, preemptible = pod_terms({"spec": pod.get("spec")})
            if not self.inventory.adopt(pod["metadata"]["uid"], owner_of(pod), node, slices,
                                        queue=self.podqueue.queue_for(pod["metadata"].get("namespace")),
                                        priority=priority, preemptible=preemptible, created_at=held_since(pod)):
                log.warning("pod %s: node %s is not in the inventory; its slices are not counted", owner_of(pod), node)
        except HamiRayError as exc:
            log.warning("pod %s: allocation annotation not restored: %s", owner_of(pod), exc)

    def _time_passed(self, now: float) -> None:
        """Slices freed by somebody else (Ray tasks), back-offs over, a changed queue file, spared victims
        askable again, the minute after which every waiting pod is tried again."""
        if now - self._outside_at >= CHANGES_POLL_S:
            self._outside_at = now
            try:
                outside = self.inventory.changes()
            except Exception as exc:  # noqa: BLE001 - the placement actor restarting: ask again later
                log.info("inventory changes not read: %s", exc)
                outside = self._outside
            if outside != self._outside:
                self._outside = outside
                self.changed()
        if now - self._rechecked_at >= RECHECK_S:
            self._rechecked_at = now
            try:
                if self.inventory.recheck():
                    self.free_gone()
            except Exception as exc:  # noqa: BLE001 - the placement actor restarting: checked again later
                log.info("pods' leases not read again: %s", exc)
        if now - self._swept_at >= 0.2:
            self._swept_at = now
            self.podqueue.sweep(now)
            if self.locks.expired():  # a lock older than HAMi's timeout is free now
                self.changed()
        if self.podqueue.tick(now):
            self.changed()

    # --- placing and binding ---------------------------------------------------------------------
    def reinterpreted(self, pod: dict[str, Any], containers: Sequence[ContainerRequest]) -> None:
        """Tell the pod, once, where its requests were read with HAMi's meaning rather than as written."""
        notes = [note for c in containers for note in c.notes]
        uid = pod["metadata"]["uid"]
        if notes and uid not in self._reinterpreted:
            self._reinterpreted.add(uid)
            self.note(self.event, pod, "Normal", REINTERPRETED, "; ".join(notes))

    def place(self, uid: str, owner: str, requests: Sequence[SliceRequest], nodes: Sequence[str], *,
              wait_for_locks: bool = False) -> Allocation:
        """Hold a pod's slices on one of ``nodes`` (:meth:`Inventory.place`), passing over the nodes with a
        bind in flight (HAMi's lock) for the best of the others. A pod that fits only those waits for their
        locks: Unschedulable with them counted, and no preemption is planned for it (:meth:`waits_for_lock`);
        with ``wait_for_locks`` (the extender, whose bind waits for the lock) it is held on the best of them,
        unclaimed (:meth:`claim_when_free` takes the node when its bind in flight is over).

        Raises:
            Unschedulable, TemporaryError, InvalidRequest: as :meth:`Inventory.place`.
        """
        self._waits_for_lock.discard(uid)
        namespace, _, name = owner.partition("/")
        free, busy = self.locks.split(nodes, self.has_pod, pod=(namespace, name))
        try:
            if not free and busy:
                raise Unschedulable(0, {})
            allocation = self.inventory.place(uid, owner, requests, free)
        except Unschedulable as exc:
            if not busy or exc.never:
                raise
            if self.inventory.fits(requests, busy):
                if wait_for_locks:
                    return self.inventory.place(uid, owner, requests, busy)
                self._waits_for_lock.add(uid)
                raise Unschedulable(exc.total_nodes + len(busy), {**exc.reasons, LOCKED: len(busy)}) from None
            allocation = self.inventory.place(uid, owner, requests, nodes)  # raises, with every node's reason
        if self.locks.needs_lock(allocation.node):
            self.locks.claim(allocation.node, uid)
        return allocation

    def claim_when_free(self, node: str, uid: str, pod: tuple[str, str]) -> bool:
        """Claim ``node`` for the bind of pod ``uid`` (``pod``: its namespace and name) if no other bind is
        in flight there (:meth:`NodeLocks.free_for`): True then, or where the node takes no lock. Under
        :attr:`lock`."""
        if not self.locks.needs_lock(node):
            return True
        if not self.locks.free_for(node, uid, self.has_pod, pod):
            return False
        self.locks.claim(node, uid)
        return True

    def waits_for_lock(self, uid: str) -> bool:
        """Whether the pod did not fit now only because of binds in flight (no preemption for it)."""
        return uid in self._waits_for_lock

    def reserve(self, pod: dict[str, Any], nodes: Sequence[str], *,
                wait_for_locks: bool = False) -> tuple[str, dict[str, str]]:
        """Place the pod's containers (HAMi's requests, in its namespace's queue) on one of ``nodes`` and
        hold them; the pod is then in flight until :meth:`bind` says how its binding went (what it held
        before, never bound, is freed first). A pod without devices goes to the node of ``nodes`` with the
        fewest pods. Returns the node and HAMi's annotations for the Binding. ``wait_for_locks``: see
        :meth:`place`.

        Raises:
            TemporaryError: the pod is in flight already; its queue's limit holds it back.
            Unschedulable: no node of ``nodes`` fits now (``0/N nodes are available: ...``).
            InvalidRequest: bad resources or annotations, or a request no device can ever hold.
        """
        uid = pod["metadata"]["uid"]
        with self._lock:
            if uid in self._in_flight:
                raise TemporaryError(f"pod {owner_of(pod)} is being bound already")
            self.free(uid)  # placed before (its annotations) and never bound: place it again
            if self.inventory.holds(uid):
                raise TemporaryError(f"pod {owner_of(pod)}: the slices it held before are not freed yet")
            containers = pod_requests(pod, self.config)
            self.reinterpreted(pod, containers)
            requests = [c.request for c in containers if c.request is not None]
            if not requests:
                if not nodes:
                    raise Unschedulable(0, {})
                node = min(nodes, key=lambda n: (self._per_node[n], n))
                annotations = binding_annotations(node, containers, None)
            else:
                priority, preemptible = pod_terms(pod)
                requests = with_terms(requests, self.podqueue.queue_for(pod["metadata"].get("namespace")),
                                      priority, preemptible)
                allocation = self.place(uid, owner_of(pod), requests, nodes, wait_for_locks=wait_for_locks)
                node = allocation.node
                annotations = binding_annotations(node, containers, allocation)
            self._in_flight.add(uid)
        return node, annotations

    def bind(self, pod: dict[str, Any], node: str, annotations: dict[str, str] | None, *,
             explain: bool = True) -> str | None:
        """Bind the pod to ``node`` (:meth:`Binder.bind <hami_ray.k8s.binder.Binder.bind>`: HAMi's lock where
        the node takes it, the label, the Binding); None when it is bound there, else why not."""
        return self.binder.bind(pod, node, annotations, explain=explain)

    def landed(self, uid: str) -> None:
        """The pod's binding call is over (bound or not): it is no longer in flight. Under :attr:`lock`."""
        self._in_flight.discard(uid)

    def adopt(self, pod: dict[str, Any], node: str) -> None:
        """Hold what a bound pod's allocation annotations say (:meth:`_adopt`). Under :attr:`lock`."""
        self._adopt(pod, node)

    def has_pod(self, namespace: str, name: str) -> bool:
        """Whether a pod of that name is in the cache (placement: no API call under the lock)."""
        return (namespace, name) in self._names

    # --- events and conditions -------------------------------------------------------------------
    def condition(self, pod: dict[str, Any], reason: str, message: str) -> None:
        condition = {"type": "PodScheduled", "status": "False", "reason": reason, "message": message,
                     "lastTransitionTime": timestamp()}
        try:
            self.kube.patch(pod_path(pod, "/status"), {"status": {"conditions": [condition]}},
                            content_type="application/strategic-merge-patch+json")
        except ApiException as exc:
            log.info("pod %s: condition not written: %s", owner_of(pod), exc.reason)

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str, kind: str = "Pod",
               action: str = "Scheduling") -> None:
        meta = obj["metadata"]
        namespace = meta.get("namespace") or "default"
        body = {"apiVersion": "events.k8s.io/v1", "kind": "Event",
                "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": namespace},
                "eventTime": timestamp(micro=True), "reportingController": COMPONENT, "reportingInstance": COMPONENT,
                "action": action, "type": type_, "reason": reason, "note": message[:1024],
                "regarding": {"kind": kind, "name": meta["name"], "namespace": meta.get("namespace"),
                              "uid": meta.get("uid"), "apiVersion": "v1"}}
        try:
            self.kube.post(f"/apis/events.k8s.io/v1/namespaces/{namespace}/events", body)
        except ApiException as exc:
            log.warning("event %s on %s not written: %s %s", reason, meta["name"], exc.reason, exc.body)

    def note(self, fn: Callable[..., None], *args: Any) -> None:
        if self.quiet:
            return
        if self._notes is None:
            fn(*args)
        else:
            self._notes.submit(fn, *args)

    # --- running ---------------------------------------------------------------------------------
    def _informers(self) -> list[Informer]:
        """Nodes first (pods adopt slices on them), then namespaces (pods' queues), then pods."""
        return [self.node_informer, *([self.namespace_informer] if self.queue else []), self.pod_informer]

    def sync(self) -> None:
        """List nodes, namespaces, then pods into the caches (differences since the last list are handled as
        the watch would: a first list rebuilds the ledger from the pods' allocation annotations)."""
        for informer in self._informers():
            try:
                informer.relist()
            except ApiException as exc:
                if informer is not self.namespace_informer or exc.status != 403:
                    raise
                log.warning("namespaces not readable (%s): every pod is in queue %s", exc.reason, DEFAULT_QUEUE)

    def schedule_pending(self) -> None:
        """One cycle in this thread over every waiting pod (whatever its back-off); bindings and evictions
        are made before it returns."""
        with self._lock:
            now = time.monotonic()
            self._outside_at = 0.0
            self._time_passed(now)
            self.podqueue.sweep(now, everyone=True)
            calls = self._guarded_cycle()
        for call in calls:
            call()

    def _guarded_cycle(self) -> list[Call]:
        try:
            return self.podqueue.cycle()
        except Exception:  # noqa: BLE001 - a long-running loop never dies on one bad object
            log.exception("scheduling cycle failed")
            return []

    def run_once(self) -> PassStats:
        """One pass: :meth:`sync`, then :meth:`schedule_pending`; what it did."""
        before = PassStats(**{k: v for k, v in vars(self.stats).items() if k != "skipped_nodes"})
        self.sync()
        self.schedule_pending()
        with self._lock:
            return PassStats(bound=self.stats.bound - before.bound,
                             unschedulable=self.stats.unschedulable - before.unschedulable,
                             invalid=self.stats.invalid - before.invalid,
                             released=self.stats.released - before.released, skipped_nodes=sorted(self._skipped))

    def follow(self, stop: threading.Event) -> None:
        """List nodes, namespaces, then pods (until the API server answers), then follow them by watch in
        threads until ``stop``. Returns once the first lists are in: the ledger is rebuilt from the
        annotations."""
        follow_all(self._informers(), stop)

    def _next(self, stop: threading.Event) -> list[Call]:
        """Wait until a cycle is due (or ``stop``), run it; the calls it leaves."""
        with self._cond:
            while not stop.is_set():
                self._time_passed(time.monotonic())
                if self._dirty:
                    self._dirty = False
                    return self._guarded_cycle()
                self._cond.wait(0.2)
        return []

    def run(self, stop: threading.Event, binders: int = 8) -> None:
        """Follow the cluster and schedule until ``stop``; bindings and evictions go out from ``binders``
        threads."""
        self._pool = ThreadPoolExecutor(binders, thread_name_prefix="hami-ray-bind")
        self._notes = ThreadPoolExecutor(2, thread_name_prefix="hami-ray-events")
        try:
            self.follow(stop)
            with self._lock:
                self.free_gone()
                self._dirty = True
            while not stop.is_set():
                for call in self._next(stop):
                    self._pool.submit(_logged, call)
        finally:
            self._pool.shutdown(wait=True)
            self._notes.shutdown(wait=True)
            self._pool = self._notes = None


def _logged(call: Call) -> None:
    try:
        call()
    except Exception:  # noqa: BLE001 - one failed call never stops the pool's thread
        log.exception("API call failed")
