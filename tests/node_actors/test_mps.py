"""The MPS control daemon's lifecycle (start, check, restart, adopt, stop) against a stand-in control program.

``fake_mps_control.py`` speaks the real tool's stdin protocol over a Unix socket in the pipe directory, so
these tests run real processes without a GPU. Every daemon and MPS server a test starts is stopped, and
any left over is killed by its pid, in the ``make_daemon`` fixture.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node_actors.mps import PID_FILE, MpsDaemon, MpsError
from node_actors.processes import pid_alive

FAKE = Path(__file__).with_name("fake_mps_control.py")
CONTROL = [sys.executable, str(FAKE)]
LOGGED_PID = re.compile(r"started pid=(\d+)")


def eventually(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def logged_pids(state_dir: Path) -> list[int]:
    """Pids of every daemon and server the stand-in logged under ``state_dir``."""
    pids = []
    for name in ("control.log", "server.log"):
        path = state_dir / "mps" / "log" / name
        if path.exists():
            pids += [int(pid) for pid in LOGGED_PID.findall(path.read_text())]
    return pids


def _ours(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return FAKE.name.encode() in cmdline or b"getppid" in cmdline  # a daemon, or a server (SERVER_CODE)


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., MpsDaemon]]:
    made: list[MpsDaemon] = []

    def make(state_dir: Path = tmp_path, **kwargs: object) -> MpsDaemon:
        kwargs.setdefault("control", CONTROL)
        daemon = MpsDaemon(state_dir, **kwargs)  # type: ignore[arg-type]
        made.append(daemon)
        return daemon

    yield make
    for daemon in reversed(made):
        daemon.stop()
    for pid in logged_pids(tmp_path):
        if pid_alive(pid) and _ours(pid):
            os.kill(pid, signal.SIGKILL)


def test_start_serves_on_private_directories(make_daemon: Callable[..., MpsDaemon], tmp_path: Path) -> None:
    daemon = make_daemon(devices=["GPU-aaa", "GPU-bbb"])
    daemon.start()

    pipe, logs = tmp_path / "mps" / "pipe", tmp_path / "mps" / "log"
    assert (daemon.pipe_dir, daemon.log_dir) == (pipe, logs)
    assert int((pipe / PID_FILE).read_text()) == daemon.pid
    assert daemon.client_env() == {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(logs)}
    assert daemon.server_list() == []  # servers start lazily
    daemon.command("start_server -uid 0")
    servers = daemon.server_list()
    assert len(servers) == 1 and pid_alive(servers[0])
    control_log = (logs / "control.log").read_text()
    assert f"started pid={daemon.pid} devices=GPU-aaa,GPU-bbb" in control_log  # the daemon's CUDA_VISIBLE_DEVICES
    assert "cmd: get_default_device_pinned_mem_limit 0" in control_log  # the memory-limit probe
    state = daemon.state()
    assert state.running and state.pid == daemon.pid and state.restarts == 0 and state.reason is None
    assert state.started_at is not None
    daemon.start()  # already running: nothing new
    assert control_log.count("started pid=") == (logs / "control.log").read_text().count("started pid=") == 1


def test_command_errors_raise(make_daemon: Callable[..., MpsDaemon]) -> None:
    daemon = make_daemon()
    with pytest.raises(MpsError, match="Cannot find MPS control daemon process"):
        daemon.command("get_server_list")  # nothing listens yet
    daemon.start()
    with pytest.raises(MpsError, match="unknown command"):  # the reply says Error:, the exit status is 0
        daemon.command("bogus")
    daemon.command("set_default_device_pinned_mem_limit 0 2G")
    assert daemon.command("get_default_device_pinned_mem_limit 0") == "2G"


def test_stop_quits_daemon_and_servers(make_daemon: Callable[..., MpsDaemon], tmp_path: Path) -> None:
    daemon = make_daemon()
    daemon.start()
    daemon.command("start_server -uid 0")
    pid, servers = daemon.pid, daemon.server_list()
    assert pid is not None

    daemon.stop()
    assert not pid_alive(pid)
    assert eventually(lambda: not any(pid_alive(s) for s in servers))
    assert not (daemon.pipe_dir / PID_FILE).exists()
    assert "cmd: quit" in (daemon.log_dir / "control.log").read_text()
    state = daemon.state()
    assert (state.running, state.pid, state.reason) == (False, None, "stopped")
    daemon.stop()  # a no-op
    assert daemon.check() is False  # a stopped daemon is not brought back


def test_check_restarts_a_killed_daemon(make_daemon: Callable[..., MpsDaemon]) -> None:
    daemon = make_daemon()
    assert daemon.check() is False  # before start: nothing to keep running
    daemon.start()
    old = daemon.pid
    assert old is not None
    assert daemon.check() is False and daemon.healthy()

    os.kill(old, signal.SIGKILL)
    assert eventually(lambda: not daemon.state().running)
    assert not daemon.healthy()
    assert daemon.check() is True
    assert daemon.pid not in (None, old)
    assert daemon.server_list() == []
    state = daemon.state()
    assert state.running and state.restarts == 1 and state.reason is not None and "exited" in state.reason
    assert daemon.check() is False
    assert daemon.state().restarts == 1


def test_check_replaces_a_hung_daemon(make_daemon: Callable[..., MpsDaemon]) -> None:
    daemon = make_daemon(timeout_s=0.8)  # the health check and SIGTERM each wait this long
    daemon.start()
    hung = daemon.pid
    assert hung is not None
    os.kill(hung, signal.SIGSTOP)  # alive, answers nothing, SIGTERM stays pending: SIGKILL ends it

    assert daemon.check() is True
    assert not pid_alive(hung)
    assert daemon.pid not in (None, hung) and daemon.server_list() == []
    reason = daemon.state().reason
    assert reason is not None and "does not answer" in reason


def test_restarted_node_actor_adopts_running_daemon(make_daemon: Callable[..., MpsDaemon]) -> None:
    first = make_daemon()
    first.start()
    first.command("start_server -uid 0")
    servers = first.server_list()

    second = make_daemon()  # a new incarnation on the same state directory; the first was not stopped
    second.start()
    assert second.pid == first.pid
    assert second.server_list() == servers  # its clients keep their server
    assert (second.log_dir / "control.log").read_text().count("started pid=") == 1  # no new daemon
    assert second.check() is False

    second.stop()
    assert first.pid is not None and not pid_alive(first.pid)


def test_adopts_a_daemonised_daemon(make_daemon: Callable[..., MpsDaemon], tmp_path: Path) -> None:
    daemon = make_daemon()
    daemon.pipe_dir.mkdir(parents=True)
    daemon.log_dir.mkdir(parents=True)
    env = {**os.environ, **daemon.client_env()}
    subprocess.run([*CONTROL, "-d"], env=env, check=True, timeout=10, stdin=subprocess.DEVNULL)
    (pid,) = logged_pids(tmp_path)

    daemon.start()
    assert daemon.pid == pid and daemon.healthy()
    daemon.stop()  # not our child: quit, then wait on its pid
    assert eventually(lambda: not pid_alive(pid))
    assert not (daemon.pipe_dir / PID_FILE).exists()


def test_stale_pid_file_is_not_adopted(make_daemon: Callable[..., MpsDaemon],
                                       spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    unrelated = spawn(sys.executable, "-c", "import time; time.sleep(30)")
    daemon = make_daemon()
    daemon.pipe_dir.mkdir(parents=True)
    (daemon.pipe_dir / PID_FILE).write_text(f"{unrelated.pid}\n")  # a recycled pid
    (daemon.pipe_dir / "control").write_text("")  # a dead daemon's leftover

    daemon.start()
    assert daemon.pid not in (None, unrelated.pid)
    assert int((daemon.pipe_dir / PID_FILE).read_text()) == daemon.pid
    assert unrelated.poll() is None  # left alone
    assert daemon.server_list() == []


def test_missing_control_program(make_daemon: Callable[..., MpsDaemon]) -> None:
    daemon = make_daemon(control="/nonexistent/nvidia-cuda-mps-control")
    reason = daemon.available()
    assert reason is not None and "/nonexistent/nvidia-cuda-mps-control is not installed" in reason
    with pytest.raises(MpsError, match="/nonexistent/nvidia-cuda-mps-control"):
        daemon.start()
    assert daemon.state().reason == reason and daemon.pid is None

    bare = make_daemon(control="nvidia-cuda-mps-control-not-here")
    assert bare.available() == "nvidia-cuda-mps-control-not-here is not installed (not on PATH)"
    assert make_daemon().available() is None


def test_no_memory_limit_support_fails_start(make_daemon: Callable[..., MpsDaemon], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MPS_NO_MEMLIMIT", "1")  # the daemon inherits the environment
    daemon = make_daemon()
    with pytest.raises(MpsError, match="does not support pinned device memory limits") as raised:
        daemon.start()
    assert "unknown command" in str(raised.value)
    (pid,) = logged_pids(tmp_path)
    assert not pid_alive(pid)  # stopped and reaped
    assert daemon.pid is None and not daemon.state().running


def test_start_failure_reports_control_log(make_daemon: Callable[..., MpsDaemon], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MPS_FAIL_START", "1")
    daemon = make_daemon()
    with pytest.raises(MpsError, match="exited at start with status 1") as raised:
        daemon.start()
    assert "control.log ends:" in str(raised.value)
    assert "fake start failure requested" in str(raised.value)
    assert daemon.pid is None and not logged_pids(tmp_path)


def test_a_daemon_without_pid_file_is_found_and_adopted(make_daemon: Callable[..., MpsDaemon]) -> None:
    """The real tool run with -f may write no pid file: a restarted node actor still finds the daemon that
    serves its pipe directory (by its environment) instead of starting a second one."""
    first = make_daemon()
    first.start()
    pid = first.pid
    (first.pipe_dir / "nvidia-cuda-mps-control.pid").unlink()
    second = make_daemon()
    second.start()
    assert second.pid == pid
