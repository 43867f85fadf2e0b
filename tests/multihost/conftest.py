"""The multi-host cluster of the suite (issue 13): hosts made of network and PID namespaces on this machine
(:mod:`tests.multihost.hosts`), ``ray start --head`` on one, ``ray start --address`` on two more, each with
simulated devices of its own, and a fourth host that runs the user's drivers (a Ray node with no CPUs and
no devices, as a login node would be). No Ray internals are patched here.

- h1 (head): ``2xA100-80GB``; h2: ``2xT4-16GB``; h3: ``2xV100-32GB``; h0: the drivers' host.

Where this machine refuses a kind of namespace (or ``HAMI_RAY_MULTIHOST_MODE`` caps them), the hosts are the
closest thing that works (:func:`tests.multihost.hosts.choose`: own loopback addresses, PID namespaces where
allowed); the suite prints what it uses and what was refused, and says it again in the terminal summary
(``multi-host hosts``). A test that cannot hold there skips, saying why.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import PIPE

import pytest

from tests.multihost.hosts import REPO, Host, Hosts, Isolation, choose

DRIVER = REPO / "tests" / "multihost" / "driver.py"
SPECS = {"h1": "2xA100-80GB", "h2": "2xT4-16GB", "h3": "2xV100-32GB"}
ISOLATION = pytest.StashKey[Isolation]()  # the session's hosts, for the terminal summary


@dataclass
class Cluster:
    hosts: Hosts
    by_name: dict[str, Host]
    state: Path
    nodes: list[dict[str, object]] = field(default_factory=list)  # as the first driver saw them

    @property
    def head(self) -> Host:
        return self.by_name["h1"]

    @property
    def isolation(self) -> Isolation:
        return self.hosts.isolation

    def driver(self, *args: str) -> DriverRun:
        """Start ``driver.py`` on the drivers' host (h0)."""
        h0 = self.by_name["h0"]
        proc = h0.run([sys.executable, str(DRIVER), self.head.gcs_address, h0.ip, *args], stdout=PIPE,
                      stderr=PIPE)
        return DriverRun(proc)


class DriverRun:
    """A running driver: its JSON lines, one at a time."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def line(self, timeout: float = 300) -> dict[str, object]:
        """The next JSON line it prints (Ray's own messages on stdout are skipped).

        Raises:
            AssertionError: it exited, or printed no JSON line, within ``timeout`` (its stderr's tail says why).
        """
        proc = self.proc
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
            text = proc.stdout.readline() if ready else ""
            if not text:
                self._kill()
                err = proc.stderr.read() if proc.stderr else ""
                self.stop()
                raise AssertionError(f"the driver printed no result within {timeout:g} s: {err[-3000:]}")
            if text.startswith("{"):
                return json.loads(text)  # type: ignore[no-any-return]

    def finish(self, timeout: float = 120) -> None:
        proc = self.proc
        try:
            proc.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        """Kill the driver and close its pipes."""
        self._kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def _kill(self) -> None:
        """Kill the driver (nsenter's child, which nsenter would leave running) and nsenter."""
        from node_actors.pids import ProcessTable  # noqa: PLC0415

        proc = self.proc
        for pid in sorted(ProcessTable.scan().descendants([proc.pid]) - {proc.pid}):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Say what the hosts were, and what this machine refused, when the suite made them."""
    isolation = config.stash.get(ISOLATION, None)
    if isolation is not None:
        terminalreporter.write_sep("-", "multi-host hosts")
        terminalreporter.write_line(isolation.describe())


@pytest.fixture(scope="session")
def multihost(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Cluster]:
    isolation = choose()
    pytestconfig.stash[ISOLATION] = isolation
    print(f"multi-host suite: hosts: {isolation.describe()}")
    workdir = tmp_path_factory.mktemp("hosts")
    hosts = Hosts(workdir, isolation)
    try:
        by_name = {name: hosts.add(name) for name in ("h0", "h1", "h2", "h3")}
        by_name["h1"].start_ray(None, num_cpus=2, env={"HAMI_RAY_NODE_SIMULATE": SPECS["h1"]})
        for name in ("h2", "h3"):
            by_name[name].start_ray(by_name["h1"], num_cpus=2, env={"HAMI_RAY_NODE_SIMULATE": SPECS[name]})
        by_name["h0"].start_ray(by_name["h1"], num_cpus=0)
        cluster = Cluster(hosts, by_name, workdir / "hami-state")
        run = cluster.driver("setup", str(cluster.state), "4")
        try:
            cluster.nodes = list(run.line()["nodes"])  # type: ignore[call-overload]
        finally:
            run.finish()
        yield cluster
    finally:
        hosts.close()
