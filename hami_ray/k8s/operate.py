"""Around the bridge: ``hami-ray status --kubeconfig`` (a read-only view from the annotations) and
leader election between replicas (``--leader-elect``)."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from kubernetes import client

from hami_ray.k8s.kubeapi import owner_of, since
from hami_ray.k8s.scheduler import SCHEDULER_NAME, PodScheduler
from hami_ray.observe.model import ClusterStatus, build_status

log = logging.getLogger(__name__)


def cluster_status(api: client.ApiClient, scheduler_name: str = SCHEDULER_NAME) -> ClusterStatus:
    """What ``hami-ray status --kubeconfig`` shows: nodes and devices from the register annotations,
    every placed pod's slices (owner ``namespace/pod``) from its allocation annotations, and the pending
    pods of ``scheduler_name`` with their last ``PodScheduled`` message. Read-only."""
    view = PodScheduler(api, scheduler_name=scheduler_name, quiet=True)
    view.sync()
    pending = sorted((p for p in view.pods.values() if (p.get("spec") or {}).get("schedulerName") == scheduler_name
                      and not (p.get("spec") or {}).get("nodeName")
                      and (p.get("status") or {}).get("phase") == "Pending"),
                     key=lambda p: p["metadata"].get("creationTimestamp") or "")
    now = time.time()
    waiting = [{"owner": owner_of(p), "request": "pod", "priority": 0,
                "waited_s": round(now - since(p["metadata"].get("creationTimestamp")), 1)
                if p["metadata"].get("creationTimestamp") else 0.0,
                "reason": _pod_scheduled_message(p)} for p in pending[:10]]
    return build_status(view.inventory.snapshot(), queue_depth=len(pending), waiting=waiting)


def _pod_scheduled_message(pod: dict[str, Any]) -> str:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return str(cond.get("message") or cond.get("reason") or "")
    return "not tried yet"


def lead(api: client.ApiClient, sched: PodScheduler, stop: threading.Event, *, namespace: str, name: str,
         identity: str | None = None, lease_s: float = 15.0) -> None:
    """Schedule only while holding the ``coordination.k8s.io`` Lease ``namespace/name`` (kube-scheduler's
    ``--leader-elect``): a second replica waits, and takes over within ``lease_s`` when the first stops
    renewing. Losing the lease stops scheduling and returns (the process should exit, as kube-scheduler does)."""
    import os  # noqa: PLC0415
    import socket  # noqa: PLC0415

    from kubernetes.leaderelection import electionconfig, leaderelection  # noqa: PLC0415
    from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock  # noqa: PLC0415

    lock = LeaseLock(name, namespace, identity or f"{socket.gethostname()}_{os.getpid()}")  # type: ignore[no-untyped-call]
    lock.api_instance = client.CoordinationV1Api(api)
    done = threading.Event()

    def started() -> None:
        log.info("leading as %s", lock.identity)
        try:
            sched.run(stop)
        finally:
            done.set()

    def stopped() -> None:
        log.warning("%s lost the lease %s/%s: scheduling stops", lock.identity, namespace, name)
        stop.set()

    retry_s = max(lease_s / 7.5, 1.1)  # kube-scheduler: 15 / 10 / 2 s; the client wants retries over 1 s
    renew_s = max(lease_s * 2 / 3, retry_s * 1.3)
    config = electionconfig.Config(  # type: ignore[no-untyped-call]
        lock, math.ceil(max(lease_s, renew_s * 1.2)), renew_s, retry_s, started, stopped)
    leaderelection.LeaderElection(config).run()  # type: ignore[no-untyped-call]
    done.wait(30)
