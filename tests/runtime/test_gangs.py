"""Gangs of slices (``hami_ray.slice_group``), reserved all or none like Ray's placement groups: where they
land per strategy, tasks and actors run in a gang's slices, a waiting gang holds none of its slices, and a
gang larger than the cluster fails at once (issue 13). On the shared local cluster: the head has two
A100-80GB and a T4, the worker two V100-32GB."""

from __future__ import annotations

import threading

import pytest
import ray

import hami_ray
from hami_ray.core.errors import InvalidRequest, Unschedulable
from hami_ray.runtime import api
from tests.runtime.conftest import RayCluster, assert_node_actors_empty_and_never_over, live_leases, wait_until

pytestmark = pytest.mark.ray


@hami_ray.remote
def which() -> tuple[str, str]:
    info = hami_ray.current_slice()
    assert info is not None
    return info.lease_id, info.devices[0].uuid


@hami_ray.remote
class Worker:
    def where(self) -> str:
        info = hami_ray.current_slice()
        assert info is not None
        return info.lease_id


def test_pack_and_spread_and_work_in_each_slice(hami: RayCluster) -> None:
    with hami_ray.slice_group([{"gpu_memory": "40GiB", "gpu_type": "A100"}] * 3, strategy="STRICT_PACK") as packed:
        assert len(set(packed.nodes)) == 1 and len(packed) == 3
        got = ray.get([which.options(slice_group=packed, slice_index=i).remote() for i in range(3)], timeout=120)
        assert [lease for lease, _ in got] == [s.lease_id for s in packed.slices]  # each ran in its own slice
        worker = Worker.options(slice_group=packed, slice_index=1).remote()
        assert ray.get(worker.where.remote(), timeout=120) == packed.slices[1].lease_id
        ray.kill(worker)
        held = {x.lease_id: x for x in api.status().leases}
        assert all(held[s.lease_id].holder == "driver" for s in packed.slices)  # the tasks ended, the gang holds
    with hami_ray.slice_group([{"gpu_memory": "8GiB"}] * 2, strategy="STRICT_SPREAD") as spread:
        assert len(set(spread.nodes)) == 2
    assert wait_until(lambda: live_leases() == 0)
    assert_node_actors_empty_and_never_over()


def test_a_waiting_gang_holds_nothing_and_runs_when_it_fits(hami: RayCluster) -> None:
    """Four 40 GiB slices fit on the two A100s; two are held elsewhere, so a gang of three waits, holding
    none of its slices, until one more frees."""
    first = api.lease(gpu_memory="40GiB", gpu_type="A100")
    second = api.lease(gpu_memory="40GiB", gpu_type="A100")
    a, b = first.__enter__(), second.__enter__()
    got: list[object] = []
    waiting = threading.Thread(target=lambda: got.append(
        hami_ray.slice_group([{"gpu_memory": "40GiB", "gpu_type": "A100"}] * 3, strategy="PACK")))
    waiting.start()
    try:
        assert wait_until(lambda: api.queue_depth() == 1)
        for _ in range(10):  # while it waits: only the two leases are held, never part of the gang
            assert {x.lease_id for x in api.status().leases} == {a.lease_id, b.lease_id}
            assert waiting.is_alive()
        first.__exit__(None, None, None)
        waiting.join(timeout=120)
        assert not waiting.is_alive() and len(got) == 1
        group = got[0]
        assert isinstance(group, api.SliceGroup) and len(group) == 3
        group.release()
    finally:
        second.__exit__(None, None, None)
        waiting.join(timeout=120)
    assert wait_until(lambda: live_leases() == 0)


def test_a_gang_larger_than_the_cluster_fails_at_once(hami: RayCluster) -> None:
    with pytest.raises(Unschedulable, match="no node could ever hold"):
        hami_ray.slice_group([{"gpu_memory": "80GiB", "gpu_type": "A100"}] * 3, strategy="STRICT_PACK")
    with pytest.raises(Unschedulable, match="no node could ever hold"):
        hami_ray.slice_group([{"gpu_memory": "8GiB"}] * 3, strategy="STRICT_SPREAD")  # two nodes only
    with pytest.raises(InvalidRequest, match="unknown gang strategy"):
        hami_ray.slice_group([{"gpu_memory": "8GiB"}], strategy="SCATTER")
    with pytest.raises(InvalidRequest, match="slice_index"):
        with hami_ray.slice_group([{"gpu_memory": "8GiB"}]) as one:
            which.options(slice_group=one, slice_index=3)
    assert wait_until(lambda: live_leases() == 0)
