"""Binding a placed pod (issue 16): HAMi's node lock where the node's device plugin needs it, the
``hami.io/vgpu-node`` label, then one ``pods/binding`` call that carries HAMi's annotations.

Owned by a :class:`~hami_ray.k8s.scheduler.PodScheduler` (:meth:`PodScheduler.bind` is :meth:`Binder.bind`),
called from its pool of binding threads (and the extender's ``/bind``); the bookkeeping (in flight, the
ledger, the pod queue) is the scheduler's, under its lock, the API calls outside it.

- The lock (:mod:`hami_ray.k8s.nodelock`): on a node that takes it (``--bind-mode``), for a pod with
  devices, taken before anything else. Found held by another bind: the slice is freed and the pod placed
  again at once, the node counted as locked. Released again when the pod does not end up bound there.
- The label: HAMi's vGPUmonitor lists the pods of its node by ``hami.io/vgpu-node``. The Binding carries
  it: an API server of Kubernetes 1.35 or later (1.33 and 1.34 with the ``PodTopologyLabelsAdmission``
  feature gate on) copies a Binding's labels onto the pod in the same write. An older one drops them:
  the pod watch sees a pod bound here without the label (:meth:`Binder.seen_bound`), patches it on, and
  from then on every bind sends the label as a merge patch before its Binding (two writes per pod). A pod
  another binder bound elsewhere first (the Binding's 409) gets its label put right.
- The Binding: a 409 (bound meanwhile) reads the pod and keeps what it says; any other failure frees the
  slice and the pod waits its back-off.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kubernetes.client.exceptions import ApiException

from hami_ray.k8s import nodelock
from hami_ray.k8s.annotations import NODE_ANNOTATION, NODE_LABEL, asks_devices, node_label
from hami_ray.k8s.kubeapi import owner_of, pod_path
from hami_ray.k8s.nodelock import NodeLocked

if TYPE_CHECKING:
    from hami_ray.k8s.scheduler import PodScheduler

log = logging.getLogger(__name__)


class Binder:
    """The binding calls of one :class:`~hami_ray.k8s.scheduler.PodScheduler` (see the module)."""

    def __init__(self, sched: PodScheduler) -> None:
        self.sched = sched
        # whether the API server copies a Binding's labels onto the pod (see the module); the watch says
        self.labels_in_binding = True
        self._labelled: dict[str, str] = {}  # pod uid -> the node its Binding carried the label for (sched.lock)

    def bind(self, pod: dict[str, Any], node: str, annotations: dict[str, str] | None, *,
             explain: bool = True) -> str | None:
        """Bind the pod to ``node``: HAMi's node lock first where the node takes it (a pod with devices),
        the ``hami.io/vgpu-node`` label, then one ``pods/binding`` call with HAMi's annotations on it. A lock
        another bind holds sends the pod back to be placed again at once (no back-off, no event); a 409
        from the binding (bound meanwhile) keeps what the pod says; any other failure frees the slice (and
        the lock this bind took) and the pod waits its back-off. None when the pod is bound on ``node``,
        else why not. ``explain=False`` (extender mode: kube-scheduler writes them): no events, no
        conditions, no back-off here."""
        sched = self.sched
        meta = pod["metadata"]
        uid = meta["uid"]
        who = (str(meta["namespace"]), str(meta["name"]))
        locked = False  # this bind holds the node's lock: released if the pod is not bound here
        try:
            if sched.locks.needs_lock(node) and asks_devices(annotations or meta.get("annotations")):
                with sched.lock:
                    known = sched.locks.known(node)
                value = nodelock.acquire(sched.kube, node, who, exists=self._pod_exists, known=known,
                                         timeout_s=sched.locks.timeout_s)
                locked = True
                with sched.lock:
                    sched.locks.mine(node, uid, value)  # held until the watch shows it
            labels = node_label(node)
            in_binding = False
            if labels is None:
                log.warning("pod %s: node name %s cannot be a label value: no %s label", owner_of(pod), node,
                            NODE_ANNOTATION)
            elif self.labels_in_binding:
                in_binding = True
                with sched.lock:
                    self._labelled[uid] = node
            else:
                sched.kube.patch(pod_path(pod), {"metadata": {"labels": labels}})
            body = {"apiVersion": "v1", "kind": "Binding",
                    "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": uid,
                                 "annotations": annotations or {}, **({"labels": labels} if in_binding else {})},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
            sched.kube.post(pod_path(pod, "/binding"), body)
        except NodeLocked as exc:
            return self._lock_taken(pod, node, exc, explain)
        except ApiException as exc:
            if exc.status == 409:  # bound meanwhile: a lock of ours stays only if it is bound here
                answer = self._refresh(pod, node, explain)
                if locked and answer is not None:
                    self._unlock(pod, node)
                return answer
            if locked:
                self._unlock(pod, node)
            return self._not_bound(pod, f"binding to {node} failed: {exc.status} {exc.reason}",
                                   explain and exc.status != 404, node)
        except Exception as exc:  # noqa: BLE001 - the API server went away: free it, try again later
            if locked:
                self._unlock(pod, node)
            return self._not_bound(pod, f"binding to {node} failed: {exc}", explain, node)
        with sched.lock:
            sched.landed(uid)
            sched.stats.bound += 1
            sched.podqueue.told.pop(uid, None)
            if not locked:
                sched.locks.unclaim(node, uid)
        if explain:
            sched.note(sched.event, pod, "Normal", "Scheduled",
                      f"Successfully assigned {meta['namespace']}/{meta['name']} to {node}")
        return None

    def seen_bound(self, pod: dict[str, Any], node: str | None) -> None:
        """The pod watch saw the pod bound (``node``) or deleted (None). A bind of ours whose Binding carried
        the label and the pod came without it: this API server drops a Binding's labels. The label is
        patched on (from the events thread) and later binds patch it before their Binding. Under sched.lock."""
        uid = pod["metadata"]["uid"]
        ours = self._labelled.pop(uid, None)
        if ours is None or node is None or node != ours:
            return
        if (pod["metadata"].get("labels") or {}).get(NODE_LABEL) == node:
            return
        if self.labels_in_binding:
            log.info("the API server dropped the labels of a Binding (Kubernetes before 1.35, or the "
                     "PodTopologyLabelsAdmission feature gate off): %s goes on as a patch before each Binding",
                     NODE_LABEL)
            self.labels_in_binding = False
        self.sched.note(self._label, pod, node)

    def _label(self, pod: dict[str, Any], node: str) -> None:
        labels = node_label(node)
        if labels is None:
            return
        try:
            self.sched.kube.patch(pod_path(pod), {"metadata": {"labels": labels}})
        except ApiException as exc:
            log.info("pod %s: label not set: %s", owner_of(pod), exc.reason)

    def _lock_taken(self, pod: dict[str, Any], node: str, exc: NodeLocked, explain: bool) -> str:
        """Another bind holds ``node``'s lock: the slice is freed and the pod placed again at once, the
        node counted as locked until the watch says otherwise."""
        sched = self.sched
        uid = pod["metadata"]["uid"]
        log.info("pod %s: %s; placed again", owner_of(pod), exc)
        with sched.lock:
            sched.landed(uid)
            self._labelled.pop(uid, None)
            sched.locks.unclaim(node, uid)
            if exc.value is not None:
                sched.locks.saw(node, exc.value)
            sched.free(uid)
            if explain and uid in sched.pods:
                sched.podqueue.remove(uid)
                sched.podqueue.enqueue(sched.pods[uid])
            sched.changed()
        return str(exc)

    def _unlock(self, pod: dict[str, Any], node: str) -> None:
        """Release the lock this bind took on ``node`` (the bind did not happen; no Allocate will)."""
        sched = self.sched
        meta = pod["metadata"]
        try:
            nodelock.release(sched.kube, node, (str(meta["namespace"]), str(meta["name"])))
        except Exception as exc:  # noqa: BLE001 - it expires, or its pod's deletion frees it
            log.warning("pod %s: lock of node %s not released: %s", owner_of(pod), node, exc)
        with sched.lock:
            sched.locks.unclaim(node, meta["uid"])

    def _pod_exists(self, namespace: str, name: str) -> bool:
        """Whether a pod of that name exists: the cache, else the API server (HAMi's dangling-lock check)."""
        sched = self.sched
        with sched.lock:
            if sched.has_pod(namespace, name):
                return True
        try:
            sched.kube.get(pod_path({"metadata": {"namespace": namespace, "name": name}}))
        except ApiException as exc:
            return bool(exc.status != 404)
        return True

    def _not_bound(self, pod: dict[str, Any], error: str, explain: bool, node: str | None = None) -> str:
        sched = self.sched
        uid = pod["metadata"]["uid"]
        with sched.lock:
            sched.landed(uid)
            self._labelled.pop(uid, None)
            if node is not None:
                sched.locks.unclaim(node, uid)
            sched.free(uid)
            if explain and uid in sched.pods:
                sched.podqueue.park(pod, "BindingRejected", error)
        return error

    def _refresh(self, pod: dict[str, Any], node: str, explain: bool = True) -> str | None:
        """The binding was refused with 409: read the pod; if it is bound, what it says wins over what
        this bridge chose (our slice is freed, its annotations' are held). None if it is bound on ``node``."""
        sched = self.sched
        uid = pod["metadata"]["uid"]
        fresh: dict[str, Any] | None
        try:
            fresh = sched.kube.get(pod_path(pod))
        except ApiException as exc:
            fresh = None if exc.status == 404 else pod
        with sched.lock:
            sched.landed(uid)
            sched.free(uid)
            if fresh is None or fresh["metadata"].get("uid") != uid:
                return "binding refused (409): the pod is gone"
            sched.pods[uid] = fresh
            bound_on = (fresh.get("spec") or {}).get("nodeName")
            if bound_on:
                sched.adopt(fresh, bound_on)
                if bound_on != node:
                    sched.note(self._relabel, fresh, node, bound_on)
                return None if bound_on == node else f"binding refused (409): the pod is bound to {bound_on}"
            if explain:
                sched.podqueue.park(fresh, "BindingRejected", "binding refused (409); tried again")
            return "binding refused (409)"

    def _relabel(self, pod: dict[str, Any], ours: str, bound_on: str) -> None:
        """Our label went on a pod another binder bound elsewhere first: it names the node it is on."""
        sched = self.sched
        labels = (pod["metadata"].get("labels") or {})
        want = node_label(bound_on)
        if labels.get(NODE_LABEL) != ours or want is None:
            return
        try:
            sched.kube.patch(pod_path(pod), {"metadata": {"labels": want}})
        except ApiException as exc:
            log.info("pod %s: label not corrected: %s", owner_of(pod), exc.reason)
