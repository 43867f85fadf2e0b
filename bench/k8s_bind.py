"""Pods bound per second and the time from creation to binding, with hami-ray as hami-scheduler on the
real test cluster (``make k8s-bin``): 1,000 kwok nodes of 8 simulated GPUs (HAMi register annotations),
5,000 pods of mixed slices.

    python bench/k8s_bind.py --json out/k8s_bind.json [--nodes 1000 --pods 5000 --rate 0 --process]

Nodes are Node objects with HAMi's register annotation and ``kwok.x-k8s.io/node=fake``: kwok (started by
the test cluster) plays their kubelets, so they are Ready, renew their leases, and every pod bound there
is started (its status patched to Running), load the API server carries as in a real cluster. Pods are
created from 4 threads (``--rate``: at most that many per second in all; 0: as fast as they go); each
pod's creation (when the create call returned) and binding (when a watch saw its ``nodeName``) are timed
on this machine's clock. The scheduler runs in this process (``--process``: as its own process, the
``hami-ray k8s scheduler`` command). Writes ``pods_per_s`` (pods / (last binding - first creation)),
``p50_s``, ``p99_s``, ``bound``, ``running`` (pods kwok started) and the CPU seconds of each process.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from kubernetes import config

from bench_io import report
from hami_ray.k8s.kubeapi import KubeApi
from hami_ray.k8s.scheduler import PodScheduler

REPO = Path(__file__).resolve().parents[1]
BINARY = REPO / ".k8s" / "bin" / "hami-k8s-cluster"
SHAPES = [{"nvidia.com/gpu": "1", "nvidia.com/gpumem": m, "nvidia.com/gpucores": c}
          for m, c in (("1024", "10"), ("2048", "20"), ("4096", "0"), ("8000", "30"))]


def start_cluster(state: Path) -> tuple[subprocess.Popen[bytes], Path]:
    proc = subprocess.Popen([str(BINARY), "-dir", str(state)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kubeconfig = state / "kubeconfig"
    deadline = time.monotonic() + 240
    while not kubeconfig.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the test cluster did not start (make k8s-bin)")
        time.sleep(0.2)
    return proc, kubeconfig


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children that were waited for (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out.extend(int(x) for x in text)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=0.0, help="pods created per second at most (0: no limit)")
    parser.add_argument("--process", action="store_true", help="the scheduler as its own process")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="hami-k8s-bench-"))
    proc, kubeconfig = start_cluster(state)
    sched_proc = None
    try:
        api = config.new_client_from_config(config_file=str(kubeconfig))
        api.configuration.connection_pool_maxsize = 16
        kube = KubeApi(api)
        register = "".join(f"GPU-{{n}}-{i},10,16384,100,NVIDIA-Tesla T4,0,true:" for i in range(8))
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: kube.post("/api/v1/nodes", {"metadata": {"name": f"node-{n:04d}", "annotations": {
                "kwok.x-k8s.io/node": "fake", "hami.io/node-nvidia-register": register.replace("{n}", str(n))}}}),
                range(args.nodes)))
        kube.post("/api/v1/namespaces", {"metadata": {"name": "bench"}})
        kube.post("/api/v1/namespaces/bench/serviceaccounts", {"metadata": {"name": "default"}})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # kwok has made them Ready
            nodes, _ = kube.list("/api/v1/nodes")
            ready = sum(1 for n in nodes for c in (n.get("status") or {}).get("conditions") or []
                        if c["type"] == "Ready" and c["status"] == "True")
            if ready >= args.nodes:
                break
            time.sleep(1.0)
        created: dict[str, float] = {}
        bound: dict[str, float] = {}
        running: set[str] = set()
        stop = threading.Event()
        _, version = kube.list("/api/v1/namespaces/bench/pods")

        def follow() -> None:
            try:
                watch_pods()
            except Exception:  # noqa: BLE001 - the cluster stopping at the end
                if not stop.is_set():
                    raise

        def watch_pods() -> None:
            rv = version
            while not stop.is_set():
                for kind, pod in kube.watch("/api/v1/namespaces/bench/pods", rv, timeout_s=30):
                    rv = pod["metadata"].get("resourceVersion", rv)
                    name = pod["metadata"].get("name")
                    if (pod.get("spec") or {}).get("nodeName") and name not in bound:
                        bound[name] = time.time()
                    if (pod.get("status") or {}).get("phase") == "Running":
                        running.add(name)
                    if stop.is_set():
                        return

        threading.Thread(target=follow, daemon=True).start()
        if args.process:
            sched_proc = subprocess.Popen([sys.executable, "-m", "hami_ray.cli", "k8s", "scheduler", "--kubeconfig",
                                           str(kubeconfig)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            scheduler = PodScheduler(api)
            threading.Thread(target=scheduler.run, args=(stop,), daemon=True).start()
        time.sleep(2.0)
        cpu0 = {"cluster": cpu_seconds(proc.pid), "kwok": sum(cpu_seconds(c) for c in children(proc.pid)),
                "bench": time.process_time()}
        if sched_proc is not None:
            cpu0["scheduler"] = cpu_seconds(sched_proc.pid)
        t0 = time.monotonic()
        interval = 4 / args.rate if args.rate > 0 else 0.0

        def create(worker: int) -> None:
            for i in range(worker, args.pods, 4):
                if interval:
                    wait = t0 + i / args.rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                name = f"p{i:05d}"
                kube.post("/api/v1/namespaces/bench/pods", {"metadata": {"name": name}, "spec": {
                    "schedulerName": "hami-scheduler", "containers": [
                        {"name": "main", "image": "busybox", "resources": {"limits": SHAPES[i % 4]}}]}})
                created[name] = time.time()

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(create, range(4)))
        deadline = time.monotonic() + 1800
        while len(bound) < args.pods and time.monotonic() < deadline:
            time.sleep(0.5)
        wall = time.monotonic() - t0
        cpu = {"cluster": cpu_seconds(proc.pid) - cpu0["cluster"],
               "kwok": sum(cpu_seconds(c) for c in children(proc.pid)) - cpu0["kwok"],
               "bench": time.process_time() - cpu0["bench"]}
        if sched_proc is not None:
            cpu["scheduler"] = cpu_seconds(sched_proc.pid) - cpu0["scheduler"]
        time.sleep(2.0)
        stop.set()
        latencies = [bound[n] - created[n] for n in bound if n in created]
        span = max(bound.values()) - min(created.values()) if bound else float("nan")
        report({
            "nodes": args.nodes, "gpus": args.nodes * 8, "pods": args.pods, "bound": len(bound),
            "running": len(running), "rate_limit": args.rate, "scheduler": "process" if args.process else "in-bench",
            "pods_per_s": round(len(bound) / span, 1) if bound else 0.0,
            "created_per_s": round(len(created) / (max(created.values()) - min(created.values())), 1),
            "p50_s": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
            "p99_s": round(float(np.percentile(latencies, 99)), 3) if latencies else None,
            "seconds": round(span, 1), "cpu_s": {k: round(v, 1) for k, v in cpu.items()}, "wall_s": round(wall, 1),
            "cpus": os.cpu_count(),
        }, args.json)
    finally:
        for p in (sched_proc, proc):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(timeout=60)


if __name__ == "__main__":
    main()
