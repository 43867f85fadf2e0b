"""Every script in examples/ runs on the shared cluster and does what it says."""

from __future__ import annotations

import pytest

from examples import burst, gang, overrun, self_sizing, shared_inference
from tests.runtime.conftest import RayCluster, live_leases, wait_until

pytestmark = pytest.mark.ray


def test_shared_inference_pool(hami: RayCluster) -> None:
    out = shared_inference.main(replicas=4, requests=16)
    assert out["answers"] == 16
    for replica in out["replicas"]:
        assert replica["visible"] == ",".join(replica["devices"]) and replica["cores"] == 25
    assert wait_until(lambda: live_leases() == 0, timeout=20)


def test_burst_queues_then_drains(hami: RayCluster) -> None:
    out = burst.main(tasks=40)  # 5 GPUs x 2 half slices = 10 at once; 30 wait
    assert out["most_at_once"] <= 10 and out["waited"] >= 30 and out["devices_used"] >= 2
    assert wait_until(lambda: live_leases() == 0)


def test_overrun_is_stopped(hami: RayCluster) -> None:
    out = overrun.main()
    assert out["stopped"] and out["used_mib"] == 3072 and out["limit_mib"] == 2048
    assert wait_until(lambda: live_leases() == 0)


def test_gang_runs_a_rank_in_each_slice(hami: RayCluster) -> None:
    out = gang.main(world=4)
    assert out["ranks"] == [0, 1, 2, 3] and len(out["nodes"]) == 1  # PACK: one node holds all four
    assert wait_until(lambda: live_leases() == 0)


def test_a_server_sizes_itself_from_its_slice(hami: RayCluster) -> None:
    out = self_sizing.main(servers=2)
    for server in out["servers"]:
        assert server["memory_fraction"] == 0.25 and server["jax"] == "0.25"
        assert server["pool_mib"] <= server["slice_mib"]  # the engine's pool fits in the slice
    assert wait_until(lambda: live_leases() == 0)
