"""HAMi v2.10's NVIDIA device plugin, emulated as far as Allocate goes, and a kubelet that calls it: for the
tests of HAMi's node lock (tests/k8s/test_hami_lock.py) and for bench/k8s_bind.py's ``hami-lock`` mode.

The lookup is ``GetPendingPod`` exactly as ../shared/reference/hami.md documents it ("How HAMi's device
plugin finds the pod", and the v2.10 source it was read from): the node's ``hami.io/mutex.lock``, if it
names a pod, is that pod (a lock that does not parse fails Allocate); else the first pod in list order of
``spec.nodeName=<node>`` (all namespaces) that is ``Pending``, has ``hami.io/bind-time``, a
``hami.io/bind-phase`` of ``allocating`` or ``success`` and ``hami.io/vgpu-node`` equal to the node; else
Allocate fails with "no binding pod found on node". Allocate's side effects (hami.md §1.4,
``plugin/server.go``): the first container entry left in ``hami.io/vgpu-devices-to-allocate`` is served
(its device count must equal the request's) and erased; once no entry is left, ``bind-phase=success``
and the lock is released if it names the pod (``ReleaseNodeLock`` with its owner check). A failed
Allocate sets ``bind-phase=failed`` and releases the lock the same way.

Written from the reference, not from hami_ray: it shares no code with what it checks.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from hami_ray.core.codec import DecodedDevice, decode_pod_devices
from hami_ray.k8s.kubeapi import KubeApi

LOCK = "hami.io/mutex.lock"
TO_ALLOCATE = "hami.io/vgpu-devices-to-allocate"
ALLOCATED = "hami.io/vgpu-devices-allocated"
BIND_PHASE = "hami.io/bind-phase"
BIND_TIME = "hami.io/bind-time"
VGPU_NODE = "hami.io/vgpu-node"
GPU = "nvidia.com/gpu"


class AllocateFailed(Exception):
    """What HAMi's Allocate would answer the kubelet with an error."""


def _path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{name}"


def _entries(value: str) -> list[str]:
    return value.split(";")


class HamiPlugin:
    """HAMi's device plugin of one node: :meth:`pending_pod` and :meth:`allocate`."""

    def __init__(self, api: client.ApiClient, node: str) -> None:
        self.kube = KubeApi(api)
        self.node = node

    def pending_pod(self) -> dict[str, Any]:
        """``GetPendingPod``.

        Raises:
            AllocateFailed: a lock that does not parse, a locked pod that cannot be read, no pod found.
        """
        node = self.kube.get(f"/api/v1/nodes/{self.node}")
        value = ((node.get("metadata") or {}).get("annotations") or {}).get(LOCK)
        if value is not None:  # GetAllocatePodByNode
            parts = value.split(",")
            if len(parts) not in (1, 3):
                raise AllocateFailed(f"malformed lock annotation: expected 3 parts, got {len(parts)} from {value}")
            if len(parts) == 3 and parts[1] and parts[2]:
                try:
                    return self.kube.get(_path(parts[1], parts[2]))
                except ApiException as exc:
                    raise AllocateFailed(f"pod {parts[1]}/{parts[2]} of the lock: {exc.status}") from None
        page = self.kube.request("GET", "/api/v1/pods", query=[("fieldSelector", f"spec.nodeName={self.node}")])
        for pod in page.get("items") or []:
            annotations = pod["metadata"].get("annotations") or {}
            if (pod.get("status") or {}).get("phase") != "Pending":
                continue
            if BIND_TIME not in annotations:
                continue
            if annotations.get(BIND_PHASE) not in ("allocating", "success"):
                continue
            if annotations.get(VGPU_NODE) == self.node:
                return pod
        raise AllocateFailed(f"no binding pod found on node {self.node}")

    def allocate(self, device_ids: int) -> tuple[dict[str, Any], list[DecodedDevice]]:
        """One Allocate of one container request with ``device_ids`` ids: the pod served, the devices.

        Raises:
            AllocateFailed: as HAMi's Allocate fails (the pod, if found, marked ``bind-phase=failed``).
        """
        pod = self.pending_pod()
        meta = pod["metadata"]
        annotations = meta.get("annotations") or {}
        entries = _entries(annotations.get(TO_ALLOCATE, ""))
        index = next((i for i, e in enumerate(entries) if e.strip(":").strip()), None)
        if index is None:
            self._failed(pod)
            raise AllocateFailed(f"pod {meta['namespace']}/{meta['name']}: device request not found")
        [devices] = decode_pod_devices(entries[index] + ";", field=TO_ALLOCATE)
        if len(devices) != device_ids:
            self._failed(pod)
            raise AllocateFailed(f"device number not matched: {len(devices)} != {device_ids}")
        entries[index] = ""
        self.kube.patch(_path(meta["namespace"], meta["name"]),
                        {"metadata": {"annotations": {TO_ALLOCATE: ";".join(entries)}}})  # EraseNextDeviceType...
        fresh = self.kube.get(_path(meta["namespace"], meta["name"]))  # PodAllocationTrySuccess
        left = _entries((fresh["metadata"].get("annotations") or {}).get(TO_ALLOCATE, ""))
        if not any(e.strip(":").strip() for e in left):
            self.kube.patch(_path(meta["namespace"], meta["name"]),
                            {"metadata": {"annotations": {BIND_PHASE: "success"}}})
            self.release(meta["namespace"], meta["name"])
        return pod, devices

    def _failed(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        self.kube.patch(_path(meta["namespace"], meta["name"]), {"metadata": {"annotations": {BIND_PHASE: "failed"}}})
        self.release(meta["namespace"], meta["name"])

    def release(self, namespace: str, name: str) -> None:
        """``ReleaseNodeLock``: only a lock ending in ``,<namespace>,<name>``, conditional on the node read."""
        for _ in range(5):
            node = self.kube.get(f"/api/v1/nodes/{self.node}")
            meta = node["metadata"]
            value = (meta.get("annotations") or {}).get(LOCK)
            if value is None or not value.endswith(f",{namespace},{name}"):
                return
            try:
                self.kube.patch(f"/api/v1/nodes/{self.node}", {"metadata": {
                    "resourceVersion": meta["resourceVersion"], "annotations": {LOCK: None}}})
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise


@dataclass
class Served:
    """One Allocate: the pod the kubelet admitted, the container, the pod HAMi's plugin served and what."""

    admitted: str
    container: int
    served: str | None
    devices: list[DecodedDevice] = field(default_factory=list)
    expected: list[DecodedDevice] = field(default_factory=list)
    error: str = ""

    @property
    def right(self) -> bool:
        return self.served == self.admitted and self.devices == self.expected and not self.error


class Kubelet:
    """A kubelet for one node: it admits the pods bound to it, each container with ``nvidia.com/gpu`` through
    one Allocate (init containers first). Each round it lists the node's pods and admits the new ones
    newest name first, as a kubelet may order a batch (a batch is sorted by creation time, equal times in
    any order). ``most_waiting``: the most pods it ever saw bound and not yet admitted at once."""

    def __init__(self, api: client.ApiClient, node: str) -> None:
        self.plugin = HamiPlugin(api, node)
        self.kube = self.plugin.kube
        self.node = node
        self.served: list[Served] = []
        self.admitted: set[str] = set()
        self.most_waiting = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def round(self) -> int:
        """Admit the pods bound here since the last round; how many."""
        page = self.kube.request("GET", "/api/v1/pods", query=[("fieldSelector", f"spec.nodeName={self.node}")])
        new = [p for p in page.get("items") or [] if p["metadata"]["uid"] not in self.admitted
               and (p["metadata"].get("annotations") or {}).get(TO_ALLOCATE) is not None]
        self.most_waiting = max(self.most_waiting, len(new))
        for pod in sorted(new, key=lambda p: p["metadata"]["name"], reverse=True):
            self.admit(pod)
        return len(new)

    def admit(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        self.admitted.add(meta["uid"])
        spec = pod.get("spec") or {}
        expected = decode_pod_devices((meta.get("annotations") or {}).get(ALLOCATED, ""), field=ALLOCATED)
        for i, container in enumerate([*(spec.get("initContainers") or []), *(spec.get("containers") or [])]):
            count = int(((container.get("resources") or {}).get("limits") or {}).get(GPU, 0))
            if not count:
                continue
            record = Served(f"{meta['namespace']}/{meta['name']}", i, None, expected=list(expected[i]))
            try:
                served, devices = self.plugin.allocate(count)
                record.served = f"{served['metadata']['namespace']}/{served['metadata']['name']}"
                record.devices = list(devices)
            except AllocateFailed as exc:
                record.error = str(exc)
            self.served.append(record)

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    if self.round() == 0:
                        self._stop.wait(0.02)
                except Exception as exc:  # noqa: BLE001 - the test reads what went wrong
                    self.served.append(Served("?", -1, None, error=f"{type(exc).__name__}: {exc}"))
                    self._stop.wait(0.2)

        self._thread = threading.Thread(target=loop, name=f"kubelet-{self.node}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def wait_admitted(kubelets: list[Kubelet], count: int, timeout: float) -> bool:
    """Until the kubelets admitted ``count`` pods together (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(len(k.admitted) for k in kubelets) >= count:
            return True
        time.sleep(0.05)
    return sum(len(k.admitted) for k in kubelets) >= count
