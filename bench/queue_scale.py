"""10,000 requests submitted to a full cluster wait without processes of their own, then drain in order
once capacity frees; the placement actor's memory is read meanwhile.

With lanes (the default) the tasks queue to a few lane workers that wait for the slice as one request
each in the placement actor's queue; with ``HAMI_RAY_LANES=0`` each task waits there as a coroutine.

    python bench/queue_scale.py --json out/queue_scale.json [--requests 10000]

One local Ray node with one simulated T4; the driver holds it whole (``hami_ray.lease``), submits the
requests (each wants the whole T4, so they run strictly one after another), waits until all are queued,
counts Ray worker processes and the placement actor's resident memory, then lets go and checks that the
tasks started in submission order. Writes ``requests``, ``queued``, ``submit_s``, ``worker_processes_before``
/ ``_while_waiting``, ``placement_rss_mb_idle`` / ``_while_waiting``, ``drain_s``, ``drained_in_order``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import ray

import hami_ray
from bench_io import local_hami, report
from hami_ray.runtime import api
from hami_ray.runtime.loopback import ray_worker_processes


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def turn(i: int) -> tuple[int, float]:
    return i, time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--requests", type=int, default=10_000)
    args = parser.parse_args()
    n = args.requests
    with local_hami("1xT4-16GB"):
        task = hami_ray.remote(gpus=1, gpu_type="T4")(turn)
        ray.get(task.remote(-1))  # the slice worker exists before counting
        expect_queued = 1 if api._lanes else n
        status = ray.get(api._handle().status.remote())
        pid = status["pid"]
        rss_idle = rss_mb(pid)
        with api.lease(gpus=1, gpu_type="T4"):
            before = ray_worker_processes()
            t0 = time.perf_counter()
            refs = [task.remote(i) for i in range(n)]
            submit_s = time.perf_counter() - t0
            deadline = time.monotonic() + 600
            # every request waits: in the placement actor's queue (one entry per waiting lane, or per task
            # without lanes), or queued behind it to a lane's worker
            while api.queue_depth() < min(n, expect_queued) and time.monotonic() < deadline:
                time.sleep(0.5)
            queued = api.queue_depth()
            time.sleep(2.0)
            waiting = ray_worker_processes()
            rss_waiting = rss_mb(pid)
            driver_rss = rss_mb(os.getpid())
            lanes = dataclasses.asdict(api._lanes.stats) if api._lanes else {}
        t1 = time.perf_counter()
        ran = ray.get(refs, timeout=1800)
        drain_s = time.perf_counter() - t1
        order = [i for i, _ in sorted(ran, key=lambda x: x[1])]
        result = {
            "requests": n, "queued": queued, "submit_s": round(submit_s, 2),
            "worker_processes_before": before, "worker_processes_while_waiting": waiting,
            "placement_rss_mb_idle": round(rss_idle, 1), "placement_rss_mb_while_waiting": round(rss_waiting, 1),
            "driver_rss_mb_while_waiting": round(driver_rss, 1), "lanes": lanes,
            "drain_s": round(drain_s, 1), "drain_tasks_per_s": round(n / drain_s, 1),
            "drained_in_order": order == list(range(n)),
        }
        report(result, args.json)


if __name__ == "__main__":
    main()
