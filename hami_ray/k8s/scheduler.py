"""hami-ray as ``hami-scheduler`` for pods: HAMi-compatible placement, annotations and binding.

The bridge keeps every node and pod by list-then-watch (:class:`~hami_ray.k8s.kubeapi.Informer`, plain
JSON) and reacts to each change:

- a node's register annotations fill the inventory (a node whose annotation does not parse is left out,
  with a warning event on it, once);
- a pod that is bound (by us, another replica, HAMi's scheduler or before a restart) holds what its
  allocation annotations say; one that is deleted, Succeeded or Failed frees its lease. The first list
  is taken in whole before anything is placed, so a restarted bridge has rebuilt its ledger from the
  annotations before it binds anything new;
- a pending pod of this scheduler joins the queue (creation order). The scheduling loop places the
  containers' requests (init containers first, as HAMi resolves them: :func:`hami_ray.core.hami.pod_requests`)
  on one node with the core engine, then binds: one ``pods/binding`` call that carries HAMi's annotations
  (``hami.io/vgpu-node``, ``hami.io/vgpu-time``, the vendors' ``...-devices-to-allocate`` and
  ``...-devices-allocated``, ``hami.io/bind-phase``, ``hami.io/bind-time``; the API server writes the
  Binding's annotations onto the pod with its node, so there is no moment where one is there without the
  other). A 409 (bound meanwhile) reads the pod again and keeps what it says instead of ours.

A pod that cannot be placed gets kube-scheduler's ``FailedScheduling`` event and ``PodScheduled=False``
condition with the ``0/N nodes are available`` counts (once per distinct message), and waits: it is tried
again after a back-off (1 s doubling to 10 s) once the cluster changed (a slice freed, a node changed),
and every minute anyway. Bad input gets the reason and the pod stays pending; nothing stops the loop.
A ``Scheduled`` event follows each binding. Events and conditions are written off the binding path.

Inventory (:mod:`hami_ray.k8s.inventory`): HAMi's node register annotations, or the Ray placement
actor's ledger (pods and Ray tasks in one).
"""

from __future__ import annotations

import heapq
import json
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
from hami_ray.core.hami import HamiConfig, pod_requests
from hami_ray.k8s.annotations import NODE_ANNOTATION, allocated, binding_annotations
from hami_ray.k8s.inventory import AnnotationInventory, Inventory
from hami_ray.k8s.kubeapi import Informer, KubeApi, pod_path, timestamp
from hami_ray.k8s.nodefit import NodeInfo, allowed

log = logging.getLogger(__name__)

SCHEDULER_NAME = "hami-scheduler"
COMPONENT = "hami-ray-scheduler"
BACKOFF_S = (1.0, 10.0)  # kube-scheduler's pod back-off: initial, most
RESYNC_WAITING_S = 60.0  # a waiting pod is tried again at least this often, cluster change or not
CHANGES_POLL_S = 1.0  # how often the inventory is asked whether somebody else freed slices (Ray tasks)


@dataclass
class PassStats:
    bound: int = 0
    unschedulable: int = 0
    invalid: int = 0
    released: int = 0
    skipped_nodes: list[str] = field(default_factory=list)


@dataclass
class _Waiting:
    """A pod that could not be placed: when it may be tried again."""

    signature: str
    backoff: float = BACKOFF_S[0]
    retry_at: float = 0.0
    last: float = 0.0
    changes: int = 0  # the cluster-change count when it was last tried


class PodScheduler:
    """Places and binds the pods whose ``schedulerName`` is ``scheduler_name``.

    :meth:`run_once` is one pass (list, place everything pending, bind in this thread); :meth:`run`
    follows the cluster by watch until stopped, binding from a pool of threads.
    """

    def __init__(self, api: client.ApiClient, *, scheduler_name: str = SCHEDULER_NAME,
                 config: HamiConfig | None = None, inventory: Inventory | None = None, quiet: bool = False,
                 queue: bool = True) -> None:
        self.kube = KubeApi(api)
        self.scheduler_name = scheduler_name
        self.config = config or HamiConfig()
        self.inventory: Inventory = inventory if inventory is not None else AnnotationInventory()
        self.quiet = quiet  # read-only (status): no events, no conditions
        self.queue = queue  # False: follow the cluster only (extender mode: kube-scheduler decides when)
        self.stats = PassStats()
        self.pods: dict[str, dict[str, Any]] = {}  # uid -> pod, as the API server has it
        self.nodes: dict[str, NodeInfo] = {}  # what the filters read of each node; nodes left out are not here
        self._open: list[str] | None = None  # the nodes without cordon or taints (cached until a node changes)
        self._skipped: dict[str, str] = {}  # node -> why its register annotation was refused
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._active: list[tuple[str, str, str]] = []  # heap: (creationTimestamp, namespace/name, uid)
        self._queued: set[str] = set()
        self._waiting: dict[str, _Waiting] = {}
        self._told: dict[str, str] = {}  # uid -> the last FailedScheduling message (never repeated)
        self._in_flight: set[str] = set()  # uids whose binding call is under way
        self._bound_on: dict[str, str] = {}  # uid -> node, for every bound live pod (spreads device-less pods)
        self._per_node: Counter[str] = Counter()
        self._changes = 0  # cluster changes seen (slices freed, nodes changed)
        self._outside = self.inventory.changes()
        self._outside_at = time.monotonic()
        self._swept_at = 0.0
        self._pool: ThreadPoolExecutor | None = None  # run(): bindings, several at once
        self._notes: ThreadPoolExecutor | None = None  # run(): events and conditions, off the binding path
        self.pod_informer = Informer(self.kube, "/api/v1/pods", self._on_pod, "pods")
        self.node_informer = Informer(self.kube, "/api/v1/nodes", self._on_node, "nodes")

    @property
    def lock(self) -> threading.RLock:
        """Guards the caches and the inventory (the watch threads hold it while they apply a change)."""
        return self._lock

    @property
    def ledger(self) -> Any:
        """The annotation inventory's ledger (tests and status read it)."""
        return getattr(self.inventory, "ledger")

    # --- following the cluster -----------------------------------------------------------------
    def _on_node(self, kind: str, node: dict[str, Any]) -> None:
        meta = node["metadata"]
        name = meta["name"]
        with self._lock:
            if kind == "DELETED":
                self.nodes.pop(name, None)
                self._open = None
                self._skipped.pop(name, None)
                self.inventory.remove_node(name)
                self._changed()
                return
            annotations = meta.get("annotations") or {}
            old = self.nodes.get(name)
            try:
                changed = self.inventory.set_node(name, annotations)
            except HamiRayError as exc:
                self.nodes.pop(name, None)
                self._open = None
                if self._skipped.get(name) != str(exc):
                    self._skipped[name] = str(exc)
                    self._note(self._event, node, "Warning", "InvalidRegisterAnnotation", str(exc), "Node")
                return
            self._skipped.pop(name, None)
            info = NodeInfo.of(node)
            self.nodes[name] = info
            if changed or old != info:
                self._open = None
                self._changed()

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        spec = pod.get("spec") or {}
        with self._lock:
            if kind == "DELETED" or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                if kind == "DELETED":
                    self.pods.pop(uid, None)
                else:
                    self.pods[uid] = pod
                self._forget(uid)
                node = self._bound_on.pop(uid, None)
                if node is not None:
                    self._per_node[node] -= 1
                if self.inventory.holds(uid):
                    self.inventory.release(uid)
                    self.stats.released += 1
                    self._changed()
                return
            self.pods[uid] = pod
            node = spec.get("nodeName")
            if node:
                self._forget(uid)
                if uid not in self._bound_on:
                    self._bound_on[uid] = node
                    self._per_node[node] += 1
                if not self.inventory.holds(uid) and uid not in self._in_flight:
                    self._adopt(pod, node)
                return
            if spec.get("schedulerName") != self.scheduler_name or meta.get("deletionTimestamp"):
                return
            if uid in self._in_flight or uid in self._queued:
                return
            placed_on = (meta.get("annotations") or {}).get(NODE_ANNOTATION)
            if placed_on and not self.inventory.holds(uid):  # annotated, never bound (HAMi's two steps)
                self._adopt(pod, placed_on)
            if not self.queue:
                return
            waiting = self._waiting.get(uid)
            if waiting is not None:
                if waiting.signature == _signature(pod):
                    return  # our own condition, or nothing that placement reads changed
                del self._waiting[uid]
            self._push(pod)

    def _adopt(self, pod: dict[str, Any], node: str) -> None:
        """Hold what the pod's allocation annotations say it was given on ``node``."""
        try:
            slices = [c for c in allocated(pod["metadata"].get("annotations") or {}) if c]
            if slices and not self.inventory.adopt(pod["metadata"]["uid"], owner_of(pod), node, slices):
                log.warning("pod %s: node %s is not in the inventory; its slices are not counted", owner_of(pod), node)
        except HamiRayError as exc:
            log.warning("pod %s: allocation annotation not restored: %s", owner_of(pod), exc)

    def _forget(self, uid: str) -> None:
        self._queued.discard(uid)
        self._waiting.pop(uid, None)
        self._told.pop(uid, None)

    def _push(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        heapq.heappush(self._active, (meta.get("creationTimestamp") or "", owner_of(pod), meta["uid"]))
        self._queued.add(meta["uid"])
        self._cond.notify()

    def _changed(self) -> None:
        self._changes += 1
        self._cond.notify()

    # --- the queue -------------------------------------------------------------------------------
    def _sweep(self, now: float, everyone: bool = False) -> None:
        """Waiting pods whose back-off is over and that saw a cluster change (or waited a minute) go
        back to the queue; ``everyone``: all of them (a pass of :meth:`run_once`)."""
        if now - self._outside_at >= CHANGES_POLL_S or everyone:
            self._outside_at = now
            try:
                outside = self.inventory.changes()
            except Exception as exc:  # noqa: BLE001 - the placement actor restarting: ask again later
                log.info("inventory changes not read: %s", exc)
                outside = self._outside
            if outside != self._outside:
                self._outside = outside
                self._changes += 1
        self._swept_at = now
        for uid, waiting in list(self._waiting.items()):
            due = (waiting.changes != self._changes and now >= waiting.retry_at) or now - waiting.last >= RESYNC_WAITING_S
            if everyone or due:
                del self._waiting[uid]
                pod = self.pods.get(uid)
                if pod is not None:
                    self._push(pod)

    def _next(self, stop: threading.Event | None) -> str | None:
        """The next pod to place (creation order); None when there is none (``stop=None``) or on stop."""
        with self._cond:
            while True:
                now = time.monotonic()
                if stop is not None and self._waiting and (now - self._swept_at >= 0.2
                                                           or now - self._outside_at >= CHANGES_POLL_S):
                    self._sweep(now)
                while self._active:
                    uid = heapq.heappop(self._active)[2]
                    if uid in self._queued:
                        self._queued.discard(uid)
                        return uid
                if stop is None or stop.is_set():
                    return None
                self._cond.wait(0.2)

    # --- placing ---------------------------------------------------------------------------------
    def _schedule(self, uid: str) -> None:
        with self._lock:
            pod = self.pods.get(uid)
            if pod is None or uid in self._in_flight:
                return
            meta, spec = pod["metadata"], pod.get("spec") or {}
            if spec.get("nodeName") or meta.get("deletionTimestamp") or spec.get("schedulerName") != self.scheduler_name:
                return
            if self.inventory.holds(uid):  # placed before (annotations), not bound: bind it there
                node = (meta.get("annotations") or {}).get(NODE_ANNOTATION)
                if node:
                    self._in_flight.add(uid)
                    self._submit(pod, node, None)
                    return
                self.inventory.release(uid)
            if self._open is None:
                self._open = [n for n, info in self.nodes.items() if info.open]
            nodes, refused = allowed(pod, self.nodes, self._open)
            try:
                node, annotations = self.reserve(pod, nodes)
            except Unschedulable as exc:  # counted with the nodes its selector, taints or cordons left out
                total = exc.total_nodes + sum(refused.values())
                self._unschedulable(pod, "Unschedulable", str(Unschedulable(total, {**exc.reasons, **refused})))
                return
            except TemporaryError as exc:  # a reservation refused (Ray)
                self._unschedulable(pod, "Unschedulable", str(exc))
                return
            except HamiRayError as exc:  # the pod's resources or annotations; a request no device can hold
                self._unschedulable(pod, "InvalidRequest", str(exc), invalid=True)
                return
        self._submit(pod, node, annotations)

    def reserve(self, pod: dict[str, Any], nodes: Sequence[str]) -> tuple[str, dict[str, str]]:
        """Place the pod's containers (HAMi's requests) on one of ``nodes`` and hold them; the pod is then
        in flight until :meth:`bind` says how its binding went (what it held before, never bound, is
        freed first). A pod without devices goes to the node of ``nodes`` with the fewest pods. Returns the
        node and HAMi's annotations for the Binding.

        Raises:
            TemporaryError: the pod is in flight already.
            Unschedulable: no node of ``nodes`` fits now (``0/N nodes are available: ...``).
            InvalidRequest: bad resources or annotations, or a request no device can ever hold.
        """
        uid = pod["metadata"]["uid"]
        with self._lock:
            if uid in self._in_flight:
                raise TemporaryError(f"pod {owner_of(pod)} is being bound already")
            if self.inventory.holds(uid):  # placed before (its annotations) and never bound: place it again
                self.inventory.release(uid)
            containers = pod_requests(pod, self.config)
            requests = [c.request for c in containers if c.request is not None]
            if not requests:
                if not nodes:
                    raise Unschedulable(0, {})
                node = min(nodes, key=lambda n: (self._per_node[n], n))
                annotations = binding_annotations(node, containers, None)
            else:
                allocation = self.inventory.place(uid, owner_of(pod), requests, nodes)
                node = allocation.node
                annotations = binding_annotations(node, containers, allocation)
            self._in_flight.add(uid)
        return node, annotations

    def _submit(self, pod: dict[str, Any], node: str, annotations: dict[str, str] | None) -> None:
        if self._pool is None:
            self.bind(pod, node, annotations)
        else:
            self._pool.submit(self.bind, pod, node, annotations)

    def bind(self, pod: dict[str, Any], node: str, annotations: dict[str, str] | None, *,
             explain: bool = True) -> str | None:
        """One ``pods/binding`` call, with HAMi's annotations on it; a 409 (bound meanwhile) keeps what the
        pod says; any other failure frees the slice and the pod waits its back-off. None when the pod is
        bound on ``node``, else why not. ``explain=False`` (extender mode: kube-scheduler writes them):
        no events, no conditions, no back-off here."""
        meta = pod["metadata"]
        uid = meta["uid"]
        body = {"apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": uid,
                             "annotations": annotations or {}},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
        try:
            self.kube.post(pod_path(pod, "/binding"), body)
        except ApiException as exc:
            if exc.status == 409:
                return self._refresh(pod, node, explain)
            error = f"binding to {node} failed: {exc.status} {exc.reason}"
            with self._lock:
                self._in_flight.discard(uid)
                if self.inventory.holds(uid):
                    self.inventory.release(uid)
                if explain and exc.status != 404 and uid in self.pods:
                    self._unschedulable(pod, "BindingRejected", error)
            return error
        except Exception as exc:  # noqa: BLE001 - the API server went away: free it, try again later
            error = f"binding to {node} failed: {exc}"
            with self._lock:
                self._in_flight.discard(uid)
                if self.inventory.holds(uid):
                    self.inventory.release(uid)
                if explain and uid in self.pods:
                    self._unschedulable(pod, "BindingRejected", error)
            return error
        with self._lock:
            self._in_flight.discard(uid)
            self.stats.bound += 1
            self._told.pop(uid, None)
        if explain:
            self._note(self._event, pod, "Normal", "Scheduled",
                       f"Successfully assigned {meta['namespace']}/{meta['name']} to {node}")
        return None

    def _refresh(self, pod: dict[str, Any], node: str, explain: bool = True) -> str | None:
        """The binding was refused with 409: read the pod; if it is bound, what it says wins over what
        this bridge chose (our slice is freed, its annotations' are held). None if it is bound on ``node``."""
        uid = pod["metadata"]["uid"]
        fresh: dict[str, Any] | None
        try:
            fresh = self.kube.get(pod_path(pod))
        except ApiException as exc:
            fresh = None if exc.status == 404 else pod
        with self._lock:
            self._in_flight.discard(uid)
            if self.inventory.holds(uid):
                self.inventory.release(uid)
            if fresh is None or fresh["metadata"].get("uid") != uid:
                return "binding refused (409): the pod is gone"
            self.pods[uid] = fresh
            bound_on = (fresh.get("spec") or {}).get("nodeName")
            if bound_on:
                self._adopt(fresh, bound_on)
                return None if bound_on == node else f"binding refused (409): the pod is bound to {bound_on}"
            if explain:
                self._unschedulable(fresh, "BindingRejected", "binding refused (409); tried again")
            return "binding refused (409)"

    # --- explaining --------------------------------------------------------------------------------
    def _unschedulable(self, pod: dict[str, Any], reason: str, message: str, invalid: bool = False) -> None:
        uid = pod["metadata"]["uid"]
        now = time.monotonic()
        waiting = self._waiting.get(uid)
        if waiting is None:
            waiting = self._waiting[uid] = _Waiting(_signature(pod))
        else:
            waiting.backoff = min(waiting.backoff * 2, BACKOFF_S[1])
        waiting.retry_at, waiting.last, waiting.changes = now + waiting.backoff, now, self._changes
        if invalid:
            self.stats.invalid += 1
        else:
            self.stats.unschedulable += 1
        if self._told.get(uid) == message:
            return
        self._told[uid] = message
        self._note(self._event, pod, "Warning", "FailedScheduling", message)
        self._note(self._condition, pod, reason, message)

    def _condition(self, pod: dict[str, Any], reason: str, message: str) -> None:
        condition = {"type": "PodScheduled", "status": "False", "reason": reason, "message": message,
                     "lastTransitionTime": timestamp()}
        try:
            self.kube.patch(pod_path(pod, "/status"), {"status": {"conditions": [condition]}},
                            content_type="application/strategic-merge-patch+json")
        except ApiException as exc:
            log.info("pod %s: condition not written: %s", owner_of(pod), exc.reason)

    def _event(self, obj: dict[str, Any], type_: str, reason: str, message: str, kind: str = "Pod") -> None:
        meta = obj["metadata"]
        namespace = meta.get("namespace") or "default"
        body = {"apiVersion": "events.k8s.io/v1", "kind": "Event",
                "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": namespace},
                "eventTime": timestamp(micro=True), "reportingController": COMPONENT, "reportingInstance": COMPONENT,
                "action": "Scheduling", "type": type_, "reason": reason, "note": message[:1024],
                "regarding": {"kind": kind, "name": meta["name"], "namespace": meta.get("namespace"),
                              "uid": meta.get("uid"), "apiVersion": "v1"}}
        try:
            self.kube.post(f"/apis/events.k8s.io/v1/namespaces/{namespace}/events", body)
        except ApiException as exc:
            log.warning("event %s on %s not written: %s %s", reason, meta["name"], exc.reason, exc.body)

    def _note(self, fn: Callable[..., None], *args: Any) -> None:
        if self.quiet:
            return
        if self._notes is None:
            fn(*args)
        else:
            self._notes.submit(fn, *args)

    # --- running ---------------------------------------------------------------------------------
    def sync(self) -> None:
        """List nodes, then pods, into the caches (differences since the last list are handled as the
        watch would: a first list rebuilds the ledger from the pods' allocation annotations)."""
        self.node_informer.relist()
        self.pod_informer.relist()

    def schedule_pending(self) -> None:
        """Place and bind, in this thread, every queued pod and every waiting one (whatever its back-off)."""
        with self._lock:
            self._sweep(time.monotonic(), everyone=True)
        while (uid := self._next(None)) is not None:
            try:
                self._schedule(uid)
            except Exception:  # noqa: BLE001 - a long-running loop never dies on one bad object
                log.exception("pod %s not scheduled", uid)

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
        """List nodes, then pods (until the API server answers), then follow both by watch in two threads
        until ``stop``. Returns once the first lists are in: the ledger is rebuilt from the annotations."""
        for informer in (self.node_informer, self.pod_informer):  # nodes first: pods adopt slices on them
            while not stop.is_set():
                try:
                    informer.relist()
                    break
                except Exception as exc:  # noqa: BLE001 - the API server is not there yet
                    log.warning("listing %s: %s", informer.name, exc)
                    stop.wait(1.0)
            threading.Thread(target=informer.run, args=(stop,), name=f"hami-ray-{informer.name}",
                             daemon=True).start()

    def run(self, stop: threading.Event, binders: int = 8) -> None:
        """Follow the cluster and schedule until ``stop``; bindings go out from ``binders`` threads."""
        self._pool = ThreadPoolExecutor(binders, thread_name_prefix="hami-ray-bind")
        self._notes = ThreadPoolExecutor(2, thread_name_prefix="hami-ray-events")
        try:
            self.follow(stop)
            while not stop.is_set():
                uid = self._next(stop)
                if uid is None:
                    continue
                try:
                    self._schedule(uid)
                except Exception:  # noqa: BLE001 - a long-running loop never dies on one bad object
                    log.exception("pod %s not scheduled", uid)
        finally:
            self._pool.shutdown(wait=True)
            self._notes.shutdown(wait=True)
            self._pool = self._notes = None


def _signature(pod: dict[str, Any]) -> str:
    """What placement reads of a pod: its annotations and containers' resources."""
    spec = pod.get("spec") or {}
    return json.dumps([pod["metadata"].get("annotations"),
                       [c.get("resources") for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])]],
                      sort_keys=True)


def owner_of(pod: dict[str, Any]) -> str:
    meta = pod["metadata"]
    return f"{meta.get('namespace')}/{meta.get('name')}"

