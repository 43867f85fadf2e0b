"""The mutating webhook registered with the real API server (HTTPS, a CA made by the test): pods created
in a labelled namespace go through it; what HAMi's webhook changes is changed, what it refuses is
refused with the reason, and a pod mutated this way is bound by the bridge. Bad AdmissionReviews posted
straight to it get clear answers and the server goes on."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request

import pytest
from kubernetes import client

from hami_ray.core.codec import decode_pod_devices
from hami_ray.k8s.scheduler import PodScheduler
from hami_ray.k8s.webhook import WebhookServer

pytestmark = pytest.mark.k8s
LABEL = "hami-ray-webhook-test"


def _create(admin: client.ApiClient, namespace: str, name: str, limits: dict[str, str], **spec: object) -> client.V1Pod:
    container = {"name": "main", "image": "busybox", "resources": {"limits": limits}}
    container.update(spec.pop("container", {}))  # type: ignore[arg-type]
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [container], **spec}}
    client.CoreV1Api(admin).create_namespaced_pod(namespace, body)
    return client.CoreV1Api(admin).read_namespaced_pod(name, namespace)


def test_pods_created_through_the_webhook(webhook: tuple[WebhookServer, bytes], admin: client.ApiClient,
                                          api: client.ApiClient, namespace: str) -> None:
    memory_only = _create(admin, namespace, "memory-only", {"nvidia.com/gpumem": "3000"})
    assert memory_only.spec.scheduler_name == "hami-scheduler"
    assert memory_only.spec.containers[0].resources.limits == {"nvidia.com/gpumem": "3k", "nvidia.com/gpu": "1"}
    whole = _create(admin, namespace, "whole-gpu", {"nvidia.com/gpu": "1"})
    assert whole.spec.containers[0].resources.limits == {"nvidia.com/gpu": "1", "nvidia.com/gpucores": "100"}
    priority = _create(admin, namespace, "low-priority", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000",
                                                          "nvidia.com/priority": "1"})
    assert [(e.name, e.value) for e in priority.spec.containers[0].env] == [("CUDA_TASK_PRIORITY", "1")]
    plain = _create(admin, namespace, "no-devices", {"cpu": "100m"})
    assert plain.spec.scheduler_name == "default-scheduler"
    other = _create(admin, namespace, "own-scheduler", {"nvidia.com/gpu": "1"}, schedulerName="my-scheduler")
    assert other.spec.scheduler_name == "my-scheduler"
    for name, limits, spec, words in (
            ("over-100", {"nvidia.com/gpu": "1", "nvidia.com/gpumem-percentage": "150"}, {}, "outside 0-100"),
            ("privileged", {"nvidia.com/gpu": "1"}, {"container": {"securityContext": {"privileged": True}}},
             "privileged"),
            ("pinned", {"nvidia.com/gpu": "1"}, {"nodeName": "somewhere"}, "names its node")):
        with pytest.raises(client.ApiException) as refused:
            _create(admin, namespace, name, limits, **spec)
        assert refused.value.status in (400, 403) and words in refused.value.body, refused.value.body
    # the mutated pod is scheduled by the bridge with exactly what the webhook added
    core = client.CoreV1Api(admin)
    for node in core.list_node().items:
        core.delete_node(node.metadata.name)
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="webhook-node", annotations={
        "kwok.x-k8s.io/node": "fake",
        "hami.io/node-nvidia-register": "GPU-wh-0,10,16384,100,NVIDIA-Tesla T4,0,true:"})))
    try:
        PodScheduler(api).run_once()
        pod = core.read_namespaced_pod("memory-only", namespace)
        assert pod.spec.node_name == "webhook-node"
        [[device]] = decode_pod_devices(pod.metadata.annotations["hami.io/vgpu-devices-allocated"])
        assert (device.uuid, device.memory_mib, device.cores) == ("GPU-wh-0", 3000, 0)
        # gpucores 100 (added by the webhook) makes it exclusive: it cannot share the GPU memory-only holds
        assert core.read_namespaced_pod("whole-gpu", namespace).spec.node_name is None
    finally:
        core.delete_node("webhook-node")


def _post(server: WebhookServer, ca: bytes, body: bytes) -> tuple[int, dict[str, object]]:
    context = ssl.create_default_context(cadata=ca.decode())
    request = urllib.request.Request(f"https://127.0.0.1:{server.address[1]}/mutate", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as resp:  # noqa: S310 - loopback
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_bad_admission_reviews_get_clear_answers(webhook: tuple[WebhookServer, bytes]) -> None:
    server, ca = webhook
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}
    assert _post(server, ca, b"{not json")[0] == 400
    code, body = _post(server, ca, json.dumps(review).encode())
    assert code == 400 and "request" in str(body["error"])
    code, body = _post(server, ca, json.dumps({**review, "request": {"kind": {"kind": "Pod"}}}).encode())
    assert code == 400 and "uid" in str(body["error"])
    code, body = _post(server, ca, json.dumps({**review, "request": {"uid": "u1", "kind": {"kind": "Pod"}}}).encode())
    assert code == 200 and body["response"] == {  # type: ignore[index]
        "uid": "u1", "allowed": False,
        "status": {"code": 403, "reason": "Forbidden", "message": "hami-ray: the request carries no pod object"}}
    garbage = {"spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpumem": "lots"}}}]}}
    code, body = _post(server, ca, json.dumps({**review, "request": {"uid": "u2", "kind": {"kind": "Pod"},
                                                                     "object": garbage}}).encode())
    assert code == 200 and body["response"]["allowed"] is False  # type: ignore[index]
    assert "nvidia.com/gpumem='lots' is not a number" in body["response"]["status"]["message"]  # type: ignore[index]
    code, body = _post(server, ca, json.dumps({**review, "request": {"uid": "u3", "kind": {"kind": "Pod"},
                                                                     "object": {"spec": {"containers": "x"}}}}).encode())
    assert code == 200 and "not a list" in body["response"]["status"]["message"]  # type: ignore[index]
    ok = {"spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}
    code, body = _post(server, ca, json.dumps({**review, "request": {"uid": "u4", "kind": {"kind": "Pod"},
                                                                     "object": ok}}).encode())
    assert code == 200 and body["response"]["allowed"] is True  # type: ignore[index]  # still serving
    patch = json.loads(base64.b64decode(body["response"]["patch"]))  # type: ignore[index]
    assert {"op": "add", "path": "/spec/containers/0/resources/limits/nvidia.com~1gpucores", "value": "100"} in patch
