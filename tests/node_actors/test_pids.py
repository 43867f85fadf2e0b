"""node_actors.pids with real processes: descendants, (pid, start) identity, PID-namespace mapping, and
scans of a fake procfs that hold malformed and vanished entries."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node_actors.pids import (
    INIT_PIDNS_INO,
    Proc,
    ProcessTable,
    in_host_pidns,
    kill_checked,
    own_pidns,
    same_process,
)
from node_actors.processes import pid_alive, start_ticks

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
SLEEP = "import time; time.sleep(600)"
# A child that starts a sleeping grandchild, prints its pid, reaps it when it dies (no lingering zombie),
# then sleeps itself.
PARENT = (
    "import subprocess, sys, time\n"
    f"g = subprocess.Popen([sys.executable, '-c', {SLEEP!r}])\n"
    "print(g.pid, flush=True)\n"
    "g.wait()\n"
    "time.sleep(600)\n"
)
# Runs inside a new PID namespace: its pid there, its namespace's inode as os.stat sees it, and what
# in_host_pidns() says from inside; then it waits to be killed.
INNER = (
    "import os, time\n"
    "from node_actors.pids import in_host_pidns\n"
    "print(os.getpid(), os.stat('/proc/self/ns/pid').st_ino, in_host_pidns(), flush=True)\n"
    "time.sleep(600)\n"
)

Start = Callable[..., subprocess.Popen[bytes]]


def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def read_line(child: subprocess.Popen[bytes], timeout: float = 20.0) -> bytes:
    """The child's first stdout line, or b"" when it exits (or stays silent) first."""
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    return child.stdout.readline() if ready else b""


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def start() -> Iterator[Start]:
    """Start child processes with piped output; each is killed by its pid, waited for, its pipes closed."""
    children: list[subprocess.Popen[bytes]] = []

    def run(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env)
        children.append(child)
        return child

    yield run
    for child in children:
        if child.poll() is None:
            kill_pid(child.pid)
        child.wait(timeout=10)
        for pipe in (child.stdout, child.stderr):
            if pipe is not None:
                pipe.close()


# --- descendants ---------------------------------------------------------------------------------------


def test_descendants_are_children_and_grandchildren(start: Start) -> None:
    child = start(PYTHON, "-c", PARENT)
    grandchild = int(read_line(child))
    try:
        table = ProcessTable.scan()
        found = table.descendants([child.pid])
        assert found == {child.pid, grandchild}
        assert os.getpid() not in found
        assert table.get(grandchild) is not None and table.get(grandchild).ppid == child.pid  # type: ignore[union-attr]
        # Our own subtree holds them too; a root that does not exist adds nothing.
        assert found <= ProcessTable.scan().descendants([os.getpid()])
        assert table.descendants([child.pid, 2**22 + 1]) == found

        kill_pid(grandchild)
        assert wait_until(lambda: grandchild not in ProcessTable.scan())
        assert ProcessTable.scan().descendants([child.pid]) == {child.pid}
    finally:
        kill_pid(grandchild)


def test_an_orphan_is_lost_by_a_ppid_walk(start: Start) -> None:
    # The known limit of a ppid walk (reference section 3): once its parent dies, the grandchild is
    # re-parented to init or a subreaper and no longer found from the parent's pid.
    child = start(PYTHON, "-c", PARENT)
    grandchild = int(read_line(child))
    try:
        kill_pid(child.pid)
        child.wait(timeout=10)
        table = ProcessTable.scan()
        assert grandchild in table
        assert table.get(grandchild).ppid != child.pid  # type: ignore[union-attr]
        assert table.descendants([child.pid]) == set()
    finally:
        kill_pid(grandchild)


def test_a_zombie_is_absent(start: Start) -> None:
    child = start(PYTHON, "-c", SLEEP)
    assert wait_until(lambda: child.pid in ProcessTable.scan())
    start_tick = start_ticks(child.pid)
    kill_pid(child.pid)  # not waited for yet: a zombie, our child, until child.wait()
    assert wait_until(lambda: child.pid not in ProcessTable.scan())
    assert Path(f"/proc/{child.pid}").exists()  # still there as a zombie
    assert not same_process(child.pid, start_tick)
    assert kill_checked(child.pid, start_tick) is None
    child.wait(timeout=10)


def test_own_entry_matches_the_process() -> None:
    table = ProcessTable.scan()
    me = table.get(os.getpid())
    assert me is not None
    assert me.ppid == os.getppid()
    assert me.start == start_ticks(os.getpid())
    assert me.nspid[0] == os.getpid()
    assert me.pidns == own_pidns() == os.stat("/proc/self/ns/pid").st_ino
    assert table.resolve(os.getpid(), None) == os.getpid()
    assert table.resolve(os.getpid(), own_pidns()) == os.getpid()


# --- (pid, start) identity ------------------------------------------------------------------------------


def test_start_time_tells_a_reused_pid_and_guards_the_kill(start: Start) -> None:
    child = start(PYTHON, "-c", SLEEP)
    assert wait_until(lambda: child.pid in ProcessTable.scan())
    tick = start_ticks(child.pid)
    assert tick is not None
    table = ProcessTable.scan()
    assert table.same(child.pid, tick)
    assert not table.same(child.pid, tick + 1)
    assert same_process(child.pid, tick)
    assert same_process(child.pid, None)
    assert not same_process(child.pid, tick + 1)

    # As if the pid had been recycled since it was recorded: left alone.
    assert kill_checked(child.pid, tick + 1) is None
    assert child.poll() is None and pid_alive(child.pid)

    assert kill_checked(child.pid, tick) is True
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert not same_process(child.pid, tick)
    assert table.same(child.pid, tick)  # a snapshot: it changes only with the next scan
    assert not ProcessTable.scan().same(child.pid, tick)


def test_kill_checked_without_start_checks_liveness_only(start: Start) -> None:
    child = start(PYTHON, "-c", SLEEP)
    assert wait_until(lambda: pid_alive(child.pid))
    assert kill_checked(child.pid, None) is True
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert kill_checked(child.pid, None) is None  # reaped: nothing of that pid is left to kill


# --- PID namespaces -------------------------------------------------------------------------------------


@pytest.fixture
def unshared(start: Start) -> tuple[subprocess.Popen[bytes], int, int, str]:
    """A Python worker in its own PID namespace (``unshare --pid --fork --mount-proc``): the unshare
    process, the worker's pid and namespace inode as it sees them, and its ``in_host_pidns()``.

    Skips, printing unshare's stderr, where new PID namespaces are refused (no privilege, no user
    namespaces, a seccomp profile)."""
    argv = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    if os.geteuid() != 0:
        argv.append("--map-root-user")  # unprivileged: a user namespace grants the right to a PID one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        proc = start(*argv, PYTHON, "-c", INNER, cwd=REPO, env=env)
    except FileNotFoundError as exc:
        pytest.skip(f"unshare is not installed: {exc}")
    line = read_line(proc)
    if not line:
        if proc.poll() is None:
            kill_pid(proc.pid)
        proc.wait(timeout=10)
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace").strip()
        print(f"unshare refused (exit {proc.returncode}): {err}", file=sys.stderr)
        pytest.skip(f"unshare --pid --fork refused (exit {proc.returncode}): {err}")
    pid, ino, host = line.split()
    return proc, int(pid), int(ino), host.decode()


def test_resolve_maps_a_pid_inside_a_namespace_to_ours(
        unshared: tuple[subprocess.Popen[bytes], int, int, str]) -> None:
    proc, inner_pid, inner_ns, _ = unshared
    assert inner_pid <= 2  # the first process of a fresh namespace
    assert inner_ns != own_pidns()
    table = ProcessTable.scan()

    host_pid = table.resolve(inner_pid, inner_ns)
    assert host_pid is not None and host_pid != inner_pid
    assert host_pid in table.descendants([proc.pid]) and host_pid != proc.pid
    assert Path(f"/proc/{host_pid}/cmdline").read_bytes().split(b"\0")[0] == PYTHON.encode()
    worker = table.get(host_pid)
    assert worker is not None
    assert worker.pidns == inner_ns
    assert worker.nspid[0] == host_pid and worker.nspid[-1] == inner_pid and len(worker.nspid) >= 2

    # Numbered in our namespace, the same number names another process, if any: never the worker.
    assert table.resolve(inner_pid, None) != host_pid
    assert table.resolve(inner_pid, own_pidns()) != host_pid
    assert table.resolve(inner_pid, inner_ns + 1) is None  # no such namespace

    # Once the worker exits, nothing resolves in its namespace.
    kill_pid(host_pid)  # init of the namespace: the kernel kills the rest of it
    proc.wait(timeout=10)
    assert wait_until(lambda: ProcessTable.scan().resolve(inner_pid, inner_ns) is None)


def test_in_host_pidns_is_false_inside_a_namespace(
        unshared: tuple[subprocess.Popen[bytes], int, int, str]) -> None:
    _, _, inner_ns, inner_says = unshared
    assert inner_says == "False"
    here = in_host_pidns()
    assert isinstance(here, bool)
    assert here == (own_pidns() == INIT_PIDNS_INO)
    assert inner_ns != INIT_PIDNS_INO


# --- fake procfs ----------------------------------------------------------------------------------------


def stat_line(pid: int, comm: str, state: str, ppid: int, start: int) -> str:
    # Fields 3.. of proc_pid_stat(5); start time is field 22, i.e. the 20th after the comm.
    rest = [state, str(ppid)] + ["0"] * 17 + [str(start)] + ["0"] * 30
    return f"{pid} ({comm}) {' '.join(rest)}\n"


def fake_proc(root: Path, pid: int, *, stat: str | None, nspid: tuple[int, ...] | None = None,
              status: bool = True, pidns: int | None = None) -> None:
    directory = root / str(pid)
    directory.mkdir()
    if stat is not None:
        (directory / "stat").write_text(stat)
    if status:
        nspid_line = "" if nspid is None else "NSpid:\t" + "\t".join(map(str, nspid)) + "\n"
        (directory / "status").write_text(f"Name:\tx\nState:\tS (sleeping)\nPid:\t{pid}\n{nspid_line}VmRSS:\t1 kB\n")
    if pidns is not None:
        (directory / "ns").mkdir()
        (directory / "ns" / "pid").symlink_to(f"pid:[{pidns}]")  # what the kernel's link reads


def test_scan_of_a_fake_procfs_skips_bad_entries(tmp_path: Path) -> None:
    fake_proc(tmp_path, 100, stat=stat_line(100, "init", "S", 0, 5), nspid=(100,), pidns=INIT_PIDNS_INO)
    fake_proc(tmp_path, 101, stat="101 (broken\n")  # no closing parenthesis
    fake_proc(tmp_path, 102, stat=stat_line(102, "no status", "S", 100, 7), status=False)  # vanished mid-scan
    fake_proc(tmp_path, 103, stat=stat_line(103, "zombie", "Z", 100, 8))
    fake_proc(tmp_path, 104, stat=stat_line(104, "a) b (c", "R", 100, 9), nspid=(104, 7), pidns=4242)
    fake_proc(tmp_path, 105, stat=None)  # a directory and nothing in it
    fake_proc(tmp_path, 106, stat=stat_line(106, "old kernel", "S", 104, 10))  # no NSpid line, no ns/
    fake_proc(tmp_path, 107, stat="107 (short) S 1 2\n")  # too few fields
    fake_proc(tmp_path, 108, stat=stat_line(108, "nan", "S", 1, 11).replace(" 11 ", " x "))
    (tmp_path / "self").mkdir()
    (tmp_path / "meminfo").write_text("MemTotal: 1 kB\n")

    table = ProcessTable.scan(tmp_path)
    assert sorted(p.pid for p in table) == [100, 104, 106]
    assert table.get(100) == Proc(pid=100, ppid=0, start=5, nspid=(100,), pidns=INIT_PIDNS_INO)
    assert table.get(104) == Proc(pid=104, ppid=100, start=9, nspid=(104, 7), pidns=4242)
    assert table.get(106) == Proc(pid=106, ppid=104, start=10, nspid=(106,), pidns=None)

    assert table.descendants([100]) == {100, 104, 106}
    assert table.descendants([104, 103, 999]) == {104, 106}
    assert table.resolve(7, 4242) == 104
    assert table.resolve(7, 4243) is None
    assert table.resolve(104, None) == 104 and table.resolve(103, None) is None
    assert table.same(104, 9) and not table.same(104, 10) and not table.same(103, 8)

    assert own_pidns(tmp_path) is None and in_host_pidns(tmp_path) is None
    assert table.own_pidns is None


def test_scan_of_an_empty_or_missing_procfs(tmp_path: Path) -> None:
    assert len(ProcessTable.scan(tmp_path)) == 0
    with pytest.raises(FileNotFoundError):
        ProcessTable.scan(tmp_path / "absent")
