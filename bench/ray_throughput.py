"""Throughput of 200 quarter-GPU tasks three ways, in one process and one Ray cluster, and the latency
of one lease round trip (acquire + release) through the placement actor.

    python bench/ray_throughput.py --json out/ray_throughput.json

1. Ray's own ``num_gpus=0.25`` with its defaults: GPU tasks get ``max_calls=1``, a new worker process
   per task (bookkeeping only: nothing stops a task from using the whole GPU).
2. Ray's ``num_gpus=0.25, max_calls=0``: workers reused, still no isolation.
3. ``hami_ray.remote(gpu_memory=<a quarter of the device>)``: a slice per task, visibility and HAMi-core
   limits in the worker's environment; every task's environment is checked against its slice.

No GPU is needed: Ray is told it has GPUs (``num_gpus``), hami-ray simulates the same count. Both
reusing variants are warmed alike first; Ray's default runs last, because the 200 processes it starts
and stops slow down whatever runs next. Writes ``ray_default_tasks_per_s``,
``ray_max_calls0_tasks_per_s``, ``hami_tasks_per_s``, the ratios, how many hami tasks went down a lane
(:mod:`hami_ray.runtime.lanes`), whether the node actors' high-water marks stayed within every device,
``lease_roundtrip_p50_ms`` / ``lease_roundtrip_p99_ms`` (acquire + release through the placement actor
as ``hami_ray.lease()`` and the lanes make them: over its fast path) and, beside them, the same two
calls as Ray actor calls and a no-op Ray call to that actor: the floor under a Ray-call round trip.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from pathlib import Path

import numpy as np
import ray

import hami_ray
from bench_io import local_hami, report
from hami_ray.runtime import api

TASKS = 200
GPUS = 2
SLICES = 4 * GPUS
DEVICE_MIB = 16384  # simulated T4-16GB


def task_body() -> tuple[int, str, str]:
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES", ""), os.environ.get("CUDA_DEVICE_MEMORY_LIMIT_0", "")


def node_actors_never_over() -> bool:
    """Every node actor's recount is clean and no device ever held more than it has (high-water marks)."""
    for node in api.status().nodes:
        audit = ray.get(ray.get_actor(f"hami-ray-node-{node.name}", namespace="hami-ray").audit.remote())
        for uuid, (mib, cores, slices) in audit["peak"].items():
            cap_mib, cap_cores, cap_slices = audit["capacity"][uuid]
            if mib > cap_mib or cores > cap_cores or slices > cap_slices:
                return False
    return True


def latencies(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Milliseconds of each of ``n`` calls of ``fn`` (after a few unmeasured ones)."""
    for _ in range(10):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def timed(submit, n: int) -> tuple[float, list[tuple[int, str, str]]]:  # type: ignore[no-untyped-def]
    """Tasks per second for ``n`` calls of ``submit`` (submitted at once, then all awaited)."""
    start = time.perf_counter()
    out = ray.get([submit() for _ in range(n)])
    return n / (time.perf_counter() - start), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tasks", type=int, default=TASKS)
    parser.add_argument("--roundtrips", type=int, default=500)
    args = parser.parse_args()
    n = args.tasks
    with local_hami(f"{GPUS}xT4-16GB", num_gpus=GPUS):
        ray_default = ray.remote(num_gpus=0.25)(task_body)
        ray_reuse = ray.remote(num_gpus=0.25, max_calls=0)(task_body)
        hami_task = hami_ray.remote(gpu_memory=DEVICE_MIB // 4)(task_body)
        warm = 2 * SLICES  # both pools alike: each reaches the processes it keeps for a burst
        ray.get([ray_reuse.remote() for _ in range(warm)])
        ray.get([hami_task.remote() for _ in range(warm)])
        time.sleep(2)  # let the warm-up's process starts finish before anything is timed
        # Ray's default (a new process per task) goes last: its 200 exiting processes would slow what follows.
        reuse_tps, _ = timed(ray_reuse.remote, n)
        lanes_before = dataclasses.replace(api._lanes.stats) if api._lanes else None
        hami_tps, hami_out = timed(hami_task.remote, n)
        lanes_after = api._lanes.stats if api._lanes else None
        uuids = {d.uuid for n in api.status().nodes for d in n.devices}
        isolated = all(cvd in uuids and limit == f"{DEVICE_MIB // 4}m" for _, cvd, limit in hami_out)
        never_over = node_actors_never_over()
        handle = api._handle()
        request = hami_ray.slice_request({"gpu_memory": 1024}).model_dump(mode="json")
        calls = api._calls_or_raise()

        def fast_roundtrip() -> None:  # what hami_ray.lease() and the lanes use
            grant = calls.call("acquire", request=request, owner="bench")
            lease = grant["lease"]
            calls.call("release", lease_id=lease["lease_id"], token=lease["token"], node=lease["allocation"]["node"])

        def ray_roundtrip() -> None:  # the same two calls as Ray actor calls
            grant = ray.get(handle.acquire.remote(request, "bench"))
            ray.get(handle.release.remote(grant["lease"]["lease_id"], grant["lease"]["token"]))

        times = latencies(fast_roundtrip, args.roundtrips)
        ray_times = latencies(ray_roundtrip, args.roundtrips)
        noop = latencies(lambda: ray.get(handle.ping.remote()), args.roundtrips)
        default_tps, default_out = timed(ray_default.remote, n)
        result = {
            "tasks": n,
            "ray_default_tasks_per_s": round(default_tps, 2),
            "ray_max_calls0_tasks_per_s": round(reuse_tps, 2),
            "hami_tasks_per_s": round(hami_tps, 2),
            "hami_vs_ray_default": round(hami_tps / default_tps, 2),
            "hami_vs_ray_max_calls0": round(hami_tps / reuse_tps, 2),
            "ray_default_worker_processes": len({pid for pid, _, _ in default_out}),
            "hami_worker_processes": len({pid for pid, _, _ in hami_out}),
            "hami_tasks_in_lanes": (lanes_after.tasks - lanes_before.tasks) if lanes_after and lanes_before else 0,
            "hami_isolation_env_checked": isolated,
            "hami_never_over_capacity": never_over,
            "lease_roundtrip_p50_ms": round(float(np.percentile(times, 50)), 3),
            "lease_roundtrip_p99_ms": round(float(np.percentile(times, 99)), 3),
            "lease_roundtrip_ray_calls_p50_ms": round(float(np.percentile(ray_times, 50)), 3),
            "placement_noop_ray_call_p50_ms": round(float(np.percentile(noop, 50)), 3),
            "meta": {"python": platform.python_version(), "ray": ray.__version__, "cpus": os.cpu_count()},
        }
        report(result, args.json)


if __name__ == "__main__":
    main()
