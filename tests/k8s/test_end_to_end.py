"""Every Kubernetes component together, in the test cluster: a pod asking only for GPU memory and cores is
created through the webhook (which makes it ask for one GPU and go to hami-scheduler), scheduled once by
the bridge and once by the real kube-scheduler through the extender, and the device plugin's Allocate for
its container (asked by the kubelet stand-in over the real gRPC protocol) returns exactly the slice's
environment; ``hami.io/bind-phase`` ends ``success``."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client

from hami_ray.core.codec import decode_pod_devices
from hami_ray.k8s.scheduler import PodScheduler
from hami_ray.k8s.webhook import WebhookServer
from tests.helpers import wait_for
from tests.k8s.kubelet import Kubelet, start_plugin
from tests.k8s.test_extender import _extender_in_process, _kube_scheduler

pytestmark = pytest.mark.k8s


def _create(admin: client.ApiClient, namespace: str, name: str, node: str) -> None:
    """A pod as a user writes it for HAMi: memory and cores only, no count, no scheduler; held to this
    test node's simulated GPUs."""
    client.CoreV1Api(admin).create_namespaced_pod(namespace, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": {
            "nvidia.com/use-gpuuuid": ",".join(f"GPU-sim-{node}-{i}" for i in range(2))}},
        "spec": {"containers": [{"name": "main", "image": "busybox", "resources": {
            "limits": {"nvidia.com/gpumem": "3000", "nvidia.com/gpucores": "30"}}}]}})


def _allocated_through_the_plugin(admin: client.ApiClient, namespace: str, name: str, node: str,
                                  kubelet: Kubelet, device_id: str) -> None:
    core = client.CoreV1Api(admin)
    pod = core.read_namespaced_pod(name, namespace)
    assert pod.spec.node_name == node
    assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"  # the webhook's default
    [[device]] = decode_pod_devices(pod.metadata.annotations["hami.io/vgpu-devices-to-allocate"])
    assert (device.memory_mib, device.cores) == (3000, 30)
    [answer] = kubelet.allocate([device_id])
    cache = answer["envs"].pop("CUDA_DEVICE_MEMORY_SHARED_CACHE")
    assert answer["envs"] == {"NVIDIA_VISIBLE_DEVICES": device.uuid, "CUDA_DEVICE_MEMORY_LIMIT_0": "3000m",
                              "CUDA_DEVICE_SM_LIMIT": "30"}
    assert cache.startswith("/usr/local/vgpu/")
    annotations = core.read_namespaced_pod(name, namespace).metadata.annotations
    assert (annotations["hami.io/bind-phase"], annotations["hami.io/vgpu-devices-to-allocate"]) == ("success", ";")


def test_webhook_bridge_or_extender_then_device_plugin(webhook: tuple[WebhookServer, bytes],
                                                       admin: client.ApiClient, api: client.ApiClient,
                                                       plugin_api: client.ApiClient, namespace: str,
                                                       node: str, kubelet: Kubelet, kubeconfig: Path,
                                                       tmp_path: Path) -> None:
    plugin, _ = start_plugin(plugin_api, node, kubelet)
    try:
        registration = kubelet.registrations.get(timeout=10)[1]
        kubelet.connect(registration["endpoint"])
        ids = [d[0] for d in kubelet.lists.get(timeout=5)]
        core = client.CoreV1Api(admin)
        assert wait_for(lambda: "hami.io/node-nvidia-register" in (core.read_node(node).metadata.annotations or {}))

        _create(admin, namespace, "by-the-bridge", node)
        assert core.read_namespaced_pod("by-the-bridge", namespace).spec.scheduler_name == "hami-scheduler"
        assert PodScheduler(api).run_once().bound >= 1
        _allocated_through_the_plugin(admin, namespace, "by-the-bridge", node, kubelet, ids[0])

        with _extender_in_process(api) as extender, _kube_scheduler(
                tmp_path, kubeconfig, "hami-scheduler", f"http://127.0.0.1:{extender.server_address[1]}",
                cache_capable=True):
            _create(admin, namespace, "by-kube-scheduler", node)
            assert wait_for(lambda: core.read_namespaced_pod("by-kube-scheduler", namespace).spec.node_name,
                            timeout=30)
        _allocated_through_the_plugin(admin, namespace, "by-kube-scheduler", node, kubelet, ids[1])
    finally:
        plugin.stop()
