"""HAMi's node lock (issue 16) against the real API server: binds in ``hami-lock`` mode let HAMi's device
plugin (emulated from the reference: tests/k8s/hami_plugin.py) serve every Allocate the pod it belongs
to, with 8 pods per node bound concurrently on several nodes; the same emulation serves a wrong pod in
``direct`` mode; the lock itself is taken by one binder only, expires as HAMi's does, and placement passes
over locked nodes instead of waiting for them."""

from __future__ import annotations

import datetime
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from kubernetes import client

from hami_ray.core.codec import RegisteredDevice, encode_node_register
from hami_ray.k8s import nodelock
from hami_ray.k8s.annotations import NODE_LABEL
from hami_ray.k8s.kubeapi import KubeApi
from hami_ray.k8s.nodelock import LOCK_ANNOTATION, PLUGIN_ANNOTATION, BindMode, NodeLock, NodeLocked
from hami_ray.k8s.scheduler import PodScheduler
from tests.helpers import wait_for
from tests.k8s.hami_plugin import Kubelet, wait_admitted

pytestmark = pytest.mark.k8s
REGISTER = "hami.io/node-nvidia-register"


def _register(node: str, gpus: int = 8) -> str:
    """HAMi's JSON register of ``gpus`` 16 GiB T4s, as its device plugin writes it."""
    return encode_node_register([RegisteredDevice(f"GPU-{node}-{i}", 10, 16384, 100, "NVIDIA-Tesla T4", index=i)
                                 for i in range(gpus)])


def _make(admin: client.ApiClient, nodes: list[str], name: str, annotations: dict[str, str]) -> None:
    core = client.CoreV1Api(admin)
    try:
        core.delete_node(name)
    except client.ApiException:
        pass
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name, annotations=annotations)))
    nodes.append(name)


def _pod(admin: client.ApiClient, namespace: str, name: str, scheduler: str, *containers: dict[str, str],
         annotations: dict[str, str] | None = None) -> None:
    client.CoreV1Api(admin).create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, annotations=annotations),
        spec=client.V1PodSpec(scheduler_name=scheduler, containers=[
            client.V1Container(name=f"c{i}", image="busybox", resources=client.V1ResourceRequirements(limits=limits))
            for i, limits in enumerate(containers)])))


def _running(sched: PodScheduler) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=sched.run, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


def _lock_of(admin: client.ApiClient, node: str) -> str | None:
    return (client.CoreV1Api(admin).read_node(node).metadata.annotations or {}).get(LOCK_ANNOTATION)


def _events(admin: client.ApiClient, namespace: str, pod: str, reason: str) -> list[str]:
    return [e.note for e in client.EventsV1Api(admin).list_namespaced_event(namespace).items
            if e.regarding.name == pod and e.reason == reason]


# --- HAMi's plugin serves the right pod ---------------------------------------------------------------------
def test_every_allocate_serves_its_pod_with_8_pods_per_node_in_hami_lock_mode(
        admin: client.ApiClient, api: client.ApiClient, namespace: str, nodes: list[str]) -> None:
    """4 nodes registered by HAMi's plugin (``auto`` reads them as ``hami-lock``), 8 GPUs each; 32 pods of one
    GPU with 10,000 MiB (one per GPU: exactly 8 per node) created at once; the bridge runs with its 8 binding
    threads, a kubelet per node admits what is bound to it through HAMi's emulated plugin. Every Allocate
    serves the pod the kubelet admitted with that pod's devices; a node never has two pods between binding
    and Allocate; every pod carries the label; no lock is left."""
    names = [f"lock-{i}" for i in range(4)]
    for name in names:
        _make(admin, nodes, name, {REGISTER: _register(name)})
    sched = PodScheduler(api, scheduler_name="lock-sched", bind_mode=BindMode.AUTO)
    kubelets = [Kubelet(admin, name) for name in names]
    for kubelet in kubelets:
        kubelet.start()
    stop, thread = _running(sched)
    try:
        ours = {"nvidia.com/use-gpuuuid": ",".join(f"GPU-{n}-{g}" for n in names for g in range(8))}
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: _pod(admin, namespace, f"p{i:02d}", "lock-sched",
                                         {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "10000"}, annotations=ours),
                          range(32)))
        assert wait_admitted(kubelets, 32, timeout=120), [len(k.admitted) for k in kubelets]
    finally:
        stop.set()
        thread.join(timeout=30)
        for kubelet in kubelets:
            kubelet.stop()
    served = [s for k in kubelets for s in k.served]
    wrong = [s for s in served if not s.right]
    assert len(served) == 32 and not wrong, wrong
    assert [len(k.admitted) for k in kubelets] == [8, 8, 8, 8]
    assert max(k.most_waiting for k in kubelets) == 1  # the lock: one bind -> Allocate in flight per node
    pods = client.CoreV1Api(admin).list_namespaced_pod(namespace).items
    assert all(p.metadata.labels.get(NODE_LABEL) == p.spec.node_name for p in pods)
    assert all(p.metadata.annotations["hami.io/bind-phase"] == "success" for p in pods)
    assert [_lock_of(admin, name) for name in names] == [None] * 4


def test_without_the_lock_the_same_plugin_serves_a_wrong_pod(admin: client.ApiClient, api: client.ApiClient,
                                                             namespace: str, nodes: list[str]) -> None:
    """``direct`` mode, one node, 8 pods bound before the kubelet admits any: the kubelet admits p7 first,
    HAMi's lookup (no lock) takes the first Pending pod of the list, p0, and gives p7's container p0's
    devices. Deterministic: the API server lists a namespace's pods by name."""
    _make(admin, nodes, "nolock-0", {REGISTER: _register("nolock-0")})
    for i in range(8):
        _pod(admin, namespace, f"p{i}", "nolock-sched", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "10000"},
             annotations={"nvidia.com/use-gpuuuid": ",".join(f"GPU-nolock-0-{g}" for g in range(8))})
    assert PodScheduler(api, scheduler_name="nolock-sched", bind_mode=BindMode.DIRECT).run_once().bound == 8
    assert _lock_of(admin, "nolock-0") is None
    kubelet = Kubelet(admin, "nolock-0")
    kubelet.round()
    first = kubelet.served[0]
    assert (first.admitted, first.served) == (f"{namespace}/p7", f"{namespace}/p0")
    assert first.devices != first.expected and not first.right
    assert sum(not s.right for s in kubelet.served) >= 4  # p7..p4 get p0..p3's devices
    pods = client.CoreV1Api(admin).list_namespaced_pod(namespace).items
    assert all(p.metadata.labels.get(NODE_LABEL) == "nolock-0" for p in pods)  # the label in direct mode too


# --- the lock ------------------------------------------------------------------------------------------
def test_one_binder_holds_the_lock_and_stale_locks_expire_as_hamis_do(admin: client.ApiClient,
                                                                      nodes: list[str]) -> None:
    kube = KubeApi(admin)
    _make(admin, nodes, "race-lock", {REGISTER: _register("race-lock", 1)})
    known = kube.get("/api/v1/nodes/race-lock")  # every binder read the node free, at the same version

    def take(i: int) -> str | None:
        try:
            return nodelock.acquire(kube, "race-lock", ("ns", f"pod-{i}"), exists=lambda ns, n: True, known=known)
        except NodeLocked:
            return None

    with ThreadPoolExecutor(8) as pool:
        taken = [v for v in pool.map(take, range(8)) if v is not None]
    assert len(taken) == 1 and _lock_of(admin, "race-lock") == taken[0]
    holder = taken[0].split(",")[2]
    assert NodeLock.parse(taken[0]).age_s(nodelock.now_utc()) < 60
    with pytest.raises(NodeLocked, match=rf"node race-lock is locked by ns/{holder} since .* \(hami.io/mutex.lock\)"):
        nodelock.acquire(kube, "race-lock", ("ns", "late"), exists=lambda ns, n: True)
    assert not nodelock.release(kube, "race-lock", ("ns", "late"))  # not its lock: it stays
    assert _lock_of(admin, "race-lock") == taken[0]
    # the owner is gone (HAMi's dangling-lock check): taken over
    assert nodelock.acquire(kube, "race-lock", ("ns", "next"), exists=lambda ns, n: n != holder).endswith(",ns,next")
    # older than 5 minutes: taken over whoever holds it; a fresh bare time (legacy) holds
    old = (nodelock.now_utc() - datetime.timedelta(minutes=6)).strftime("%Y-%m-%dT%H:%M:%S+00:00")
    for value, free in ((f"{old},ns,next", True), (old, True), (NodeLock(nodelock.now_utc()).value(), False),
                        ("garbage", False), ("2026-01-01T00:00:00Z,too,many,parts", False)):
        kube.patch("/api/v1/nodes/race-lock", {"metadata": {"annotations": {LOCK_ANNOTATION: value}}})
        if free:
            assert nodelock.acquire(kube, "race-lock", ("ns", "again"), exists=lambda ns, n: True).endswith(",ns,again")
        else:
            with pytest.raises(NodeLocked):
                nodelock.acquire(kube, "race-lock", ("ns", "again"), exists=lambda ns, n: True)
    assert nodelock.release(kube, "race-lock", ("ns", "again")) is False  # "garbage..." is not its lock
    kube.patch("/api/v1/nodes/race-lock", {"metadata": {"annotations": {LOCK_ANNOTATION: "1,ns,again"}}})
    assert nodelock.release(kube, "race-lock", ("ns", "again")) and _lock_of(admin, "race-lock") is None


def test_placement_passes_over_locked_nodes_and_waits_only_when_none_else_fits(
        admin: client.ApiClient, api: client.ApiClient, namespace: str, nodes: list[str]) -> None:
    """Node ``busy`` holds a fresh lock of a live pod (another scheduler's bind in flight). A pod that fits
    both goes to ``free`` at once (binpack would rank them equal); a pod held to ``busy`` (use-gpuuuid)
    waits, told why once it has waited ``LOCK_WAIT_QUIET_S`` (a lock turns over in seconds), with no
    preemption; deleting the lock's pod frees the lock (HAMi's dangling check) and
    it is bound there, taking the lock. A node marked by hami-ray's device plugin gets no lock (``auto``)."""
    _pod(admin, namespace, "holder", "someone-else", {"cpu": "1m"})
    lock = NodeLock(nodelock.now_utc(), namespace, "holder").value()
    _make(admin, nodes, "busy", {REGISTER: _register("busy", 1), LOCK_ANNOTATION: lock})
    _make(admin, nodes, "free", {REGISTER: _register("free", 1)})
    _make(admin, nodes, "ours", {REGISTER: _register("ours", 1), PLUGIN_ANNOTATION: "nvidia.com/gpu"})
    sched = PodScheduler(api, scheduler_name="pass-sched", bind_mode=BindMode.AUTO)
    stop, thread = _running(sched)
    core = client.CoreV1Api(admin)
    bound = lambda name: core.read_namespaced_pod(name, namespace).spec.node_name  # noqa: E731
    try:
        _pod(admin, namespace, "either", "pass-sched", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "10000"},
             annotations={"nvidia.com/use-gpuuuid": "GPU-busy-0,GPU-free-0"})
        assert wait_for(lambda: bound("either") == "free", timeout=30)
        assert wait_for(lambda: (_lock_of(admin, "free") or "").endswith(f",{namespace},either"), timeout=10)
        _pod(admin, namespace, "pinned", "pass-sched", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "4000"},
             annotations={"nvidia.com/use-gpuuuid": "GPU-busy-0"})
        # (free is locked too now: by "either", whose Allocate no plugin here makes)
        assert wait_for(lambda: any("2 node(s) had a bind in flight (hami.io/mutex.lock)" in n
                                    for n in _events(admin, namespace, "pinned", "FailedScheduling")), timeout=30), \
            _events(admin, namespace, "pinned", "FailedScheduling")
        assert bound("pinned") is None
        with sched.lock:
            assert sched.waits_for_lock(core.read_namespaced_pod("pinned", namespace).metadata.uid)
        core.delete_namespaced_pod("holder", namespace, grace_period_seconds=0)
        assert wait_for(lambda: bound("pinned") == "busy", timeout=30)
        assert (_lock_of(admin, "busy") or "").endswith(f",{namespace},pinned")
        _pod(admin, namespace, "mine", "pass-sched", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"},
             annotations={"nvidia.com/use-gpuuuid": "GPU-ours-0"})
        assert wait_for(lambda: bound("mine") == "ours", timeout=30)
        assert _lock_of(admin, "ours") is None  # hami-ray's own device plugin: direct
        assert core.read_namespaced_pod("mine", namespace).metadata.labels[NODE_LABEL] == "ours"
    finally:
        stop.set()
        thread.join(timeout=30)


def test_an_expired_lock_is_taken_and_a_lock_found_at_bind_time_sends_the_pod_elsewhere(
        admin: client.ApiClient, api: client.ApiClient, namespace: str, nodes: list[str]) -> None:
    """A lock older than 5 minutes does not hold a node (the pod is bound there); a lock written after the
    bridge last saw the node (its watch not caught up) refuses the bind, and the pod is placed again, on
    the other node, at once."""
    _pod(admin, namespace, "holder", "someone-else", {"cpu": "1m"})
    old = NodeLock(nodelock.now_utc() - datetime.timedelta(minutes=6), namespace, "holder").value()
    _make(admin, nodes, "stale", {REGISTER: _register("stale", 1), LOCK_ANNOTATION: old})
    sched = PodScheduler(api, scheduler_name="stale-sched", bind_mode=BindMode.HAMI_LOCK)
    _pod(admin, namespace, "first", "stale-sched", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"},
         annotations={"nvidia.com/use-gpuuuid": "GPU-stale-0"})
    assert sched.run_once().bound == 1
    assert client.CoreV1Api(admin).read_namespaced_pod("first", namespace).spec.node_name == "stale"
    assert (_lock_of(admin, "stale") or "").endswith(f",{namespace},first")

    _make(admin, nodes, "late-a", {REGISTER: _register("late-a", 1)})
    _make(admin, nodes, "late-b", {REGISTER: _register("late-b", 1)})
    sched = PodScheduler(api, scheduler_name="late-sched", bind_mode=BindMode.HAMI_LOCK)
    sched.sync()
    _pod(admin, namespace, "late", "late-sched", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"},
         annotations={"nvidia.com/use-gpuuuid": "GPU-late-a-0,GPU-late-b-0"})
    sched.sync()
    uid = client.CoreV1Api(admin).read_namespaced_pod("late", namespace).metadata.uid
    with sched.lock:
        node, annotations = sched.reserve(sched.pods[uid], ["late-a", "late-b"])
    fresh = NodeLock(nodelock.now_utc(), namespace, "holder").value()
    KubeApi(admin).patch(f"/api/v1/nodes/{node}", {"metadata": {"annotations": {LOCK_ANNOTATION: fresh}}})
    answer = sched.bind(sched.pods[uid], node, annotations)
    assert answer is not None and f"node {node} is locked by {namespace}/holder" in answer
    assert not sched.inventory.holds(uid)
    other = "late-b" if node == "late-a" else "late-a"
    sched.schedule_pending()  # placed again at once: no back-off, the refused node passed over
    assert client.CoreV1Api(admin).read_namespaced_pod("late", namespace).spec.node_name == other
    assert not _events(admin, namespace, "late", "FailedScheduling")


def test_hami_rays_plugin_serves_the_pod_the_lock_names(admin: client.ApiClient, api: client.ApiClient,
                                                       plugin_api: client.ApiClient, namespace: str, node: str,
                                                       kubelet: object) -> None:
    """hami-ray's device plugin marks its node (``hami-ray.io/device-plugin``) and, like HAMi's, serves
    the pod the node lock names before any other waiting pod; the lock is released with its Allocate."""
    from tests.k8s.kubelet import Kubelet as Stand_in  # noqa: PLC0415
    from tests.k8s.kubelet import start_plugin  # noqa: PLC0415

    assert isinstance(kubelet, Stand_in)
    plugin, _ = start_plugin(plugin_api, node, kubelet)
    try:
        _, request = kubelet.registrations.get(timeout=10)
        kubelet.connect(request["endpoint"])
        ids = [d[0] for d in kubelet.lists.get(timeout=5)]
        annotations = client.CoreV1Api(admin).read_node(node).metadata.annotations
        assert annotations[PLUGIN_ANNOTATION] == "nvidia.com/gpu"
        assert not nodelock.lock_needed(annotations, BindMode.AUTO)
        for name, mib in (("older", "1000"), ("locked", "2000")):
            client.CoreV1Api(admin).create_namespaced_pod(namespace, client.V1Pod(
                metadata=client.V1ObjectMeta(name=name, annotations={
                    "nvidia.com/use-gpuuuid": f"GPU-sim-{node}-0,GPU-sim-{node}-1"}), spec=client.V1PodSpec(scheduler_name=f"sched-{node}", containers=[
                    client.V1Container(name="c", image="busybox", resources=client.V1ResourceRequirements(
                        limits={"nvidia.com/gpu": "1", "nvidia.com/gpumem": mib}))])))
            assert PodScheduler(api, scheduler_name=f"sched-{node}").run_once().bound == 1
        KubeApi(admin).patch(f"/api/v1/nodes/{node}", {"metadata": {"annotations": {
            LOCK_ANNOTATION: NodeLock(nodelock.now_utc(), namespace, "locked").value()}}})
        [answer] = kubelet.allocate([ids[0]])
        assert answer["envs"]["CUDA_DEVICE_MEMORY_LIMIT_0"] == "2000m"  # "locked", not the older "older"
        assert _lock_of(admin, node) is None
        [answer] = kubelet.allocate([ids[1]])
        assert answer["envs"]["CUDA_DEVICE_MEMORY_LIMIT_0"] == "1000m"
    finally:
        plugin.stop()


def test_the_command_line_names_the_bind_modes(tmp_path: Path) -> None:
    from typer.testing import CliRunner  # noqa: PLC0415

    from hami_ray.cli import app  # noqa: PLC0415

    result = CliRunner().invoke(app, ["k8s", "scheduler", "--once", "--bind-mode", "locked",
                                      "--kubeconfig", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "--bind-mode is one of auto, hami-lock, direct, not 'locked'" in " ".join(result.output.split())
