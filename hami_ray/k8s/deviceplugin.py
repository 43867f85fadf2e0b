"""hami-ray as HAMi's NVIDIA device plugin: the kubelet's side of a pod the bridge bound.

``hami-ray k8s device-plugin`` runs on each GPU node (DaemonSet ``deploy/k8s/device-plugin.yaml``):

- it registers the node's devices in HAMi's node annotations: ``hami.io/node-nvidia-register`` (JSON as
  Go writes it, split count, MiB, cores 100, model, NUMA, health) and ``hami.io/node-handshake``
  (``Reported <time>``), every 30 s and when health changes, so that the bridge (``hami-ray k8s
  scheduler``) places pods on it; and ``hami-ray.io/device-plugin`` (the resource it serves), which tells
  the bridge's ``--bind-mode auto`` that this node's plugin is hami-ray's (:mod:`hami_ray.k8s.nodelock`);
- it serves the kubelet device plugin API v1beta1 (``hami_ray/k8s/proto/deviceplugin/v1beta1/api.proto``) on
  ``<plugin dir>/hami-ray-nvidia.sock`` and registers with ``<plugin dir>/kubelet.sock``; ListAndWatch
  advertises every device x split count as ``<uuid>-<i>``;
- Allocate serves the pod the node lock ``hami.io/mutex.lock`` names, as HAMi's plugin does, when it names
  one that waits for its devices (a bridge in ``hami-lock`` mode); else the pod bound to this node that
  still waits for its devices (``hami.io/bind-phase=allocating``, oldest ``hami.io/bind-time`` first): the
  first container entry left in ``hami.io/vgpu-devices-to-allocate`` becomes HAMi's environment (hami.md
  §2.6), the entry is erased, and ``bind-phase`` becomes ``success`` once no entry is left (``failed`` when
  the request cannot be served), and the lock, if it names the pod, is removed. Allocate is handed device
  ids, not a pod: without the lock the pod it serves is the right one only while one pod per node is
  between its binding and its Allocate (the kubelet admits a batch of new pods in creation order, which
  the oldest bind-time need not match); ``direct`` binding trades that certainty for throughput (see
  docs/kubernetes.md, "Bind modes");
- a restarted kubelet deletes every socket in the plugin dir: the directory is polled and the server
  started and registered again.

The Python code for the API comes from :mod:`hami_ray.k8s.grpc_api` (generated from the .proto).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import uuid as uuid_module
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import grpc  # type: ignore[import-untyped]
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from hami_ray.core.codec import DecodedDevice, RegisteredDevice, decode_pod_devices, encode_node_register
from hami_ray.core.errors import HamiRayError
from hami_ray.core.model import DEFAULT_SPLIT_COUNT, FULL_CORES, Device
from hami_ray.core.vendors import NVIDIA_VENDOR, VENDORS
from hami_ray.k8s.grpc_api import pb2, pb2_grpc
from hami_ray.k8s import nodelock
from hami_ray.k8s.kubeapi import KubeApi, pod_path, timestamp
from hami_ray.k8s.annotations import BIND_PHASE_ANNOTATION, BIND_TIME_ANNOTATION, TO_ALLOCATE_ANNOTATION

log = logging.getLogger(__name__)


VERSION = "v1beta1"
DEFAULT_PLUGIN_DIR = Path("/var/lib/kubelet/device-plugins")
KUBELET_SOCKET = "kubelet.sock"
SOCKET_NAME = "hami-ray-nvidia.sock"
DEFAULT_RESOURCE = "nvidia.com/gpu"
HEALTHY, UNHEALTHY = "Healthy", "Unhealthy"
VGPU_DIR = "/usr/local/vgpu"  # HAMi-core's directory inside containers
NODE_LOCK_ANNOTATION = nodelock.LOCK_ANNOTATION  # HAMi's node lock; the device plugin releases it
PLUGIN_ANNOTATION = nodelock.PLUGIN_ANNOTATION  # "this node's device plugin is hami-ray's"
REGISTER_ANNOTATION = NVIDIA_VENDOR.register or "hami.io/node-nvidia-register"
HANDSHAKE_ANNOTATION = NVIDIA_VENDOR.handshake or "hami.io/node-handshake"
MAX_ID_LENGTH = 63  # the kubelet's limit on a device ID


# --- errors Allocate answers with --------------------------------------------------------------------
class AllocateError(HamiRayError):
    """An Allocate that cannot be served: the gRPC status code and a message for the kubelet's event."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Conflict(Exception):
    """The pod changed between reading and patching it (409): read it again."""


def _left(value: str | None) -> bool:
    """Whether an allocation annotation still names a device (an entry that is not empty)."""
    return bool(value) and any(piece.strip(":").strip() for piece in (value or "").split(";"))


class DevicePlugin:
    """The plugin of one node: annotations, the gRPC server, registration and re-registration.

    Args:
        api: a Kubernetes client (the DaemonSet's ServiceAccount: nodes get/patch, pods get/list/watch/patch).
        node: this node's name.
        devices: the node's devices (:func:`discover_devices`).
        health: called every ``health_s`` for health by uuid (a backend's ``health``); None: always healthy.
        plugin_dir: the kubelet's device plugin directory.
        resource: the extended resource advertised.
        split_count: virtual devices per physical one (HAMi's ``deviceSplitCount``).
        libvgpu: HAMi-core's library on the host: mounted into containers with an ``/etc/ld.so.preload``.

    Example: ``DevicePlugin(api, "gpu-1", discover_devices("gpu-1", simulate="2xT4-16GB")).run(stop)``.
    """

    def __init__(self, api: client.ApiClient, node: str, devices: Sequence[Device], *,
                 health: Any = None, plugin_dir: Path = DEFAULT_PLUGIN_DIR, resource: str = DEFAULT_RESOURCE,
                 split_count: int = DEFAULT_SPLIT_COUNT, libvgpu: Path | None = None, socket_name: str = SOCKET_NAME,
                 poll_s: float = 0.5, health_s: float = 5.0, report_s: float = 30.0) -> None:
        if split_count < 1:
            raise ValueError("split_count must be at least 1")
        self.kube = KubeApi(api)
        self.node = node
        self.devices = list(devices)
        self.plugin_dir = Path(plugin_dir)
        self.resource = resource
        self.split_count = split_count
        self.libvgpu = libvgpu
        self.socket = self.plugin_dir / socket_name
        self.poll_s, self.health_s, self.report_s = poll_s, health_s, report_s
        self._health_of = health
        self._uuids = {d.uuid for d in self.devices}
        self._ids = {f"{d.uuid}-{i}": d.uuid for d in self.devices for i in range(split_count)}
        for device_id in self._ids:
            if len(device_id) > MAX_ID_LENGTH:
                log.warning("device ID %s is longer than the kubelet's %d characters", device_id, MAX_ID_LENGTH)
        self._health = {d.uuid: d.healthy for d in self.devices}
        self._changed = threading.Condition()
        self._version = 0  # moves when the device list (health) changes: ListAndWatch sends it again
        self._allocating = threading.Lock()
        self._stop = threading.Event()
        self._server: grpc.Server | None = None
        self._socket_ino: int | None = None
        self._kubelet_ino: int | None = None  # kubelet.sock when we registered; None: not registered
        self._thread: threading.Thread | None = None
        self._reported_at = 0.0
        self._refused = ""  # the last registration failure (logged once)
        self.registrations = 0

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Write the node's annotations, serve, register, and watch (health, the plugin dir) in a thread."""
        self._stop.clear()
        if self.libvgpu is not None:
            self._write_preload()
        try:
            self.report()
        except Exception as exc:  # noqa: BLE001 - the loop tries again every 5 s
            log.warning("node %s: register annotation not written: %s", self.node, exc)
            self._reported_at = time.monotonic() - self.report_s + 5.0
        self._serve()
        self._register()
        self._thread = threading.Thread(target=self._loop, name="hami-ray-device-plugin", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and serving; our socket is removed."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._shutdown()

    def run(self, stop: threading.Event) -> None:
        """:meth:`start`, wait for ``stop``, :meth:`stop`."""
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()

    def _serve(self) -> None:
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        if self.socket.exists() or self.socket.is_symlink():
            self.socket.unlink()
        server = grpc.server(ThreadPoolExecutor(max_workers=8, thread_name_prefix="hami-ray-dp-grpc"))
        pb2_grpc.add_DevicePluginServicer_to_server(_Servicer(self), server)
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server
        self._socket_ino = self.socket.stat().st_ino
        log.info("serving the device plugin API on %s", self.socket)

    def _shutdown(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=0.5).wait(5)
        try:
            if self._socket_ino is not None and self.socket.stat().st_ino == self._socket_ino:
                self.socket.unlink()
        except OSError:
            pass
        self._socket_ino = None
        self._kubelet_ino = None

    def _register(self) -> bool:
        """Register with the kubelet; False (logged) when it is not there yet."""
        kubelet = self.plugin_dir / KUBELET_SOCKET
        try:
            inode = kubelet.stat().st_ino
        except OSError:
            return False
        request = pb2.RegisterRequest(version=VERSION, endpoint=self.socket.name, resource_name=self.resource,
                                      options=_options())
        try:
            with grpc.insecure_channel(f"unix://{kubelet}") as channel:
                pb2_grpc.RegistrationStub(channel).Register(request, timeout=5)
        except grpc.RpcError as exc:
            why = f"{exc.code()}: {exc.details()}" if isinstance(exc, grpc.Call) else str(exc)
            if why != self._refused:  # tried every poll_s: said once
                log.info("registration with %s failed (tried again every %.1f s): %s", kubelet, self.poll_s, why)
                self._refused = why
            return False
        self._kubelet_ino = inode
        self._refused = ""
        self.registrations += 1
        log.info("registered %s (%s) with the kubelet", self.resource, self.socket.name)
        return True

    def _loop(self) -> None:
        """Every ``poll_s``: our socket deleted or kubelet.sock recreated -> serve and register again;
        every ``health_s``: health; every ``report_s`` (5 s after a failure): the node's annotations."""
        checked = time.monotonic()
        while not self._stop.wait(self.poll_s):
            try:
                self._watch_dir()
            except Exception:  # noqa: BLE001 - a long-running loop never dies
                log.exception("plugin directory check failed")
            now = time.monotonic()
            if now - checked >= self.health_s:
                checked = now
                self._check_health()
            if now - self._reported_at >= self.report_s:
                try:
                    self.report()
                except Exception as exc:  # noqa: BLE001 - the API server restarting: again in 5 s
                    log.warning("node %s: register annotation not written: %s", self.node, exc)
                    self._reported_at = now - self.report_s + 5.0

    def _watch_dir(self) -> None:
        try:
            ours: int | None = self.socket.stat().st_ino
        except OSError:
            ours = None
        try:
            kubelet: int | None = (self.plugin_dir / KUBELET_SOCKET).stat().st_ino
        except OSError:
            kubelet = None
        restarted = self._kubelet_ino is not None and kubelet is not None and kubelet != self._kubelet_ino
        if ours is None or ours != self._socket_ino or restarted:
            log.info("the kubelet restarted (%s): serving and registering again",
                     "our socket is gone" if ours != self._socket_ino else "kubelet.sock is new")
            self._shutdown()
            self._serve()
        if self._kubelet_ino is None and kubelet is not None:
            self._register()

    # --- devices ---------------------------------------------------------------------------------
    def _check_health(self) -> None:
        if self._health_of is None:
            return
        try:
            health = dict(self._health_of())
        except Exception as exc:  # noqa: BLE001 - a backend that fails to answer: every device unhealthy
            log.warning("device health not read: %s", exc)
            health = {}
        fresh = {u: bool(health.get(u, False)) for u in self._uuids}
        if fresh == self._health:
            return
        log.warning("device health changed: %s", {u: h for u, h in fresh.items() if self._health.get(u) != h})
        with self._changed:
            self._health = fresh
            self._version += 1
            self._changed.notify_all()
        try:
            self.report()
        except Exception as exc:  # noqa: BLE001 - written again by the loop
            log.warning("node %s: register annotation not written: %s", self.node, exc)

    def registered(self) -> list[RegisteredDevice]:
        """The node's devices as HAMi's register annotation lists them."""
        return [RegisteredDevice(id=d.uuid, index=d.index, count=self.split_count, devmem=d.memory_mib,
                                 devcore=FULL_CORES, type=d.model if d.model.startswith("NVIDIA") else f"NVIDIA-{d.model}",
                                 numa=d.numa, health=self._health[d.uuid])
                for d in self.devices]

    def report(self) -> None:
        """Write ``hami.io/node-nvidia-register``, ``hami.io/node-handshake`` and our mark on the node."""
        annotations = {REGISTER_ANNOTATION: encode_node_register(self.registered()),
                       HANDSHAKE_ANNOTATION: f"Reported {timestamp()}", PLUGIN_ANNOTATION: self.resource}
        self.kube.patch(f"/api/v1/nodes/{self.node}", {"metadata": {"annotations": annotations}})
        self._reported_at = time.monotonic()

    def list_devices(self) -> list[Any]:
        """Every device x split count, as ListAndWatch sends them."""
        by_uuid = {d.uuid: d for d in self.devices}
        return [pb2.Device(ID=device_id, health=HEALTHY if self._health[uuid] else UNHEALTHY,
                           topology=pb2.TopologyInfo(nodes=[pb2.NUMANode(ID=by_uuid[uuid].numa)]))
                for device_id, uuid in self._ids.items()]

    def list_and_watch(self, context: grpc.ServicerContext) -> Iterator[Any]:
        seen = -1
        server = self._server
        while context.is_active() and not self._stop.is_set() and server is self._server:
            with self._changed:
                if self._version == seen:
                    self._changed.wait(0.5)
                    continue
                seen = self._version
                devices = self.list_devices()
            yield pb2.ListAndWatchResponse(devices=devices)

    def preferred(self, request: Any) -> Any:
        """The request's IDs, those it must include first (any slice serves the pod: Allocate reads the
        pod's annotation, not the IDs)."""
        out = []
        for want in request.container_requests:
            chosen = list(dict.fromkeys([*want.must_include_deviceIDs, *want.available_deviceIDs]))
            out.append(pb2.ContainerPreferredAllocationResponse(deviceIDs=chosen[:max(want.allocation_size, 0)]))
        return pb2.PreferredAllocationResponse(container_responses=out)

    # --- Allocate ----------------------------------------------------------------------------------
    def allocate(self, request: Any) -> Any:
        """Serve the container requests of one Allocate from the pod waiting on this node.

        Raises:
            AllocateError: INVALID_ARGUMENT (an ID never advertised, no container), NOT_FOUND (no pod
                waits), FAILED_PRECONDITION (the pod's devices do not match the request), UNAVAILABLE
                (the API server did not answer); the pod found, if any, is marked ``bind-phase=failed``.
        """
        wanted = [list(c.devices_ids) for c in request.container_requests]
        with self._allocating:
            for _ in range(5):
                try:
                    return self._allocate(wanted)
                except _Conflict:
                    continue
            raise AllocateError(grpc.StatusCode.ABORTED, "the pod kept changing while it was being allocated")

    def _allocate(self, wanted: list[list[str]]) -> Any:
        unknown = sorted({i for ids in wanted for i in ids if i not in self._ids})
        try:
            pod = self._pending_pod()
        except ApiException as exc:
            raise AllocateError(grpc.StatusCode.UNAVAILABLE, f"pods on node {self.node} not read: {exc.status} {exc.reason}") from None
        if unknown:
            self._fail(pod, f"device IDs never advertised by this plugin: {', '.join(unknown)}",
                       grpc.StatusCode.INVALID_ARGUMENT)
        if not wanted or not all(wanted):
            self._fail(pod, "Allocate without devices for a container", grpc.StatusCode.INVALID_ARGUMENT)
        if pod is None:
            self._fail(None, f"no pod bound to node {self.node} waits for devices ({BIND_PHASE_ANNOTATION}=allocating "
                       f"with an entry left in {TO_ALLOCATE_ANNOTATION})", grpc.StatusCode.NOT_FOUND)
        meta = pod["metadata"]
        owner = f"{meta['namespace']}/{meta['name']}"
        annotations = dict(meta.get("annotations") or {})
        pieces = annotations[TO_ALLOCATE_ANNOTATION].split(";")
        responses = []
        for ids in wanted:
            index = next((i for i, piece in enumerate(pieces) if piece.strip(":").strip()), None)
            if index is None:
                self._fail(pod, f"pod {owner} has no container entry left for {len(wanted)} container requests",
                           grpc.StatusCode.FAILED_PRECONDITION)
            try:
                devices = decode_pod_devices(pieces[index] + ";", field=TO_ALLOCATE_ANNOTATION)[0]
            except HamiRayError as exc:
                self._fail(pod, f"pod {owner}: {exc}", grpc.StatusCode.FAILED_PRECONDITION)
            if len(devices) != len(ids):
                self._fail(pod, f"pod {owner}: container entry {index} has {len(devices)} device(s), the kubelet "
                           f"asked for {len(ids)} ({', '.join(ids)})", grpc.StatusCode.FAILED_PRECONDITION)
            foreign = [d.uuid for d in devices if d.uuid not in self._uuids]
            if foreign:
                self._fail(pod, f"pod {owner}: devices {', '.join(foreign)} are not on node {self.node}",
                           grpc.StatusCode.FAILED_PRECONDITION)
            responses.append(self.container_response(devices))
            pieces[index] = ""
        annotations[TO_ALLOCATE_ANNOTATION] = ";".join(pieces)
        done = not any(_left(annotations.get(v.to_allocate)) for v in VENDORS if v.to_allocate)
        patch = {TO_ALLOCATE_ANNOTATION: annotations[TO_ALLOCATE_ANNOTATION]}
        if done:
            patch[BIND_PHASE_ANNOTATION] = "success"
        try:  # one write, conditional on the version read: all of it or nothing
            self.kube.patch(pod_path(pod), {"metadata": {"resourceVersion": meta["resourceVersion"],
                                                         "annotations": patch}})
        except ApiException as exc:
            if exc.status == 409:
                raise _Conflict() from None
            raise AllocateError(grpc.StatusCode.UNAVAILABLE,
                                f"pod {owner}: allocation not recorded: {exc.status} {exc.reason}") from None
        log.info("pod %s: %d container(s) allocated%s", owner, len(responses), ", bind-phase=success" if done else "")
        if done:
            self._release_lock(pod)
        return pb2.AllocateResponse(container_responses=responses)

    def container_response(self, devices: Sequence[DecodedDevice]) -> Any:
        """HAMi's environment for a container's devices (hami.md §2.6), and HAMi-core's mounts."""
        envs = {"NVIDIA_VISIBLE_DEVICES": ",".join(d.uuid for d in devices)}
        for i, device in enumerate(devices):
            envs[f"CUDA_DEVICE_MEMORY_LIMIT_{i}"] = f"{device.memory_mib}m"
        envs["CUDA_DEVICE_SM_LIMIT"] = str(devices[0].cores)
        envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"] = f"{VGPU_DIR}/{uuid_module.uuid4()}.cache"
        mounts = []
        if self.libvgpu is not None:
            mounts = [pb2.Mount(container_path=f"{VGPU_DIR}/libvgpu.so", host_path=str(self.libvgpu), read_only=True),
                      pb2.Mount(container_path="/etc/ld.so.preload", host_path=str(self._preload()), read_only=True)]
        return pb2.ContainerAllocateResponse(envs=envs, mounts=mounts)

    def _pending_pod(self) -> dict[str, Any] | None:
        """The pod on this node waiting for devices (HAMi's GetPendingPod): the one the node lock names, else
        the oldest ``bind-time`` first."""
        locked = self._locked_pod()
        if locked is not None:
            return locked
        page = self.kube.request("GET", "/api/v1/pods", query=[("fieldSelector", f"spec.nodeName={self.node}")])
        waiting = []
        for pod in page.get("items") or []:
            meta = pod.get("metadata") or {}
            if not _waits(pod):
                continue
            try:
                bound = int((meta.get("annotations") or {}).get(BIND_TIME_ANNOTATION, ""))
            except ValueError:
                bound = 2**63
            waiting.append((bound, meta.get("creationTimestamp") or "", meta.get("namespace", ""), meta.get("name", ""), pod))
        return min(waiting, key=lambda w: w[:4])[4] if waiting else None

    def _locked_pod(self) -> dict[str, Any] | None:
        """The pod ``hami.io/mutex.lock`` names, if it is bound here and waits for devices."""
        node = self.kube.get(f"/api/v1/nodes/{self.node}")
        value = ((node.get("metadata") or {}).get("annotations") or {}).get(NODE_LOCK_ANNOTATION)
        try:
            lock = nodelock.NodeLock.parse(value) if value else None
        except ValueError:
            lock = None
        if lock is None or not lock.name:
            return None
        try:
            pod = self.kube.get(pod_path({"metadata": {"namespace": lock.namespace, "name": lock.name}}))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        if (pod.get("spec") or {}).get("nodeName") != self.node or not _waits(pod):
            return None
        return pod

    def _fail(self, pod: dict[str, Any] | None, message: str, code: grpc.StatusCode) -> NoReturn:
        """Mark the pod ``bind-phase=failed`` (when there is one) and raise ``AllocateError(code, message)``."""
        if pod is not None:
            try:
                self.kube.patch(pod_path(pod), {"metadata": {"annotations": {BIND_PHASE_ANNOTATION: "failed"}}})
            except ApiException as exc:
                log.warning("pod %s: bind-phase=failed not written: %s", pod["metadata"].get("name"), exc.reason)
            self._release_lock(pod)
        log.warning("Allocate refused: %s", message)
        raise AllocateError(code, message)

    def _release_lock(self, pod: dict[str, Any]) -> None:
        """Remove HAMi's node lock when it names this pod (``<time>,<namespace>,<name>``), conditional on
        the Node read: a lock another bind took meanwhile stays."""
        meta = pod["metadata"]
        try:
            nodelock.release(self.kube, self.node, (str(meta.get("namespace")), str(meta.get("name"))))
        except ApiException as exc:
            log.info("node lock not released: %s", exc)

    def _preload(self) -> Path:
        assert self.libvgpu is not None
        return self.libvgpu.parent / "ld.so.preload"

    def _write_preload(self) -> None:
        """``ld.so.preload`` beside libvgpu.so on the host, naming the library's path in containers."""
        assert self.libvgpu is not None
        if not self.libvgpu.exists():
            log.warning("%s does not exist: containers will not load HAMi-core", self.libvgpu)
        text = f"{VGPU_DIR}/libvgpu.so\n"
        path = self._preload()
        if not path.is_file() or path.read_text() != text:
            staged = path.with_name(f".{path.name}.{os.getpid()}")
            staged.write_text(text)
            os.replace(staged, path)


def _waits(pod: dict[str, Any]) -> bool:
    """Whether a pod bound here still waits for devices: ``bind-phase=allocating`` with an entry left."""
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    return (annotations.get(BIND_PHASE_ANNOTATION) == "allocating" and _left(annotations.get(TO_ALLOCATE_ANNOTATION))
            and not meta.get("deletionTimestamp") and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"))


def _options() -> Any:
    return pb2.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)


class _Servicer(pb2_grpc.DevicePluginServicer):  # type: ignore[misc]
    """The gRPC face of a :class:`DevicePlugin`: a bad request is answered with a status, never raised."""

    def __init__(self, plugin: DevicePlugin) -> None:
        self.plugin = plugin

    def GetDevicePluginOptions(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _options()

    def ListAndWatch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        yield from self.plugin.list_and_watch(context)

    def GetPreferredAllocation(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self.plugin.preferred(request)

    def Allocate(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            return self.plugin.allocate(request)
        except AllocateError as exc:
            context.abort(exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - answered, logged; the server goes on
            log.exception("Allocate failed")
            context.abort(grpc.StatusCode.INTERNAL, f"Allocate failed: {exc}")

    def PreStartContainer(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return pb2.PreStartContainerResponse()


def discover_devices(node: str, *, simulate: str | None = None, libvgpu: Path | None = None) -> tuple[list[Device], Any]:
    """This node's devices and a health callable: the simulated backend for ``simulate`` (e.g.
    ``"2xT4-16GB"``), else node_actors' detection (NVML).

    Raises:
        InvalidRequest: a malformed ``simulate`` spec.
        DeviceError: NVML failed while listing devices.
    """
    from node_actors.backends import SimulatedBackend, detect_backend  # noqa: PLC0415
    from node_actors.settings import BackendSettings  # noqa: PLC0415

    state = Path(tempfile.gettempdir()) / "hami-ray-device-plugin"
    if simulate:
        backend: Any = SimulatedBackend(simulate, node, state)
    else:
        # pods get HAMi's model (HAMi-core in the container, never the node's MPS daemon): the plugin starts
        # no MPS daemon of its own
        backend = detect_backend(BackendSettings(node_name=node, state_dir=state, libvgpu_path=libvgpu,
                                                 isolation="hami-core"))
    return backend.discover(), backend.health
