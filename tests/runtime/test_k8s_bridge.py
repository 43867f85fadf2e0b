"""Ray tasks and Kubernetes pods on one ledger: the bridge with the placement actor as its inventory
(``hami-ray k8s scheduler --ray-address``), against the real API server and a Ray node that says which
Kubernetes node it runs on (``$HAMI_RAY_K8S_NODE``) with a simulated 16 GiB GPU."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from kubernetes import client

import hami_ray
from hami_ray.core.codec import decode_pod_devices
from hami_ray.core.request import slice_request
from hami_ray.k8s.inventory import RayInventory
from hami_ray.k8s.annotations import BIND_PHASE_ANNOTATION, NODE_ANNOTATION, TO_ALLOCATE_ANNOTATION
from hami_ray.k8s.scheduler import PodScheduler
from hami_ray.runtime import api
from hami_ray.runtime.placement import PLACEMENT_NAME
from node_actors.actor import K8S_NODE_ENV, NAMESPACE

from tests.helpers import wait_for

from .conftest import RayCluster

pytestmark = pytest.mark.k8s
K8S_NODE = "ray-gpu-node"
SCHED = "ray-bridge"



@pytest.fixture(scope="module")
def bridge(hami: RayCluster, admin: client.ApiClient, api: client.ApiClient) -> Iterator[PodScheduler]:
    """A Ray node with one simulated L4 (16 GiB) on Kubernetes node ``ray-gpu-node`` (kwok plays its
    kubelet), and the bridge (deploy/k8s/rbac.yaml's rights) sharing the placement actor's ledger."""
    ray_node = hami.add_node("1xL4-16GB", env={K8S_NODE_ENV: K8S_NODE})
    placement = ray.get_actor(PLACEMENT_NAME, namespace=NAMESPACE)
    assert wait_for(lambda: K8S_NODE in ray.get(placement.pod_leases.remote())["nodes"], timeout=60)
    core = client.CoreV1Api(admin)
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=K8S_NODE, annotations={"kwok.x-k8s.io/node": "fake"})))
    sched = PodScheduler(api, scheduler_name=SCHED, inventory=RayInventory(placement))
    stop = threading.Event()
    runner = threading.Thread(target=sched.run, args=(stop,), daemon=True)
    runner.start()
    try:
        yield sched
    finally:
        stop.set()
        runner.join(timeout=30)
        core.delete_node(K8S_NODE)
        hami.cluster.remove_node(ray_node)


def _pod(admin: client.ApiClient, namespace: str, name: str, limits: dict[str, str]) -> None:
    client.CoreV1Api(admin).create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name=name), spec=client.V1PodSpec(scheduler_name=SCHED, containers=[
            client.V1Container(name="main", image="busybox", resources=client.V1ResourceRequirements(limits=limits))])))


def _l4() -> tuple[str, str]:
    """The L4's node id and uuid, as the placement actor has them."""
    for node in api.status().nodes:
        for device in node.devices:
            if device.model == "L4-16GB":
                return node.name, device.uuid
    raise AssertionError("no L4 in the cluster")


def _slices_on(uuid: str) -> list[tuple[str, int]]:
    return sorted((lease.owner, g.memory_mib) for lease in api.status().leases
                  for g in lease.allocation.devices if g.uuid == uuid)


def test_hami_documented_pod_is_bound_from_the_placement_actors_ledger(bridge: PodScheduler, admin: client.ApiClient,
                                                                       namespace: str) -> None:
    _, uuid = _l4()
    _pod(admin, namespace, "hami-doc", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "3000", "nvidia.com/gpucores": "30"})
    core = client.CoreV1Api(admin)
    assert wait_for(lambda: core.read_namespaced_pod("hami-doc", namespace).spec.node_name == K8S_NODE)
    annotations = core.read_namespaced_pod("hami-doc", namespace).metadata.annotations
    assert annotations[NODE_ANNOTATION] == K8S_NODE and annotations[BIND_PHASE_ANNOTATION] == "allocating"
    [[device]] = decode_pod_devices(annotations["hami.io/vgpu-devices-allocated"])
    assert annotations[TO_ALLOCATE_ANNOTATION] == annotations["hami.io/vgpu-devices-allocated"]
    assert (device.uuid, device.type, device.memory_mib, device.cores) == (uuid, "NVIDIA", 3000, 30)
    assert _slices_on(uuid) == [(f"{namespace}/hami-doc", 3000)]  # the Ray cluster's ledger holds it
    core.delete_namespaced_pod("hami-doc", namespace, grace_period_seconds=0)
    assert wait_for(lambda: _slices_on(uuid) == [])


def test_a_ray_task_and_a_pod_never_share_the_gpu_beyond_its_memory(bridge: PodScheduler, admin: client.ApiClient,
                                                                    namespace: str, tmp_path: Path) -> None:
    """A Ray task holds 12 GiB of the 16 GiB GPU: a pod asking 8 GiB waits (FailedScheduling) and is bound
    once the task ends. Then the pod holds 8 GiB: a Ray task asking 12 GiB waits until the pod is gone."""
    _, uuid = _l4()
    core = client.CoreV1Api(admin)
    go = tmp_path / "go"

    @hami_ray.remote(gpu_memory="12GiB", gpu_type="L4-16GB")
    def hold(flag: str) -> str:
        import os  # noqa: PLC0415

        while not os.path.exists(flag):
            time.sleep(0.05)
        return os.environ["CUDA_DEVICE_MEMORY_LIMIT_0"]

    task = hold.remote(str(go))
    assert wait_for(lambda: [m for _, m in _slices_on(uuid)] == [12288])
    _pod(admin, namespace, "wants-8g", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "8192"})
    assert wait_for(lambda: any(e.reason == "FailedScheduling" and "0/1 nodes are available" in e.note
                             for e in client.EventsV1Api(admin).list_namespaced_event(namespace).items
                             if e.regarding.name == "wants-8g"))
    time.sleep(2.0)
    assert core.read_namespaced_pod("wants-8g", namespace).spec.node_name is None
    go.touch()
    assert ray.get(task, timeout=60) == "12288m"
    assert wait_for(lambda: core.read_namespaced_pod("wants-8g", namespace).spec.node_name == K8S_NODE)
    assert _slices_on(uuid) == [(f"{namespace}/wants-8g", 8192)]

    go.unlink()
    second = hold.remote(str(go))
    assert wait_for(lambda: any(w.owner for w in api.status().waiting), timeout=30)  # it waits for the pod
    time.sleep(1.0)
    assert [m for _, m in _slices_on(uuid)] == [8192]
    core.delete_namespaced_pod("wants-8g", namespace, grace_period_seconds=0)
    assert wait_for(lambda: sorted(m for _, m in _slices_on(uuid)) == [12288])
    go.touch()
    assert ray.get(second, timeout=60) == "12288m"
    assert wait_for(lambda: _slices_on(uuid) == [])


def test_one_queue_policy_for_ray_tasks_and_pods(bridge: PodScheduler, admin: client.ApiClient, namespace: str,
                                                 tmp_path: Path) -> None:
    """Queues applied to the placement actor hold for pods too: a Ray task of org/team-b (which guarantees
    nothing) borrows 12 GiB of the L4; a pod of org/team-a (its namespace's queue, under its guarantee) asks
    8 GiB: the placement actor reclaims, the task is interrupted with SlicePreempted, the pod is bound once
    the task's slice is gone, and the task runs again (its max_retries) once the pod has left.

    The pod comes once the task runs: on a loaded machine its worker may start only after the slice was
    reclaimed, and such a task does not run in the slice it lost (tests/runtime/test_queues.py checks that):
    its first run would then be the one after the pod, and it would wait for a preemption that never comes."""
    api.apply_queues("queues: [{name: org}, {name: org/team-a, guaranteed: {memory: 16GiB}}, {name: org/team-b}]")
    core = client.CoreV1Api(admin)
    try:
        core.patch_namespace(namespace, {"metadata": {"annotations": {"hami.io/queue": "org/team-a"}}})
        _, uuid = _l4()
        runs = tmp_path / "runs"
        runs.mkdir()

        @hami_ray.remote(gpu_memory="12GiB", gpu_type="L4-16GB", queue="org/team-b")
        def borrow(flag: str, marks: str) -> int:
            import os  # noqa: PLC0415

            n = len(os.listdir(marks))
            open(os.path.join(marks, str(n)), "w").close()
            while n == 0 or not os.path.exists(flag):  # the first run lasts until preempted
                time.sleep(0.05)
            return n

        task = borrow.options(max_retries=2).remote(str(tmp_path / "go"), str(runs))
        assert wait_for(lambda: [m for _, m in _slices_on(uuid)] == [12288])
        assert wait_for(lambda: (runs / "0").exists(), timeout=60)  # its first run has started
        _pod(admin, namespace, "owed-8g", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "8192"})
        assert wait_for(lambda: core.read_namespaced_pod("owed-8g", namespace).spec.node_name == K8S_NODE, timeout=60)
        assert _slices_on(uuid) == [(f"{namespace}/owed-8g", 8192)]  # the task's slice was gone first
        assert next(r for r in api.queues() if r["queue"] == "org/team-b")["preempted"] >= 1
        core.delete_namespaced_pod("owed-8g", namespace, grace_period_seconds=0)
        (tmp_path / "go").touch()
        assert ray.get(task, timeout=120) == 1  # its second run
    finally:
        assert wait_for(lambda: _slices_on(_l4()[1]) == [], timeout=60)
        api.apply_queues("queues: []")


def test_a_restarted_bridge_frees_the_slices_of_pods_deleted_while_it_was_down(bridge: PodScheduler,
                                                                                api: client.ApiClient) -> None:
    """A pod deleted while no bridge ran sends no event to the next one; its slices in the shared ledger
    must still be freed once that bridge has listed the pods (found by bench/chaos.py's bridge kills)."""
    placement = ray.get_actor(PLACEMENT_NAME, namespace=NAMESPACE)
    before = RayInventory(placement)  # the bridge that held it, before it died
    uid = "00000000-0000-4000-8000-00000000dead"
    before.place(uid, "gone/pod", [slice_request({"gpus": 1, "gpu_memory": "1GiB"})], [K8S_NODE])
    lease_id = f"pod-{uid}"
    assert any(x.lease_id == lease_id for x in api_status_leases())
    restarted = PodScheduler(api, scheduler_name="restarted-bridge", inventory=RayInventory(placement))
    stop = threading.Event()
    runner = threading.Thread(target=restarted.run, args=(stop,), daemon=True)
    runner.start()
    try:
        assert wait_for(lambda: all(x.lease_id != lease_id for x in api_status_leases()), timeout=60)
    finally:
        stop.set()
        runner.join(timeout=30)


def test_a_pods_slice_a_restarted_placement_actor_holds_again_is_freed(bridge: PodScheduler) -> None:
    """The placement actor frees a pod's slice in its ledger, answers the bridge, and tells the node actor
    afterwards: killed in between, its next incarnation rebuilds the ledger from the node actor and holds
    the slice again, for a pod the bridge freed and forgot (bench/chaos.py: a pod slice held by nothing
    for 98 s, until the bridge itself was restarted). The running bridge sees the new incarnation, reads
    the pods' leases again and frees the slices of pods that are gone."""
    placement = ray.get_actor(PLACEMENT_NAME, namespace=NAMESPACE)
    with bridge.lock:
        bridge.inventory.sync()  # its own periodic re-read (RECHECK_EVERY_S) is minutes away now
    uid = "00000000-0000-4000-8000-0000000fa11e"
    RayInventory(placement).place(uid, "gone/freed-before", [slice_request({"gpus": 1, "gpu_memory": "1GiB"})],
                                  [K8S_NODE])  # what the node actor still holds (the bridge never saw it)
    lease_id = f"pod-{uid}"
    assert not bridge.inventory.holds(uid)
    ray.kill(placement, no_restart=False)
    assert wait_for(lambda: all(x.lease_id != lease_id for x in api_status_leases()), timeout=120), \
        f"{lease_id} still held after the placement actor restarted"


def api_status_leases() -> list[object]:
    return list(api.status().leases)
