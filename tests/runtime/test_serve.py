"""Ray Serve replicas on slices (``hami_ray.serve.deployment``), on the shared local Ray with simulated
devices: HTTP through Serve's own proxy, packing by policy, autoscaling up and down, a replica's death."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import urllib.request
import warnings
from collections.abc import Iterator

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import hami_ray
from hami_ray.core.errors import InvalidRequest
from hami_ray.runtime import api
from tests.runtime.conftest import RayCluster, wait_until

pytestmark = pytest.mark.ray
serve = pytest.importorskip("ray.serve")

REPLICA = {"num_cpus": 0.05}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def http_port(hami: RayCluster) -> Iterator[int]:
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    try:
        yield port
    finally:
        serve.shutdown()
        assert wait_until(lambda: not _serve_leases(""), timeout=60), _serve_leases("")


def _serve_leases(app: str) -> list[hami_ray.Lease]:
    return [lease for lease in api.status().leases if lease.owner.startswith(f"serve:{app}")]


def _answer() -> dict[str, object]:
    s = hami_ray.current_slice()
    assert s is not None
    return {"lease": s.lease_id, "node": s.node, "uuids": [d.uuid for d in s.devices], "pid": os.getpid(),
            "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "isolation": s.isolation}


@hami_ray.serve.deployment(gpu_memory="10GiB", gpu_cores=10, num_replicas=6, ray_actor_options=REPLICA)
class Echo:
    def __init__(self) -> None:
        self.seen_at_init = hami_ray.current_slice()  # the slice is there before the user's __init__

    def __call__(self, request: object) -> dict[str, object]:
        assert self.seen_at_init is not None
        return {**_answer(), "init_lease": self.seen_at_init.lease_id}


def test_http_through_serves_proxy_each_replica_in_its_own_packed_slice(http_port: int) -> None:
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    try:
        held = {lease.lease_id: lease for lease in _serve_leases("echo/Echo#")}
        assert len(held) == 6, held  # one slice per replica, each its own owner
        assert len({lease.owner for lease in held.values()}) == 6
        per_device: dict[str, int] = {}
        for lease in held.values():
            (grant,) = lease.allocation.slices[0]
            assert grant.memory_mib == 10 * 1024 and grant.cores == 10
            per_device[grant.uuid] = per_device.get(grant.uuid, 0) + 1
        assert max(per_device.values()) >= 2 and len(per_device) < 6, per_device  # packed: replicas share GPUs

        answers = []
        for _ in range(20):
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/echo", timeout=30) as reply:
                answers.append(json.loads(reply.read()))
        for a in answers:
            assert a["lease"] in held and a["init_lease"] == a["lease"]
            lease = held[str(a["lease"])]
            assert a["uuids"] == [g.uuid for g in lease.allocation.slices[0]]
            assert a["cvd"] == ",".join(a["uuids"])  # type: ignore[arg-type]
            assert a["isolation"] in ("watchdog", "none", "hami-core", "mps", "mig")
    finally:
        serve.delete("echo")
    assert wait_until(lambda: not _serve_leases("echo/"), timeout=60), _serve_leases("echo/")


class Scaled:
    async def __call__(self, seconds: float) -> str:
        import asyncio  # noqa: PLC0415

        await asyncio.sleep(seconds)
        s = hami_ray.current_slice()
        return s.lease_id if s is not None else ""


def _scaled() -> object:
    with warnings.catch_warnings():  # Serve 2.60 deprecates metrics_interval_s, and still reads it
        warnings.simplefilter("ignore", DeprecationWarning)
        return hami_ray.serve.deployment(
            gpu_memory="8GiB", ray_actor_options=REPLICA, max_ongoing_requests=2,
            autoscaling_config={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
                                "upscale_delay_s": 0, "downscale_delay_s": 1, "metrics_interval_s": 0.2,
                                "look_back_period_s": 1})(Scaled)


def test_autoscaling_up_takes_slices_and_down_frees_them(http_port: int) -> None:
    handle = serve.run(_scaled().bind(), name="scaled", route_prefix="/scaled")
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            responses = [handle.remote(0.3) for _ in range(6)]
            for r in responses:
                r.result(timeout_s=60)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        assert wait_until(lambda: len(_serve_leases("scaled/")) == 3, timeout=120), _serve_leases("scaled/")
    finally:
        stop.set()
        loader.join(timeout=120)
    try:
        assert wait_until(lambda: len(_serve_leases("scaled/")) == 1, timeout=120), _serve_leases("scaled/")
        assert handle.remote(0).result(timeout_s=60) in {lease.lease_id for lease in _serve_leases("scaled/")}
    finally:
        serve.delete("scaled")
    assert wait_until(lambda: not _serve_leases("scaled/"), timeout=60)


@hami_ray.serve.deployment(gpu_memory="4GiB", num_replicas=1, ray_actor_options=REPLICA)
class Mortal:
    def __call__(self) -> dict[str, object]:
        return _answer()


def test_a_killed_replicas_slice_is_freed_and_its_replacement_gets_a_new_one(http_port: int) -> None:
    handle = serve.run(Mortal.bind(), name="mortal", route_prefix="/mortal")
    try:
        first = handle.remote().result(timeout_s=60)
        (before,) = _serve_leases("mortal/")
        assert before.lease_id == first["lease"]
        os.kill(int(first["pid"]), signal.SIGKILL)  # the replica's process, on this machine

        def replaced() -> bool:
            leases = _serve_leases("mortal/")
            return len(leases) == 1 and leases[0].lease_id != first["lease"]

        assert wait_until(replaced, timeout=120), _serve_leases("mortal/")
        assert first["lease"] not in {lease.lease_id for lease in api.status().leases}  # the old slice is free

        def answers_from_new() -> bool:
            try:
                again = handle.remote().result(timeout_s=10)
            except Exception:  # noqa: BLE001 - Serve still routing to the dead replica
                return False
            return again["pid"] != first["pid"] and again["lease"] == _serve_leases("mortal/")[0].lease_id

        assert wait_until(answers_from_new, timeout=120)
    finally:
        serve.delete("mortal")
    assert wait_until(lambda: not _serve_leases("mortal/"), timeout=60)


class Needy:
    def ping(self) -> str:
        s = hami_ray.current_slice()
        return s.lease_id if s is not None else ""


def test_a_node_that_could_never_hold_the_slice_fails_the_actor_with_the_nodes_that_could(hami: RayCluster) -> None:
    nodes = {n.name: n for n in api.status().nodes}
    t4_nodes = [name for name, n in nodes.items() if any(d.model == "T4-16GB" or "T4" in d.model for d in n.devices)]
    other = next(name for name in nodes if name not in t4_nodes)
    actor = ray.remote(num_cpus=0)(hami_ray.sliced(Needy, gpu_type="T4")).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(other, soft=False)).remote()
    with pytest.raises(ray.exceptions.RayActorError) as failed:
        ray.get(actor.ping.remote(), timeout=60)
    assert "could never hold" in str(failed.value) and t4_nodes[0] in str(failed.value)
    on_t4 = ray.remote(num_cpus=0)(hami_ray.sliced(Needy, gpu_type="T4", gpu_memory="1GiB")).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(t4_nodes[0], soft=False)).remote()
    lease_id = ray.get(on_t4.ping.remote(), timeout=60)
    assert lease_id in {lease.lease_id for lease in api.status().leases}
    ray.kill(on_t4)
    assert wait_until(lambda: lease_id not in {lease.lease_id for lease in api.status().leases}, timeout=60)


def test_bad_options_fail_at_decoration() -> None:
    with pytest.raises(InvalidRequest):
        hami_ray.sliced(Needy, gpu_memory="lots")
    with pytest.raises(InvalidRequest, match="not a slice keyword"):
        hami_ray.sliced(Needy, num_cpus=1)
    with pytest.raises(TypeError):
        hami_ray.sliced(lambda: None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="num_gpus"):
        hami_ray.serve.deployment(gpu_memory="1GiB", ray_actor_options={"num_gpus": 1})
    with pytest.raises(TypeError):
        hami_ray.serve.deployment(gpu_memory="1GiB")(lambda request: request)


def test_the_slice_is_taken_once_per_process(hami: RayCluster) -> None:
    @ray.remote(num_cpus=0)
    class Twice:
        def take(self) -> tuple[str, str]:
            from hami_ray.runtime.replicas import take_slice  # noqa: PLC0415
            from hami_ray.core.request import slice_request  # noqa: PLC0415

            req = slice_request({"gpu_memory": "1GiB"}).model_dump(mode="json")
            a = take_slice(req, "actor:Twice")["lease"]["lease_id"]
            b = take_slice(req, "actor:Twice")["lease"]["lease_id"]
            return a, b

    t = Twice.remote()
    a, b = ray.get(t.take.remote(), timeout=60)
    assert a == b
    assert [lease.owner for lease in api.status().leases if lease.lease_id == a] == ["actor:Twice"]
    ray.kill(t)
    assert wait_until(lambda: a not in {lease.lease_id for lease in api.status().leases}, timeout=60)


def test_a_hami_core_slice_taken_after_the_process_started_says_it_holds_at_watchdog(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from hami_ray.runtime.replicas import _started_env  # noqa: PLC0415

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    env = {"LD_PRELOAD": "/usr/local/vgpu/libvgpu.so", "HAMI_RAY_SLICE": json.dumps({"isolation": "hami-core"})}
    seen = json.loads(_started_env(env, "serve:a/B#c")["HAMI_RAY_SLICE"])
    assert seen["isolation"] == "watchdog" and "not preloaded" in seen["note"]
    monkeypatch.setenv("LD_PRELOAD", "/usr/local/vgpu/libvgpu.so")  # started with the preload: it holds
    assert _started_env(env, "serve:a/B#c") == env
