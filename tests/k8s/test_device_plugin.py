"""`hami-ray k8s device-plugin` against a kubelet stand-in and the real API server.

The stand-in is written here with grpc and speaks the protobuf wire format by hand (field numbers, no
generated code): it serves ``/v1beta1.Registration/Register`` on ``<dir>/kubelet.sock`` and dials the
plugin's socket as the kubelet does (GetDevicePluginOptions, ListAndWatch, Allocate). The plugin runs
with exactly the rights of deploy/k8s/device-plugin.yaml's ServiceAccount; pods are bound by the bridge
(:class:`PodScheduler`, the ``api`` fixture) on a kwok node made by each test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from kubernetes import client

from hami_ray.core.codec import decode_node_register, decode_pod_devices
from hami_ray.k8s.deviceplugin import discover_devices
from hami_ray.k8s.scheduler import PodScheduler
from tests.helpers import sa_kubeconfig, wait_for
from tests.k8s.kubelet import Kubelet, encode_field, decode_fields, start_plugin

pytestmark = pytest.mark.k8s
SOCKET = "hami-ray-nvidia.sock"
TO_ALLOCATE = "hami.io/vgpu-devices-to-allocate"
PHASE = "hami.io/bind-phase"


def _pod(admin: client.ApiClient, namespace: str, name: str, node: str, *containers: dict[str, str]) -> None:
    """A pod of the scheduler ``sched-<node>``, held to that node's simulated GPUs (``use-gpuuuid``)."""
    client.CoreV1Api(admin).create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, annotations={
            "nvidia.com/use-gpuuuid": ",".join(f"GPU-sim-{node}-{i}" for i in range(2))}),
        spec=client.V1PodSpec(scheduler_name=f"sched-{node}", containers=[
            client.V1Container(name=f"c{i}", image="busybox", resources=client.V1ResourceRequirements(limits=limits))
            for i, limits in enumerate(containers)])))


def _annotations(admin: client.ApiClient, namespace: str, name: str) -> dict[str, str]:
    return dict(client.CoreV1Api(admin).read_namespaced_pod(name, namespace).metadata.annotations or {})


def _registered(kubelet: Kubelet, timeout: float = 10.0) -> tuple[float, dict[str, Any]]:
    return kubelet.registrations.get(timeout=timeout)


def _next_list(kubelet: Kubelet, timeout: float = 5.0) -> list[tuple[str, str, int]]:
    return kubelet.lists.get(timeout=timeout)


# --- tests -----------------------------------------------------------------------------------------------
def test_registers_lists_devices_and_writes_the_node_annotations(admin: client.ApiClient, plugin_api: client.ApiClient,
                                                                 node: str, kubelet: Kubelet) -> None:
    """Register (v1beta1, the socket's name, nvidia.com/gpu); ListAndWatch: 2 GPUs x 10, Healthy, and an
    update when a GPU fails; HAMi's register annotation decodes with the codec."""
    plugin, backend = start_plugin(plugin_api, node, kubelet, health_s=0.2)
    try:
        _, request = _registered(kubelet)
        assert request == {"version": "v1beta1", "endpoint": SOCKET, "resource_name": "nvidia.com/gpu",
                           "pre_start_required": False, "preferred": True}
        options = kubelet.connect(request["endpoint"])
        assert options.get(2) == [1] and 1 not in options  # get_preferred_allocation_available only
        devices = _next_list(kubelet)
        uuids = [f"GPU-sim-{node}-{g}" for g in range(2)]
        assert sorted(d[0] for d in devices) == sorted(f"{u}-{i}" for u in uuids for i in range(10))
        assert {d[1] for d in devices} == {"Healthy"}
        assert {d[0]: d[2] for d in devices}[f"{uuids[1]}-3"] == 1  # NUMA node of the second GPU
        assert kubelet.channel is not None
        want = encode_field(1, b"".join([*(encode_field(1, f"{uuids[0]}-{i}") for i in range(3)),
                                         encode_field(2, f"{uuids[0]}-2"), bytes([3 << 3, 2])]))  # allocation_size 2
        preferred = decode_fields(kubelet.channel.unary_unary("/v1beta1.DevicePlugin/GetPreferredAllocation")(want, timeout=5))
        assert len(preferred[1]) == 1  # one container
        assert [bytes(i).decode() for i in decode_fields(preferred[1][0])[1]] == [f"{uuids[0]}-2", f"{uuids[0]}-0"]
        prestart = kubelet.channel.unary_unary("/v1beta1.DevicePlugin/PreStartContainer")(encode_field(1, "x"), timeout=5)
        assert prestart == b""
        annotations = client.CoreV1Api(admin).read_node(node).metadata.annotations
        registered = decode_node_register(annotations["hami.io/node-nvidia-register"])
        assert [(r.id, r.count, r.devmem, r.devcore, r.type, r.numa, r.health) for r in registered] == [
            (uuids[0], 10, 16384, 100, "NVIDIA-T4-16GB", 0, True), (uuids[1], 10, 16384, 100, "NVIDIA-T4-16GB", 1, True)]
        assert annotations["hami.io/node-handshake"].startswith("Reported 20")
        backend.set_healthy(uuids[0], False)
        update = _next_list(kubelet)
        assert {d[0] for d in update if d[1] == "Unhealthy"} == {f"{uuids[0]}-{i}" for i in range(10)}
        assert wait_for(lambda: not decode_node_register(client.CoreV1Api(admin).read_node(node).metadata.annotations[
            "hami.io/node-nvidia-register"])[0].health, timeout=5)
    finally:
        plugin.stop()
    assert not (kubelet.dir / SOCKET).exists()


def test_allocate_serves_the_pod_the_bridge_bound(admin: client.ApiClient, api: client.ApiClient,
                                                 plugin_api: client.ApiClient, namespace: str, node: str,
                                                 kubelet: Kubelet) -> None:
    """nvidia.com/gpu 1, gpumem 3000, gpucores 30, bound by the bridge: Allocate returns HAMi's environment
    for that slice and HAMi-core's mounts; to-allocate is erased, bind-phase success. A two-container pod
    takes two Allocates and is done only after the second."""
    libvgpu = kubelet.dir / "vgpu" / "libvgpu.so"
    libvgpu.parent.mkdir()
    libvgpu.write_bytes(b"")
    plugin, _ = start_plugin(plugin_api, node, kubelet, libvgpu=libvgpu)
    try:
        _, request = _registered(kubelet)
        kubelet.connect(request["endpoint"])
        ids = [d[0] for d in _next_list(kubelet)]
        _pod(admin, namespace, "one", node, {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "3000", "nvidia.com/gpucores": "30"})
        assert PodScheduler(api, scheduler_name=f"sched-{node}").run_once().bound == 1
        before = _annotations(admin, namespace, "one")
        [[device]] = decode_pod_devices(before[TO_ALLOCATE])
        assert before[PHASE] == "allocating" and device.uuid.startswith(f"GPU-sim-{node}-")
        [answer] = kubelet.allocate([ids[0]])
        cache = answer["envs"].pop("CUDA_DEVICE_MEMORY_SHARED_CACHE")
        assert answer["envs"] == {"NVIDIA_VISIBLE_DEVICES": device.uuid, "CUDA_DEVICE_MEMORY_LIMIT_0": "3000m",
                                  "CUDA_DEVICE_SM_LIMIT": "30"}
        assert cache.startswith("/usr/local/vgpu/") and cache.endswith(".cache")
        preload = libvgpu.parent / "ld.so.preload"
        assert answer["mounts"] == [("/usr/local/vgpu/libvgpu.so", str(libvgpu), True),
                                    ("/etc/ld.so.preload", str(preload), True)]
        assert preload.read_text() == "/usr/local/vgpu/libvgpu.so\n"
        after = _annotations(admin, namespace, "one")
        assert (after[PHASE], after[TO_ALLOCATE]) == ("success", ";")
        assert after["hami.io/vgpu-devices-allocated"] == before["hami.io/vgpu-devices-allocated"]

        _pod(admin, namespace, "two", node, {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"},
             {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "2000", "nvidia.com/gpucores": "20"})
        assert PodScheduler(api, scheduler_name=f"sched-{node}").run_once().bound == 1
        entries = decode_pod_devices(_annotations(admin, namespace, "two")[TO_ALLOCATE])
        [first] = kubelet.allocate([ids[1]])
        assert (first["envs"]["NVIDIA_VISIBLE_DEVICES"], first["envs"]["CUDA_DEVICE_MEMORY_LIMIT_0"]) == (
            entries[0][0].uuid, "1000m")
        middle = _annotations(admin, namespace, "two")
        assert middle[PHASE] == "allocating"
        assert decode_pod_devices(middle[TO_ALLOCATE]) == [[], entries[1]]
        [second] = kubelet.allocate([ids[2]])
        assert (second["envs"]["NVIDIA_VISIBLE_DEVICES"], second["envs"]["CUDA_DEVICE_MEMORY_LIMIT_0"],
                second["envs"]["CUDA_DEVICE_SM_LIMIT"]) == (entries[1][0].uuid, "2000m", "20")
        assert second["envs"]["CUDA_DEVICE_MEMORY_SHARED_CACHE"] != first["envs"]["CUDA_DEVICE_MEMORY_SHARED_CACHE"]
        done = _annotations(admin, namespace, "two")
        assert (done[PHASE], done[TO_ALLOCATE]) == ("success", ";;")
    finally:
        plugin.stop()


def test_registers_again_after_a_kubelet_restart(plugin_api: client.ApiClient, node: str, kubelet: Kubelet,
                                                 tmp_path: Path) -> None:
    """The deployed command: the kubelet restarts (every socket in the directory deleted, kubelet.sock made
    anew); the plugin serves and registers again within 5 s, and the kubelet lists its devices again."""
    command = [sys.executable, "-m", "hami_ray.cli", "k8s", "device-plugin", "--kubeconfig",
               str(sa_kubeconfig(plugin_api, tmp_path / "sa.kubeconfig")), "--node", node,
               "--plugin-dir", str(kubelet.dir), "--simulate", "1xT4-16GB", "--split-count", "4"]
    with (tmp_path / "plugin.log").open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _, request = _registered(kubelet, timeout=30)  # the process starts (imports) first
        kubelet.connect(request["endpoint"])
        assert len(_next_list(kubelet)) == 4
        elapsed = []
        for _ in range(2):
            began = kubelet.restart()
            at, again = _registered(kubelet, timeout=10)
            assert at >= began and kubelet.registrations.empty()
            elapsed.append(at - began)
            assert again == request
            kubelet.connect(again["endpoint"])
            assert {d[1] for d in _next_list(kubelet)} == {"Healthy"}
        print(f"re-registered {elapsed[0]:.2f} s and {elapsed[1]:.2f} s after the kubelet restarted")
        assert max(elapsed) < 5.0, elapsed
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, (tmp_path / "plugin.log").read_text()[-3000:]
    assert not (kubelet.dir / SOCKET).exists()


def test_bad_requests_get_clear_errors_and_the_server_goes_on(admin: client.ApiClient, api: client.ApiClient,
                                                             plugin_api: client.ApiClient, namespace: str, node: str,
                                                             kubelet: Kubelet) -> None:
    """No pod waiting here: NOT_FOUND; an ID never advertised: INVALID_ARGUMENT; more IDs than the pod's
    devices: FAILED_PRECONDITION and that pod bind-phase=failed. A pod waiting on another node is never
    touched, and a good Allocate afterwards works."""
    elsewhere = client.CoreV1Api(admin)
    elsewhere.create_namespaced_pod(namespace, client.V1Pod(metadata=client.V1ObjectMeta(name="elsewhere"), spec=client.V1PodSpec(
        scheduler_name="nobody", containers=[client.V1Container(name="c", image="busybox")])))
    other = "GPU-other-0,NVIDIA,1000,0:;"
    elsewhere.create_namespaced_pod_binding("elsewhere", namespace, client.V1Binding(
        metadata=client.V1ObjectMeta(name="elsewhere", annotations={
            TO_ALLOCATE: other, PHASE: "allocating", "hami.io/bind-time": "1"}),
        target=client.V1ObjectReference(api_version="v1", kind="Node", name=f"{node}-absent")), _preload_content=False)
    untouched = _annotations(admin, namespace, "elsewhere")
    plugin, _ = start_plugin(plugin_api, node, kubelet)
    try:
        _, request = _registered(kubelet)
        kubelet.connect(request["endpoint"])
        ids = [d[0] for d in _next_list(kubelet)]
        with pytest.raises(grpc.RpcError) as missing:
            kubelet.allocate([ids[0]])
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert f"no pod bound to node {node} waits for devices" in missing.value.details()
        with pytest.raises(grpc.RpcError) as unknown:
            kubelet.allocate(["GPU-never-0"])
        assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "never advertised by this plugin: GPU-never-0" in unknown.value.details()

        _pod(admin, namespace, "mismatch", node, {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"})
        assert PodScheduler(api, scheduler_name=f"sched-{node}").run_once().bound == 1
        waiting = _annotations(admin, namespace, "mismatch")[TO_ALLOCATE]
        with pytest.raises(grpc.RpcError) as mismatch:
            kubelet.allocate([ids[0], ids[1]])
        assert mismatch.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "has 1 device(s), the kubelet asked for 2" in mismatch.value.details()
        failed = _annotations(admin, namespace, "mismatch")
        assert (failed[PHASE], failed[TO_ALLOCATE]) == ("failed", waiting)  # nothing half-written

        _pod(admin, namespace, "good", node, {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "2000"})
        assert PodScheduler(api, scheduler_name=f"sched-{node}").run_once().bound == 1
        [answer] = kubelet.allocate([ids[3]])
        assert answer["envs"]["CUDA_DEVICE_MEMORY_LIMIT_0"] == "2000m"
        assert _annotations(admin, namespace, "good")[PHASE] == "success"
        assert _annotations(admin, namespace, "elsewhere") == untouched
    finally:
        plugin.stop()


def test_discover_devices_simulated() -> None:
    """The CLI's device source: ``--simulate`` gives the simulated backend's devices and health."""
    devices, health = discover_devices("n-sim", simulate="2xT4-16GB")
    assert [d.uuid for d in devices] == ["GPU-sim-n-sim-0", "GPU-sim-n-sim-1"]
    assert health() == {"GPU-sim-n-sim-0": True, "GPU-sim-n-sim-1": True}
