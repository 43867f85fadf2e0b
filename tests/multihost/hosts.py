"""Separate hosts on one machine, for the multi-host suite (issue 13).

Each host is a network namespace with its own address on a private bridge, and its Ray node runs as the
first process of a PID namespace of its own (with its own ``/proc``): hosts do not share pids, addresses or
loopback, as on a real cluster. The bridge lives in a namespace of its own too, so nothing is added to the
machine's own network namespace, and every address is inside namespaces this module created
(``SUBNET``.x/24); no traffic leaves them.

    with Hosts() as hosts:
        head, worker = hosts.add("h1"), hosts.add("h2")
        head.start_ray(head=None, num_cpus=2)
        worker.start_ray(head=head, num_cpus=2, env={"HAMI_RAY_NODE_SIMULATE": "2xT4-16GB"})
        out = head.run([sys.executable, "driver.py"], stdout=PIPE)   # a process on that host

Root is needed (``ip netns``, ``unshare --pid``). :func:`refusal` says why this machine cannot make such
hosts, for the suite to show and skip on. Called by ``tests/multihost/conftest.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.231.7"  # addresses exist only inside the namespaces made here
REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
START_TIMEOUT_S = 180.0
# Ray >= 2.5x turns token authentication on where a token file exists (~/.ray/auth_token, written by any
# local ray.init()); the hosts are private namespaces: say the mode for every process alike.
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


def refusal() -> str | None:
    """Why separate hosts cannot be made here (None: they can): each tool is tried for real, once."""
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"hrprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"`ip netns add` refused: {made.stderr.strip()}"
    try:
        pidns = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--pid", "--fork", "--mount-proc", "true"],
                               capture_output=True, text=True, check=False, timeout=30)
        if pidns.returncode != 0:
            return f"`unshare --pid --fork --mount-proc` refused: {pidns.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Host:
    """One host: its network namespace, address, and (once started) its Ray node as a PID namespace's init."""

    name: str
    netns: str
    ip: str
    workdir: Path
    ray_start: subprocess.Popen[bytes] | None = None
    init_pid: int | None = None  # the PID namespace's first process (``ray start --block``), as the machine sees it
    _logs: list[object] = field(default_factory=list)

    def start_ray(self, head: Host | None, num_cpus: int, env: dict[str, str] | None = None) -> None:
        """``ray start --head`` (``head`` None) or ``ray start --address`` of ``head``, blocking in a new PID
        namespace; returns once the node says it started.

        Raises:
            RuntimeError: Ray did not start within ``START_TIMEOUT_S`` (the tail of its log says why).
        """
        where = ["--head", "--port", "6379", "--include-dashboard", "false"] if head is None \
            else ["--address", f"{head.ip}:6379"]
        log_path = self.workdir / f"{self.name}-ray.log"
        log = log_path.open("ab")
        self._logs.append(log)
        argv = ["ip", "netns", "exec", self.netns, "unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                str(RAY), "start", *where, "--node-ip-address", self.ip, "--num-cpus", str(num_cpus),
                "--temp-dir", str(self.workdir / f"ray-{self.name}"), "--disable-usage-stats", "--block"]
        self.ray_start = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env={**os.environ, **RAY_ENV, **(env or {})}, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.ray_start.poll() is not None:
                raise RuntimeError(f"ray start on {self.name} exited: {self._tail(log_path)}")
            if self.init_pid is None:
                self.init_pid = self._child(self.ray_start.pid)
            if b"Ray runtime started" in log_path.read_bytes():
                return
            time.sleep(0.2)
        raise RuntimeError(f"ray start on {self.name} did not start within {START_TIMEOUT_S:g} s: "
                           f"{self._tail(log_path)}")

    def run(self, argv: list[str], **popen: object) -> subprocess.Popen[str]:
        """Start a process on this host: in its network, PID and mount namespaces (as if logged in there)."""
        if self.init_pid is None:
            raise RuntimeError(f"host {self.name} runs no Ray node yet")
        full = ["nsenter", "--target", str(self.init_pid), "--net", "--pid", "--mount", f"--wd={REPO}", *argv]
        env = {**os.environ, **RAY_ENV, **dict(popen.pop("env", None) or {})}  # type: ignore[call-overload]
        return subprocess.Popen(full, text=True, env=env, **popen)  # type: ignore[call-overload, no-any-return]

    def kill(self) -> None:
        """The host dies: its PID namespace's init is killed, so the kernel kills every process in it."""
        for pid in (self.init_pid, self.ray_start.pid if self.ray_start else None):
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.ray_start is not None:
            self.ray_start.wait(timeout=60)
        for log in self._logs:
            log.close()  # type: ignore[attr-defined]
        self._logs.clear()

    @staticmethod
    def _child(pid: int) -> int | None:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    @staticmethod
    def _tail(path: Path) -> str:
        try:
            return path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


class Hosts:
    """The hosts of one test session and the bridge between them; :meth:`close` removes all of it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.prefix = f"hr{os.getpid() % 10000}"  # interface names stay under Linux's 15 characters
        self.switch = f"{self.prefix}-sw"
        self.hosts: list[Host] = []
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add(self, name: str) -> Host:
        """A new host on the bridge, with the next address."""
        index = len(self.hosts)
        host = Host(name, f"{self.prefix}-{name}", f"{SUBNET}.{10 + index}", self.workdir)
        inner, outer = f"{self.prefix}{name}e", f"{self.prefix}{name}p"
        _ip("netns", "add", host.netns)
        self.hosts.append(host)
        _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
        _ip("link", "set", inner, "netns", host.netns)
        _ip("link", "set", outer, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", outer, "master", "br0")
        _ip("-n", self.switch, "link", "set", outer, "up")
        _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", inner)
        _ip("-n", host.netns, "link", "set", inner, "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        """Kill every host's processes and remove the namespaces (their interfaces go with them)."""
        for host in self.hosts:
            host.kill()
        for netns in [h.netns for h in self.hosts] + [self.switch]:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
