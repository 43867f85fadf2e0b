"""The node actor: a thin Ray shell over :class:`~node_actors.agent.NodeAgent`, one per Ray node.

Named ``hami-ray-node-<node id>`` in namespace ``hami-ray``, detached, pinned to its node, restarted on
failure (it then rebuilds from its journal). A background thread runs the agent's ``tick`` (reap dead
holders, refresh health, enforce memory) every ``TICK_S``; a lock serialises it with the actor methods.
Each method unpacks, calls the agent, returns plain data.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import ray

from hami_ray.core.model import Lease
from node_actors.agent import NodeAgent
from node_actors.backends import detect_backend
from node_actors.settings import AgentSettings, BackendSettings

NAMESPACE = "hami-ray"
TICK_S = 1.0
NODE_SIMULATE_ENV = "HAMI_RAY_NODE_SIMULATE"  # set where a node starts (`ray start`): that node's devices


def node_actor_name(node_id: str) -> str:
    return f"hami-ray-node-{node_id}"


def node_state_dir(state_root: str, node_id: str) -> str:
    """Where the node actor of ``node_id`` keeps its journal and simulated usage files."""
    return str(Path(state_root) / node_id[:16])


class NodeActorShell:
    """The actor's body; ``NodeActor`` below is this class made remote."""

    def __init__(self, node_id: str, state_root: str, simulate: str | None, settings: dict[str, Any],
                 simulate_default: str | None = None) -> None:
        """``simulate``: this node's spec from ``hami_ray.init(simulate_per_node=...)``; else the node's own
        ``$HAMI_RAY_NODE_SIMULATE``; else ``simulate_default`` (``init(simulate=...)`` for every node)."""
        simulate = simulate or os.environ.get(NODE_SIMULATE_ENV) or simulate_default
        state_dir = Path(node_state_dir(state_root, node_id))
        self.backend = detect_backend(BackendSettings(node_name=node_id, state_dir=state_dir, simulate=simulate))
        self.agent = NodeAgent(node_id, self.backend, state_dir, settings=AgentSettings(**settings),
                               cpu_milli=0, memory_mib=0)
        self.state_dir = str(state_dir)
        self.simulated = simulate is not None and self.backend.__class__.__name__ == "SimulatedBackend"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._exceeded: list[dict[str, Any]] = []
        threading.Thread(target=self._loop, name="hami-ray-tick", daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                with self._lock:
                    for exc in self.agent.tick():
                        self._exceeded.append({"lease_id": exc.lease_id, "uuid": exc.uuid, "used_mib": exc.used_mib,
                                               "limit_mib": exc.limit_mib, "pid": exc.pid})
                    del self._exceeded[:-1000]
            except Exception:  # noqa: BLE001 - a long-running loop never dies on one bad object
                time.sleep(TICK_S)

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {"node": self.agent.node().model_dump(mode="json"), "state_dir": self.state_dir,
                    "simulated": self.simulated, "pid": os.getpid(),
                    "leases": [lease.model_dump(mode="json") for lease in self.agent.leases()]}

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

    def reserve(self, lease: dict[str, Any]) -> dict[str, str]:
        """Confirm a reservation and return its isolation environment (one round trip for both)."""
        with self._lock:
            held = self.agent.reserve(Lease.model_validate(lease))
            return self.agent.isolation_env(held.lease_id)

    def isolation_env(self, lease_id: str) -> dict[str, str]:
        with self._lock:
            return self.agent.isolation_env(lease_id)

    def activate(self, lease_id: str, pid: int) -> None:
        with self._lock:
            try:
                self.agent.activate(lease_id, pid)
            except Exception:  # noqa: BLE001 - the lease may already be gone (a fast task)
                pass

    def finish(self, lease_id: str, pid: int) -> None:
        with self._lock:
            self.agent.finish(lease_id, pid)

    def release(self, lease_id: str, token: str) -> bool:
        with self._lock:
            return self.agent.release(lease_id, token) is not None

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
