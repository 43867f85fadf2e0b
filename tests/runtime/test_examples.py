"""Every script in examples/ runs on the shared cluster and does what it says."""

from __future__ import annotations

import pytest

from examples import burst, data_pipeline, gang, overrun, self_sizing, serve_models, shared_inference
from tests.runtime.conftest import RayCluster, live_leases, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")]


def readable(line: str) -> bool:
    """A sentence for people, not a Python repr."""
    return bool(line) and not any(c in line for c in "{}[]") and "\n" not in line


def test_shared_inference_pool(hami: RayCluster) -> None:
    out = shared_inference.main(replicas=4, requests=16)
    assert out["answers"] == 16 and readable(shared_inference.summary(out))
    for replica in out["replicas"]:
        assert replica["visible"] == ",".join(replica["devices"]) and replica["cores"] == 25
    assert wait_until(lambda: live_leases() == 0, timeout=20)


def test_burst_queues_then_drains(hami: RayCluster) -> None:
    out = burst.main(tasks=40)  # 5 GPUs x 2 half slices = 10 at once; 30 wait
    assert out["most_at_once"] <= 10 and out["waited"] >= 30 and out["devices_used"] >= 2
    assert readable(burst.summary(out))
    assert wait_until(lambda: live_leases() == 0)


def test_overrun_is_stopped(hami: RayCluster) -> None:
    out = overrun.main()
    assert out["stopped"] and out["used_mib"] == 3072 and out["limit_mib"] == 2048
    assert readable(overrun.summary(out))
    assert wait_until(lambda: live_leases() == 0)


def test_gang_runs_a_rank_in_each_slice(hami: RayCluster) -> None:
    out = gang.main(world=4)
    assert out["ranks"] == [0, 1, 2, 3] and len(out["nodes"]) == 1  # PACK: one node holds all four
    assert readable(gang.summary(out))
    assert wait_until(lambda: live_leases() == 0)


def test_a_server_sizes_itself_from_its_slice(hami: RayCluster) -> None:
    out = self_sizing.main(servers=2)
    for server in out["servers"]:
        assert server["memory_fraction"] == 0.25 and server["jax"] == "0.25"
        assert server["pool_mib"] <= server["slice_mib"]  # the engine's pool fits in the slice
    assert readable(self_sizing.summary(out))
    assert wait_until(lambda: live_leases() == 0)


def test_serve_models_answer_over_http_from_packed_slices(hami: RayCluster) -> None:
    from ray import serve  # noqa: PLC0415

    try:
        out = serve_models.main(requests=12)
    finally:
        serve.shutdown()
    assert out["replicas"] == 4 and out["devices"] < 4 and out["requests"] == 12 and out["answered_by"] >= 1
    assert readable(serve_models.summary(out))
    assert wait_until(lambda: live_leases() == 0, timeout=60)


def test_data_pipeline_runs_a_pool_larger_than_the_gpus(hami: RayCluster) -> None:
    out = data_pipeline.main(rows=200, pool=6)
    assert out["rows"] == 200 and out["pool"] > out["whole_gpus"] and 1 <= out["slices_used"] <= 6
    assert readable(data_pipeline.summary(out))
    assert wait_until(lambda: live_leases() == 0, timeout=60)
