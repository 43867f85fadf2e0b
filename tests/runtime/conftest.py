"""One local multi-node Ray (``ray.cluster_utils.Cluster`` on 127.0.0.1, no dashboard) with simulated
devices of several models, shared by the runtime tests.

- head: 4 CPUs, ``2xA100-80GB,1xT4-16GB`` (``hami_ray.init(simulate=...)``, the default for every node)
- worker: 2 CPUs, ``2xV100-32GB`` (its own ``HAMI_RAY_NODE_SIMULATE``, as ``ray start`` would set it)

Tests that need a node of their own (node removal) add and remove it themselves.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Ray turns 127.0.0.1 in an address into the machine's outward address unless cluster mode is off;
# set before Ray is imported anywhere in this process and inherited by every process Ray starts.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest  # noqa: E402
import ray  # noqa: E402
from ray._private import ray_constants  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from hami_ray.runtime import api  # noqa: E402
from node_actors.actor import NODE_SIMULATE_ENV  # noqa: E402

LOOPBACK = "127.0.0.1"
SPEC = "2xA100-80GB,1xT4-16GB"
WORKER_SPEC = "2xV100-32GB"


@dataclass
class RayCluster:
    cluster: Cluster
    state: Path

    def add_node(self, spec: str, num_cpus: int = 1) -> object:
        return self.cluster.add_node(node_ip_address=LOOPBACK, num_cpus=num_cpus, env_vars={NODE_SIMULATE_ENV: spec})


@pytest.fixture(scope="session")
def hami(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    ray_constants.ENABLE_RAY_CLUSTER = False  # in case Ray was imported before this file
    state = tmp_path_factory.mktemp("hami-state")
    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": LOOPBACK, "num_cpus": 4, "include_dashboard": False})
    try:
        cluster.add_node(node_ip_address=LOOPBACK, num_cpus=2, env_vars={NODE_SIMULATE_ENV: WORKER_SPEC})
        ray.init(address=cluster.address, _node_ip_address=LOOPBACK, log_to_driver=False, configure_logging=False)
        api.init(simulate=SPEC, state_root=str(state),
                 agent={"grace_s": 0.5, "reap_interval_s": 0.5, "tolerance_mib": 0})
        assert wait_until(lambda: len(api.status().nodes) == 2, timeout=60), "node actors did not start"
        yield RayCluster(cluster, state)
    finally:
        api.shutdown()
        ray.shutdown()
        cluster.shutdown()


def wait_until(predicate, timeout: float = 15.0, step: float = 0.2) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def live_leases() -> int:
    return len(api.status().leases)


def audit_all() -> dict[str, dict[str, object]]:
    """Every node actor's audit (ledger recounted; capacity and peak per device)."""
    out = {}
    for node in api.status().nodes:
        actor = ray.get_actor(f"hami-ray-node-{node.name}", namespace="hami-ray")
        out[node.name] = ray.get(actor.audit.remote(), timeout=30)
    return out
