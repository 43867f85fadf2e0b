"""Ray Data's actor pools on slices (``map_batches(hami_ray.sliced(Model, ...), compute=ActorPoolStrategy(size=N))``), on the
shared local Ray with simulated devices: more pool actors than the cluster has whole GPUs."""

from __future__ import annotations

import os
import threading

import pytest

import hami_ray
from hami_ray.runtime import api
from tests.runtime.conftest import RayCluster, wait_until

# Ray Data 2.60 warns about its own defaults when a dataset starts
pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")]
data = pytest.importorskip("ray.data")

POOL = 6  # the shared cluster has 5 whole GPUs (2 A100, 1 T4 on the head; 2 V100 on the worker)


class Model:
    def __init__(self) -> None:
        s = hami_ray.current_slice()
        assert s is not None  # the slice is in place before the user's __init__ runs
        self.lease = s.lease_id
        self.visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")

    def __call__(self, batch: dict[str, object]) -> dict[str, object]:
        import numpy as np  # noqa: PLC0415

        s = hami_ray.current_slice()
        assert s is not None and s.lease_id == self.lease
        n = len(batch["id"])  # type: ignore[arg-type]
        return {"id": batch["id"], "lease": np.array([self.lease] * n),
                "visible": np.array([self.visible] * n), "uuids": np.array([",".join(d.uuid for d in s.devices)] * n)}


def _data_leases() -> list[hami_ray.Lease]:
    return [lease for lease in api.status().leases if lease.owner == "data:Model"]


def test_an_actor_pool_larger_than_the_gpus_runs_to_completion_on_slices(hami: RayCluster) -> None:
    whole_gpus = sum(len(n.devices) for n in api.status().nodes)
    assert POOL > whole_gpus
    seen: dict[str, hami_ray.Lease] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for lease in _data_leases():
                seen[lease.lease_id] = lease
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        ds = data.range(300).map_batches(hami_ray.sliced(Model, gpu_memory="8GiB"), compute=data.ActorPoolStrategy(size=POOL),
                                         batch_size=10, num_cpus=0.05)
        rows = ds.take_all()
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert sorted(int(r["id"]) for r in rows) == list(range(300))  # the whole dataset, once
    used = {str(r["lease"]) for r in rows}
    assert 1 <= len(used) <= POOL
    assert used <= set(seen), (used, set(seen))  # every batch ran in a slice the ledger held for a pool actor
    assert len(seen) <= POOL
    for r in rows:
        assert r["visible"] == r["uuids"]  # the actor saw its slice's devices, nothing else
        assert seen[str(r["lease"])].allocation.slices[0][0].memory_mib == 8 * 1024
    assert wait_until(lambda: not _data_leases(), timeout=60), _data_leases()  # the pool's end frees them


class Stuck:
    def ready(self) -> bool:
        return True


def test_a_slice_granted_after_its_requester_died_is_freed_with_it(hami: RayCluster) -> None:
    """A pool actor that asks for its slice and is killed while the request waits (Ray Data cancels the
    actors still starting when a dataset ends): the placement actor grants the request all the same, later.
    The slice is bound to the dead process at the grant, so the node actor reaps it at once; it was held by
    nothing until the reservation's grace (10 minutes) ended (a CPU hog run, issue 15)."""
    import ray  # noqa: PLC0415
    from ray.exceptions import RayActorError  # noqa: PLC0415
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415

    (t4_node,) = [n.name for n in api.status().nodes if any("T4" in d.model for d in n.devices)]
    holder = ray.remote(num_cpus=0)(hami_ray.sliced(Stuck, gpus=1, gpu_type="T4"))
    with api.lease(gpus=1, gpu_type="T4", preemptible=False):  # the T4 held whole: the actor's request waits
        stuck = holder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(t4_node, soft=False)).remote()
        assert wait_until(lambda: api.queue_depth() == 1, timeout=60)
        ray.kill(stuck)
        with pytest.raises(RayActorError):
            ray.get(stuck.ready.remote(), timeout=60)
        assert api.queue_depth() == 1  # its request still waits: it is granted once the T4 frees
    assert wait_until(lambda: api.queue_depth() == 0, timeout=60)
    assert wait_until(lambda: not api.status().leases, timeout=30), api.status().leases
