"""The runtime across nodes of several device models (the conftest's two-node Cluster): placement by
type, capacity under a storm of mixed tasks checked against the node actors' own ledgers, node removal
and the order in which a queue drains. Marked ``ray``."""

from __future__ import annotations

import os
import time

import pytest
import ray

import hami_ray
from hami_ray.runtime import api
from hami_ray.runtime.lanes import MAX_PENDING
from hami_ray.runtime.loopback import ray_worker_processes
from tests.runtime.conftest import RayCluster, assert_node_actors_empty_and_never_over, live_leases, wait_until

pytestmark = pytest.mark.ray
SLICE_KEYS = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_SM_LIMIT")


@hami_ray.remote(gpu_memory="10GiB", gpu_cores=10)
def probe(hold_s: float = 0.0) -> dict[str, object]:
    """What a task sees: its node, its slice and its environment, and when it held the slice."""
    info = hami_ray.current_slice()
    assert info is not None
    start = time.monotonic()
    time.sleep(hold_s)
    return {"node": ray.get_runtime_context().get_node_id(), "lease": info.lease_id,
            "devices": [(g.uuid, g.memory_mib, g.cores) for g in info.devices],
            "env": {k: v for k, v in os.environ.items() if k in SLICE_KEYS or k.startswith("CUDA_DEVICE_MEMORY_LIMIT")},
            "span": (start, time.monotonic())}


def _models() -> dict[str, str]:
    return {d.uuid: d.model for n in api.status().nodes for d in n.devices}


def _check_isolation(out: dict[str, object], node_of: dict[str, str]) -> None:
    devices = out["devices"]
    env = out["env"]
    assert isinstance(devices, list) and isinstance(env, dict)
    uuids = [u for u, _, _ in devices]
    assert env["CUDA_VISIBLE_DEVICES"] == ",".join(uuids) == env["NVIDIA_VISIBLE_DEVICES"]
    assert {node_of[u] for u in uuids} == {out["node"]}  # ran on the node that holds its devices
    for i, (_, mib, _) in enumerate(devices):
        assert env[f"CUDA_DEVICE_MEMORY_LIMIT_{i}"] == f"{mib}m"
    assert f"CUDA_DEVICE_MEMORY_LIMIT_{len(devices)}" not in env
    assert env["CUDA_DEVICE_SM_LIMIT"] == str(devices[0][2])


def test_each_model_on_its_node(hami: RayCluster) -> None:
    models = _models()
    node_of = {d.uuid: n.name for n in api.status().nodes for d in n.devices}
    for gpu_type, gpus in (("V100", 2), ("A100", 1), ("T4", 1)):
        out = ray.get(probe.options(gpu_type=gpu_type, gpus=gpus, gpu_memory="25%").remote(), timeout=120)
        _check_isolation(out, node_of)
        assert all(gpu_type in models[u] for u, _, _ in out["devices"])
        assert len(out["devices"]) == gpus
    assert wait_until(lambda: live_leases() == 0)


def test_thousand_mixed_tasks_never_exceed_a_device(hami: RayCluster) -> None:
    """1,000 tasks of five shapes over both nodes: every task sees exactly its slice, no device ever
    holds more than it has (from the tasks' own spans and from each node actor's high-water mark), the
    node actors' ledgers recount clean and end empty.

    Two shapes go where the policy puts them; the other three name a model, so that every device serves
    whatever the machine's speed: under binpack, which devices the free shapes reach depends on how many
    slices are held at once (lanes hold more on a fast machine), and a CPU hog once left the V100s idle."""
    shapes = [probe, probe.options(gpu_memory="40%", gpu_cores=40),
              probe.options(gpus=2, gpu_type="V100", gpu_memory="8GiB", gpu_cores=20),
              probe.options(gpus=2, gpu_type="A100", gpu_memory="25%", gpu_cores=30),
              probe.options(gpu_type="T4", gpu_memory="4GiB", gpu_cores=25)]
    refs = [shapes[i % len(shapes)].remote(0.002 * (i % 4)) for i in range(1000)]
    outs = ray.get(refs, timeout=600)
    node_of = {d.uuid: n.name for n in api.status().nodes for d in n.devices}
    capacity = {d.uuid: (d.memory_mib, d.core_capacity) for n in api.status().nodes for d in n.devices}
    events = []
    for out in outs:
        _check_isolation(out, node_of)
        start, end = out["span"]
        for uuid, mib, cores in out["devices"]:
            events += [(start, 1, uuid, mib, cores), (end, 0, uuid, -mib, -cores)]  # ends first at a tie
    held = {u: [0, 0] for u in capacity}
    for _, _, uuid, mib, cores in sorted(events):
        held[uuid][0] += mib
        held[uuid][1] += cores
        assert held[uuid][0] <= capacity[uuid][0] and held[uuid][1] <= capacity[uuid][1], (uuid, held[uuid])
    served = {u for out in outs for u, _, _ in out["devices"]}
    assert served == set(capacity), f"devices never used: {sorted(set(capacity) - served)}"
    assert wait_until(lambda: live_leases() == 0, timeout=60), api.status().leases
    assert_node_actors_empty_and_never_over()


def test_removed_node_leases_are_lost_and_the_rest_keep_running(hami: RayCluster) -> None:
    extra = hami.add_node("1xA10-24GB")
    assert wait_until(lambda: any("A10" in m and "A100" not in m for m in _models().values()), timeout=60)

    @hami_ray.remote(gpu_memory="4GiB")
    class Holder:
        def where(self) -> str:
            return ray.get_runtime_context().get_node_id()

    doomed = Holder.options(gpu_type="A10", exclude_gpu_type="A100").remote()
    survivor = Holder.options(gpu_type="V100").remote()
    doomed_node = ray.get(doomed.where.remote(), timeout=60)
    ray.get(survivor.where.remote(), timeout=60)
    (lease,) = [x for x in api.status().leases if x.allocation.node == doomed_node]
    hami.cluster.remove_node(extra)
    assert wait_until(lambda: lease.lease_id in {x.lease_id for x in api.lost_leases()}, timeout=60)
    lost = next(x for x in api.lost_leases() if x.lease_id == lease.lease_id)
    assert lost.state == "lost"
    assert doomed_node not in {n.name for n in api.status().nodes}
    assert ray.get(survivor.where.remote(), timeout=30)  # the rest keep running
    assert [x.owner for x in api.status().leases] == ["actor:Holder"]
    ray.kill(survivor)
    assert wait_until(lambda: live_leases() == 0, timeout=20)


def test_a_full_cluster_queues_without_processes_and_drains_in_order(hami: RayCluster) -> None:
    """The only T4 is held whole; 300 whole-T4 tasks wait (queued to a few lane workers, each one request
    in the placement actor's queue; no process per task), one of high priority submitted last; once the
    T4 frees they run one at a time: priority first, then in submission order."""

    @hami_ray.remote(gpus=1, gpu_type="T4")
    def turn(i: int) -> tuple[int, float]:
        return i, time.monotonic()

    ray.get(turn.remote(-1), timeout=120)  # the worker of this shape exists before we count
    with api.lease(gpus=1, gpu_type="T4", preemptible=False):  # held whole throughout: the urgent task may not take it
        before = ray_worker_processes()
        refs = [turn.remote(i) for i in range(300)]
        urgent = turn.options(priority=10).remote(1000)
        lanes = api._lanes
        waiting = 301 if lanes is None else lanes.waiting_lanes()  # MAX_PENDING for the 300, one for the urgent
        assert waiting <= MAX_PENDING + 1
        assert wait_until(lambda: api.queue_depth() == waiting, timeout=60)
        time.sleep(1.0)
        assert ray_worker_processes() <= before + waiting
    ran = ray.get(refs + [urgent], timeout=300)
    order = [i for i, _ in sorted(ran, key=lambda x: x[1])]
    assert order == [1000] + list(range(300))
    assert wait_until(lambda: live_leases() == 0)


def test_plain_ray_num_gpus_never_lands_on_sliced_devices(hami: RayCluster) -> None:
    """hami-ray's nodes give Ray no GPUs (``--num-gpus 0``): a plain ``num_gpus=1`` task cannot land on a
    device hami-ray slices, it waits for a GPU Ray itself counts. A node where Ray also counts GPUs is named
    in status. ``hami_ray.remote(num_gpus=f)`` is a slice of fraction ``f`` (issue 13)."""
    @ray.remote(num_gpus=1)
    def plain() -> str:
        return ray.get_runtime_context().get_node_id()

    @hami_ray.remote(num_gpus=0.25, gpu_type="V100")
    def sliced() -> tuple[int, int]:
        info = hami_ray.current_slice()
        assert info is not None
        return info.devices[0].memory_mib, info.devices[0].cores

    assert ray.get(sliced.remote(), timeout=120) == (8192, 25)  # a quarter of a 32 GiB V100
    ref = plain.remote()
    ready, _ = ray.wait([ref], timeout=3)  # hami-ray's nodes offer Ray no GPU: nothing to land on
    assert not ready
    extra = hami.add_node("1xA10-24GB", num_gpus=1)  # a misconfigured node: Ray counts its GPU too
    try:
        assert wait_until(lambda: any(n.warnings for n in api.status().nodes), timeout=60)
        (node,) = [n for n in api.status().nodes if n.warnings]
        assert "--num-gpus 0" in node.warnings[0]
        assert ray.get(ref, timeout=60) == node.name  # and there the plain task lands
    finally:
        ray.cancel(ref, force=True)
        hami.cluster.remove_node(extra)
    assert wait_until(lambda: not any(n.warnings for n in api.status().nodes), timeout=60)
    assert wait_until(lambda: live_leases() == 0)
