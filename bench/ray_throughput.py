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

Then (``--serve``, the default; ``--no-serve`` skips it) Ray Serve requests/s through Serve's own HTTP
proxy (``proxy_location="HeadOnly"`` on 127.0.0.1), on the same cluster, for one class body deployed two
ways with the same number of replicas (``--serve-replicas``, spread evenly over the GPUs):

- ``hami_ray.serve.deployment(gpu_memory=, gpu_cores=)``: each replica takes its share of a device as a
  slice before ``__init__``;
- ``serve.deployment(ray_actor_options={"num_gpus": 1 / replicas_per_gpu})``: Ray's bookkeeping only.

The handler returns the replica's ``CUDA_VISIBLE_DEVICES`` and pid. Each run deploys the app, waits until
the route answers, sends an untimed warm-up (a tenth of the requests, at least ten per client), then
times ``--serve-requests`` requests from ``--serve-clients`` threads, each on its own keep-alive
``http.client`` connection (the requests are handed out one at a time, so all clients end together);
then the app is deleted and, for the slices, the ledger is polled until its slices are free. One
untimed run of the ``num_gpus`` way goes first (in trial runs the first run after the task benchmarks
was the slowest of a bench), then the two ways alternate in ABBA order (slices, num_gpus, num_gpus,
slices, ...: ``--serve-rounds`` runs of each, ``serve_order``), which cancels a linear drift. Writes
the medians ``serve_slices_rps`` and ``serve_num_gpus_rps``, their ratio ``serve_slices_vs_num_gpus``,
the per-run values (``*_rounds``), how many replicas answered, and ``serve_slices_env_checked``: whether
every answer of a slice run carried as ``CUDA_VISIBLE_DEVICES`` the uuid of a slice that the ledger held for
a ``serve:`` owner of that run, one slice per replica throughout, and no device answered from more
replica processes than it held slices for.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray

import hami_ray
from bench_io import local_hami, report
from hami_ray.runtime import api

TASKS = 200
GPUS = 2
SLICES = 4 * GPUS
DEVICE_MIB = 16384  # simulated T4-16GB
SERVE_REPLICAS = 4
SERVE_REQUESTS = 1000
SERVE_CLIENTS = 8
SERVE_ROUNDS = 2
SERVE_ROUTE = "/bench"
SERVE_REPLICA_CPUS = 0.05
SERVE_WAIT_S = 120.0
SERVE_STALL_S = 60.0


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


class Answer:
    """The Serve handler of both deployments: what the replica's process sees."""

    def __call__(self, request: object) -> dict[str, object]:
        return {"cvd": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "pid": os.getpid()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], what: str, timeout: float = SERVE_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)


def serve_leases(app: str) -> list[hami_ray.Lease]:
    return [lease for lease in hami_ray.status().leases if lease.owner.startswith(f"serve:{app}/")]


def get(conn: http.client.HTTPConnection, route: str) -> tuple[int, bytes]:
    conn.request("GET", route)
    reply = conn.getresponse()
    return reply.status, reply.read()


def answers_ok(port: int, route: str) -> bool:
    """Whether the route answers 200 yet (Serve's proxy learns new routes a little after ``serve.run``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        return get(conn, route)[0] == 200
    except OSError:
        return False
    finally:
        conn.close()


def http_load(port: int, route: str, requests: int, clients: int) -> tuple[float, list[dict[str, Any]]]:
    """Requests per second for ``requests`` GETs of ``route`` from ``clients`` threads, each on its own
    keep-alive connection (opened before the clock starts), taking the next request from a shared count;
    and every answer. A non-200 answer or a failed request fails the run."""
    left = [requests]
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    answers: list[list[dict[str, Any]]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.connect()
            start.wait()
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                status, body = get(conn, route)
                if status != 200:
                    raise RuntimeError(f"{route}: HTTP {status}: {body[:200]!r}")
                answers[i].append(json.loads(body))
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)
            start.abort()
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass  # a client failed to connect: its error is raised below
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return requests / elapsed, [a for per_client in answers for a in per_client]


@dataclasses.dataclass
class ServeRun:
    rps: float
    replicas_answered: int
    env_checked: bool


def report_stall(app: str, deployed: threading.Event) -> None:
    """While ``app`` deploys, every ``SERVE_STALL_S``: what the ledger holds and who waits (on stderr)."""
    while not deployed.wait(SERVE_STALL_S):
        try:
            st = hami_ray.status()
        except Exception as exc:  # noqa: BLE001 - a diagnostic only
            print(f"{app}: still deploying; no status: {exc}", file=sys.stderr, flush=True)
            continue
        held = [f"{lease.owner}@{lease.allocation.devices[0].uuid[-8:]}" for lease in st.leases]
        waiting = [f"{w.owner} ({w.reason}, {w.waited_s:.0f} s)" for w in st.waiting]
        print(f"{app}: still deploying; ledger holds {held or 'nothing'}, waiting: {waiting or 'nobody'}",
              file=sys.stderr, flush=True)


def serve_run(deployment: Any, app: str, port: int, args: argparse.Namespace, sliced: bool) -> ServeRun:
    """Deploy ``deployment`` as ``app``, warm it up, time the HTTP load, delete it (for slices: and wait
    until the ledger has freed them)."""
    from ray import serve  # noqa: PLC0415 - only with --serve

    deployed = threading.Event()
    threading.Thread(target=report_stall, args=(app, deployed), daemon=True).start()
    try:
        serve.run(deployment.bind(), name=app, route_prefix=SERVE_ROUTE)
    finally:
        deployed.set()
    try:
        wait_for(lambda: answers_ok(port, SERVE_ROUTE), f"{app}: {SERVE_ROUTE} answering")
        http_load(port, SERVE_ROUTE, max(args.serve_clients * 10, args.serve_requests // 10), args.serve_clients)
        held = serve_leases(app)  # before the timed run: the slices its answers must name
        rps, answers = http_load(port, SERVE_ROUTE, args.serve_requests, args.serve_clients)
        env_checked = False
        if sliced:  # the ledger's leases record no pids: each answer names a held slice, no more pids per slice
            held_cvd = Counter(",".join(g.uuid for g in lease.allocation.devices) for lease in held)
            pids_per_cvd = Counter(cvd for _, cvd in {(a["pid"], a["cvd"]) for a in answers})
            still = {lease.lease_id for lease in serve_leases(app)}
            env_checked = (len(held) == args.serve_replicas and still == {lease.lease_id for lease in held}
                           and all(held_cvd[cvd] >= n for cvd, n in pids_per_cvd.items()))
        return ServeRun(rps, len({a["pid"] for a in answers}), env_checked)
    finally:
        serve.delete(app)
        wait_for(lambda: not serve_leases(app), f"{app}: slices freed")


def serve_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Serve requests/s, slices against Ray's ``num_gpus`` fractions, alternating (see the module)."""
    from ray import serve  # noqa: PLC0415 - only with --serve

    replicas = args.serve_replicas
    per_gpu = -(-replicas // GPUS)  # replicas sharing one device, as both ways place them
    options: dict[str, Any] = {"num_replicas": replicas}
    sliced = hami_ray.serve.deployment(gpu_memory=DEVICE_MIB // per_gpu, gpu_cores=100 // per_gpu,
                                       ray_actor_options={"num_cpus": SERVE_REPLICA_CPUS}, **options)(Answer)
    fractions = serve.deployment(ray_actor_options={"num_cpus": SERVE_REPLICA_CPUS, "num_gpus": 1 / per_gpu},
                                 **options)(Answer)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    runs: dict[str, list[ServeRun]] = {"slices": [], "num_gpus": []}
    order: list[str] = []
    try:
        # An untimed run first: in trial runs the first run after the task benchmarks was the slowest,
        # and in ABBA order it would always be a slice run.
        serve_run(fractions, "bench-warmup", port, args, sliced=False)
        for i in range(args.serve_rounds):  # ABBA: slices, num_gpus, num_gpus, slices, ...
            for way in ("slices", "num_gpus") if i % 2 == 0 else ("num_gpus", "slices"):
                deployment = sliced if way == "slices" else fractions
                runs[way].append(serve_run(deployment, f"bench-{way.replace('_', '-')}-{i}", port, args,
                                           sliced=way == "slices"))
                order.append(way)
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
    slices_rps = statistics.median(r.rps for r in runs["slices"])
    num_gpus_rps = statistics.median(r.rps for r in runs["num_gpus"])
    return {
        "serve_replicas": replicas,
        "serve_requests": args.serve_requests,
        "serve_clients": args.serve_clients,
        "serve_rounds": args.serve_rounds,
        "serve_route": SERVE_ROUTE,
        "serve_order": ["num_gpus (untimed)", *order],
        "serve_proxy": "HeadOnly, HTTP keep-alive",
        "serve_slice_per_replica": {"gpu_memory_mib": DEVICE_MIB // per_gpu, "gpu_cores": 100 // per_gpu},
        "serve_num_gpus_per_replica": round(1 / per_gpu, 4),
        "serve_slices_rps": round(slices_rps, 2),
        "serve_num_gpus_rps": round(num_gpus_rps, 2),
        "serve_slices_vs_num_gpus": round(slices_rps / num_gpus_rps, 2),
        "serve_slices_rps_rounds": [round(r.rps, 2) for r in runs["slices"]],
        "serve_num_gpus_rps_rounds": [round(r.rps, 2) for r in runs["num_gpus"]],
        "serve_replicas_answered": {k: [r.replicas_answered for r in v] for k, v in runs.items()},
        "serve_slices_env_checked": all(r.env_checked for r in runs["slices"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tasks", type=int, default=TASKS)
    parser.add_argument("--roundtrips", type=int, default=500)
    parser.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure Ray Serve requests/s: slices against num_gpus fractions")
    parser.add_argument("--serve-requests", type=int, default=SERVE_REQUESTS, help="timed requests per run")
    parser.add_argument("--serve-replicas", type=int, default=SERVE_REPLICAS)
    parser.add_argument("--serve-clients", type=int, default=SERVE_CLIENTS)
    parser.add_argument("--serve-rounds", type=int, default=SERVE_ROUNDS, help="runs of each way, alternating")
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
        }
        if args.serve:
            time.sleep(2)  # let the default run's exiting processes go first
            result.update(serve_bench(args))
        result["meta"] = {"python": platform.python_version(), "ray": ray.__version__, "cpus": os.cpu_count()}
        report(result, args.json)


if __name__ == "__main__":
    main()
