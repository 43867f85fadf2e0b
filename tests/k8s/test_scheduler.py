"""hami-ray as hami-scheduler against the real API server: HAMi's documented pod is bound with
annotations HAMi's device plugin would decode, bad input gets kube-scheduler's explanations and stays
pending, pods without devices are bound, a restart rebuilds the ledger from the annotations, and a
deleted pod's lease is freed for a pod that waited. Inventory: HAMi's node register annotations."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from kubernetes import client

from hami_ray.core.codec import ALLOCATED_ANNOTATION, decode_pod_devices
from hami_ray.k8s.annotations import BIND_PHASE_ANNOTATION, NODE_ANNOTATION, TO_ALLOCATE_ANNOTATION
from hami_ray.k8s.scheduler import PodScheduler
from tests.helpers import sa_kubeconfig

pytestmark = pytest.mark.k8s
REGISTER = "hami.io/node-nvidia-register"


def _node(api: client.ApiClient, name: str, register: str) -> None:
    core = client.CoreV1Api(api)
    try:
        core.delete_node(name)
    except client.ApiException:
        pass
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name, annotations={REGISTER: register})))


def _pod(api: client.ApiClient, namespace: str, name: str, limits: dict[str, str] | None,
         annotations: dict[str, str] | None = None) -> None:
    resources = client.V1ResourceRequirements(limits=limits) if limits else None
    client.CoreV1Api(api).create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, annotations=annotations),
        spec=client.V1PodSpec(scheduler_name="hami-scheduler", containers=[
            client.V1Container(name="main", image="busybox", resources=resources)])))


def _events(api: client.ApiClient, namespace: str, pod: str) -> list[tuple[str, str]]:
    items = client.EventsV1Api(api).list_namespaced_event(namespace).items
    return [(e.reason, e.note) for e in items if e.regarding.name == pod]


def test_the_scheduler_has_only_what_deploy_grants(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    assert core.list_node().items is not None  # may read nodes
    with pytest.raises(client.ApiException) as info:
        core.list_secret_for_all_namespaces()
    assert info.value.status == 403
    with pytest.raises(client.ApiException) as info:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="not-mine")))
    assert info.value.status == 403


def test_hami_documented_pod_is_bound_with_hami_annotations(admin: client.ApiClient, api: client.ApiClient,
                                                            namespace: str) -> None:
    """Pods and nodes are made by the admin; the scheduler runs with deploy/k8s/rbac.yaml's rights."""
    for node in list(client.CoreV1Api(admin).list_node().items):
        client.CoreV1Api(admin).delete_node(node.metadata.name)
    _node(admin, "gpu-node-1", "GPU-aaaa-0,10,16384,100,NVIDIA-Tesla T4,0,true:GPU-aaaa-1,10,16384,100,NVIDIA-Tesla T4,0,true:")
    _node(admin, "broken-node", "this is not a register annotation")
    _pod(admin, namespace, "hami-doc", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "3000", "nvidia.com/gpucores": "30"})
    # (a fractional gpumem such as "1500m" never reaches a scheduler: the API server refuses it)
    _pod(admin, namespace, "over-100-percent", {"nvidia.com/gpu": "1", "nvidia.com/gpumem-percentage": "150"})
    _pod(admin, namespace, "too-big", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "100000"})
    _pod(admin, namespace, "no-room-now", {"nvidia.com/gpu": "2", "nvidia.com/gpumem": "16000"})
    _pod(admin, namespace, "bad-annotation", {"nvidia.com/gpu": "1"}, {"hami.io/gpu-scheduler-policy": "mutex"})
    _pod(admin, namespace, "no-devices", None)
    sched = PodScheduler(api)
    stats = sched.run_once()
    assert stats.skipped_nodes == ["broken-node"]
    core = client.CoreV1Api(admin)
    pod = core.read_namespaced_pod("hami-doc", namespace)
    assert pod.spec.node_name == "gpu-node-1"
    annotations = pod.metadata.annotations
    assert annotations[NODE_ANNOTATION] == "gpu-node-1" and annotations[BIND_PHASE_ANNOTATION] == "allocating"
    assert annotations[TO_ALLOCATE_ANNOTATION] == annotations[ALLOCATED_ANNOTATION]
    [[device]] = decode_pod_devices(annotations[ALLOCATED_ANNOTATION])
    assert device.uuid in {"GPU-aaaa-0", "GPU-aaaa-1"} and (device.type, device.memory_mib, device.cores) == (
        "NVIDIA", 3000, 30)
    assert ("Scheduled", "Successfully assigned %s/hami-doc to gpu-node-1" % namespace) in _events(admin, namespace,
                                                                                                  "hami-doc")
    assert core.read_namespaced_pod("no-devices", namespace).spec.node_name == "gpu-node-1"
    for name, words in (("over-100-percent", "nvidia.com/gpumem-percentage"),
                        ("too-big", "more than any NVIDIA device has"), ("no-room-now", "0/1 nodes are available"),
                        ("bad-annotation", "hami.io/gpu-scheduler-policy")):
        left = core.read_namespaced_pod(name, namespace)
        assert left.spec.node_name is None
        notes = [note for reason, note in _events(admin, namespace, name) if reason == "FailedScheduling"]
        assert notes and words in notes[0], notes
        cond = {c.type: c for c in left.status.conditions or []}["PodScheduled"]
        assert cond.status == "False"
    assert sched.run_once().bound == 0  # nothing new; the explanations are not repeated
    assert len([r for r, _ in _events(admin, namespace, "too-big") if r == "FailedScheduling"]) == 1

    restarted = PodScheduler(api)  # a new process: its ledger comes from the annotations
    restarted.run_once()
    usage = restarted.ledger.usage(device.uuid)
    assert (usage.memory_mib, usage.cores, usage.slices) == (3000, 30, 1)
    core.delete_namespaced_pod("hami-doc", namespace, grace_period_seconds=0)
    after = restarted.run_once()  # its lease is freed, and the pod that waited for room is bound
    assert (after.released, after.bound) == (1, 1)
    assert core.read_namespaced_pod("no-room-now", namespace).spec.node_name == "gpu-node-1"
    assert [restarted.ledger.usage(u).memory_mib for u in ("GPU-aaaa-0", "GPU-aaaa-1")] == [16000, 16000]
    restarted.ledger.check_invariants()
    for name in ("gpu-node-1", "broken-node"):
        core.delete_node(name)


def test_the_command_line_runs_a_pass(kubeconfig: Path, admin: client.ApiClient, namespace: str) -> None:
    from typer.testing import CliRunner  # noqa: PLC0415

    from hami_ray.cli import app  # noqa: PLC0415

    _node(admin, "cli-node", "GPU-cccc-0,10,16384,100,NVIDIA-Tesla T4,0,true:")
    _pod(admin, namespace, "cli-pod", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1024"})
    _pod(admin, namespace, "cli-too-big", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "100000"})
    result = CliRunner().invoke(app, ["k8s", "scheduler", "--kubeconfig", str(kubeconfig), "--once"])
    assert result.exit_code == 0, result.output
    assert "bound 1" in result.output
    assert client.CoreV1Api(admin).read_namespaced_pod("cli-pod", namespace).spec.node_name == "cli-node"
    shown = CliRunner().invoke(app, ["status", "--kubeconfig", str(kubeconfig), "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    (node,) = [n for n in data["nodes"] if n["name"] == "cli-node"]
    (slice_,) = node["devices"][0]["slices"]
    assert (slice_["owner"], slice_["memory_mib"]) == (f"{namespace}/cli-pod", 1024)
    assert data["summary"]["queue_depth"] >= 1  # cli-too-big waits
    assert any(w["owner"] == f"{namespace}/cli-too-big" for w in data["waiting"])



def test_a_restart_in_the_middle_of_500_pods(admin: client.ApiClient, api: client.ApiClient, namespace: str,
                                            tmp_path: Path) -> None:
    """The scheduler process (with deploy/k8s/rbac.yaml's rights) is SIGKILLed while 500 pods arrive and
    a new one takes over: every pod is bound once, where its annotations say; no device holds more than
    it has; the ledger rebuilt from the annotations recounts clean."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from hami_ray.core.codec import devices_from_register  # noqa: PLC0415

    core = client.CoreV1Api(admin)
    for node in list(core.list_node().items):
        core.delete_node(node.metadata.name)
    register = "".join(f"GPU-r{{n}}-{i},10,16384,100,NVIDIA-Tesla T4,0,true:" for i in range(8))
    for n in range(10):
        _node(admin, f"node-{n}", register.replace("{n}", str(n)))
    capacity = {d.uuid: d for n in range(10) for d in devices_from_register(register.replace("{n}", str(n)))}
    config_path = sa_kubeconfig(api, tmp_path / "scheduler.kubeconfig")
    # direct: the nodes carry HAMi's register annotation but no device plugin runs to release HAMi's lock
    command = [sys.executable, "-m", "hami_ray.cli", "k8s", "scheduler", "--kubeconfig", str(config_path),
               "--bind-mode", "direct"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shapes = [{"nvidia.com/gpu": "1", "nvidia.com/gpumem": m, "nvidia.com/gpucores": c}
              for m, c in (("1024", "10"), ("2048", "20"), ("4096", "0"))]
    second = None
    try:
        for i in range(500):
            _pod(admin, namespace, f"p{i:03d}", shapes[i % 3])
            if i == 250:
                bound = lambda: sum(1 for p in core.list_namespaced_pod(namespace).items if p.spec.node_name)  # noqa: E731
                deadline = time.monotonic() + 60
                while bound() < 50 and time.monotonic() < deadline:
                    time.sleep(0.2)
                os.kill(first.pid, signal.SIGKILL)  # in the middle of its work
                first.wait(timeout=30)
                second = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            pods = core.list_namespaced_pod(namespace).items
            if len(pods) == 500 and all(p.spec.node_name for p in pods):
                break
            time.sleep(0.5)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
    pods = core.list_namespaced_pod(namespace).items
    assert len(pods) == 500 and all(p.spec.node_name for p in pods), sum(1 for p in pods if not p.spec.node_name)
    held: dict[str, list[tuple[int, int]]] = {}
    for p in pods:
        annotations = p.metadata.annotations
        assert annotations[NODE_ANNOTATION] == p.spec.node_name  # bound where it was placed
        for container in decode_pod_devices(annotations[ALLOCATED_ANNOTATION]):
            for d in container:
                assert d.uuid.startswith(f"GPU-r{p.spec.node_name.removeprefix('node-')}-")
                held.setdefault(d.uuid, []).append((d.memory_mib, d.cores))
    for uuid, grants in held.items():
        device = capacity[uuid]
        assert sum(m for m, _ in grants) <= device.memory_mib and sum(c for _, c in grants) <= 100
        assert len(grants) <= device.split_count
    rebuilt = PodScheduler(admin)
    rebuilt.run_once()
    rebuilt.ledger.check_invariants()
    for uuid, grants in held.items():
        assert rebuilt.ledger.usage(uuid).memory_mib == sum(m for m, _ in grants)
    for n in range(10):
        core.delete_node(f"node-{n}")
