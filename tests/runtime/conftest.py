"""One local multi-node Ray (``ray.cluster_utils.Cluster`` on 127.0.0.1, no dashboard) with simulated
devices of several models, shared by the runtime tests.

- head: 4 CPUs, ``2xA100-80GB,1xT4-16GB`` (``hami_ray.init(simulate=...)``, the default for every node)
- worker: 2 CPUs, ``2xV100-32GB`` (its own ``HAMI_RAY_NODE_SIMULATE``, as ``ray start`` would set it)

Tests that need a node of their own (node removal) add and remove it themselves.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from hami_ray.runtime import api
from hami_ray.runtime.loopback import LOOPBACK, pin_ray_to_loopback
from node_actors.actor import NODE_SIMULATE_ENV
from tests.helpers import wait_for as wait_until  # noqa: F401 - the runtime tests import it from here

SPEC = "2xA100-80GB,1xT4-16GB"
WORKER_SPEC = "2xV100-32GB"
# Ray Serve's controller gives a new HTTP proxy 5 s to answer its ready check and a running one 10 s for each
# health check, then restarts it. Next to a CPU hog on 2 cores a proxy's start (uvicorn, starlette) takes
# longer, and the Serve tests saw their proxy restarted until their own waits ran out (issue 15). Read by the
# controller when it is imported, in the cluster's processes, which inherit this environment.
SERVE_ON_A_LOADED_MACHINE = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
                             "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


@dataclass
class RayCluster:
    cluster: Cluster
    state: Path

    def add_node(self, spec: str, num_cpus: int = 1, env: dict[str, str] | None = None, num_gpus: int = 0) -> object:
        return self.cluster.add_node(node_ip_address=LOOPBACK, num_cpus=num_cpus, num_gpus=num_gpus,
                                     env_vars={NODE_SIMULATE_ENV: spec, **(env or {})})


@pytest.fixture(scope="session")
def hami(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    pin_ray_to_loopback()
    for key, value in SERVE_ON_A_LOADED_MACHINE.items():
        os.environ.setdefault(key, value)
    state = tmp_path_factory.mktemp("hami-state")
    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": LOOPBACK, "num_cpus": 4, "include_dashboard": False})
    try:
        cluster.add_node(node_ip_address=LOOPBACK, num_cpus=2, env_vars={NODE_SIMULATE_ENV: WORKER_SPEC})
        ray.init(address=cluster.address, _node_ip_address=LOOPBACK, log_to_driver=False, configure_logging=False)
        api.init(simulate=SPEC, state_root=str(state),
                 agent={"grace_s": 0.5, "reap_interval_s": 0.5, "tolerance_mib": 0}, metrics_port=0,
                 preempt_grace_s=2.0)
        assert wait_until(lambda: len(api.status().nodes) == 2, timeout=60), "node actors did not start"
        yield RayCluster(cluster, state)
    finally:
        api.shutdown()
        ray.shutdown()
        cluster.shutdown()




def live_leases() -> int:
    return len(api.status().leases)


def assert_node_actors_empty_and_never_over() -> None:
    """Every node actor's ledger recounts clean, holds nothing now, and never held more than a device has
    (its high-water mark per device)."""
    for node in api.status().nodes:
        actor = ray.get_actor(f"hami-ray-node-{node.name}", namespace="hami-ray")
        audit = ray.get(actor.audit.remote(), timeout=30)
        assert audit["leases"] == 0, node.name  # the node actors' truth: nothing held, as the ledger says
        for uuid, (mib, cores, slices) in audit["peak"].items():
            cap_mib, cap_cores, cap_slices = audit["capacity"][uuid]
            assert mib <= cap_mib and cores <= cap_cores and slices <= cap_slices, uuid
