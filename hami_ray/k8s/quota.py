"""The webhook's check of a pod against its team queue (issue 14): ``hami-ray k8s webhook --queues FILE``
refuses a pod whose namespace names a queue that is not defined, or whose queue would go over its limit
with this pod.

Called by :mod:`hami_ray.k8s.webhook` for each pod it admits. It keeps its own informers of nodes (the
devices' sizes: a memory percentage or a whole device counts at the device's size), namespaces (their
queues, :func:`~hami_ray.k8s.queueing.namespace_queue`) and pods: usage per queue is counted from the
bound pods' allocation annotations (HAMi's ``...-devices-allocated``), in a
:class:`~hami_ray.core.queues.QueueBook`.

This is a point-in-time check, as Kubernetes' ResourceQuota is: pods admitted at the same moment, or bound
a moment ago and not seen yet, are not counted against each other, and a pod waiting to be scheduled
counts nothing. The scheduler still enforces the limit (a pod that would go over it waits, with the
limit as its reason); the webhook only turns pods away early, with the reason where ``kubectl`` shows it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from hami_ray.core.errors import HamiRayError
from hami_ray.core.hami import HamiConfig, pod_requests
from hami_ray.core.model import Allocation, Lease, LeaseState
from hami_ray.core.queues import QueueBook, QueueTree
from hami_ray.k8s.annotations import allocated
from hami_ray.k8s.inventory import AnnotationInventory
from hami_ray.k8s.kubeapi import Informer, KubeApi, follow_all
from hami_ray.k8s.queueing import QUEUES_POLL_S, QueueFile, namespace_queue, unknown_queue

log = logging.getLogger(__name__)


class QueueQuota:
    """Per-queue usage of the cluster's bound pods, and the admission check of a new pod against it.

    Example::

        quota = QueueQuota(api, QueueFile(Path("queues.yaml")))
        quota.follow(stop)                      # lists nodes, namespaces, pods; then watches them
        quota.check("team-a", pod)              # None, or why the pod is refused
    """

    def __init__(self, api: client.ApiClient | None, queues: QueueFile | None = None, *,
                 tree: QueueTree | None = None, config: HamiConfig | None = None) -> None:
        self.file = queues
        self.config = config or HamiConfig()
        self.devices = AnnotationInventory()  # the nodes' devices, for their sizes (nothing is held here)
        self.namespaces: dict[str, str] = {}  # namespace -> its queue (only those seen)
        self._bound: dict[str, tuple[str, Lease]] = {}  # pod uid -> (namespace, what it holds)
        self._lock = threading.Lock()
        self._tree = tree if tree is not None else (queues.tree if queues is not None else QueueTree())
        self.book = QueueBook(self._tree, self.devices.ledger)
        self.kube = KubeApi(api) if api is not None else None
        self.informers = [] if self.kube is None else [
            Informer(self.kube, "/api/v1/nodes", self.on_node, "quota-nodes"),
            Informer(self.kube, "/api/v1/namespaces", self.on_namespace, "quota-namespaces"),
            Informer(self.kube, "/api/v1/pods", self.on_pod, "quota-pods")]

    # --- following the cluster -----------------------------------------------------------------
    def on_node(self, kind: str, node: Mapping[str, Any]) -> None:
        name = node["metadata"]["name"]
        with self._lock:
            if kind == "DELETED":
                self.devices.remove_node(name)
                return
            try:
                changed = self.devices.set_node(name, node["metadata"].get("annotations") or {})
            except HamiRayError as exc:
                log.info("node %s: register annotation not read: %s", name, exc)
                return
            if changed:
                self._recount()  # whole-device counts depend on the devices' sizes

    def on_namespace(self, kind: str, namespace: Mapping[str, Any]) -> None:
        name = namespace["metadata"]["name"]
        queue = None if kind == "DELETED" else namespace_queue(namespace)
        with self._lock:
            if self.namespaces.get(name) == queue:
                return
            if queue is None:
                self.namespaces.pop(name, None)
            else:
                self.namespaces[name] = queue
            if any(ns == name for ns, _ in self._bound.values()):
                self._recount()

    def on_pod(self, kind: str, pod: Mapping[str, Any]) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        uid = meta["uid"]
        with self._lock:
            gone = kind == "DELETED" or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            node = spec.get("nodeName")
            if gone or not node:
                if self._bound.pop(uid, None) is not None:
                    self.book.drop(uid)
                return
            if uid in self._bound:
                return  # what a bound pod holds does not change
            try:
                slices = [c for c in allocated(meta.get("annotations") or {}) if c]
            except HamiRayError as exc:
                log.info("pod %s/%s: allocation annotation not read: %s", meta.get("namespace"), meta.get("name"), exc)
                return
            if not slices:
                return
            lease = Lease(lease_id=uid, owner=f"{meta.get('namespace')}/{meta.get('name')}", token="",
                          allocation=Allocation(node=node, slices=tuple(tuple(c) for c in slices)),
                          state=LeaseState.ACTIVE, holder="pod")
            self._bound[uid] = (str(meta.get("namespace")), lease)
            self._hold(meta.get("namespace"), lease)

    def _queue_of(self, namespace: str | None) -> str:
        return self.namespaces.get(namespace or "", namespace_queue(None))

    def _hold(self, namespace: str | None, lease: Lease) -> None:
        queue = self._queue_of(namespace)
        if queue in self._tree:  # a namespace naming an unknown queue counts nowhere
            self.book.hold(lease.model_copy(update={"queue": queue}))

    def _recount(self) -> None:
        """Count every bound pod again (the queues, a namespace's queue or the devices changed)."""
        self.book = QueueBook(self._tree, self.devices.ledger)
        for namespace, lease in self._bound.values():
            self._hold(namespace, lease)

    def set_queues(self, tree: QueueTree) -> None:
        """Use ``tree`` from now on."""
        with self._lock:
            self._tree = tree
            self._recount()

    # --- admission -----------------------------------------------------------------------------
    def check(self, namespace: str, pod: Mapping[str, Any]) -> str | None:
        """Why ``pod`` (as it will be created, in ``namespace``) is refused, or None. A pod without devices,
        or whose resources do not read (the scheduler explains those), is not checked.

        Example: ``"queue org/team-b at its limit: memory 12000 MiB held + 8000 MiB asked > limit 16 GiB;
        the pods of namespace team-b are in queue org/team-b"``.
        """
        try:
            requests = [c.request for c in pod_requests(pod, self.config) if c.request is not None]
        except HamiRayError:
            return None
        if not requests:
            return None
        with self._lock:
            queue = self.namespaces.get(namespace)
        if queue is None:  # a namespace made a moment ago: ask the API server
            queue = self._read_namespace(namespace)
        with self._lock:
            why = unknown_queue(namespace, queue, self._tree)
            if why is not None:
                return why
            why = self.book.never_fits(queue, requests) or self.book.limit_reason(queue, requests)
        return None if why is None else f"{why}; the pods of namespace {namespace} are in queue {queue}"

    def _read_namespace(self, namespace: str) -> str:
        if self.kube is None:
            return namespace_queue(None)
        try:
            return namespace_queue(self.kube.get(f"/api/v1/namespaces/{namespace}"))
        except ApiException as exc:
            log.info("namespace %s not read (%s): its pods are in queue %s", namespace, exc.reason,
                     namespace_queue(None))
            return namespace_queue(None)

    # --- running ---------------------------------------------------------------------------------
    def follow(self, stop: threading.Event) -> None:
        """List nodes, namespaces and pods (until the API server answers), then follow them by watch and
        the queue file by polling, in threads, until ``stop``."""
        follow_all(self.informers, stop)
        if self.file is not None:
            threading.Thread(target=self._reload, args=(stop,), name="hami-ray-quota-queues", daemon=True).start()

    def _reload(self, stop: threading.Event) -> None:
        assert self.file is not None
        while not stop.wait(QUEUES_POLL_S):
            try:
                tree = self.file.poll()
            except Exception:  # noqa: BLE001 - the file keeps being watched
                log.exception("queue definitions not read")
                continue
            if tree is not None:
                self.set_queues(tree)
