"""A user's driver on the driver host of the multi-host suite: ``python driver.py HEAD_IP:PORT MY_IP CMD ...``.

It connects to the cluster as a user would (``ray.init(address=...)``, then ``hami_ray.init()``), does one
thing, and prints its findings as one JSON line (the last line of its output). Run by
``tests/multihost/test_multihost.py`` through :meth:`tests.multihost.hosts.Host.run`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray

import hami_ray
from hami_ray.runtime import api


def by_ip() -> dict[str, str]:
    """Ray node id -> the host's address."""
    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}


def out(body: dict[str, Any]) -> None:
    print(json.dumps(body), flush=True)


def setup(state_root: str, expected: int) -> None:
    hami_ray.init(state_root=state_root, agent={"grace_s": 0.5, "reap_interval_s": 0.5, "tolerance_mib": 0},
                  metrics_port=None)
    deadline = time.monotonic() + 120
    while len(hami_ray.status().nodes) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    ips = by_ip()
    out({"nodes": [{"ip": ips.get(n.name), "models": sorted(d.model for d in n.devices)}
                   for n in hami_ray.status().nodes]})


@hami_ray.remote(gpu_memory="8GiB", gpu_cores=20)
def where() -> dict[str, Any]:
    info = hami_ray.current_slice()
    assert info is not None
    return {"slice_node": info.node, "ran_on": ray.get_runtime_context().get_node_id(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "uuid": info.devices[0].uuid,
            "pid": os.getpid(), "isolation": info.isolation}


@hami_ray.remote(gpu_memory="40GiB", gpu_type="A100")
def hold_a100(seconds: float) -> tuple[str, float, float]:
    info = hami_ray.current_slice()
    assert info is not None
    start = time.time()
    time.sleep(seconds)
    return info.devices[0].uuid, start, time.time()


def place() -> None:
    ips = by_ip()
    spread = ray.get([where.options(gpu_type=model).remote() for model in ("A100", "T4", "V100") for _ in range(2)],
                     timeout=300)
    for row in spread:
        row["host"] = ips.get(row["ran_on"])
    # 10 slices of 40 GiB on 2 A100s: 4 at a time, the rest wait in the queue
    spans = ray.get([hold_a100.remote(0.3) for _ in range(10)], timeout=300)
    out({"spread": spread, "spans": spans})


def hold() -> None:
    with hami_ray.lease(gpu_memory="2GiB", gpu_type="T4") as held:
        out({"lease_id": held.lease_id, "node": held.lease.allocation.node, "pid": os.getpid()})
        time.sleep(600)


@hami_ray.remote(gpu_memory="4GiB", gpu_type="T4")
def overrun() -> str:
    hami_ray.runtime.api.report_simulated_memory(6144)  # what NVML would report: more than the slice
    time.sleep(60)
    return "not stopped"


def enforce() -> None:
    try:
        got: Any = ray.get(overrun.remote(), timeout=120)
        out({"result": got})
    except Exception as exc:  # noqa: BLE001 - the verdict is what we report
        cause = getattr(exc, "cause", exc)
        out({"error": type(cause).__name__, "action": getattr(cause, "action", None), "message": str(exc)[-300:]})


def _lease_times(count: int) -> list[float]:
    times = []
    for _ in range(count):
        t0 = time.monotonic()
        with hami_ray.lease(gpu_memory="1GiB", gpu_type="T4"):
            pass
        times.append(time.monotonic() - t0)
    return times


def blackhole(go: str, count: int = 5) -> None:
    """Time ``count`` leases, print where the placement actor's fast path listens, wait for the test to drop
    packets to it, then time ``count`` leases again."""
    import ray.experimental.internal_kv as kv  # noqa: PLC0415

    baseline = _lease_times(count)
    where = json.loads(kv._internal_kv_get("placement-fastpath", namespace="hami-ray"))
    out({"fastpath": [where["host"], where["port"]]})
    while not Path(go).exists():
        time.sleep(0.05)
    times = _lease_times(count)
    breaker = api._calls.fast.breaker if api._calls is not None else None  # noqa: SLF001
    out({"baseline_s": baseline, "lease_s": times, "breaker": getattr(breaker, "last", None)})


def after_kill(expected_lost: str) -> None:
    deadline = time.monotonic() + 120
    lost: list[str] = []
    while time.monotonic() < deadline:
        lost = [x.lease_id for x in hami_ray.lost_leases()]
        if expected_lost in lost:
            break
        time.sleep(0.5)
    ips = by_ip()
    done = ray.get([where.remote() for _ in range(6)], timeout=300)
    out({"lost": lost, "ran_on": sorted({ips.get(r["ran_on"], "?") for r in done}),
         "nodes": len(hami_ray.status().nodes)})


def status() -> None:
    out({"leases": {x.lease_id: x.holder for x in hami_ray.status().leases}})


def main() -> None:
    address, my_ip, command, *rest = sys.argv[1:]
    ray.init(address=address, _node_ip_address=my_ip, log_to_driver=False, configure_logging=False)
    if command == "setup":
        setup(rest[0], int(rest[1]))
        return
    hami_ray.init()  # joins: the settings are the first driver's
    {"place": place, "hold": hold, "enforce": enforce, "status": status}.get(command, lambda: None)()
    if command == "blackhole":
        blackhole(rest[0], int(rest[1]) if len(rest) > 1 else 5)
    elif command == "after_kill":
        after_kill(rest[0])


if __name__ == "__main__":
    main()
