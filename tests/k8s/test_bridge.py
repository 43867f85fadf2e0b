"""The bridge's lifecycle against the real API server and kwok: a 409 on Binding keeps what the pod says,
pods that finish or go free their slices for pods that waited (watch mode, back-off), other vendors'
register and allocation keys, and leader election between two replicas run as the deployed
ServiceAccount."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kubernetes import client

from hami_ray.core.codec import decode_pod_devices, encode_pod_devices
from hami_ray.core.model import DeviceGrant
from hami_ray.k8s.annotations import NODE_ANNOTATION
from hami_ray.k8s.scheduler import PodScheduler
from tests.helpers import sa_kubeconfig, wait_for

pytestmark = pytest.mark.k8s
NVIDIA = "hami.io/node-nvidia-register"


def _gpus(prefix: str, n: int, mib: int = 16384) -> str:
    return "".join(f"{prefix}-{i},10,{mib},100,NVIDIA-Tesla T4,0,true:" for i in range(n))


def _node(admin: client.ApiClient, name: str, annotations: dict[str, str]) -> None:
    core = client.CoreV1Api(admin)
    try:
        core.delete_node(name)
    except client.ApiException:
        pass
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(
        name=name, annotations={"kwok.x-k8s.io/node": "fake", **annotations})))


def _pod(admin: client.ApiClient, namespace: str, name: str, *containers: dict[str, str],
         scheduler: str = "hami-scheduler") -> None:
    client.CoreV1Api(admin).create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(scheduler_name=scheduler, containers=[
            client.V1Container(name=f"c{i}", image="busybox", resources=client.V1ResourceRequirements(limits=limits))
            for i, limits in enumerate(containers)])))



def test_a_binding_refused_with_409_keeps_what_the_pod_says(admin: client.ApiClient, api: client.ApiClient,
                                                            namespace: str, nodes: list[str]) -> None:
    """The bridge has seen the pod pending; another replica binds it first, with its own device and
    memory. The bridge's binding gets 409: it holds what the pod's annotations say, not its own choice."""
    nodes.append("race-node")
    _node(admin, "race-node", {NVIDIA: _gpus("GPU-race", 2)})
    _pod(admin, namespace, "raced", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "4000"}, scheduler="race-sched")
    sched = PodScheduler(api, scheduler_name="race-sched")
    sched.sync()  # seen pending
    theirs = encode_pod_devices([[DeviceGrant(uuid="GPU-race-1", memory_mib=5000, cores=20)]])
    client.CoreV1Api(admin).create_namespaced_pod_binding("raced", namespace, client.V1Binding(
        metadata=client.V1ObjectMeta(name="raced", annotations={
            NODE_ANNOTATION: "race-node", "hami.io/vgpu-devices-allocated": theirs,
            "hami.io/vgpu-devices-to-allocate": theirs}),
        target=client.V1ObjectReference(api_version="v1", kind="Node", name="race-node")), _preload_content=False)
    sched.schedule_pending()  # its stale view: it places and binds, and is refused
    assert sched.stats.bound == 0
    held = {u: sched.ledger.usage(u) for u in ("GPU-race-0", "GPU-race-1")}
    assert (held["GPU-race-1"].memory_mib, held["GPU-race-1"].cores, held["GPU-race-1"].slices) == (5000, 20, 1)
    assert held["GPU-race-0"].memory_mib == 0  # its own choice is not held
    pod = client.CoreV1Api(admin).read_namespaced_pod("raced", namespace)
    assert pod.metadata.annotations["hami.io/vgpu-devices-allocated"] == theirs
    sched.ledger.check_invariants()


def test_finished_and_deleted_pods_free_their_slices_for_waiting_ones(admin: client.ApiClient, api: client.ApiClient,
                                                                     namespace: str, nodes: list[str]) -> None:
    """Watch mode on a kwok node: bound pods run; one that Succeeds, one that Fails and one deleted each
    free their slice, and a pod that waited is bound after its back-off, without a restart."""
    nodes.append("life-node")
    _node(admin, "life-node", {NVIDIA: _gpus("GPU-life", 1)})
    core = client.CoreV1Api(admin)
    sched = PodScheduler(api, scheduler_name="life-sched")
    stop = threading.Event()
    runner = threading.Thread(target=sched.run, args=(stop,), daemon=True)
    runner.start()
    try:
        whole = {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "16000"}
        _pod(admin, namespace, "first", whole, scheduler="life-sched")
        assert wait_for(lambda: core.read_namespaced_pod("first", namespace).status.phase == "Running")  # kwok ran it
        for name, end in (("second", "Succeeded"), ("third", "Failed"), ("fourth", None)):
            _pod(admin, namespace, name, whole, scheduler="life-sched")
            assert wait_for(lambda: any(e.reason == "FailedScheduling" for e in client.EventsV1Api(admin).list_namespaced_event(
                namespace).items if e.regarding.name == name))
            assert core.read_namespaced_pod(name, namespace).spec.node_name is None
            previous = {"second": "first", "third": "second", "fourth": "third"}[name]
            if end is None:
                core.delete_namespaced_pod(previous, namespace, grace_period_seconds=0)
            else:
                core.patch_namespaced_pod_status(previous, namespace, {"status": {"phase": end}})
            assert wait_for(lambda: core.read_namespaced_pod(name, namespace).spec.node_name == "life-node"), name
        assert sched.stats.released >= 3
        (lease,) = sched.ledger.leases.values()
        assert lease.owner == f"{namespace}/fourth"
    finally:
        stop.set()
        runner.join(timeout=30)


def test_other_vendors_register_and_allocation_keys(admin: client.ApiClient, api: client.ApiClient, namespace: str,
                                                    nodes: list[str]) -> None:
    """A node with NVIDIA GPUs (JSON-era register), Hygon DCUs (legacy comma register) and Ascend 910B3
    NPUs: a pod with an NVIDIA container and a DCU container gets each vendor's annotation keys, each
    listing every container (empty where it has none of that vendor's devices), as HAMi writes them."""
    nodes.append("mixed-node")
    _node(admin, "mixed-node", {
        NVIDIA: _gpus("GPU-mix", 1),
        "hami.io/node-dcu-register": "DCU-mix-0,4,65536,100,DCU-Z100,0,true:DCU-mix-1,4,65536,100,DCU-Z100,0,true:",
        "hami.io/node-register-Ascend910B3": '[{"id":"NPU-mix-0","count":4,"devmem":65536,"devcore":20,'
                                             '"type":"Ascend910B3","numa":0,"health":true}]'})
    _pod(admin, namespace, "two-vendors", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"},
         {"hygon.com/dcunum": "1", "hygon.com/dcumem": "2000"}, scheduler="mix-sched")
    _pod(admin, namespace, "npu", {"huawei.com/Ascend910B3": "1", "huawei.com/Ascend910B3-memory": "16384"},
         scheduler="mix-sched")
    sched = PodScheduler(api, scheduler_name="mix-sched")
    assert sched.run_once().bound == 2
    core = client.CoreV1Api(admin)
    annotations = core.read_namespaced_pod("two-vendors", namespace).metadata.annotations
    gpu = decode_pod_devices(annotations["hami.io/vgpu-devices-allocated"])
    dcu = decode_pod_devices(annotations["hami.io/dcu-devices-allocated"])
    assert annotations["hami.io/dcu-devices-to-allocate"] == annotations["hami.io/dcu-devices-allocated"]
    assert [[(d.uuid, d.type, d.memory_mib) for d in c] for c in gpu] == [[("GPU-mix-0", "NVIDIA", 1000)], []]
    assert len(dcu) == 2 and dcu[0] == [] and [(d.type, d.memory_mib) for d in dcu[1]] == [("DCU", 2000)]
    assert dcu[1][0].uuid in {"DCU-mix-0", "DCU-mix-1"}
    npu = core.read_namespaced_pod("npu", namespace).metadata.annotations
    [[device]] = decode_pod_devices(npu["hami.io/Ascend910B3-devices-allocated"])
    assert (device.uuid, device.type, device.memory_mib) == ("NPU-mix-0", "Ascend910B3", 16384)
    assert "hami.io/vgpu-devices-allocated" not in npu
    rebuilt = PodScheduler(api, scheduler_name="mix-sched")  # every vendor's allocation is read back
    rebuilt.sync()
    assert rebuilt.ledger.usage(dcu[1][0].uuid).memory_mib == 2000
    assert rebuilt.ledger.usage("NPU-mix-0").memory_mib == 16384



def test_two_replicas_with_leader_election(admin: client.ApiClient, api: client.ApiClient, namespace: str,
                                           nodes: list[str], tmp_path: Path) -> None:
    """Two `hami-ray k8s scheduler --leader-elect` processes: one holds the Lease and binds; killed, the
    other takes over within the lease duration and binds the next pod."""
    nodes.append("elect-node")
    _node(admin, "elect-node", {NVIDIA: _gpus("GPU-elect", 1)})
    config_path = sa_kubeconfig(api, tmp_path / "sa.kubeconfig")
    command = [sys.executable, "-m", "hami_ray.cli", "k8s", "scheduler", "--kubeconfig", str(config_path),
               "--scheduler-name", "elect-sched", "--leader-elect", "--lease-seconds", "4",
               "--bind-mode", "direct"]  # HAMi's register annotation, no device plugin to release a lock
    logs = [(tmp_path / f"replica-{i}.log").open("wb") for i in range(2)]
    procs = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log) for log in logs]
    coordination = client.CoordinationV1Api(admin)
    core = client.CoreV1Api(admin)
    bound = lambda name: core.read_namespaced_pod(name, namespace).spec.node_name  # noqa: E731
    try:
        assert wait_for(lambda: _holder(coordination) is not None, timeout=30)
        holder = _holder(coordination)
        leader = next(p for p in procs if holder.endswith(f"_{p.pid}"))
        _pod(admin, namespace, "before", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "10000"}, scheduler="elect-sched")
        assert wait_for(lambda: bound("before") == "elect-node", timeout=30)
        os.kill(leader.pid, signal.SIGKILL)
        leader.wait(timeout=30)
        t0 = time.monotonic()
        _pod(admin, namespace, "after", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "6000"}, scheduler="elect-sched")
        assert wait_for(lambda: bound("after") == "elect-node", timeout=30)
        assert time.monotonic() - t0 < 20
        assert _holder(coordination) not in (None, holder)
        # the new leader counted "before" (from its annotations): 1,000 MiB more does not fit on the GPU
        _pod(admin, namespace, "over", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"}, scheduler="elect-sched")
        assert wait_for(lambda: any(e.reason == "FailedScheduling" for e in client.EventsV1Api(admin).list_namespaced_event(
            namespace).items if e.regarding.name == "over"), timeout=20)
        assert bound("over") is None
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
        for log in logs:
            log.close()


def _holder(coordination: client.CoordinationV1Api) -> str | None:
    try:
        lease = coordination.read_namespaced_lease("elect-sched", "hami-ray")
    except client.ApiException:
        return None
    return str(lease.spec.holder_identity) if lease.spec.holder_identity else None


def test_taints_selectors_and_cordons_are_honoured(admin: client.ApiClient, api: client.ApiClient, namespace: str,
                                                   nodes: list[str]) -> None:
    """As kube-scheduler: a tainted node takes only pods that tolerate the taint, a nodeSelector narrows
    the nodes, a cordoned node takes nothing; the explanation counts the nodes each rule left out."""
    core = client.CoreV1Api(admin)
    for node in core.list_node().items:  # the counts below are of these three nodes
        core.delete_node(node.metadata.name)
    nodes.extend(["taint-plain", "taint-gpu", "taint-cordoned"])
    for name in nodes:
        _node(admin, name, {NVIDIA: _gpus(f"GPU-{name}", 1)})
    core.patch_node("taint-gpu", {"metadata": {"labels": {"gpu": "on"}},
                                  "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]}})
    core.patch_node("taint-cordoned", {"spec": {"unschedulable": True}})
    big = {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "12000"}
    _pod(admin, namespace, "fills-plain", big, scheduler="taint-sched")
    client.CoreV1Api(admin).create_namespaced_pod(namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "tolerates"},
        "spec": {"schedulerName": "taint-sched", "nodeSelector": {"gpu": "on"},
                 "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                 "containers": [{"name": "c", "image": "busybox", "resources": {"limits": big}}]}})
    _pod(admin, namespace, "nowhere", big, scheduler="taint-sched")
    sched = PodScheduler(api, scheduler_name="taint-sched")
    assert sched.run_once().bound == 2
    assert core.read_namespaced_pod("fills-plain", namespace).spec.node_name == "taint-plain"
    assert core.read_namespaced_pod("tolerates", namespace).spec.node_name == "taint-gpu"
    assert core.read_namespaced_pod("nowhere", namespace).spec.node_name is None
    (note,) = [e.note for e in client.EventsV1Api(admin).list_namespaced_event(namespace).items
               if e.regarding.name == "nowhere" and e.reason == "FailedScheduling"]
    assert note.startswith("0/3 nodes are available: ") and "1 node(s) had untolerated taint" in note
    assert "1 node(s) were unschedulable" in note and "1 insufficient" in note, note
