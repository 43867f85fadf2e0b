"""Separate hosts on one machine, for the multi-host suite (issue 13).

Each host is a network namespace with its own address on a private bridge, and its Ray node runs as the
first process of a PID namespace of its own (with its own ``/proc``): hosts do not share pids, addresses or
loopback, as on a real cluster. The bridge lives in a namespace of its own too, so nothing is added to the
machine's own network namespace, and every address is inside namespaces this module created
(``SUBNET``.x/24); no traffic leaves them.

    isolation = choose()                  # the most separate hosts this machine allows
    with Hosts(workdir, isolation) as hosts:
        head, worker = hosts.add("h1"), hosts.add("h2")
        head.start_ray(head=None, num_cpus=2)
        worker.start_ray(head=head, num_cpus=2, env={"HAMI_RAY_NODE_SIMULATE": "2xT4-16GB"})
        out = head.run([sys.executable, "driver.py", head.gcs_address], stdout=PIPE)   # a process on that host

Root is needed (``ip netns``, ``unshare --pid``). A machine may refuse either kind of namespace; each is
probed on its own (:func:`choose`), and what is refused is replaced by the closest thing that works:

- ``netns``: a network namespace per host on a private bridge (``SUBNET``.x), and a PID namespace per host
  where the machine allows them (otherwise the hosts' processes share the machine's pids).
- ``loopback`` (network namespaces refused: ``ip`` missing, or ``ip netns add`` or a bridge/veth in it
  refused): each host its own loopback address (``LOOPBACK``.x: 127.0.0.0/8 is all local on Linux) in the
  machine's own network namespace, with no bridge and no added interface or address; Ray is bound to it
  (``ray start --node-ip-address``) and takes random ports where its defaults are fixed, since the hosts share
  one port space. Each host still gets a PID namespace of its own (``unshare --pid --fork --mount-proc``).
- ``plain`` (PID namespaces refused too: ``unshare``/``nsenter`` missing, or ``unshare --pid`` refused): as
  ``loopback``, and the hosts' processes are plain processes of the machine; a host is killed by killing its
  Ray node's process tree.

``HAMI_RAY_MULTIHOST_MODE=netns|loopback|plain`` caps the separation (default ``netns``: the best the machine
allows), e.g. ``HAMI_RAY_MULTIHOST_MODE=loopback`` tries the fallback on a machine that allows everything.
:attr:`Isolation.refusals` says what the machine refused, for the suite to show. Called by
``tests/multihost/conftest.py`` (and ``bench/multihost_fastpath.py``, which needs network namespaces: it
uses :func:`refusal` and the default :class:`Hosts`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.231.7"  # addresses exist only inside the namespaces made here
LOOPBACK = "127.0.0"  # the fallback's addresses: the machine's own loopback, nothing added
REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
START_TIMEOUT_S = 180.0
GCS_PORT = 6379  # the head's port in a network namespace of its own; hosts sharing the machine's take a free one
# Ray >= 2.5x turns token authentication on where a token file exists (~/.ray/auth_token, written by any
# local ray.init()); the hosts are private namespaces: say the mode for every process alike.
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}
# Hosts in one network namespace share its ports: Ray's fixed defaults would collide between their nodes (the
# dashboard agent's 52365, which it also binds on 127.0.0.1; the worker ports 10002-19999 that every raylet
# hands out from the same start; the head's 6379 and client server's 10001), so they are random (0, as
# ray.cluster_utils does) or, where Ray takes no 0, a port free now.
SHARED_PORTS = ["--dashboard-agent-listen-port", "0", "--min-worker-port", "0", "--max-worker-port", "0"]

MODE_ENV = "HAMI_RAY_MULTIHOST_MODE"
MODES = ("netns", "loopback", "plain")  # most separate first


@dataclass(frozen=True)
class Isolation:
    """How separate the hosts are, and why not more.

    Attributes:
        netns: Each host is a network namespace on a private bridge; else each has its own loopback address
            in the machine's network namespace.
        pidns: Each host's processes run in a PID namespace of its own (with its own ``/proc``).
        refusals: What the machine refused, one line per kind of namespace, e.g. ``"network namespaces:
            `ip netns add` refused: ..."``.
        cap: The mode asked for (``HAMI_RAY_MULTIHOST_MODE``, else ``netns``): nothing more separate is tried.
    """

    netns: bool = True
    pidns: bool = True
    refusals: tuple[str, ...] = ()
    cap: str = "netns"

    @property
    def mode(self) -> str:
        """``netns``, ``loopback`` or ``plain`` (the module's docstring says what each is)."""
        return "netns" if self.netns else "loopback" if self.pidns else "plain"

    def describe(self) -> str:
        """One line for the test output: the mode, what it means, and why it is not more separate."""
        net = f"a network namespace on a private bridge ({SUBNET}.x)" if self.netns \
            else f"its own loopback address ({LOOPBACK}.x) in this machine's network namespace"
        pid = "its own PID namespace" if self.pidns else "this machine's pids"
        why = [f"refused by this machine: {r}" for r in self.refusals]
        if self.cap != "netns":
            why.append(f"{MODE_ENV}={self.cap}")
        return f"{self.mode}: each host has {net} and {pid}" + (f" ({'; '.join(why)})" if why else "")


def choose(cap: str | None = None) -> Isolation:
    """The most separate hosts this machine allows, no more than ``cap``: each kind of namespace is tried
    for real, once.

    Args:
        cap: ``netns``, ``loopback`` or ``plain``; None: ``$HAMI_RAY_MULTIHOST_MODE``, else ``netns``.

    Raises:
        ValueError: ``cap`` is none of those.
    """
    wanted = cap if cap is not None else os.environ.get(MODE_ENV, "").strip() or "netns"
    if wanted not in MODES:
        raise ValueError(f"{MODE_ENV}={wanted!r}: expected one of {', '.join(MODES)}")
    refusals: list[str] = []
    netns = pidns = False
    if wanted == "netns":
        why = _probe_netns()
        netns = why is None
        if why is not None:
            refusals.append(f"network namespaces: {why}")
    if wanted != "plain":
        why = _probe_pidns()
        pidns = why is None
        if why is not None:
            refusals.append(f"PID namespaces: {why}")
    return Isolation(netns=netns, pidns=pidns, refusals=tuple(refusals), cap=wanted)


def refusal() -> str | None:
    """Why hosts with network and PID namespaces of their own cannot be made here (None: they can)."""
    return "; ".join(choose("netns").refusals) or None


def _probe_netns() -> str | None:
    """Why this machine refuses a network namespace with a bridge and a veth pair (None: it allows them)."""
    if shutil.which("ip") is None:
        return "ip is not installed"
    probe = f"hrprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"`ip netns add` refused: {made.stderr.strip()}"
    try:
        for link in (["br0", "type", "bridge"], ["hrp0", "type", "veth", "peer", "name", "hrp1"]):
            done = subprocess.run(["ip", "-n", probe, "link", "add", *link], capture_output=True, text=True,
                                  check=False)
            if done.returncode != 0:
                return f"`ip link add {' '.join(link)}` refused: {done.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _probe_pidns() -> str | None:
    """Why this machine refuses a PID namespace with its own ``/proc`` (None: it allows them)."""
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                              text=True, check=False, timeout=30)
    except subprocess.TimeoutExpired:
        return "`unshare --pid --fork --mount-proc true` did not finish within 30 s"
    if done.returncode != 0:
        return f"`unshare --pid --fork --mount-proc` refused: {done.stderr.strip()}"
    return None


def _free_port() -> int:
    """A TCP port no socket of this network namespace is bound to now."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Host:
    """One host: its address (in its network namespace, if it has one), and (once started) its Ray node, as a
    PID namespace's init where hosts have those."""

    name: str
    netns: str | None  # None: the machine's own network namespace (an own loopback address)
    ip: str
    workdir: Path
    pidns: bool = True
    ray_start: subprocess.Popen[bytes] | None = None
    init_pid: int | None = None  # the PID namespace's first process (``ray start --block``), as the machine sees it
    gcs_port: int | None = None  # the head's: where ``ray start --address`` and drivers connect
    _logs: list[object] = field(default_factory=list)
    _killed: bool = False

    @property
    def gcs_address(self) -> str:
        """``ip:port`` of this host's head node.

        Raises:
            RuntimeError: this host runs no head node.
        """
        if self.gcs_port is None:
            raise RuntimeError(f"host {self.name} runs no Ray head")
        return f"{self.ip}:{self.gcs_port}"

    @property
    def temp_dir(self) -> Path:
        return self.workdir / f"ray-{self.name}"

    def start_ray(self, head: Host | None, num_cpus: int, env: dict[str, str] | None = None) -> None:
        """``ray start --head`` (``head`` None) or ``ray start --address`` of ``head``, blocking (in a new PID
        namespace where hosts have those); returns once the node says it started.

        Raises:
            RuntimeError: Ray did not start within ``START_TIMEOUT_S`` (the tail of its log says why).
        """
        own_net = self.netns is not None
        if head is None:
            port = str(GCS_PORT) if own_net else "0"  # 0: Ray picks a free one, read back once started
            where = ["--head", "--port", port, "--include-dashboard", "false"]
            where += [] if own_net else ["--ray-client-server-port", str(_free_port())]
        else:
            where = ["--address", head.gcs_address]
        where += [] if own_net else SHARED_PORTS
        log_path = self.workdir / f"{self.name}-ray.log"
        log = log_path.open("ab")
        self._logs.append(log)
        enter = ["ip", "netns", "exec", self.netns] if self.netns is not None else []
        if self.pidns:
            enter += ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
        argv = [*enter, str(RAY), "start", *where, "--node-ip-address", self.ip, "--num-cpus", str(num_cpus),
                "--temp-dir", str(self.temp_dir), "--disable-usage-stats", "--block"]
        self.ray_start = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env={**os.environ, **RAY_ENV, **(env or {})}, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.ray_start.poll() is not None:
                raise RuntimeError(f"ray start on {self.name} exited: {self._tail(log_path)}")
            if self.pidns and self.init_pid is None:
                self.init_pid = self._child(self.ray_start.pid)
            if b"Ray runtime started" in log_path.read_bytes():
                if head is None:
                    self.gcs_port = GCS_PORT if own_net else self._started_port()
                return
            time.sleep(0.2)
        raise RuntimeError(f"ray start on {self.name} did not start within {START_TIMEOUT_S:g} s: "
                           f"{self._tail(log_path)}")

    def run(self, argv: list[str], **popen: object) -> subprocess.Popen[str]:
        """Start a process on this host: in its network, PID and mount namespaces, those it has (as if logged
        in there), in the repository."""
        if self.ray_start is None or (self.pidns and self.init_pid is None):
            raise RuntimeError(f"host {self.name} runs no Ray node yet")
        if self.pidns:
            net = ["--net"] if self.netns is not None else []
            full = ["nsenter", "--target", str(self.init_pid), *net, "--pid", "--mount", f"--wd={REPO}", *argv]
        else:
            full = (["ip", "netns", "exec", self.netns] if self.netns is not None else []) + argv
            popen.setdefault("cwd", REPO)
        env = {**os.environ, **RAY_ENV, **dict(popen.pop("env", None) or {})}  # type: ignore[call-overload]
        return subprocess.Popen(full, text=True, env=env, **popen)  # type: ignore[call-overload, no-any-return]

    def kill(self) -> None:
        """The host dies: its PID namespace's init is killed, so the kernel kills every process in it (without
        PID namespaces: every process of its Ray node, found by :meth:`_processes`). Once: a second call
        (:meth:`Hosts.close` after a test killed it) signals no pid that may since have been reused."""
        if not self._killed:
            self._killed = True
            if self.pidns:
                self._sigkill({pid for pid in (self.init_pid, self.ray_start.pid if self.ray_start else None)
                               if pid is not None})
            elif self.ray_start is not None:
                for _ in range(50):  # a process forked meanwhile is found by the next round
                    pids = self._processes()
                    if not pids:
                        break
                    self._sigkill(pids)
                    time.sleep(0.1)
        if self.ray_start is not None:
            self.ray_start.wait(timeout=60)
        for log in self._logs:
            log.close()  # type: ignore[attr-defined]
        self._logs.clear()

    def _processes(self) -> set[int]:
        """This host's live processes, where it has no PID namespace: ``ray start``'s session (it is its leader)
        and descendants, and any process naming its Ray temp dir (one Ray re-parented)."""
        assert self.ray_start is not None
        leader, mark = self.ray_start.pid, str(self.temp_dir).encode()
        found: set[int] = set()
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            state, ppid, _pgrp, sid = stat[stat.rindex(")") + 2:].split()[:4]
            if state == "Z":
                continue
            parents[pid] = int(ppid)
            if int(sid) == leader or mark in cmdline:
                found.add(pid)
        for pid in parents:  # descendants that left the session (setsid)
            seen, up = set(), pid
            while up in parents and up not in seen and up != leader:
                seen.add(up)
                up = parents[up]
            if up == leader:
                found.add(pid)
        return found | ({leader} if self.ray_start.poll() is None else set())

    @staticmethod
    def _sigkill(pids: set[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _started_port(self) -> int:
        """The port a head started with ``--port 0`` listens on (Ray writes ``ip:port`` into its temp dir)."""
        path = self.temp_dir / "ray_current_cluster"
        try:
            address = path.read_text().strip()
        except OSError as exc:
            raise RuntimeError(f"ray start on {self.name} wrote no address to {path}: {exc}") from exc
        return int(address.rsplit(":", 1)[1])

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
    """The hosts of one test session and the bridge between them (network namespaces only); :meth:`close`
    removes all of it."""

    def __init__(self, workdir: Path, isolation: Isolation | None = None) -> None:
        """Args:
            workdir: Where the hosts' Ray temp dirs and logs go.
            isolation: How separate the hosts are (:func:`choose`); None: network and PID namespaces.
        """
        self.workdir = workdir
        self.isolation = isolation or Isolation()
        self.prefix = f"hr{os.getpid() % 10000}"  # interface names stay under Linux's 15 characters
        self.switch = f"{self.prefix}-sw"
        self.hosts: list[Host] = []
        if self.isolation.netns:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")

    def add(self, name: str) -> Host:
        """A new host with the next address: on the bridge, or (without network namespaces) on loopback."""
        index = len(self.hosts)
        if not self.isolation.netns:
            host = Host(name, None, f"{LOOPBACK}.{10 + index}", self.workdir, pidns=self.isolation.pidns)
            self.hosts.append(host)
            return host
        host = Host(name, f"{self.prefix}-{name}", f"{SUBNET}.{10 + index}", self.workdir, pidns=self.isolation.pidns)
        assert host.netns is not None
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
        if self.isolation.netns:
            for netns in [h.netns for h in self.hosts if h.netns is not None] + [self.switch]:
                subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
