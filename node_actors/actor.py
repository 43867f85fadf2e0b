"""The node actor: a thin Ray shell over :class:`~node_actors.agent.NodeAgent`, one per Ray node.

Named ``hami-ray-node-<node id>`` in namespace ``hami-ray``, detached, pinned to its node, restarted on
failure (it then rebuilds from its journal). A background thread runs the agent's ``tick`` (reap dead
holders, refresh health, enforce memory) every ``TICK_S``; a lock serialises it with the actor methods.
Each method unpacks, calls the agent, returns plain data.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from hami_ray.core.errors import LeaseNotFound
from hami_ray.core.model import K8S_NODE_LABEL, Lease
from hami_ray.wire import ThreadServer
from node_actors.agent import NodeAgent
from node_actors.backends import detect_backend
from node_actors.settings import AgentSettings, BackendSettings, NodeSettings

log = logging.getLogger(__name__)
NAMESPACE = "hami-ray"
TICK_S = 1.0
NODE_SIMULATE_ENV = "HAMI_RAY_NODE_SIMULATE"  # set where a node starts (`ray start`): that node's devices
K8S_NODE_ENV = "HAMI_RAY_K8S_NODE"  # the Kubernetes node this Ray node runs on (KubeRay: spec.nodeName)


def node_actor_name(node_id: str) -> str:
    return f"hami-ray-node-{node_id}"


def node_state_dir(state_root: str, node_id: str) -> str:
    """Where the node actor of ``node_id`` keeps its journal and simulated usage files."""
    return str(Path(state_root) / node_id[:16])


class NodeActorShell:
    """The actor's body; ``NodeActor`` below is this class made remote."""

    def __init__(self, node_id: str, state_root: str, simulate: str | None, settings: dict[str, Any],
                 simulate_default: str | None = None, node_settings: dict[str, Any] | None = None) -> None:
        """``simulate``: this node's spec from ``hami_ray.init(simulate_per_node=...)``; else the node's own
        ``$HAMI_RAY_NODE_SIMULATE``; else ``simulate_default`` (``init(simulate=...)`` for every node).
        ``node_settings``: isolation settings from ``init(node={...})`` over the node's environment
        (``HAMI_RAY_ISOLATION``, ``HAMI_RAY_LIBVGPU``, ``HAMI_RAY_MPS_CONTROL``)."""
        simulate = simulate or os.environ.get(NODE_SIMULATE_ENV) or simulate_default
        state_dir = Path(node_state_dir(state_root, node_id))
        node = NodeSettings.load(os.environ, node_settings)
        backend_settings = BackendSettings(node_name=node_id, state_dir=state_dir, simulate=simulate,
                                           libvgpu_path=node.libvgpu_path, isolation=node.isolation,
                                           mps_control=node.mps_control)
        self.backend = detect_backend(backend_settings)
        atexit.register(self.backend.close)  # stops the MPS daemon when the actor's process exits cleanly
        lib = backend_settings.libvgpu_path
        # what a slice worker on this node must be started with (read by the loader, never later): only
        # where slices are graded hami-core
        report = self.backend.isolation_report()
        hami = any(grade.value == "hami-core" for _, grade, _ in report.devices)
        self.start_env = {"LD_PRELOAD": str(lib)} if hami and lib is not None and Path(lib).is_file() else {}
        self.agent = NodeAgent(node_id, self.backend, state_dir, settings=AgentSettings(**settings),
                               cpu_milli=0, memory_mib=0)
        self.state_dir = str(state_dir)
        self.warnings = self._shared_with_ray(node_id)
        self.host = self._ray_node_name(node_id)
        k8s_node = os.environ.get(K8S_NODE_ENV, "").strip()
        self.labels = {K8S_NODE_LABEL: k8s_node} if k8s_node else {}
        self.simulated = simulate is not None and self.backend.__class__.__name__ == "SimulatedBackend"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._exceeded: list[dict[str, Any]] = []
        self._actions: dict[str, int] = {}  # enforcement action -> count
        self.wire: dict[str, Any] | None = None  # the fast path to reserve and release (hami_ray.wire)
        try:
            ops: dict[str, Callable[..., Any]] = {"reserve": self.reserve, "release_many": self.release_many,
                                                  "preempt": self.preempt, "activate": self.activate}
            server = ThreadServer(ops, ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
            self.wire = {"host": server.address[0], "port": server.address[1], "secret": server.secret}
        except OSError as exc:  # Ray calls still work
            log.warning("node actor fast path not started: %s", exc)
        threading.Thread(target=self._loop, name="hami-ray-tick", daemon=True).start()

    def _shared_with_ray(self, node_id: str) -> list[str]:
        """Plain Ray ``num_gpus`` and hami-ray never share a device: a node whose devices hami-ray manages
        starts Ray with ``--num-gpus 0`` (deploy/ does). Say so where Ray counts GPUs here all the same."""
        if not self.agent.node().devices:
            return []
        try:
            ray_gpus = next((float(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes()  # type: ignore[no-untyped-call]
                             if n.get("NodeID") == node_id), 0.0)
        except Exception:  # noqa: BLE001 - a warning is not worth failing the node actor's start
            return []
        if not ray_gpus:
            return []
        return [f"Ray also counts {ray_gpus:g} GPU(s) on this node: plain Ray num_gpus tasks may land on devices "
                "hami-ray slices (start Ray here with --num-gpus 0, or use hami_ray.remote(num_gpus=...))"]

    @staticmethod
    def _ray_node_name(node_id: str) -> str:
        """What operators call this node: Ray's node name (``ray start --node-name``; Ray's default is the
        node's address), else the machine's host name."""
        try:
            name = next((str(n.get("NodeName") or "") for n in ray.nodes()  # type: ignore[no-untyped-call]
                         if n.get("NodeID") == node_id), "")
        except Exception:  # noqa: BLE001 - a name is not worth failing the node actor's start
            name = ""
        return name or socket.gethostname()

    def _loop(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                with self._lock:
                    for exc in self.agent.tick():  # never raises: a failing step marks enforcement degraded
                        self._actions[exc.action] = self._actions.get(exc.action, 0) + 1
                        self._exceeded.append({"lease_id": exc.lease_id, "uuid": exc.uuid, "used_mib": exc.used_mib,
                                               "limit_mib": exc.limit_mib, "pid": exc.pid, "action": exc.action})
                    del self._exceeded[:-1000]
            except Exception:  # noqa: BLE001 - a long-running loop never dies on one bad object
                log.exception("node actor tick failed")
                time.sleep(TICK_S)

    def __ray_shutdown__(self) -> None:
        """Ray's hook on a graceful actor exit: stop the tick and the MPS daemon."""
        self._stop.set()
        with self._lock:
            self.backend.close()

    def info(self) -> dict[str, Any]:
        with self._lock:
            node = self.agent.node()
            if self.labels:
                node = node.model_copy(update={"labels": {**node.labels, **self.labels}})
            return {"node": node.model_dump(mode="json"), "state_dir": self.state_dir,
                    "simulated": self.simulated, "pid": os.getpid(), "start_env": self.start_env, "wire": self.wire,
                    "leases": [lease.model_dump(mode="json") for lease in self.agent.leases()],
                    "usage": self._usage(), "enforcement": dict(self._actions),
                    "isolation": {**self.agent.isolation_status(), "warnings": list(self.warnings), "host": self.host},
                    "journal": self.agent.journal_status()}

    def _usage(self) -> dict[str, Any] | None:
        """The last sample: per device used MiB and utilisation, per lease and device used MiB."""
        sample = self.agent.last_sample
        if sample is None:
            return None
        return {"devices": [{"uuid": d.uuid, "used_mib": d.used_mib, "utilization": d.utilization}
                            for d in sample.devices],
                "slices": [{"lease_id": s.lease_id, "uuid": s.uuid, "used_mib": s.used_mib} for s in sample.slices]}

    def audit(self) -> dict[str, Any]:
        """The ledger recounted (raises on a difference), each device's capacity and the most it ever
        held at once: what tests check after a storm of tasks."""
        with self._lock:
            self.agent.check()
            return {"capacity": {d.uuid: (d.memory_capacity_mib, d.core_capacity, d.slice_capacity)
                                 for d in self.agent.node().devices},
                    "peak": dict(self.agent.peak), "leases": len(self.agent.leases())}

    def lease_ids(self) -> list[str]:
        with self._lock:
            return [lease.lease_id for lease in self.agent.leases()]

    def reserve(self, lease: dict[str, Any], releases: list[tuple[str, str]] | None = None) -> dict[str, str]:
        """Confirm a reservation and return its isolation environment (one round trip for both);
        ``releases`` (lease id, token) are freed first (the placement actor's releases not told yet)."""
        with self._lock:
            self._release_all(releases or [])
            held = self.agent.reserve(Lease.model_validate(lease))
            return self.agent.isolation_env(held.lease_id)

    def release_many(self, releases: list[tuple[str, str]]) -> None:
        with self._lock:
            self._release_all(releases)

    def _release_all(self, releases: list[tuple[str, str]]) -> None:
        for lease_id, token in releases:
            try:
                self.agent.release(lease_id, token)
            except Exception as exc:  # noqa: BLE001 - one bad release never blocks the others
                log.warning("release of %s refused: %s", lease_id, exc)

    def isolation_env(self, lease_id: str) -> dict[str, str]:
        with self._lock:
            return self.agent.isolation_env(lease_id)

    def activate(self, lease_id: str, pid: int, pidns: int | None = None, starting: bool = False,
                 start: int | None = None) -> bool:
        """``pid`` (numbered in PID namespace ``pidns``) holds the lease now; False when the lease is not live
        here (a fast task ended it). ``starting``: ``pid`` is about to start work in the slice (a task's
        worker, :func:`hami_ray.runtime.worker.enter_slice`): False too, and ``pid`` not taken, while the slice
        is under a preemption notice, so that no work starts on a slice being taken back (a process that
        comes during the grace is told only at a tick, and stopped at the deadline, told or not). ``start``:
        the process's start time as it read it (the placement actor binds a requester that may be gone)."""
        with self._lock:
            if starting and lease_id in self.agent.preempting():
                return False
            try:
                self.agent.activate(lease_id, pid, pidns, start)
            except Exception:  # noqa: BLE001 - the lease may already be gone (a fast task)
                return False
            return True

    def claim(self, lease_id: str, pid: int | None = None, pidns: int | None = None) -> bool:
        """A driver holds the lease (its pid only when it runs on this node); False when it is not live."""
        with self._lock:
            try:
                self.agent.claim(lease_id, pid, pidns)
            except Exception:  # noqa: BLE001 - the lease may already be gone
                return False
            return True

    def finish(self, lease_id: str, pid: int) -> None:
        with self._lock:
            self.agent.finish(lease_id, pid)

    def disown(self, pid: int, pidns: int | None = None, keep: list[str] | None = None) -> list[str]:
        """``pid`` holds no Ray slice here but ``keep`` (:meth:`NodeAgent.disown`); the slices it left."""
        with self._lock:
            left = self.agent.disown(pid, pidns, keep or ())
        if left:
            log.warning("process %d held slices it did not know of, now left: %s", pid, ", ".join(left))
        return left

    def release(self, lease_id: str, token: str) -> bool:
        with self._lock:
            return self.agent.release(lease_id, token) is not None

    def preempt(self, lease_id: str, for_queue: str, reason: str = "reclaim",
                grace_s: float = 10.0) -> dict[str, Any] | None:
        """Notice of preemption (:meth:`NodeAgent.preempt`); None when the lease is no longer live here."""
        with self._lock:
            try:
                return self.agent.preempt(lease_id, for_queue, reason, grace_s)
            except LeaseNotFound:
                return None

    def quota_exceeded(self, lease_id: str) -> dict[str, Any] | None:
        """The enforcement record of a lease whose processes were stopped, if any."""
        with self._lock:
            for item in self._exceeded:
                if item["lease_id"] == lease_id:
                    return dict(item)
            return None

    def ping(self) -> bool:
        return True


NodeActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1,  # type: ignore[call-overload]
                       max_concurrency=4)(NodeActorShell)
