"""hami-ray as ``hami-scheduler`` for pods: HAMi-compatible placement, annotations and binding.

One pass (:meth:`PodScheduler.run_once`) reads the nodes' HAMi register annotations into the ledger
(a node whose annotation does not parse is skipped, with a warning event on it), rebuilds the leases of
pods already placed from their allocation annotations (first pass, or after a restart, before anything
new is bound), frees the leases of pods that are gone, Succeeded or Failed, and then places every
pending pod of this scheduler in creation order: the containers' requests (init containers first, as
HAMi resolves them: :func:`hami_ray.core.hami.pod_requests`) on one node with the core engine, HAMi's
pod annotations written exactly (``hami.io/vgpu-node``, ``hami.io/vgpu-time``,
``hami.io/vgpu-devices-to-allocate``, ``hami.io/vgpu-devices-allocated``, ``hami.io/bind-phase``,
``hami.io/bind-time``), then the Binding. A pod that cannot be placed gets kube-scheduler's
``FailedScheduling`` event and ``PodScheduled=False`` condition with the ``0/N nodes are available``
counts, and is tried again next pass; a pod with bad input gets the reason and stays pending; nothing
stops the loop. :meth:`run` repeats passes, woken by pod and node watch events.

Inventory from HAMi's node annotations (``--inventory annotations``); sharing the ledger with the Ray
placement actor comes with the rest of the bridge.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from hami_ray.core.codec import ALLOCATED_ANNOTATION, REGISTER_ANNOTATION, decode_pod_devices, devices_from_register, \
    encode_pod_devices
from hami_ray.core.errors import HamiRayError, Unschedulable
from hami_ray.core.hami import HamiConfig, pod_requests
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import Allocation, DeviceGrant, Lease, LeaseState, Node
from hami_ray.core.scheduler import Scheduler
from hami_ray.core.vendors import NVIDIA_SCORE_ANNOTATION
from hami_ray.observe.model import ClusterStatus, build_status

log = logging.getLogger(__name__)

SCHEDULER_NAME = "hami-scheduler"
NODE_ANNOTATION = "hami.io/vgpu-node"
TIME_ANNOTATION = "hami.io/vgpu-time"
TO_ALLOCATE_ANNOTATION = "hami.io/vgpu-devices-to-allocate"
BIND_PHASE_ANNOTATION = "hami.io/bind-phase"
BIND_TIME_ANNOTATION = "hami.io/bind-time"
COMPONENT = "hami-ray-scheduler"


@dataclass
class PassStats:
    bound: int = 0
    unschedulable: int = 0
    invalid: int = 0
    released: int = 0
    skipped_nodes: list[str] = field(default_factory=list)


class PodScheduler:
    """Places and binds the pods whose ``schedulerName`` is ``scheduler_name``."""

    def __init__(self, api: client.ApiClient, *, scheduler_name: str = SCHEDULER_NAME,
                 config: HamiConfig | None = None) -> None:
        self.core = client.CoreV1Api(api)
        self.events = client.EventsV1Api(api)
        self.scheduler_name = scheduler_name
        self.config = config or HamiConfig()
        self.ledger = Ledger()
        self.scheduler = Scheduler(self.ledger)
        self._leases: dict[str, str] = {}  # pod uid -> lease id
        self._rebuilt = False
        self._wake = threading.Event()
        self._told: dict[str, str] = {}  # pod uid -> the last FailedScheduling message (not repeated)
        self._pods: dict[str, Any] | None = None  # run(): pods by uid, kept by the watch (no re-list per pass)
        self._pods_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # run(): API calls of bindings, several at once
        self._in_flight: set[str] = set()  # pod uids whose binding calls are under way
        self._failed: list[str] = []  # pod uids whose binding failed (their leases are freed by the pass)

    # --- one pass ----------------------------------------------------------------------------
    def run_once(self) -> PassStats:
        stats = PassStats()
        self._sync_nodes(stats)
        with self._pods_lock:
            failed, self._failed = self._failed, []
            cached = None if self._pods is None else list(self._pods.values())
        for uid in failed:
            if uid in self._leases:
                self.ledger.release(self._leases.pop(uid))
        pods = self.core.list_pod_for_all_namespaces().items if cached is None else cached
        if not self._rebuilt:
            self._rebuild(pods)
            self._rebuilt = True
        self._release_gone(pods, stats)
        pending = [p for p in pods if p.spec.scheduler_name == self.scheduler_name and not p.spec.node_name
                   and p.status.phase == "Pending" and p.metadata.deletion_timestamp is None]
        pending.sort(key=lambda p: (p.metadata.creation_timestamp or datetime.datetime.min, p.metadata.name))
        for pod in pending:
            try:
                self._schedule(pod, stats)
            except Exception as exc:  # noqa: BLE001 - a long-running loop never dies on one bad object
                log.exception("pod %s/%s: %s", pod.metadata.namespace, pod.metadata.name, exc)
        return stats

    def _sync_nodes(self, stats: PassStats, quiet: bool = False) -> None:
        seen = set()
        for node in self.core.list_node().items:
            name = node.metadata.name
            annotations = node.metadata.annotations or {}
            register = annotations.get(REGISTER_ANNOTATION)
            if register is None:
                devices: tuple[Any, ...] = ()
            else:
                try:
                    devices = devices_from_register(register, annotations.get(NVIDIA_SCORE_ANNOTATION))
                except HamiRayError as exc:
                    stats.skipped_nodes.append(name)
                    if not quiet:
                        self._event(node, "Warning", "InvalidRegisterAnnotation", f"{REGISTER_ANNOTATION}: {exc}",
                                    kind="Node")
                    continue
            seen.add(name)
            new = Node(name=name, devices=devices)
            if name not in self.ledger.nodes or self.ledger.node(name) != new:
                self.ledger.add_node(new)
        for name in set(self.ledger.nodes) - seen:
            self.ledger.remove_node(name)

    def _rebuild(self, pods: list[Any]) -> None:
        """Leases of the pods already placed (ours or HAMi's), from their allocation annotations."""
        for pod in pods:
            annotations = pod.metadata.annotations or {}
            node = annotations.get(NODE_ANNOTATION) or pod.spec.node_name
            value = annotations.get(ALLOCATED_ANNOTATION)
            if not node or value is None or pod.status.phase in ("Succeeded", "Failed"):
                continue
            try:
                containers = decode_pod_devices(value)
                slices = tuple(tuple(DeviceGrant(uuid=d.uuid, memory_mib=d.memory_mib, cores=d.cores) for d in c)
                               for c in containers if c)
                lease = Lease(lease_id=f"pod-{pod.metadata.uid}", owner=_owner(pod), token=pod.metadata.uid,
                              allocation=Allocation(node=node, slices=slices), state=LeaseState.ACTIVE)
                self.ledger.allocate(lease)
                self._leases[pod.metadata.uid] = lease.lease_id
            except HamiRayError as exc:
                log.warning("pod %s: allocation annotation not restored: %s", _owner(pod), exc)

    def _release_gone(self, pods: list[Any], stats: PassStats) -> None:
        live = {p.metadata.uid for p in pods if p.status.phase not in ("Succeeded", "Failed")}
        for uid in [u for u in self._leases if u not in live]:
            self.ledger.release(self._leases.pop(uid))
            stats.released += 1

    def _schedule(self, pod: Any, stats: PassStats) -> None:
        uid = pod.metadata.uid
        with self._pods_lock:
            if uid in self._in_flight:
                return
        if uid in self._leases:  # placed before a restart, not bound: bind where its annotations say
            node = (pod.metadata.annotations or {}).get(NODE_ANNOTATION)
            if node:
                self._bind(pod, node, None, stats, annotate=False)
            return
        try:
            containers = pod_requests(client.ApiClient().sanitize_for_serialization(pod), self.config)
        except HamiRayError as exc:
            stats.invalid += 1
            self._unschedulable(pod, "InvalidRequest", str(exc))
            return
        requests = [c.request for c in containers if c.request is not None]
        if not requests:
            self._bind(pod, self._least_busy(), None, stats)
            return
        try:
            allocation = self.scheduler.place(requests)
        except Unschedulable as exc:
            stats.unschedulable += 1
            self._unschedulable(pod, "Unschedulable", str(exc))
            return
        except HamiRayError as exc:
            stats.invalid += 1
            self._unschedulable(pod, "InvalidRequest", str(exc))
            return
        grants = iter(allocation.slices)
        per_container = [list(next(grants)) if c.request is not None else [] for c in containers]
        lease = Lease(lease_id=f"pod-{uid}", owner=_owner(pod), token=uid, allocation=allocation,
                      state=LeaseState.ACTIVE)
        self.ledger.allocate(lease)
        self._leases[uid] = lease.lease_id
        self._bind(pod, allocation.node, encode_pod_devices(per_container), stats)

    def _bind(self, pod: Any, node: str | None, encoded: str | None, stats: PassStats, *,
              annotate: bool = True) -> None:
        """Write HAMi's annotations (``encoded``: the devices, None without any), then the Binding; a
        409 (bound meanwhile, by another replica or before a restart) keeps what the annotations say."""
        uid = pod.metadata.uid
        if node is None:
            stats.unschedulable += 1
            self._unschedulable(pod, "Unschedulable", "0/0 nodes are available")
            return
        now = str(int(time.time()))
        annotations = {NODE_ANNOTATION: node, TIME_ANNOTATION: now, BIND_PHASE_ANNOTATION: "allocating",
                       BIND_TIME_ANNOTATION: now}
        if encoded is not None:
            annotations[TO_ALLOCATE_ANNOTATION] = encoded
            annotations[ALLOCATED_ANNOTATION] = encoded
        stats.bound += 1
        if self._pool is None:
            self._api_bind(pod, node, annotations if annotate else None)
            return
        with self._pods_lock:
            self._in_flight.add(uid)
        self._pool.submit(self._api_bind, pod, node, annotations if annotate else None)

    def _api_bind(self, pod: Any, node: str, annotations: dict[str, str] | None) -> None:
        """The API calls of a binding (run(): on a pool thread; a failure frees the lease next pass)."""
        uid = pod.metadata.uid
        try:
            self._calls(pod, node, annotations)
        except Exception as exc:  # noqa: BLE001 - one pod's failure never stops the others
            log.warning("pod %s not bound: %s", _owner(pod), exc)
            with self._pods_lock:
                self._failed.append(uid)
        finally:
            with self._pods_lock:
                self._in_flight.discard(uid)

    def _calls(self, pod: Any, node: str, annotations: dict[str, str] | None) -> None:
        uid = pod.metadata.uid
        try:
            if annotations is not None:
                self.core.patch_namespaced_pod(pod.metadata.name, pod.metadata.namespace,
                                               {"metadata": {"annotations": annotations}})
            self.core.create_namespaced_pod_binding(pod.metadata.name, pod.metadata.namespace, client.V1Binding(
                metadata=client.V1ObjectMeta(name=pod.metadata.name, uid=uid),
                target=client.V1ObjectReference(api_version="v1", kind="Node", name=node)),
                _preload_content=False)
        except ApiException as exc:
            if exc.status == 409:  # bound meanwhile (another replica): keep what the annotations say
                return
            raise
        self._told.pop(uid, None)
        self._event(pod, "Normal", "Scheduled",
                    f"Successfully assigned {pod.metadata.namespace}/{pod.metadata.name} to {node}")

    def _least_busy(self) -> str | None:
        """For a pod without devices: the node holding the fewest leases (it is their scheduler too)."""
        names = sorted(self.ledger.nodes)
        if not names:
            return None
        held = dict.fromkeys(names, 0)
        for lease in self.ledger.leases.values():
            held[lease.allocation.node] = held.get(lease.allocation.node, 0) + 1
        return min(names, key=lambda n: (held[n], n))

    # --- explaining ----------------------------------------------------------------------------
    def _unschedulable(self, pod: Any, reason: str, message: str) -> None:
        if self._told.get(pod.metadata.uid) == message:
            return
        self._told[pod.metadata.uid] = message
        self._event(pod, "Warning", "FailedScheduling", message)
        condition = {"type": "PodScheduled", "status": "False", "reason": reason, "message": message,
                     "lastTransitionTime": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        try:
            self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace,
                                                  {"status": {"conditions": [condition]}})
        except ApiException as exc:
            log.info("pod %s: condition not written: %s", _owner(pod), exc.reason)

    def _event(self, obj: Any, type_: str, reason: str, message: str, kind: str = "Pod") -> None:
        namespace = obj.metadata.namespace or "default"
        now = datetime.datetime.now(datetime.timezone.utc)
        body = client.EventsV1Event(
            metadata=client.V1ObjectMeta(name=f"{obj.metadata.name}.{time.time_ns():x}", namespace=namespace),
            event_time=now, reporting_controller=COMPONENT, reporting_instance=COMPONENT, action="Scheduling",
            type=type_, reason=reason, note=message[:1024],
            regarding=client.V1ObjectReference(kind=kind, name=obj.metadata.name, namespace=obj.metadata.namespace,
                                               uid=obj.metadata.uid, api_version="v1"))
        try:
            self.events.create_namespaced_event(namespace, body)
        except ApiException as exc:
            log.warning("event %s on %s not written: %s %s", reason, obj.metadata.name, exc.reason, exc.body)

    # --- the loop ----------------------------------------------------------------------------
    def run(self, stop: threading.Event, resync_s: float = 1.0, binders: int = 8) -> None:
        """Passes until ``stop``: after every pod or node change, and every ``resync_s`` anyway. Pods
        are kept by a watch (listed once, then followed); bindings go out from ``binders`` threads."""
        self._pool = ThreadPoolExecutor(binders, thread_name_prefix="hami-ray-bind")  # pods cached once listed
        threading.Thread(target=self._follow_pods, args=(stop,), daemon=True).start()
        threading.Thread(target=self._watch, args=(self.core.list_node, stop), daemon=True).start()
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - a long-running loop never dies on one bad object
                log.exception("scheduling pass failed")
            self._wake.wait(resync_s)
            self._wake.clear()

    def _follow_pods(self, stop: threading.Event) -> None:
        """List the pods once, then follow them by watch from that version (list again if it is gone)."""
        while not stop.is_set():
            try:
                listed = self.core.list_pod_for_all_namespaces()
                with self._pods_lock:
                    self._pods = {p.metadata.uid: p for p in listed.items}
                self._wake.set()
                for event in watch.Watch().stream(self.core.list_pod_for_all_namespaces, timeout_seconds=30,
                                                  resource_version=listed.metadata.resource_version):
                    pod = event["object"]
                    with self._pods_lock:
                        assert self._pods is not None
                        if event["type"] == "DELETED":
                            self._pods.pop(pod.metadata.uid, None)
                        else:
                            self._pods[pod.metadata.uid] = pod
                    self._wake.set()
                    if stop.is_set():
                        return
            except Exception:  # noqa: BLE001 - the API server restarting, or a 410: list again
                time.sleep(0.5)

    def _watch(self, target: Any, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                for _ in watch.Watch().stream(target, timeout_seconds=30):
                    self._wake.set()
                    if stop.is_set():
                        return
            except Exception:  # noqa: BLE001 - the API server restarting: watch again
                time.sleep(1.0)


def cluster_status(api: client.ApiClient, scheduler_name: str = SCHEDULER_NAME) -> ClusterStatus:
    """What ``hami-ray status --kubeconfig`` shows: nodes and devices from the register annotations,
    every placed pod's slices (owner ``namespace/pod``) from its allocation annotation, and the pending
    pods of ``scheduler_name`` with their last ``PodScheduled`` message. Read-only."""
    view = PodScheduler(api, scheduler_name=scheduler_name)
    view._sync_nodes(PassStats(), quiet=True)
    pods = view.core.list_pod_for_all_namespaces().items
    view._rebuild(pods)
    pending = [p for p in pods if p.spec.scheduler_name == scheduler_name and not p.spec.node_name
               and p.status.phase == "Pending"]
    now = time.time()
    waiting = [{"owner": _owner(p), "request": "pod", "priority": 0,
                "waited_s": round(now - p.metadata.creation_timestamp.timestamp(), 1)
                if p.metadata.creation_timestamp else 0.0,
                "reason": _pod_scheduled_message(p)} for p in pending[:10]]
    return build_status(view.ledger.snapshot(), queue_depth=len(pending), waiting=waiting)


def _pod_scheduled_message(pod: Any) -> str:
    for cond in pod.status.conditions or []:
        if cond.type == "PodScheduled" and cond.status == "False":
            return str(cond.message or cond.reason or "")
    return "not tried yet"


def _owner(pod: Any) -> str:
    return f"{pod.metadata.namespace}/{pod.metadata.name}"

