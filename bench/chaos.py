"""One long mixed run with faults injected while it goes, invariants checked all the time, figures at the end.

    python bench/chaos.py --minutes 10 --json docs/chaos.json       # Ray only: --no-k8s

**The load** (bounded in time and count), all in one ledger: Ray tasks with slices (up to ``--in-flight`` at
once, each 0.2-1.5 s, 1-16 GiB), actors with slices (created, called, killed), driver leases of this
process, a second driver process that takes leases and runs tasks, and (with the Go test cluster of
``make k8s-bin``) pods through the bridge (``hami-ray k8s scheduler --inventory ray``, a process of its
own) on a kwok node that a Ray node says it runs on. The Ray cluster is ``ray.cluster_utils.Cluster`` on
127.0.0.1: a head and two workers with simulated devices (a third joins for the pods).

**The faults**, on a seeded schedule (``--seed``), each kind several times (``--rounds``), spaced evenly
over the run: SIGKILL of the placement actor's process, of a node actor's, of a slice task's process
(a lane's worker or a queued task's) and of the second driver; a worker node removed and one added
back; the bridge SIGKILLed and started again; the node actors' fast path blackholed (nftables on the
loopback, for the node actor's port only, in a table of its own that is deleted after); the simulated
stand-in failing like NVML (``node_actors.backends.simulated`` ``usage-error``); a process over its
slice; a high-priority request preempting lower ones; a node actor's state disk filled until writes fail
(each first node's state directory is a small tmpfs of its own); the API server slowed for the bridge (a
proxy between them delays every piece of every response). Recovery time: from the injection until the
fault's own recovery condition holds *and* a probe slice task completes.

**Invariants**, checked every second by an auditor that reads the node actors (their ledgers, their
recounts and high-water marks), the placement actor's ledger and the API server, never the load's own
bookkeeping:

- ``over_capacity``: no device ever held more memory, cores or slices than it has (each node actor's
  high-water mark, all holders counted: tasks, actors, drivers, pods) and every recount is clean;
- ``orphan``: no lease held by nothing (its processes dead, its driver's job ended, its pod gone) for
  longer than the reaping bound (``ORPHAN_BOUND_S``);
- ``diverged``: no lease in the placement ledger that its node actor does not hold, or the reverse, for
  longer than ``DIVERGE_BOUND_S`` (the ledger equals the node actors' truth after each recovery);
- ``pod_rebound`` / ``pod_unannotated``: no pod bound twice, none bound without HAMi's annotations;
- ``hung``: every task, actor call, lease and pod either completes or fails with a typed error within
  its bound (``TASK_BOUND_S``); one that does not is ``lost``.

Writes JSON (keys other tools read: ``invariant_violations``, ``lost``, ``faults`` {name: {count,
recover_p50_s, recover_max_s}}, ``done``, ``failed_by_error``) and prints a rich table. A failure counts
as *typed* when it is a hami-ray error (:class:`hami_ray.core.errors.HamiRayError`) or one of Ray's own
error types (``ray.exceptions.RayError``: a task on a removed node whose retries ran out, a killed
actor); anything else, or no answer in time, is lost work.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("chaos")
HEAD_SPEC = "2xA100-80GB"
WORKER_SPEC = "2xV100-32GB"
POD_NODE_SPEC = "1xL4-24GB"
K8S_NODE = "chaos-gpu-node"
SCHEDULER = "hami-chaos"
TASK_BOUND_S = 240.0  # a task, actor call, lease or pod answers within this, or it is lost
ORPHAN_BOUND_S = 20.0  # reap interval, driver sync and the bridge's resync, with room
DIVERGE_BOUND_S = 15.0  # the placement actor syncs with every node actor each second
RECOVER_BOUND_S = 120.0  # a fault not recovered in this long is a violation
RESERVE_GRACE_S = 15.0  # node actors: a reservation no process claims is freed after this
BLACKHOLE_S = 8.0  # how long the fast path drops packets
NVML_FAULT_S = 5.0  # how long the stand-in fails
KUBE_TIMEOUT_S = 10.0  # every API call of the load and the auditor (a restarted API server may leave one hanging)
NOT_READY_HOLD_S = 3.0  # the pods' node stays NotReady this long once the controller marked it
DISK_FULL_S = 8.0  # how long a node actor's state disk stays full
STATE_DISK_SIZE = "32m"  # each first node's state directory is a tmpfs of this size (so it can be filled)
SLOW_API_S = 10.0  # how long the API server is slow for the bridge
SLOW_API_DELAY_S = 0.5  # the delay the proxy adds to each piece of every response, meanwhile
AGENT = {"grace_s": 1.0, "reap_interval_s": 0.5, "tolerance_mib": 0, "reserve_grace_s": RESERVE_GRACE_S}


# --- what happened ---------------------------------------------------------------------------------
@dataclass
class Ledger:
    """What the load saw (its own outcomes) and what the auditor found; thread-safe."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    done: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    violations: list[dict[str, Any]] = field(default_factory=list)
    completions: list[float] = field(default_factory=list)  # when each task finished

    def ok(self, kind: str) -> None:
        with self.lock:
            self.done[kind] += 1
            if kind == "tasks":
                self.completions.append(time.monotonic())

    def fail(self, kind: str, exc: BaseException) -> None:
        from ray.exceptions import RayError  # noqa: PLC0415

        from hami_ray.core.errors import HamiRayError  # noqa: PLC0415

        name = type(exc).__name__
        cause = getattr(exc, "cause", None)
        if cause is not None and isinstance(cause, BaseException):
            name = f"{name}({type(cause).__name__})"
            typed = isinstance(cause, (HamiRayError, RayError))
        else:
            typed = isinstance(exc, (HamiRayError, RayError))
        with self.lock:
            if typed:
                self.failed[name] += 1
            else:
                self.lost.append(f"{kind}: {name}: {str(exc)[:200]}")

    def lose(self, what: str) -> None:
        with self.lock:
            self.lost.append(what)

    def violate(self, kind: str, detail: str) -> None:
        with self.lock:
            self.violations.append({"kind": kind, "detail": detail, "t": round(time.monotonic(), 1)})
        log.error("INVARIANT %s: %s", kind, detail)


# --- the cluster -----------------------------------------------------------------------------------
class Cluster:
    """The Ray cluster, hami-ray on it, and (optionally) the Kubernetes side."""

    def __init__(self, state: Path, k8s: bool) -> None:
        import ray  # noqa: PLC0415
        from ray.cluster_utils import Cluster as RayCluster  # noqa: PLC0415

        from hami_ray.runtime import api  # noqa: PLC0415
        from hami_ray.runtime.loopback import LOOPBACK, pin_ray_to_loopback  # noqa: PLC0415

        self.state = state
        pin_ray_to_loopback()
        self.ray = RayCluster(initialize_head=True, head_node_args={
            "node_ip_address": LOOPBACK, "num_cpus": 4, "include_dashboard": False})
        self.workers: list[Any] = []
        self.kube: KubeSide | None = None
        for _ in range(2):
            self.add_worker()
        self.disks = StateDisks(state / "nodes", [self.ray.head_node.node_id] + [w.node_id for w in self.workers])
        try:
            ray.init(address=self.ray.address, _node_ip_address=LOOPBACK, log_to_driver=False,
                     configure_logging=False)
            api.init(simulate=HEAD_SPEC, state_root=str(state / "nodes"), agent=AGENT, metrics_port=None,
                     preempt_grace_s=2.0)
            _wait(lambda: len(api.status().nodes) == 3, 90, "node actors did not start")
            if k8s:
                self.kube = KubeSide(self, state / "k8s")
        except BaseException:
            self.close()
            raise

    def add_worker(self, spec: str = WORKER_SPEC, env: dict[str, str] | None = None) -> Any:
        from hami_ray.runtime.loopback import LOOPBACK  # noqa: PLC0415
        from node_actors.actor import NODE_SIMULATE_ENV  # noqa: PLC0415

        node = self.ray.add_node(node_ip_address=LOOPBACK, num_cpus=2, env_vars={NODE_SIMULATE_ENV: spec, **(env or {})})
        if env is None:
            self.workers.append(node)
        return node

    def close(self) -> None:
        import ray  # noqa: PLC0415

        from hami_ray.runtime import api  # noqa: PLC0415

        if self.kube is not None:
            self.kube.close()
        with contextlib.suppress(Exception):
            api.shutdown(stop_cluster=True)
        ray.shutdown()
        self.ray.shutdown()
        self.disks.close()


class StateDisks:
    """The first nodes' state directories, each a small tmpfs of its own, so that one node actor's state
    disk can be filled while the others' are not (root only; without it the fault is not injected)."""

    def __init__(self, root: Path, node_ids: list[str]) -> None:
        from node_actors.actor import node_state_dir  # noqa: PLC0415

        self.mounts: dict[str, Path] = {}
        self.refused: str | None = None
        for node_id in node_ids:
            path = Path(node_state_dir(str(root), node_id))
            path.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STATE_DISK_SIZE}", "tmpfs", str(path)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                self.refused = done.stderr.strip() or f"mount exited {done.returncode}"
                log.warning("state disks stay on the shared disk (cannot mount a tmpfs: %s): "
                            "state_disk_full will not be injected", self.refused)
                break
            self.mounts[node_id] = path

    def fill(self, node_id: str) -> Path:
        """Write a file until the kernel answers ENOSPC."""
        filler = self.mounts[node_id] / "chaos-filler"
        chunk = b"\0" * (1 << 20)
        with filler.open("ab") as f:
            try:
                while True:
                    f.write(chunk)
                    f.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        return filler

    def close(self) -> None:
        for path in self.mounts.values():
            subprocess.run(["umount", "-l", str(path)], check=False)
        self.mounts.clear()


class SlowProxy(threading.Thread):
    """A TCP proxy on the loopback between the bridge and the API server (TLS passes through untouched);
    while ``slow`` is set, every piece of a response waits ``SLOW_API_DELAY_S`` before it is passed on."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(daemon=True, name="slow-proxy")
        import socket  # noqa: PLC0415

        self.upstream = upstream
        self.slow = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._closed = False
        self.connections = 0  # connections the bridge opened through it (the proof it is in the path)
        self.delayed = 0  # response pieces held back while slow

    def run(self) -> None:
        import socket  # noqa: PLC0415

        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: Any, dst: Any, response: bool) -> None:
        import socket  # noqa: PLC0415

        try:
            while data := src.recv(65536):
                if response and self.slow.is_set():
                    self.delayed += 1
                    time.sleep(SLOW_API_DELAY_S)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            src.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()


class KubeSide:
    """The Go test cluster (etcd, kube-apiserver, kwok), a Ray node on Kubernetes node ``K8S_NODE``, and
    the bridge as a process of its own (so it can be SIGKILLed)."""

    def __init__(self, cluster: Cluster, state: Path) -> None:
        from kubernetes import client, config  # noqa: PLC0415

        from node_actors.actor import K8S_NODE_ENV  # noqa: PLC0415

        binary = REPO / ".k8s" / "bin" / "hami-k8s-cluster"
        if not binary.exists():
            raise SystemExit(f"{binary} is missing: `make k8s-bin` builds it (or run with --no-k8s)")
        state.mkdir(parents=True)
        self.state = state
        self._log = (state / "cluster.log").open("wb")
        self.proc = subprocess.Popen([str(binary), "-dir", str(state)], stdout=self._log, stderr=subprocess.STDOUT)
        self.kubeconfig = state / "kubeconfig"
        _wait(lambda: self.kubeconfig.exists() or self.proc.poll() is not None, 240, "the test cluster did not start")
        if self.proc.poll() is not None:
            raise SystemExit(f"the test cluster exited: {(state / 'cluster.log').read_text()[-2000:]}")
        self.client = config.new_client_from_config(str(self.kubeconfig))
        self.core = client.CoreV1Api(self.client)
        self.namespace = "chaos"
        _wait(lambda: _quiet(lambda: self.core.list_namespace(limit=1)), 60, "the API server did not answer")
        self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=self.namespace)))
        with contextlib.suppress(Exception):
            self.core.create_namespaced_service_account(self.namespace, client.V1ServiceAccount(
                metadata=client.V1ObjectMeta(name="default")))
        self.ray_node = cluster.add_worker(POD_NODE_SPEC, env={K8S_NODE_ENV: K8S_NODE})
        self.core.create_node(client.V1Node(metadata=client.V1ObjectMeta(
            name=K8S_NODE, annotations={"kwok.x-k8s.io/node": "fake"})))
        self.address = cluster.ray.address
        self.proxy, self.bridge_kubeconfig = self._proxied(self.kubeconfig)
        self.bridge: subprocess.Popen[bytes] | None = None
        self.start_bridge()

    def _proxied(self, kubeconfig: Path) -> tuple[SlowProxy, Path]:
        """The bridge talks to the API server through a proxy that the slow_apiserver fault slows down."""
        from urllib.parse import urlsplit  # noqa: PLC0415

        import yaml  # noqa: PLC0415

        body = yaml.safe_load(kubeconfig.read_text())
        url = urlsplit(body["clusters"][0]["cluster"]["server"])
        proxy = SlowProxy((url.hostname or "127.0.0.1", url.port or 443))
        proxy.start()
        body["clusters"][0]["cluster"]["server"] = f"{url.scheme}://{url.hostname}:{proxy.port}"
        path = self.state / "kubeconfig-bridge"
        path.write_text(yaml.safe_dump(body))
        return proxy, path

    def start_bridge(self) -> None:
        self.bridge = subprocess.Popen(
            [str(Path(sys.executable).parent / "hami-ray"), "k8s", "scheduler", "--kubeconfig", str(self.bridge_kubeconfig),
             "--scheduler-name", SCHEDULER, "--inventory", "ray", "--ray-address", self.address],
            stdout=(self.state / "bridge.log").open("ab"), stderr=subprocess.STDOUT,
            env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})

    def kill_bridge(self) -> None:
        if self.bridge is not None and self.bridge.poll() is None:
            self.bridge.send_signal(signal.SIGKILL)
            self.bridge.wait(timeout=30)

    def close(self) -> None:
        self.kill_bridge()
        self.proxy.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


# --- reading the truth -----------------------------------------------------------------------------
def _node_actor(node: str) -> Any:
    import ray  # noqa: PLC0415

    return ray.get_actor(f"hami-ray-node-{node}", namespace="hami-ray")


def _placement() -> Any:
    import ray  # noqa: PLC0415

    from hami_ray.runtime.placement import PLACEMENT_NAME  # noqa: PLC0415

    return ray.get_actor(PLACEMENT_NAME, namespace="hami-ray")


def _alive_ray_nodes() -> dict[str, str]:
    """Ray's live nodes (id -> node manager address)."""
    import ray  # noqa: PLC0415

    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}


def _process_start(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot, /proc/<pid>/stat field 22), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _is_lane_worker(pid: int) -> bool:
    """Whether ``pid`` is a lane's slice worker (Ray titles an actor's process ``ray::<Class>...``)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::SliceWorker")
    except OSError:
        return False


def _dead_jobs() -> set[str]:
    import ray._private.state as ray_state  # noqa: PLC0415

    return {str(j.get("JobID")) for j in ray_state.jobs() if j.get("IsDead")}


class Auditor(threading.Thread):
    """Every second: the node actors' leases, recounts and high-water marks, the placement ledger and the
    API server's pods, checked against the invariants (see the module's docstring)."""

    def __init__(self, cluster: Cluster, record: Ledger) -> None:
        super().__init__(name="auditor", daemon=True)
        self.cluster = cluster
        self.record = record
        self.stop = threading.Event()
        self.rounds = 0
        self._orphan_since: dict[str, float] = {}
        self._orphan_holder: dict[str, str] = {}
        # per holder kind, the longest a lease was held by nothing (freed or not; an episode ends at the first
        # round that sees it freed, so an upper bound): how close the reaping came to ORPHAN_BOUND_S
        self.orphan_max_s: dict[str, float] = {}
        self._diverged_since: dict[str, float] = {}
        self._bound: dict[str, str] = {}  # pod uid -> node it was bound to
        self._reported: set[tuple[str, str]] = set()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.audit()
                self.rounds += 1
            except Exception as exc:  # noqa: BLE001 - a fault makes a read fail: next round
                log.info("audit round skipped: %s", exc)

    def _violate(self, kind: str, key: str, detail: str) -> None:
        if (kind, key) not in self._reported:
            self._reported.add((kind, key))
            self.record.violate(kind, detail)

    def audit(self) -> None:
        import ray  # noqa: PLC0415

        now = time.monotonic()
        alive = _alive_ray_nodes()
        truth: dict[str, dict[str, Any]] = {}  # lease id -> lease (the node actors')
        answered: set[str] = set()
        for node in alive:
            try:
                actor = _node_actor(node)
                info, audit = ray.get([actor.info.remote(), actor.audit.remote()], timeout=10)
            except Exception as exc:  # noqa: BLE001 - restarting (or the recount raised: see below)
                if "recount" in str(exc).lower() or "InvariantViolation" in type(exc).__name__:
                    self._violate("over_capacity", f"{node}:recount", f"node {node[:8]}: {exc}")
                continue
            answered.add(node)
            for uuid, (mib, cores, slices) in audit["peak"].items():
                cap_mib, cap_cores, cap_slices = audit["capacity"][uuid]
                if mib > cap_mib or cores > cap_cores or slices > cap_slices:
                    self._violate("over_capacity", uuid, f"{uuid}: peak {mib} MiB / {cores} cores / {slices} slices "
                                                         f"over {cap_mib} / {cap_cores} / {cap_slices}")
            for lease in info["leases"]:
                truth[lease["lease_id"]] = lease
        self._orphans(truth, now)
        self._divergence(truth, answered, now)
        if self.cluster.kube is not None:
            self._pods()

    def _orphans(self, truth: dict[str, dict[str, Any]], now: float) -> None:
        dead_jobs: set[str] | None = None
        pods: set[str] | None = None
        held_by_nothing = set()
        for lease_id, lease in truth.items():
            holder = lease.get("holder", "process")
            if holder == "process":
                pids = lease.get("pids") or []
                starts = {int(k): v for k, v in (lease.get("pid_starts") or {}).items()}
                if not pids:
                    nothing = lease.get("state") == "reserved" and time.time() - lease.get("created_at", 0) > RESERVE_GRACE_S
                else:
                    nothing = all(_process_start(p) is None or (p in starts and _process_start(p) != starts[p])
                                  for p in pids)
            elif holder == "driver":
                if dead_jobs is None:
                    dead_jobs = _dead_jobs()
                nothing = lease.get("job", "") in dead_jobs
            else:  # a pod: its name is the owner ("pod:<namespace>/<name>" or "<namespace>/<name>")
                if self.cluster.kube is None:
                    continue
                if pods is None:
                    pods = {f"{p.metadata.namespace}/{p.metadata.name}" for p in
                            self.cluster.kube.core.list_pod_for_all_namespaces(_request_timeout=KUBE_TIMEOUT_S).items}
                nothing = lease["owner"].split(":", 1)[-1] not in pods
            if nothing:
                held_by_nothing.add(lease_id)
                if lease_id not in self._orphan_since:
                    log.info("lease %s (%s, %s) held by nothing from now on", lease_id, lease["owner"], holder)
                since = self._orphan_since.setdefault(lease_id, now)
                self._orphan_holder[lease_id] = holder
                self.orphan_max_s[holder] = round(max(self.orphan_max_s.get(holder, 0.0), now - since), 1)
                if now - since > ORPHAN_BOUND_S:
                    self._violate("orphan", lease_id, f"{lease_id} ({lease['owner']}, {holder}) held by nothing "
                                                      f"for {now - since:.0f} s")
        for lease_id in list(self._orphan_since):
            if lease_id not in held_by_nothing:
                gone_s = now - self._orphan_since.pop(lease_id)  # at most: freed since the last round
                holder = self._orphan_holder.pop(lease_id, "?")
                self.orphan_max_s[holder] = round(max(self.orphan_max_s.get(holder, 0.0), gone_s), 1)
                log.info("lease %s (%s) freed within %.1f s held by nothing", lease_id, holder, gone_s)

    def _divergence(self, truth: dict[str, dict[str, Any]], answered: set[str], now: float) -> None:
        import ray  # noqa: PLC0415

        try:
            status = ray.get(_placement().status.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the placement actor is restarting
            return
        ledger = {x["lease_id"]: x["allocation"]["node"] for x in status["snapshot"]["leases"]}
        node_of = {lease_id: lease["allocation"]["node"] for lease_id, lease in truth.items()}
        differ = {i for i, n in ledger.items() if n in answered and i not in truth}
        differ |= {i for i, n in node_of.items() if n in answered and i not in ledger}
        for lease_id in differ:
            since = self._diverged_since.setdefault(lease_id, now)
            if now - since > DIVERGE_BOUND_S:
                side = "placement ledger only" if lease_id in ledger else "node actor only"
                self._violate("diverged", lease_id, f"{lease_id}: in the {side} for {now - since:.0f} s")
        for lease_id in list(self._diverged_since):
            if lease_id not in differ:
                del self._diverged_since[lease_id]

    def _pods(self) -> None:
        from hami_ray.k8s.annotations import BIND_PHASE_ANNOTATION, TO_ALLOCATE_ANNOTATION  # noqa: PLC0415

        kube = self.cluster.kube
        assert kube is not None
        for pod in kube.core.list_namespaced_pod(kube.namespace, _request_timeout=KUBE_TIMEOUT_S).items:
            node = pod.spec.node_name
            if not node:
                continue
            uid = pod.metadata.uid
            first = self._bound.setdefault(uid, node)
            if first != node:
                self._violate("pod_rebound", uid, f"pod {pod.metadata.name} bound to {first}, then to {node}")
            notes = pod.metadata.annotations or {}
            if TO_ALLOCATE_ANNOTATION not in notes or BIND_PHASE_ANNOTATION not in notes:
                self._violate("pod_unannotated", uid, f"pod {pod.metadata.name} bound to {node} without HAMi's "
                                                      "annotations")


# --- the load --------------------------------------------------------------------------------------
class Load:
    """Threads that keep work going until ``stop``; each outcome goes to ``record``."""

    def __init__(self, cluster: Cluster, record: Ledger, seed: int, in_flight: int) -> None:
        self.cluster = cluster
        self.record = record
        self.rng = random.Random(seed)
        self.in_flight = in_flight
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.driver: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for target in (self._tasks, self._actors, self._leases, self._driver_process):
            self.threads.append(threading.Thread(target=target, name=target.__name__, daemon=True))
        if self.cluster.kube is not None:
            self.threads.append(threading.Thread(target=self._pods, name="_pods", daemon=True))
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=TASK_BOUND_S + 30)
            if thread.is_alive():
                self.record.lose(f"load thread {thread.name} did not finish in {TASK_BOUND_S + 30:.0f} s")
        if self.driver is not None and self.driver.poll() is None:
            self.driver.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.driver.wait(timeout=30)

    def _tasks(self) -> None:
        import ray  # noqa: PLC0415

        import hami_ray  # noqa: PLC0415

        @hami_ray.remote(gpu_memory="1GiB")
        def work(i: int, seconds: float) -> int:
            time.sleep(seconds)
            return i

        pending: dict[Any, tuple[int, float]] = {}
        i = 0
        while not self.stop.is_set() or pending:
            while not self.stop.is_set() and len(pending) < self.in_flight:
                mem = self.rng.choice(["1GiB", "2GiB", "4GiB", "8GiB", "16GiB"])
                ref = work.options(gpu_memory=mem, gpu_cores=self.rng.choice([10, 20, 30, 50])).remote(
                    i, self.rng.uniform(0.2, 1.5))
                pending[ref] = (i, time.monotonic())
                i += 1
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                n, _t0 = pending.pop(ref)
                try:
                    assert ray.get(ref) == n
                    self.record.ok("tasks")
                except Exception as exc:  # noqa: BLE001 - every outcome is recorded
                    self.record.fail("tasks", exc)
            now = time.monotonic()
            for ref, (n, t0) in list(pending.items()):
                if now - t0 > TASK_BOUND_S:
                    pending.pop(ref)
                    self.record.lose(f"task {n} hung for {TASK_BOUND_S:.0f} s")
                    with contextlib.suppress(Exception):
                        ray.cancel(ref, force=True)

    def _actors(self) -> None:
        import ray  # noqa: PLC0415

        import hami_ray  # noqa: PLC0415

        @hami_ray.remote(gpu_memory="4GiB", gpu_cores=20)
        class Holder:
            def where(self) -> str:
                info = hami_ray.current_slice()
                assert info is not None
                return info.lease_id

        while not self.stop.wait(self.rng.uniform(2.0, 5.0)):
            actor = Holder.remote()
            try:
                for _ in range(3):
                    ray.get(actor.where.remote(), timeout=TASK_BOUND_S)
                self.record.ok("actors")
            except ray.exceptions.GetTimeoutError:
                self.record.lose(f"an actor did not answer in {TASK_BOUND_S:.0f} s")
            except Exception as exc:  # noqa: BLE001 - every outcome is recorded
                self.record.fail("actors", exc)
            finally:
                ray.kill(actor)

    def _leases(self) -> None:
        import hami_ray  # noqa: PLC0415

        while not self.stop.wait(self.rng.uniform(1.0, 3.0)):
            try:
                with hami_ray.lease(gpu_memory="2GiB", gpu_cores=10) as held:
                    assert held.devices
                    self.stop.wait(self.rng.uniform(0.2, 1.0))
                self.record.ok("leases")
            except Exception as exc:  # noqa: BLE001 - every outcome is recorded
                self.record.fail("leases", exc)

    def start_driver(self) -> None:
        log_file = (self.cluster.state / "driver.log").open("ab")
        self.driver = subprocess.Popen([sys.executable, __file__, "--driver", self.cluster.ray.address],
                                       stdout=log_file, stderr=subprocess.STDOUT,
                                       env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                                            "HAMI_RAY_LANES": "0"})  # its tasks take the placement queue

    def _driver_process(self) -> None:
        """Keep a second driver running (the fault kills it; a new one starts)."""
        while not self.stop.wait(1.0):
            if self.driver is None or self.driver.poll() is not None:
                if self.driver is not None and self.driver.returncode not in (0, -signal.SIGKILL):
                    self.record.lose(f"the second driver exited with {self.driver.returncode}")
                if self.driver is not None:
                    self.record.ok("drivers")
                self.start_driver()

    def _pods(self) -> None:
        from kubernetes import client  # noqa: PLC0415

        kube = self.cluster.kube
        assert kube is not None
        n = 0
        live: dict[str, float] = {}  # pod name -> created at
        bound_at: dict[str, float] = {}
        while not self.stop.is_set() or live:
            if not self.stop.is_set() and len(live) < 3:
                name = f"chaos-{n}"
                n += 1
                try:
                    kube.core.create_namespaced_pod(kube.namespace, client.V1Pod(
                        metadata=client.V1ObjectMeta(name=name),
                        spec=client.V1PodSpec(scheduler_name=SCHEDULER, containers=[client.V1Container(
                            name="main", image="busybox", resources=client.V1ResourceRequirements(limits={
                                "nvidia.com/gpu": "1", "nvidia.com/gpumem": str(self.rng.choice([1024, 2048, 4096])),
                                "nvidia.com/gpucores": "10"}))])), _request_timeout=KUBE_TIMEOUT_S)
                    live[name] = time.monotonic()
                except Exception as exc:  # noqa: BLE001 - the API server is down: try again
                    log.info("pod %s not created: %s", name, exc)
            try:
                pods = {p.metadata.name: p for p in kube.core.list_namespaced_pod(kube.namespace, _request_timeout=KUBE_TIMEOUT_S).items}
            except Exception:  # noqa: BLE001 - the API server is down: next round
                self.stop.wait(1.0)
                continue
            now = time.monotonic()
            for name, t0 in list(live.items()):
                pod = pods.get(name)
                if pod is not None and pod.spec.node_name and name not in bound_at:
                    bound_at[name] = now
                if name in bound_at and now - bound_at[name] > 2.0 or self.stop.is_set() and name in bound_at:
                    if self._delete_pod(name):
                        live.pop(name)
                        self.record.ok("pods")
                elif self.stop.is_set():  # the run is over: a pod still waiting is withdrawn, not lost
                    if self._delete_pod(name):
                        live.pop(name)
                        self.record.ok("pods_withdrawn")
                elif now - t0 > TASK_BOUND_S:
                    self.record.lose(f"pod {name} not bound in {TASK_BOUND_S:.0f} s")
                    self._delete_pod(name)
                    live.pop(name)
            self.stop.wait(0.5)

    def _delete_pod(self, name: str) -> bool:
        """Delete one of the load's pods; True once it is gone (deleted now, or already: a 404, e.g. its
        delete went through while the API server restarted and the answer was lost, or the node lifecycle
        controller evicted it from a NotReady node). False: ask again next round."""
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        kube = self.cluster.kube
        assert kube is not None
        try:
            kube.core.delete_namespaced_pod(name, kube.namespace, grace_period_seconds=0,
                                            _request_timeout=KUBE_TIMEOUT_S)
        except ApiException as exc:
            return bool(exc.status == 404)
        except Exception:  # noqa: BLE001 - the API server is down or slow: next round
            return False
        return True


def second_driver(address: str) -> None:
    """``--driver``: a driver of its own (the driver-kill fault's target) taking leases and running tasks."""
    import ray  # noqa: PLC0415

    import hami_ray  # noqa: PLC0415
    from hami_ray.core.errors import HamiRayError  # noqa: PLC0415
    from hami_ray.runtime.loopback import LOOPBACK  # noqa: PLC0415

    ray.init(address=address, _node_ip_address=LOOPBACK, log_to_driver=False, configure_logging=False)
    hami_ray.init()  # joins the hami-ray that runs, with its settings

    @hami_ray.remote(gpu_memory="2GiB")
    def step(i: int) -> int:
        time.sleep(1.0)
        return i

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    i = 0
    while not stopping.is_set():
        try:
            with hami_ray.lease(gpu_memory="1GiB", gpu_cores=5):
                ray.get([step.remote(i + k) for k in range(3)], timeout=TASK_BOUND_S)
                stopping.wait(1.0)
        except (HamiRayError, ray.exceptions.RayError) as exc:  # typed: preempted, or a fault's work lost
            print(f"driver: {type(exc).__name__}: {exc}", flush=True)
        i += 3
    hami_ray.shutdown()


# --- faults ----------------------------------------------------------------------------------------
@dataclass
class Fault:
    """``inject`` returns what ``recovered`` needs; recovery also needs a probe task to complete."""

    name: str
    inject: Callable[[], Any]
    recovered: Callable[[Any], bool] = lambda _: True
    heal: Callable[[Any], None] = lambda _: None  # undo what inject did (after its duration)
    duration_s: float = 0.0
    during: bool = False  # recovery is measured while the fault lasts (work goes on around it), else from its end


class Faults:
    def __init__(self, cluster: Cluster, load: Load, record: Ledger, rng: random.Random) -> None:
        self.cluster = cluster
        self.load = load
        self.record = record
        self.rng = rng
        self.probes = 0  # probe pods bound so far (each probe a new name)
        self.disk_refusals: list[bool] = []  # per state_disk_full: whether its node actor's journal met it

    def all(self) -> list[Fault]:
        faults = [
            Fault("kill_placement_actor", self.kill_placement, self.placement_back),
            Fault("kill_node_actor", self.kill_node_actor, self.node_actor_back),
            Fault("kill_task_process", lambda: self.kill_slice_process(lane=False), self.lease_gone),
            Fault("kill_lane_worker", lambda: self.kill_slice_process(lane=True), self.lease_gone),
            Fault("kill_driver", self.kill_driver, self.driver_leases_gone),
            Fault("remove_node", self.remove_node, self.node_gone),
            Fault("add_node", self.add_node, self.node_joined),
            Fault("blackhole_fast_path", self.blackhole, heal=self.unblackhole, duration_s=BLACKHOLE_S, during=True),
            Fault("nvml_error", self.nvml_error, self.enforcement_ok, heal=self.nvml_clear, duration_s=NVML_FAULT_S),
            Fault("process_over_slice", self.over_slice, self.over_slice_stopped),
            Fault("priority_preemption", self.preempt, self.preempt_done),
            Fault("state_disk_full", self.fill_disk, heal=self.free_disk, duration_s=DISK_FULL_S, during=True),
        ]
        if self.cluster.kube is not None:
            faults += [Fault("kill_bridge", self.kill_bridge, self.bridge_back),
                       Fault("restart_apiserver", self.kill_apiserver, self.apiserver_back),
                       Fault("node_not_ready", self.node_not_ready, self.node_ready_again, heal=self.node_resume,
                             duration_s=NOT_READY_HOLD_S),
                       Fault("slow_apiserver", self.slow_api, self.bridge_back, heal=self.fast_api,
                             duration_s=SLOW_API_S, during=True)]
        return faults

    def cleanup(self) -> None:
        """Undo what a fault may have left if the run stopped in its middle (the nftables table)."""
        subprocess.run(["nft", "delete", "table", "inet", f"hami_chaos_{os.getpid()}"], check=False,
                       stderr=subprocess.DEVNULL)

    # --- Ray's side ---
    def kill_placement(self) -> int:
        import ray  # noqa: PLC0415

        pid = int(ray.get(_placement().status.remote(), timeout=30)["pid"])
        os.kill(pid, signal.SIGKILL)
        return pid

    def placement_back(self, old_pid: int) -> bool:
        import ray  # noqa: PLC0415

        try:
            return int(ray.get(_placement().status.remote(), timeout=5)["pid"]) != old_pid
        except Exception:  # noqa: BLE001 - restarting
            return False

    def kill_node_actor(self) -> tuple[str, int]:
        import ray  # noqa: PLC0415

        node = self.rng.choice(sorted(_alive_ray_nodes()))
        pid = int(ray.get(_node_actor(node).info.remote(), timeout=30)["pid"])
        os.kill(pid, signal.SIGKILL)
        return node, pid

    def node_actor_back(self, token: tuple[str, int]) -> bool:
        import ray  # noqa: PLC0415

        node, old = token
        if node not in _alive_ray_nodes():
            return True
        try:
            return int(ray.get(_node_actor(node).info.remote(), timeout=5)["pid"]) != old
        except Exception:  # noqa: BLE001 - restarting
            return False

    def kill_slice_process(self, lane: bool) -> str:
        """SIGKILL the process of a slice task: a lane's worker (an actor the driver's lanes own, named
        ``ray::SliceWorker`` by Ray) or a worker running a task that went through the placement queue."""
        import ray  # noqa: PLC0415

        for _ in range(50):
            leases = [x for node in _alive_ray_nodes() for x in _quiet_get(lambda n=node: ray.get(
                _node_actor(n).info.remote(), timeout=10)["leases"]) or []
                if x.get("holder") == "process" and x.get("pids") and x["owner"].startswith("task:")]
            mine = [x for x in leases if _is_lane_worker(x["pids"][0]) == lane]
            if mine:
                lease = self.rng.choice(mine)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(lease["pids"][0], signal.SIGKILL)
                return str(lease["lease_id"])
            time.sleep(0.2)
        raise RuntimeError(f"no running {'lane worker' if lane else 'queued task'} with a slice found in 10 s")

    def lease_gone(self, lease_id: str) -> bool:
        import ray  # noqa: PLC0415

        status = _quiet_get(lambda: ray.get(_placement().status.remote(), timeout=5))
        return status is not None and all(x["lease_id"] != lease_id for x in status["snapshot"]["leases"])

    def kill_driver(self) -> str:
        driver = self.load.driver
        assert driver is not None
        job = ""
        with contextlib.suppress(ProcessLookupError):
            driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        return job or str(driver.pid)

    def driver_leases_gone(self, pid: str) -> bool:
        import ray  # noqa: PLC0415

        status = _quiet_get(lambda: ray.get(_placement().status.remote(), timeout=5))
        return status is not None and all(x["owner"] != f"driver:{pid}" for x in status["snapshot"]["leases"])

    def remove_node(self) -> str:
        if len(self.cluster.workers) < 2:
            raise RuntimeError("fewer than two worker nodes left: none removed")
        node = self.cluster.workers.pop(self.rng.randrange(len(self.cluster.workers)))
        node_id = node.node_id
        self.cluster.ray.remove_node(node)
        return str(node_id)

    def node_gone(self, node_id: str) -> bool:
        import ray  # noqa: PLC0415

        status = _quiet_get(lambda: ray.get(_placement().status.remote(), timeout=5))
        return status is not None and all(n["name"] != node_id for n in status["snapshot"]["nodes"])

    def add_node(self) -> str:
        node = self.cluster.add_worker()
        return str(node.node_id)

    def node_joined(self, node_id: str) -> bool:
        import ray  # noqa: PLC0415

        status = _quiet_get(lambda: ray.get(_placement().status.remote(), timeout=5))
        return status is not None and any(n["name"] == node_id for n in status["snapshot"]["nodes"])

    def blackhole(self) -> str:
        """Drop every packet to the node actors' fast-path ports (loopback only), in a table of our own."""
        import ray  # noqa: PLC0415

        ports = []
        for node in _alive_ray_nodes():
            wire = (_quiet_get(lambda n=node: ray.get(_node_actor(n).info.remote(), timeout=10)) or {}).get("wire")
            if wire:
                ports.append(int(wire["port"]))
        if not ports or shutil.which("nft") is None:
            raise RuntimeError(f"no fast path to blackhole (ports {ports}, nft {shutil.which('nft')})")
        table = f"hami_chaos_{os.getpid()}"
        rules = "; ".join(f"tcp dport {p} drop" for p in ports)
        script = (f"add table inet {table}\n"
                  f"add chain inet {table} out {{ type filter hook output priority 0; policy accept; }}\n"
                  + "".join(f"add rule inet {table} out oif lo tcp dport {p} drop\n" for p in ports))
        subprocess.run(["nft", "-f", "-"], input=script.encode(), check=True)
        log.info("fast path blackholed: %s", rules)
        return table

    def unblackhole(self, table: str) -> None:
        subprocess.run(["nft", "delete", "table", "inet", table], check=False)

    def nvml_error(self) -> Path:
        from node_actors.backends.simulated import FAULTS_DIR, USAGE_ERROR  # noqa: PLC0415

        node = self.rng.choice(sorted(_alive_ray_nodes()))
        fault = self._state_dir(node) / FAULTS_DIR / USAGE_ERROR
        fault.parent.mkdir(parents=True, exist_ok=True)
        fault.write_text("NVML_ERROR_GPU_IS_LOST (chaos)")
        return fault

    def nvml_clear(self, fault: Path) -> None:
        fault.unlink(missing_ok=True)

    def enforcement_ok(self, fault: Path) -> bool:
        import ray  # noqa: PLC0415

        node = fault.parent.parent.name
        if fault.exists() or node not in _alive_ray_nodes():
            return not fault.exists()
        info = _quiet_get(lambda: ray.get(_node_actor(node).info.remote(), timeout=5))
        return info is not None and info["isolation"].get("enforcement") == "ok"

    def _state_dir(self, node: str) -> Path:
        import ray  # noqa: PLC0415

        return Path(ray.get(_node_actor(node).info.remote(), timeout=30)["state_dir"])

    def fill_disk(self) -> tuple[str, Path, threading.Event]:
        """Fill one node actor's state disk (its tmpfs) until writes fail with ENOSPC. While it stays full,
        work must go on (a probe completes: placement goes around a node actor that refuses slices it
        cannot journal); whether the node actor's journal did meet the full disk is watched meanwhile."""
        disks = self.cluster.disks
        alive = [n for n in sorted(disks.mounts) if n in _alive_ray_nodes()]
        if not alive:
            raise RuntimeError(f"no node with a state disk of its own ({disks.refused or 'all removed'})")
        node = self.rng.choice(alive)
        filler = disks.fill(node)
        stop = threading.Event()
        threading.Thread(target=self._watch_journal, args=(node, stop), daemon=True).start()
        return node, filler, stop

    def _watch_journal(self, node: str, stop: threading.Event) -> None:
        import ray  # noqa: PLC0415

        refused = False
        while not stop.wait(0.25) and not refused:
            info = _quiet_get(lambda: ray.get(_node_actor(node).info.remote(), timeout=5))
            refused = ((info or {}).get("journal") or {}).get("writable") is False
        self.disk_refusals.append(refused)

    def free_disk(self, token: tuple[str, Path, threading.Event]) -> None:
        """Free the disk; the node actor's journal must write what is pending within the recovery bound."""
        node, filler, stop = token
        stop.set()
        filler.unlink(missing_ok=True)
        deadline = time.monotonic() + RECOVER_BOUND_S
        while not self.journal_caught_up(node):
            if time.monotonic() > deadline:
                self.record.violate("not_recovered", f"state_disk_full: {node}'s journal still behind "
                                                     f"{RECOVER_BOUND_S:.0f} s after the disk was freed")
                return
            time.sleep(0.3)

    def journal_caught_up(self, node: str) -> bool:
        """The node actor's journal writes again and nothing is pending (what it freed meanwhile written)."""
        import ray  # noqa: PLC0415

        if node not in _alive_ray_nodes():
            return True
        info = _quiet_get(lambda: ray.get(_node_actor(node).info.remote(), timeout=5))
        journal = (info or {}).get("journal") or {}
        return bool(journal.get("writable")) and journal.get("pending") == 0

    def over_slice(self) -> Any:
        import hami_ray  # noqa: PLC0415
        from hami_ray.runtime import api  # noqa: PLC0415

        @hami_ray.remote(gpu_memory="2GiB", max_retries=0)
        def hog() -> None:
            api.report_simulated_memory(3000)  # what NVML would show: 3000 MiB in a 2048 MiB slice
            time.sleep(60)

        return hog.remote()

    def over_slice_stopped(self, ref: Any) -> bool:
        import ray  # noqa: PLC0415

        from hami_ray.core.errors import SliceQuotaExceeded  # noqa: PLC0415

        ready, _ = ray.wait([ref], timeout=0)
        if not ready:
            return False
        try:
            ray.get(ref)
            self.record.lose("a process over its slice was not stopped")
        except SliceQuotaExceeded:
            self.record.ok("stopped_over_slice")
        except Exception as exc:  # noqa: BLE001 - every outcome is recorded
            self.record.fail("over_slice", exc)
        return True

    def preempt(self) -> Any:
        """A high-priority request for a whole A100 while lower-priority slices hold parts of both."""
        import hami_ray  # noqa: PLC0415

        @hami_ray.remote(gpus=1, gpu_type="A100", priority=10, max_retries=0)
        def urgent() -> str:
            info = hami_ray.current_slice()
            assert info is not None
            return info.lease_id

        return urgent.remote()

    def preempt_done(self, ref: Any) -> bool:
        import ray  # noqa: PLC0415

        ready, _ = ray.wait([ref], timeout=0)
        if not ready:
            return False
        try:
            ray.get(ref)
            self.record.ok("preemptors")
        except Exception as exc:  # noqa: BLE001 - every outcome is recorded
            self.record.fail("preemptors", exc)
        return True

    # --- Kubernetes' side ---
    def kill_bridge(self) -> int:
        kube = self.cluster.kube
        assert kube is not None and kube.bridge is not None
        pid = kube.bridge.pid
        kube.kill_bridge()
        kube.start_bridge()
        return pid

    def kill_apiserver(self) -> int:
        """SIGKILL the API server process (the test cluster's supervisor starts it again)."""
        from tests.k8s.chaos_helpers import kill_apiserver  # noqa: PLC0415

        kube = self.cluster.kube
        assert kube is not None
        return kill_apiserver(kube.state)

    def apiserver_back(self, old_pid: int) -> bool:
        """Answering from a new process, and the bridge binds a probe pod through it again."""
        from tests.k8s.chaos_helpers import pid_of  # noqa: PLC0415

        kube = self.cluster.kube
        assert kube is not None
        try:
            if pid_of(kube.state, "apiserver") == old_pid:
                return False
        except (OSError, ValueError):
            return False
        return self.bridge_back(old_pid, "probe-api")

    def slow_api(self) -> int:
        """Every response from the API server to the bridge waits SLOW_API_DELAY_S per piece; a probe pod
        must still be bound meanwhile."""
        kube = self.cluster.kube
        assert kube is not None
        kube.proxy.slow.set()
        return int(time.time())

    def fast_api(self, _token: int) -> None:
        kube = self.cluster.kube
        assert kube is not None
        kube.proxy.slow.clear()

    def node_not_ready(self) -> str:
        """Stop the kwok heartbeat of the pods' node and wait until the node lifecycle controller marks
        it NotReady (and taints it); it is resumed after NOT_READY_HOLD_S more."""
        from tests.k8s.chaos_helpers import stop_heartbeat, wait_node_ready  # noqa: PLC0415

        kube = self.cluster.kube
        assert kube is not None
        stop_heartbeat(kube.core, K8S_NODE)
        wait_node_ready(kube.core, K8S_NODE, False, timeout=90)
        return K8S_NODE

    def node_resume(self, node: str) -> None:
        from tests.k8s.chaos_helpers import resume_heartbeat  # noqa: PLC0415

        kube = self.cluster.kube
        assert kube is not None
        resume_heartbeat(kube.core, node)

    def node_ready_again(self, node: str) -> bool:
        """Ready, untainted, and a probe pod is bound to it."""
        from tests.k8s.chaos_helpers import node_ready, node_taints  # noqa: PLC0415

        kube = self.cluster.kube
        assert kube is not None
        if not node_ready(kube.core, node) or node_taints(kube.core, node):
            return False
        return self.bridge_back(int(time.time()) // 3600, "probe-ready")

    def bridge_back(self, _pid: int, prefix: str = "probe") -> bool:
        """A probe pod is bound by the (new) bridge."""
        from kubernetes import client  # noqa: PLC0415

        kube = self.cluster.kube
        assert kube is not None
        name = f"{prefix}-{_pid}-{self.probes}"
        try:
            pod = kube.core.read_namespaced_pod(name, kube.namespace, _request_timeout=KUBE_TIMEOUT_S)
        except client.ApiException as exc:
            if exc.status != 404:
                return False
            kube.core.create_namespaced_pod(kube.namespace, client.V1Pod(
                metadata=client.V1ObjectMeta(name=name), spec=client.V1PodSpec(
                    scheduler_name=SCHEDULER, containers=[client.V1Container(
                        name="main", image="busybox", resources=client.V1ResourceRequirements(limits={
                            "nvidia.com/gpu": "1", "nvidia.com/gpumem": "512", "nvidia.com/gpucores": "5"}))])),
                _request_timeout=KUBE_TIMEOUT_S)
            return False
        if pod.spec.node_name:
            kube.core.delete_namespaced_pod(name, kube.namespace, grace_period_seconds=0, _request_timeout=KUBE_TIMEOUT_S)
            self.probes += 1
            return True
        return False


def _quiet(fn: Callable[[], Any]) -> bool:
    try:
        fn()
        return True
    except Exception:  # noqa: BLE001
        return False


def _quiet_get(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return None


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(what)
        time.sleep(0.2)


def probe() -> bool:
    """A tiny slice task completes (the cluster serves work)."""
    import ray  # noqa: PLC0415

    import hami_ray  # noqa: PLC0415

    @hami_ray.remote(gpu_memory="256MiB", gpu_cores=1)
    def ping() -> int:
        return 1

    try:
        return bool(ray.get(ping.remote(), timeout=60) == 1)
    except Exception as exc:  # noqa: BLE001
        log.info("probe failed: %s", exc)
        return False


# --- the run -----------------------------------------------------------------------------------------
def schedule(faults: list[Fault], rounds: int, seconds: float, rng: random.Random) -> list[tuple[float, Fault]]:
    """Each fault ``rounds`` times, shuffled, spaced evenly over ``seconds`` (the first after a quiet
    tenth of the run, which measures throughput without faults)."""
    order = [f for f in faults for _ in range(rounds)]
    rng.shuffle(order)
    start = seconds * 0.1
    step = (seconds - start) / max(1, len(order))
    return [(start + k * step, f) for k, f in enumerate(order)]


def run(minutes: float, seed: int, rounds: int, in_flight: int, k8s: bool, state: Path) -> dict[str, Any]:
    rng = random.Random(seed)
    record = Ledger()
    seconds = minutes * 60
    t_setup = time.monotonic()
    cluster = Cluster(state, k8s)
    setup_s = time.monotonic() - t_setup
    load = Load(cluster, record, seed, in_flight)
    faults = Faults(cluster, load, record, rng)
    plan = schedule(faults.all(), rounds, seconds, rng)
    auditor = Auditor(cluster, record)
    recoveries: dict[str, list[float]] = defaultdict(list)
    unrecovered: Counter[str] = Counter()
    skipped: Counter[str] = Counter()  # a fault with nothing to hit at its time (no queued task running)
    windows: list[tuple[float, float]] = []
    try:
        auditor.start()
        load.start()
        t0 = time.monotonic()
        for at, fault in plan:
            while time.monotonic() - t0 < at:
                time.sleep(0.2)
            log.info("%6.1f s: %s", time.monotonic() - t0, fault.name)
            began = time.monotonic()
            try:
                token = fault.inject()
            except Exception as exc:  # noqa: BLE001 - a fault that cannot be injected is reported
                log.warning("%s not injected: %s", fault.name, exc)
                skipped[fault.name] += 1
                continue
            if fault.duration_s and not fault.during:
                time.sleep(fault.duration_s)
                fault.heal(token)
                began = time.monotonic()  # recovery counts from the fault's end
            deadline = began + RECOVER_BOUND_S
            while not (_quiet_get(lambda: fault.recovered(token)) and probe()):
                if time.monotonic() > deadline:
                    unrecovered[fault.name] += 1
                    record.violate("not_recovered", f"{fault.name} not recovered in {RECOVER_BOUND_S:.0f} s")
                    break
                time.sleep(0.3)
            else:
                recoveries[fault.name].append(time.monotonic() - began)
            if fault.duration_s and fault.during:
                time.sleep(max(0.0, began + fault.duration_s - time.monotonic()))
                fault.heal(token)
            windows.append((began if not fault.duration_s or fault.during else began - fault.duration_s,
                            time.monotonic()))
        while time.monotonic() - t0 < seconds:
            time.sleep(0.5)
        t_end = time.monotonic()
    finally:
        faults.cleanup()
        load.join()
        auditor.stop.set()
        auditor.join(timeout=30)
        cluster.close()
    return report(record, recoveries, unrecovered, skipped, windows, t0, t_end, auditor.rounds, {
        "minutes": minutes, "seed": seed, "rounds": rounds, "in_flight": in_flight, "k8s": k8s,
        "setup_s": round(setup_s, 1), "python": platform.python_version(), "cpus": os.cpu_count(),
        "bounds_s": {"task": TASK_BOUND_S, "orphan": ORPHAN_BOUND_S, "diverge": DIVERGE_BOUND_S,
                     "recover": RECOVER_BOUND_S},
        # per state_disk_full: whether the node actor's journal met the full disk (refused a write) while
        # it lasted; a node with nothing to write meanwhile (or a WAL with room left) never notices
        "state_disk_full_journal_refused": faults.disk_refusals,
        "held_by_nothing_max_s": auditor.orphan_max_s,  # per holder kind (process, driver, pod): the bound's margin
        "slow_api_delay_s": SLOW_API_DELAY_S,
        "slow_api_proxy": ({"connections": cluster.kube.proxy.connections, "delayed_pieces": cluster.kube.proxy.delayed}
                           if cluster.kube is not None else None), "state_disk": cluster.disks.refused or f"tmpfs {STATE_DISK_SIZE}"})


def report(record: Ledger, recoveries: dict[str, list[float]], unrecovered: Counter[str], skipped: Counter[str],
           windows: list[tuple[float, float]], t0: float, t_end: float, audits: int,
           meta: dict[str, Any]) -> dict[str, Any]:
    def during(t: float) -> bool:
        return any(a <= t <= b for a, b in windows)

    fault_s = sum(min(b, t_end) - max(a, t0) for a, b in windows if b > t0)
    quiet_s = max(1e-9, (t_end - t0) - fault_s)
    done_during = sum(1 for t in record.completions if t0 <= t <= t_end and during(t))
    done_quiet = sum(1 for t in record.completions if t0 <= t <= t_end and not during(t))
    during_rate = done_during / fault_s if fault_s else 0.0
    quiet_rate = done_quiet / quiet_s
    faults = {name: {"count": len(times) + unrecovered.get(name, 0), "recovered": len(times),
                     "recover_p50_s": round(statistics.median(times), 2) if times else None,
                     "recover_max_s": round(max(times), 2) if times else None}
              for name, times in sorted(recoveries.items())}
    for name, n in unrecovered.items():
        faults.setdefault(name, {"count": n, "recovered": 0, "recover_p50_s": None, "recover_max_s": None})
    return {
        "invariant_violations": len(record.violations),
        "violations": record.violations,
        "lost": len(record.lost),
        "lost_detail": record.lost[:50],
        "faults": faults,
        "not_injected": dict(skipped),
        "done": dict(record.done),
        "failed_by_error": dict(record.failed),
        "throughput": {"tasks_per_s_during_faults": round(during_rate, 3), "tasks_per_s_quiet": round(quiet_rate, 3),
                       "ratio": round(during_rate / quiet_rate, 3) if quiet_rate else None,
                       "fault_s": round(fault_s, 1), "quiet_s": round(quiet_s, 1)},
        "audits": audits,
        "run_s": round(t_end - t0, 1),
        "meta": meta,
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = Console()
    table = Table(title=f"chaos: {result['run_s']} s, seed {result['meta']['seed']}", title_justify="left")
    for col in ("fault", "count", "recovered", "p50 s", "max s"):
        table.add_column(col, justify="left" if col == "fault" else "right")
    for name, row in result["faults"].items():
        table.add_row(name, str(row["count"]), str(row["recovered"]), str(row["recover_p50_s"]), str(row["recover_max_s"]))
    console.print(table)
    console.print(f"done {result['done']}; failed (typed) {result['failed_by_error']}")
    console.print(f"lost {result['lost']}; invariant violations {result['invariant_violations']} "
                  f"({result['audits']} audits)")
    tp = result["throughput"]
    console.print(f"tasks/s during faults {tp['tasks_per_s_during_faults']} vs quiet {tp['tasks_per_s_quiet']} "
                  f"(ratio {tp['ratio']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3, help="how many times each fault is injected")
    parser.add_argument("--in-flight", type=int, default=8, help="slice tasks in flight at once")
    parser.add_argument("--k8s", action=argparse.BooleanOptionalAction, default=None,
                        help="pods through the bridge on the Go test cluster (default: when .k8s/bin has it)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--logs", type=Path, default=None,
                        help="copy the run's logs (the bridge's, the API server's, ...) into this directory")
    parser.add_argument("--driver", default=None, help=argparse.SUPPRESS)  # the second driver's process
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.driver:
        second_driver(args.driver)
        return 0
    k8s = args.k8s if args.k8s is not None else (REPO / ".k8s" / "bin" / "hami-k8s-cluster").exists()
    state = Path(tempfile.mkdtemp(prefix="hami-chaos-"))
    try:
        result = run(args.minutes, args.seed, args.rounds, args.in_flight, k8s, state)
    finally:
        if args.logs is not None:
            _keep_logs(state, args.logs)
        shutil.rmtree(state, ignore_errors=True)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0 if result["invariant_violations"] == 0 and result["lost"] == 0 else 1


def _keep_logs(state: Path, into: Path) -> None:
    """Copy every ``*.log`` under the run's state directory into ``into`` (path separators become ``__``)."""
    into.mkdir(parents=True, exist_ok=True)
    for path in state.rglob("*.log"):
        if path.is_file():
            shutil.copyfile(path, into / "__".join(path.relative_to(state).parts))


if __name__ == "__main__":
    sys.exit(main())
