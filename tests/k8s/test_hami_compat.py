"""HAMi's manifests mean what they mean in HAMi (issue 16), through the real API server and the webhook:
``gpumem: 0`` and ``gpumem-percentage: 0`` ask for the whole device, gpumem with a percentage takes the
MiB, each pod told so by a ``HAMiRequestReinterpreted`` event; what HAMi drops without a word (gpumem
``8Gi``, gpumem in bytes) stays refused with the reason; hami-ray's device plugin writes its register as
Go's JSON does and marks its node."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from hami_ray.core.codec import RegisteredDevice, decode_pod_devices, encode_node_register
from hami_ray.core.model import Device
from hami_ray.k8s.annotations import NODE_LABEL
from hami_ray.k8s.deviceplugin import DevicePlugin
from hami_ray.k8s.kubeapi import KubeApi
from hami_ray.k8s.nodelock import LOCK_ANNOTATION, PLUGIN_ANNOTATION, BindMode
from hami_ray.k8s.scheduler import REINTERPRETED, PodScheduler
from hami_ray.k8s.webhook import WebhookServer
from tests.helpers import wait_for

pytestmark = pytest.mark.k8s
REGISTER = "hami.io/node-nvidia-register"
GPU, MEM, PCT = "nvidia.com/gpu", "nvidia.com/gpumem", "nvidia.com/gpumem-percentage"


@pytest.fixture
def compat_node(admin: client.ApiClient) -> Iterator[str]:
    name = "compat-node"
    core = client.CoreV1Api(admin)
    try:
        core.delete_node(name)
    except client.ApiException:
        pass
    register = encode_node_register([RegisteredDevice(f"GPU-compat-{i}", 10, 16384, 100, "NVIDIA-Tesla T4", index=i)
                                     for i in range(4)])
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name, annotations={REGISTER: register})))
    yield name
    core.delete_node(name)


def _create(admin: client.ApiClient, namespace: str, name: str, limits: dict[str, str]) -> client.V1Pod:
    """Through the webhook (it sets the schedulerName): a pod held to compat-node's GPUs."""
    core = client.CoreV1Api(admin)
    core.create_namespaced_pod(namespace, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": {
            "nvidia.com/use-gpuuuid": ",".join(f"GPU-compat-{i}" for i in range(4))}},
        "spec": {"containers": [{"name": "main", "image": "busybox", "resources": {"limits": limits}}]}})
    return core.read_namespaced_pod(name, namespace)


def _events(admin: client.ApiClient, namespace: str, pod: str, reason: str) -> list[str]:
    return [e.note for e in client.EventsV1Api(admin).list_namespaced_event(namespace).items
            if e.regarding.name == pod and e.reason == reason]


def test_hami_meaning_with_an_event_and_silent_drops_refused(webhook: tuple[WebhookServer, bytes],
                                                             admin: client.ApiClient, api: client.ApiClient,
                                                             namespace: str, compat_node: str) -> None:
    zero = _create(admin, namespace, "gpumem-zero", {GPU: "1", MEM: "0"})
    # the webhook's exclusive-core default reads a given gpumem (even 0) as shared memory: no gpucores 100
    assert zero.spec.containers[0].resources.limits == {GPU: "1", MEM: "0"}
    _create(admin, namespace, "percent-zero", {GPU: "1", PCT: "0"})
    _create(admin, namespace, "both", {GPU: "1", MEM: "3000", PCT: "50"})
    whole = _create(admin, namespace, "both-100", {GPU: "1", MEM: "2000", PCT: "100"})
    assert whole.spec.containers[0].resources.limits["nvidia.com/gpucores"] == "100"  # as HAMi's webhook
    _create(admin, namespace, "binary-suffix", {GPU: "1", MEM: "8Gi"})
    _create(admin, namespace, "bytes", {GPU: "1", MEM: "8589934592"})
    stats = PodScheduler(api, bind_mode="direct").run_once()
    assert stats.bound == 4, stats
    core = client.CoreV1Api(admin)
    held = {}
    for name in ("gpumem-zero", "percent-zero", "both", "both-100"):
        pod = core.read_namespaced_pod(name, namespace)
        assert pod.spec.node_name == compat_node and pod.metadata.labels[NODE_LABEL] == compat_node
        [[device]] = decode_pod_devices(pod.metadata.annotations["hami.io/vgpu-devices-allocated"])
        held[name] = (device.memory_mib, device.cores)
    assert held == {"gpumem-zero": (16384, 0), "percent-zero": (16384, 0), "both": (3000, 0), "both-100": (2000, 100)}
    told = {name: _events(admin, namespace, name, REINTERPRETED)
            for name in ("gpumem-zero", "percent-zero", "both", "both-100")}
    assert told["gpumem-zero"] == ["container 'main': nvidia.com/gpumem=0 is read as not given, as HAMi reads it: "
                                   "the whole device's memory"]
    assert told["percent-zero"] == ["container 'main': nvidia.com/gpumem-percentage=0 is read as not given, as HAMi "
                                    "reads it: the whole device's memory"]
    assert told["both"] == ["container 'main': nvidia.com/gpumem=3000 and nvidia.com/gpumem-percentage=50 both "
                            "given: the MiB are used, as in HAMi"]
    assert len(told["both-100"]) == 1 and "the MiB are used" in told["both-100"][0]
    for name, words in (("binary-suffix", "is a plain number of MiB (8Gi is 8192), got '8Gi'; HAMi would silently "
                                          "drop this container's device request"),
                        ("bytes", "'8589934592' is more than HAMi's int32 holds (a size in bytes? 8 GiB is 8192)")):
        assert core.read_namespaced_pod(name, namespace).spec.node_name is None
        notes = _events(admin, namespace, name, "FailedScheduling")
        assert notes and words in notes[0], notes
    assert PodScheduler(api, bind_mode="direct").run_once().bound == 0  # bound pods are not read again: told once
    assert all(len(_events(admin, namespace, n, REINTERPRETED)) == 1 for n in told)
    assert LOCK_ANNOTATION not in (core.read_node(compat_node).metadata.annotations or {})  # direct: no lock


def test_the_device_plugin_writes_gos_bytes_and_marks_its_node(admin: client.ApiClient,
                                                               plugin_api: client.ApiClient, node: str) -> None:
    """hami-ray's device plugin's register annotation, for models and ids holding ``<>&`` and U+2028/9, is
    byte for byte what Go's ``json.Marshal`` of HAMi's DeviceInfo gives (produced once with Go 1.26.8 from
    the same two devices: see tests/core/test_codec.py for the struct)."""
    devices = [Device(uuid="GPU-<0>", index=0, model="A100 <SXM> & co", memory_mib=81920),
               Device(uuid="GPU-&1", index=1, model="NVIDIA H100\u2028\u2029", memory_mib=81559, numa=1, healthy=False)]
    DevicePlugin(plugin_api, node, devices).report()
    annotations = client.CoreV1Api(admin).read_node(node).metadata.annotations
    go = ("[{\"id\":\"GPU-\\u003c0\\u003e\",\"count\":10,\"devmem\":81920,\"devcore\":100,\"type\":\"NVIDIA-A100 "
          "\\u003cSXM\\u003e \\u0026 co\",\"mode\":\"hami-core\",\"health\":true},{\"id\":\"GPU-\\u00261\",\"index\":1,"
          "\"count\":10,\"devmem\":81559,\"devcore\":100,\"type\":\"NVIDIA H100\\u2028\\u2029\",\"numa\":1,"
          "\"mode\":\"hami-core\"}]")
    assert annotations[REGISTER].encode() == go.encode()
    assert annotations[PLUGIN_ANNOTATION] == "nvidia.com/gpu"


@pytest.mark.parametrize("in_binding", [True, False], ids=["label-in-binding", "label-patched-first"])
def test_a_pod_another_binder_bound_first_keeps_a_label_naming_its_node(in_binding: bool, admin: client.ApiClient,
                                                                        api: client.ApiClient, namespace: str) -> None:
    """The bridge binds the pod to node A, and its Binding gets 409: another binder bound it to B first. With
    the label in the Binding, nothing of A was written; where the label goes as a patch before the Binding
    (an API server that drops a Binding's labels), it is put right: it names B."""
    core = client.CoreV1Api(admin)
    for name in ("label-a", "label-b"):
        try:
            core.delete_node(name)
        except client.ApiException:
            pass
        core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name, annotations={REGISTER: encode_node_register(
            [RegisteredDevice(f"GPU-{name}", 10, 16384, 100, "NVIDIA-Tesla T4")])})))
    try:
        core.create_namespaced_pod(namespace, client.V1Pod(
            metadata=client.V1ObjectMeta(name="raced", annotations={"nvidia.com/use-gpuuuid": "GPU-label-a"}),
            spec=client.V1PodSpec(scheduler_name="label-sched", containers=[client.V1Container(
                name="c", image="busybox", resources=client.V1ResourceRequirements(limits={GPU: "1", MEM: "1000"}))])))
        sched = PodScheduler(api, scheduler_name="label-sched")
        sched.binder.labels_in_binding = in_binding
        sched.sync()  # seen pending
        core.create_namespaced_pod_binding("raced", namespace, client.V1Binding(
            metadata=client.V1ObjectMeta(name="raced"),
            target=client.V1ObjectReference(api_version="v1", kind="Node", name="label-b")), _preload_content=False)
        sched.schedule_pending()  # its stale view: bound to label-a (the label patched first or not), then a 409
        pod = core.read_namespaced_pod("raced", namespace)
        assert pod.spec.node_name == "label-b"
        assert (pod.metadata.labels or {}).get(NODE_LABEL) == (None if in_binding else "label-b")
    finally:
        for name in ("label-a", "label-b"):
            core.delete_node(name)


class _DropsBindingLabels(KubeApi):
    """An API server before Kubernetes 1.35 (or with ``PodTopologyLabelsAdmission`` off): a Binding's labels
    never reach the pod. Played here by leaving them out of the Binding this client sends."""

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if path.endswith("/binding"):
            body = {**body, "metadata": {k: v for k, v in body["metadata"].items() if k != "labels"}}
        return super().post(path, body)


@pytest.mark.parametrize("drops", [False, True], ids=["copies-labels", "drops-labels"])
def test_the_label_rides_in_the_binding_or_follows_it(drops: bool, admin: client.ApiClient, api: client.ApiClient,
                                                      namespace: str, compat_node: str) -> None:
    """The test cluster's API server copies a Binding's labels onto the pod (as Kubernetes 1.35 and later): every
    pod is labelled by its one Binding. One that drops them: the watch sees the first pod bound without the
    label, the bridge patches it on and patches it before each later Binding; every pod ends up labelled."""
    core = client.CoreV1Api(admin)
    sched = PodScheduler(api, scheduler_name="label-follow", bind_mode=BindMode.DIRECT)  # no plugin to unlock
    if drops:
        sched.kube = _DropsBindingLabels(api)
    stop = threading.Event()
    thread = threading.Thread(target=sched.run, args=(stop,), daemon=True)
    thread.start()
    try:
        for i in range(4):
            core.create_namespaced_pod(namespace, client.V1Pod(
                metadata=client.V1ObjectMeta(name=f"l{i}", annotations={
                    "nvidia.com/use-gpuuuid": ",".join(f"GPU-compat-{g}" for g in range(4))}),
                spec=client.V1PodSpec(scheduler_name="label-follow", containers=[client.V1Container(
                    name="c", image="busybox",
                    resources=client.V1ResourceRequirements(limits={GPU: "1", MEM: "1000"}))])))
            if i == 0:  # the first one seen bound first: the bridge learns what this API server does
                assert wait_for(lambda: core.read_namespaced_pod("l0", namespace).spec.node_name, timeout=30)
                assert wait_for(lambda: sched.binder.labels_in_binding is not drops, timeout=30)

        def labelled() -> bool:
            pods = core.list_namespaced_pod(namespace).items
            return len(pods) == 4 and all(p.spec.node_name == compat_node and
                                          (p.metadata.labels or {}).get(NODE_LABEL) == compat_node for p in pods)

        assert wait_for(labelled, timeout=30)
        assert sched.binder.labels_in_binding is not drops
    finally:
        stop.set()
        thread.join(timeout=30)
