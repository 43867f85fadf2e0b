"""One local Ray (127.0.0.1, no dashboard) with simulated devices, shared by the runtime tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from hami_ray.runtime import api

SPEC = "2xA100-80GB,1xT4-16GB"


@pytest.fixture(scope="session")
def hami(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    state = tmp_path_factory.mktemp("hami-state")
    # address="local": always a new cluster, never a stale one recorded under /tmp/ray
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        api.init(simulate=SPEC, state_root=str(state),
                 agent={"grace_s": 0.5, "reap_interval_s": 0.5, "tolerance_mib": 0})
        yield state
    finally:
        api.shutdown()
        ray.shutdown()


def wait_until(predicate, timeout: float = 15.0, step: float = 0.2) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def live_leases() -> int:
    return len(api.status().leases)
