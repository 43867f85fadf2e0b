"""Pods bound per second and the time from creation to binding, with hami-ray as hami-scheduler on the
real test cluster (``make k8s-bin``): 1,000 nodes of 8 simulated GPUs (HAMi register annotations), 5,000
pods of mixed slices.

    python bench/k8s_bind.py --json out/k8s_bind.json [--nodes 1000 --pods 5000]

Nodes are Node objects with HAMi's register annotation (no kubelet: binding is what is measured). Pods
are created from 4 threads; each pod's creation (when the create call returned) and binding (when a
watch saw its ``nodeName``) are timed on this machine's clock. The scheduler runs in this process.
Writes ``pods_per_s`` (pods / (last binding - first creation)), ``p50_s``, ``p99_s``, ``bound``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from kubernetes import client, config, watch

from bench_io import report
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=5000)
    args = parser.parse_args()
    proc, kubeconfig = start_cluster(Path(tempfile.mkdtemp(prefix="hami-k8s-bench-")))
    try:
        api = config.new_client_from_config(config_file=str(kubeconfig))
        api.configuration.connection_pool_maxsize = 16
        core = client.CoreV1Api(api)
        register = "".join(f"GPU-{{n}}-{i},10,16384,100,NVIDIA-Tesla T4,0,true:" for i in range(8))
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: core.create_node(client.V1Node(metadata=client.V1ObjectMeta(
                name=f"node-{n:04d}", annotations={"hami.io/node-nvidia-register": register.replace("{n}", str(n))}))),
                range(args.nodes)))
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="bench")))
        core.create_namespaced_service_account("bench", client.V1ServiceAccount(
            metadata=client.V1ObjectMeta(name="default")))
        created: dict[str, float] = {}
        bound: dict[str, float] = {}
        stop = threading.Event()

        def follow() -> None:
            for event in watch.Watch().stream(core.list_namespaced_pod, "bench", timeout_seconds=600):
                pod = event["object"]
                if pod.spec.node_name and pod.metadata.name not in bound:
                    bound[pod.metadata.name] = time.time()
                if stop.is_set() or len(bound) >= args.pods:
                    return

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        scheduler = PodScheduler(api)
        threading.Thread(target=scheduler.run, args=(stop,), daemon=True).start()
        time.sleep(1.0)

        def create(i: int) -> None:
            name = f"p{i:05d}"
            core.create_namespaced_pod("bench", client.V1Pod(
                metadata=client.V1ObjectMeta(name=name),
                spec=client.V1PodSpec(scheduler_name="hami-scheduler", containers=[client.V1Container(
                    name="main", image="busybox", resources=client.V1ResourceRequirements(limits=SHAPES[i % 4]))])))
            created[name] = time.time()

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(create, range(args.pods)))
        deadline = time.monotonic() + 1800
        while len(bound) < args.pods and time.monotonic() < deadline:
            time.sleep(0.5)
        stop.set()
        latencies = [bound[n] - created[n] for n in bound if n in created]
        span = max(bound.values()) - min(created.values()) if bound else float("nan")
        report({
            "nodes": args.nodes, "gpus": args.nodes * 8, "pods": args.pods, "bound": len(bound),
            "pods_per_s": round(len(bound) / span, 1) if bound else 0.0,
            "p50_s": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
            "p99_s": round(float(np.percentile(latencies, 99)), 3) if latencies else None,
            "seconds": round(span, 1), "cpus": os.cpu_count(),
        }, args.json)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
