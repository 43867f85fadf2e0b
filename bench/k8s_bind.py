"""Pods bound per second and the time from creation to binding, by mode, on the real test cluster
(``make k8s-bin``): 1,000 kwok nodes of 8 simulated GPUs (HAMi's JSON register annotations), 5,000 pods.

    python bench/k8s_bind.py --mode kube-scheduler,extender,scheduler --json docs/k8s_bind.json
    python bench/k8s_bind.py --mode extender --nodes 50 --pods 300        # a quick look

Modes (issue 16), each on a fresh cluster, one after the other in the order given:

- ``scheduler``: ``hami-ray k8s scheduler``, the standalone bridge, as its own process, binding without
  HAMi's node lock (``--bind-mode direct``: hami-ray's own device plugin; ``auto`` would take the lock on
  these nodes, whose register annotations say HAMi's plugin, and nothing here would release it).
- ``hami-lock``: the same with ``--bind-mode hami-lock`` (HAMi's node lock before each bind). HAMi's device
  plugin releases the lock in its Allocate; here the bench plays that part: when a pod is seen bound, it
  sets the pod's ``hami.io/bind-phase`` to ``success`` and removes the node's lock if it names that pod.
  Skipped, with the reason, when the command has no ``--bind-mode``.
- ``extender``: the stock kube-scheduler (the test cluster's ``-scheduler-config``) with
  ``hami-ray k8s extender``, configured as HAMi's Helm chart configures its own extender: ``filterVerb``
  and ``bindVerb``, no prioritize, ``nodeCacheCapable: true``, ``weight: 1``, ``httpTimeout: 30s``,
  HAMi's resources ``ignoredByScheduler`` (plain HTTP on loopback: the chart's TLS is left out).
- ``kube-scheduler``: the same kube-scheduler without an extender, and pods without devices: the most
  this cluster binds, the ceiling for ``extender``.

kube-scheduler's client runs at ``--qps`` (500, burst twice that; upstream's default of 50 would be the
limit, not the scheduler: HAMi's own comparison run raised it to 500 too). Nodes are Node objects with
``kwok.x-k8s.io/node=fake``: kwok plays their kubelets (Ready, leases renewed, every pod bound there
started), load the API server carries as in a real cluster. After one warm-up pod is bound and deleted,
pods are created from 4 threads (``--rate``: at most that many per second in all; 0: as fast as they
go); each pod's creation (the create call returned) and binding (a watch saw its ``nodeName``) are timed
on this machine's clock. Per mode: ``pods_per_s`` (pods bound / (last binding - first creation)),
``p50_s``, ``p99_s``, ``bound``, ``running`` (pods kwok started), ``failed_scheduling`` (kube-scheduler's
events) and the CPU seconds of each process. Compare modes only within one run: the machine is shared.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from kubernetes import config
from kubernetes.client.exceptions import ApiException

from bench_io import report
from hami_ray.core.codec import RegisteredDevice, encode_node_register
from hami_ray.k8s.kubeapi import KubeApi

REPO = Path(__file__).resolve().parents[1]
BINARY = REPO / ".k8s" / "bin" / "hami-k8s-cluster"
MODES = ("scheduler", "hami-lock", "extender", "kube-scheduler")
STAND_IN_THREADS = 16  # HAMi's device plugins, Allocate by Allocate (one per node in a real cluster)
SCHEDULER = "hami-scheduler"  # the pods' schedulerName: the bridge's, and the kube-scheduler profile's
SHAPES = [{"nvidia.com/gpu": "1", "nvidia.com/gpumem": m, "nvidia.com/gpucores": c}
          for m, c in (("1024", "10"), ("2048", "20"), ("4096", "0"), ("8000", "30"))]
# HAMi's chart: charts/hami/templates/_helpers.tpl hami-vgpu.scheduler.managedResources (NVIDIA's)
MANAGED = ("nvidia.com/gpu", "nvidia.com/gpumem", "nvidia.com/gpumem-percentage", "nvidia.com/gpucores",
           "nvidia.com/priority")
LOCK = "hami.io/mutex.lock"
BIND_PHASE = "hami.io/bind-phase"
GPUS = 8


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scheduler_config(extender_url: str | None, qps: int) -> dict[str, Any]:
    """kube-scheduler's configuration: profile ``hami-scheduler``; with ``extender_url``, HAMi chart's
    extender stanza (charts/hami/templates/scheduler/configmap.yaml) pointing at hami-ray's extender."""
    cfg: dict[str, Any] = {"apiVersion": "kubescheduler.config.k8s.io/v1", "kind": "KubeSchedulerConfiguration",
                           "clientConnection": {"qps": qps, "burst": 2 * qps},
                           "profiles": [{"schedulerName": SCHEDULER}]}
    if extender_url:
        cfg["extenders"] = [{
            "urlPrefix": extender_url, "filterVerb": "filter", "bindVerb": "bind", "weight": 1,
            "nodeCacheCapable": True, "httpTimeout": "30s", "ignorable": False,
            "managedResources": [{"name": r, "ignoredByScheduler": True} for r in MANAGED]}]
    return cfg


def start_cluster(state: Path, sched_config: Path | None) -> tuple[subprocess.Popen[bytes], Path]:
    cmd = [str(BINARY), "-dir", str(state)] + (["-scheduler-config", str(sched_config)] if sched_config else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kubeconfig = state / "kubeconfig"
    deadline = time.monotonic() + 240
    while not kubeconfig.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the test cluster did not start (make k8s-bin)")
        time.sleep(0.2)
    return proc, kubeconfig


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children that were waited for (from /proc); 0 once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def component_pids(state: Path) -> dict[str, int]:
    """The test cluster's children by name (etcd, apiserver, controller-manager, kwok, kube-scheduler)."""
    return {p.stem: int(p.read_text()) for p in (state / "pids").glob("*.pid")}


@functools.cache
def has_bind_mode(command: str = "scheduler") -> bool:
    """Whether ``hami-ray k8s COMMAND`` takes ``--bind-mode`` (issue 16's HAMi-compatible bind mode)."""
    out = subprocess.run([sys.executable, "-m", "hami_ray.cli", "k8s", command, "--help"], capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "200"}, timeout=120)
    return "--bind-mode" in out.stdout


def register(node: int) -> str:
    """The node's NVIDIA register annotation as HAMi v2.10's device plugin writes it (JSON)."""
    return encode_node_register([RegisteredDevice(f"GPU-{node}-{i}", 10, 16384, 100, "NVIDIA-Tesla T4", index=i)
                                 for i in range(GPUS)])


def pod_body(name: str, mode: str, i: int) -> dict[str, Any]:
    resources = {} if mode == "kube-scheduler" else {"resources": {"limits": SHAPES[i % len(SHAPES)]}}
    return {"metadata": {"name": name}, "spec": {"schedulerName": SCHEDULER, "containers": [
        {"name": "main", "image": "busybox", **resources}]}}


class PluginStandIn:
    """What HAMi's device plugin does to the lock in Allocate, for ``hami-lock`` mode: the pod the node's
    lock names gets ``bind-phase: success`` and the lock goes (a JSON patch that tests the value first, so
    a newer lock of another pod stays). HAMi's plugin runs on every node, each Allocate independent of the
    other nodes'; here ``STAND_IN_THREADS`` threads play them, one call per pod seen bound (the CPU they
    take is counted in ``bench``)."""

    def __init__(self, kube: KubeApi) -> None:
        self.kube = kube
        self.pool = ThreadPoolExecutor(STAND_IN_THREADS)
        self.released = 0
        self.errors = 0

    def bound(self, pod: dict[str, Any]) -> None:
        self.pool.submit(self._allocate, pod["spec"]["nodeName"])

    def _allocate(self, node: str) -> None:
        try:
            lock = (self.kube.get(f"/api/v1/nodes/{node}")["metadata"].get("annotations") or {}).get(LOCK)
            if not lock or lock.count(",") != 2:
                return
            _, namespace, name = lock.split(",")
            self.kube.patch(f"/api/v1/namespaces/{namespace}/pods/{name}",
                            {"metadata": {"annotations": {BIND_PHASE: "success"}}})
            path = "/metadata/annotations/" + LOCK.replace("~", "~0").replace("/", "~1")
            self.kube.request("PATCH", f"/api/v1/nodes/{node}", [{"op": "test", "path": path, "value": lock},
                                                                 {"op": "remove", "path": path}],
                              content_type="application/json-patch+json")
            self.released += 1
        except ApiException:  # the lock changed meanwhile (422 from the test), the pod went
            self.errors += 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def start_bridge(mode: str, kubeconfig: Path, state: Path, extender_port: int) -> subprocess.Popen[bytes] | None:
    """The hami-ray process of ``mode`` (none for ``kube-scheduler``); the extender once it is ready."""
    base = [sys.executable, "-m", "hami_ray.cli", "k8s"]
    if mode == "kube-scheduler":
        return None
    if mode == "extender":
        cmd = base + ["extender", "--kubeconfig", str(kubeconfig), "--bind", f"127.0.0.1:{extender_port}",
                      "--scheduler-name", SCHEDULER]
        if has_bind_mode("extender"):  # as the scheduler mode: nodes of hami-ray's plugin, no lock
            cmd += ["--bind-mode", "direct"]
    else:
        cmd = base + ["scheduler", "--kubeconfig", str(kubeconfig)]
        if mode == "hami-lock":
            cmd += ["--bind-mode", "hami-lock"]
        elif has_bind_mode():  # the bench's nodes carry HAMi registers: `auto` would take HAMi's lock there
            cmd += ["--bind-mode", "direct"]
    log = (state / "hami-ray.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    if mode == "extender":
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the extender did not become ready: {(state / 'hami-ray.log').read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{extender_port}/readyz", timeout=2).status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
    return proc


def api_requests(kube: KubeApi) -> dict[str, int]:
    """The API server's requests so far (``apiserver_request_total``), per ``VERB resource[/subresource]``:
    what each mode asks of the API server, read from its own metrics."""
    text = kube._send("GET", "/metrics").read().decode()  # noqa: SLF001 - plain text, not JSON
    out: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.rindex("}")]))
        key = f"{labels.get('verb')} {labels.get('resource')}" + (
            f"/{labels['subresource']}" if labels.get("subresource") else "")
        out[key] = out.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out


def wait(what: str, done: Callable[[], bool], timeout: float, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not after {timeout:.0f} s")
        time.sleep(step)


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix=f"hami-k8s-bench-{mode}-"))
    extender_port = free_port()
    sched_config = None
    if mode in ("extender", "kube-scheduler"):
        sched_config = state / "scheduler-config.yaml"
        url = f"http://127.0.0.1:{extender_port}" if mode == "extender" else None
        sched_config.write_text(yaml.safe_dump(scheduler_config(url, args.qps)))
    proc, kubeconfig = start_cluster(state, sched_config)
    bridge = None
    stop = threading.Event()
    plugin = None
    try:
        api = config.new_client_from_config(config_file=str(kubeconfig))
        api.configuration.connection_pool_maxsize = 16
        kube = KubeApi(api)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: kube.post("/api/v1/nodes", {"metadata": {"name": f"node-{n:04d}", "annotations": {
                "kwok.x-k8s.io/node": "fake", "hami.io/node-nvidia-register": register(n)}}}), range(args.nodes)))
        kube.post("/api/v1/namespaces", {"metadata": {"name": "bench"}})
        try:  # the controller-manager's serviceaccount controller makes it too: whoever comes first
            kube.post("/api/v1/namespaces/bench/serviceaccounts", {"metadata": {"name": "default"}})
        except ApiException as exc:
            if exc.status != 409:
                raise

        def ready_nodes() -> bool:
            nodes, _ = kube.list("/api/v1/nodes")
            return sum(1 for n in nodes for c in (n.get("status") or {}).get("conditions") or []
                       if c["type"] == "Ready" and c["status"] == "True") >= args.nodes

        wait("kwok makes the nodes Ready", ready_nodes, 180, step=1.0)
        created: dict[str, float] = {}
        bound: dict[str, float] = {}
        warm = threading.Event()
        running: set[str] = set()
        plugin = None
        if mode == "hami-lock":  # its own connections: a pool the creators share would open and drop more
            plugin_api = config.new_client_from_config(config_file=str(kubeconfig))
            plugin_api.configuration.connection_pool_maxsize = STAND_IN_THREADS + 2
            plugin = PluginStandIn(KubeApi(plugin_api))
        _, version = kube.list("/api/v1/namespaces/bench/pods")

        def watch_pods() -> None:
            rv = version
            while not stop.is_set():
                try:
                    for _, pod in kube.watch("/api/v1/namespaces/bench/pods", rv, timeout_s=30):
                        rv = pod["metadata"].get("resourceVersion", rv)
                        name = pod["metadata"].get("name", "")
                        if name == "warmup" and warm.is_set():  # its deletion, seen after it was counted
                            continue
                        if (pod.get("spec") or {}).get("nodeName") and name not in bound:
                            bound[name] = time.time()
                            if plugin is not None:
                                plugin.bound(pod)
                        if (pod.get("status") or {}).get("phase") == "Running":
                            running.add(name)
                        if stop.is_set():
                            return
                except Exception:  # noqa: BLE001 - the cluster stopping at the end
                    if stop.is_set():
                        return
                    raise

        threading.Thread(target=watch_pods, daemon=True).start()
        bridge = start_bridge(mode, kubeconfig, state, extender_port)
        # one pod through the whole path first (informers synced, connections made), then deleted
        kube.post("/api/v1/namespaces/bench/pods", pod_body("warmup", mode, 0))
        wait(f"{mode}: the warm-up pod is bound", lambda: "warmup" in bound, 120)
        warm.set()
        kube.request("DELETE", "/api/v1/namespaces/bench/pods/warmup", {"gracePeriodSeconds": 0})
        del bound["warmup"]
        running.discard("warmup")
        time.sleep(1.0)
        pids = component_pids(state)
        if bridge is not None:
            pids["hami-ray"] = bridge.pid
        requests0 = api_requests(kube)
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        bench0 = time.process_time()
        t0 = time.monotonic()
        interval = 4 / args.rate if args.rate > 0 else 0.0

        def create(worker: int) -> None:
            for i in range(worker, args.pods, 4):
                if interval:
                    pause = t0 + i / args.rate - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                name = f"p{i:05d}"
                kube.post("/api/v1/namespaces/bench/pods", pod_body(name, mode, i))
                created[name] = time.time()

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(create, range(4)))
        deadline = time.monotonic() + args.timeout
        while len(bound) < args.pods and time.monotonic() < deadline:
            time.sleep(0.2)
        wall = time.monotonic() - t0
        cpu = {name: round(cpu_seconds(pid) - cpu0[name], 1) for name, pid in pids.items()}
        cpu["bench"] = round(time.process_time() - bench0, 1)
        requests = {k: v - requests0.get(k, 0) for k, v in api_requests(kube).items()}
        requests = {k: v for k, v in sorted(requests.items()) if v >= args.pods // 100}
        time.sleep(2.0)  # kwok starts the last pods
        events, _ = kube.list("/api/v1/namespaces/bench/events")
        failed = sum(int(e.get("count") or 1) for e in events if e.get("reason") == "FailedScheduling")
        why: dict[str, int] = {}
        for e in events:
            if e.get("reason") == "FailedScheduling":
                text = re.sub(r"\d+", "N", str(e.get("message") or e.get("note") or ""))[:200]
                why[text] = why.get(text, 0) + int(e.get("count") or 1)
        pods, _ = kube.list("/api/v1/namespaces/bench/pods")
        labelled = sum(1 for p in pods if (p.get("spec") or {}).get("nodeName") and
                       (p["metadata"].get("labels") or {}).get("hami.io/vgpu-node") == p["spec"]["nodeName"])
        stop.set()
        latencies = [bound[n] - created[n] for n in bound if n in created]
        span = max(bound.values()) - min(created.values()) if bound else float("nan")
        result: dict[str, Any] = {
            "nodes": args.nodes, "gpus": args.nodes * GPUS, "pods": args.pods, "bound": len(bound),
            "running": len(running), "rate_limit": args.rate,
            "pods_per_s": round(len(bound) / span, 1) if bound else 0.0,
            "created_per_s": round(len(created) / max(1e-9, max(created.values()) - min(created.values())), 1),
            "p50_s": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
            "p99_s": round(float(np.percentile(latencies, 99)), 3) if latencies else None,
            "seconds": round(span, 1), "wall_s": round(wall, 1), "failed_scheduling": failed,
            "failed_scheduling_why": dict(sorted(why.items(), key=lambda kv: -kv[1])[:5]),
            "cpu_s": cpu, "cpus": os.cpu_count(),
            # API calls during the run, per verb and resource (those made at least once per 100 pods)
            "api_requests": requests,
        }
        if mode != "kube-scheduler":
            result["labelled"] = labelled  # bound pods with hami.io/vgpu-node naming their node
        if mode in ("extender", "kube-scheduler"):
            result["kube_scheduler_qps"] = args.qps
        if plugin is not None:
            result["locks_released"] = plugin.released
        return result
    finally:
        stop.set()
        if plugin is not None:
            plugin.close()
        for p in (bridge, proc):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(timeout=60)
        if args.keep_logs is not None:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for log in state.glob("*.log"):
                shutil.copy(log, args.keep_logs / f"{mode}-{log.name}")
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="scheduler",
                        help=f"modes to run, comma-separated, in that order: {', '.join(MODES)}")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=0.0, help="pods created per second at most (0: no limit)")
    parser.add_argument("--qps", type=int, default=500, help="kube-scheduler's client QPS (burst: twice)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a mode waits for its pods to be bound")
    parser.add_argument("--keep-logs", type=Path, help="copy each mode's logs (hami-ray's, the cluster's) here")
    args = parser.parse_args()
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"unknown mode {unknown or modes}: choose from {', '.join(MODES)}")
    results: dict[str, Any] = {}
    for mode in modes:
        if mode == "hami-lock" and not has_bind_mode():
            reason = "`hami-ray k8s scheduler` has no --bind-mode yet (issue 16, HAMi-compatible bind mode)"
            print(f"skipping hami-lock: {reason}", file=sys.stderr)
            results[mode] = {"skipped": reason}
            continue
        print(f"{mode}: {args.nodes} nodes, {args.pods} pods ...", file=sys.stderr)
        results[mode] = run_mode(mode, args)
        print(f"{mode}: {results[mode]['pods_per_s']} pods/s, p99 {results[mode]['p99_s']} s", file=sys.stderr)
    report(results, args.json)


if __name__ == "__main__":
    main()
