"""Fixtures for node-side tests: a fake clock, the simulated backend, agents, leases, child processes."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hami_ray.core.model import Allocation, DeviceGrant, Lease
from node_actors.agent import NodeAgent
from node_actors.backends.simulated import SimulatedBackend
from node_actors.settings import AgentSettings

NODE = "n1"
SPEC = "2xA100-80GB,2xT4-16GB"
_ids = itertools.count(1)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def uuid(i: int, node: str = NODE) -> str:
    return f"GPU-sim-{node}-{i}"


def make_lease(*grants: tuple[int, int, int], node: str = NODE, lease_id: str | None = None,
               token: str = "secret-token") -> Lease:
    """``make_lease((0, 8192, 30))``: device index, MiB, cores per grant, on the simulated node."""
    lease_id = lease_id or f"lease-{next(_ids)}"
    devices = tuple(DeviceGrant(uuid=uuid(i, node), memory_mib=m, cores=c) for i, m, c in grants)
    return Lease(lease_id=lease_id, owner="task", token=token, allocation=Allocation(node=node, slices=(devices,)))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings() -> AgentSettings:
    return AgentSettings(tolerance_mib=64, grace_s=10.0, reap_interval_s=5.0, reserve_grace_s=60.0)


@pytest.fixture
def backend(tmp_path: Path) -> SimulatedBackend:
    return SimulatedBackend(SPEC, NODE, tmp_path)


@pytest.fixture
def make_agent(tmp_path: Path, backend: SimulatedBackend, clock: FakeClock,
               settings: AgentSettings) -> Iterator[Callable[[], NodeAgent]]:
    agents: list[NodeAgent] = []

    def make() -> NodeAgent:
        agent = NodeAgent(NODE, backend, tmp_path, clock=clock, settings=settings)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.close()


@pytest.fixture
def agent(make_agent: Callable[[], NodeAgent]) -> NodeAgent:
    return make_agent()


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start child processes; every one is killed (by its pid) and waited for at the end."""
    children: list[subprocess.Popen[bytes]] = []

    def start(*argv: str) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        child.wait(timeout=10)
        if child.stderr is not None:
            child.stderr.close()


PYTHON = sys.executable
