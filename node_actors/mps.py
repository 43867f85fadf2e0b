"""The node actor's CUDA MPS control daemon: start it, check it every tick, restart it, stop it.

The node actor owns one :class:`MpsDaemon` when MPS isolation is configured (``AgentSettings.mps``): it
calls :meth:`MpsDaemon.start` at start-up, :meth:`MpsDaemon.check` on each tick (a restart means the
slices served by the daemon lost their limits, and the caller marks them), :meth:`MpsDaemon.stop` at
shutdown, and puts :meth:`MpsDaemon.client_env` into the environment of every worker it serves. Facts
and pitfalls followed here are in nvidia-isolation.md §1:

- The daemon runs in the foreground (``-f``) as our child, so that the node actor is its supervisor and
  reaps it; a non-reaping parent leaves MPS zombies.
- Its pipe and log directories are private to this node actor (``<state_dir>/mps/{pipe,log}``), never the
  default ``/tmp/nvidia-mps`` that every CUDA program joins unasked.
- A restarted node actor adopts the daemon of its previous incarnation (found through the pid file)
  instead of quitting it under running clients.
- Support for pinned device memory limits (CUDA 11.5-era drivers) is probed at start; without it MPS
  would isolate compute only, so start fails instead.
- GPU settings (compute mode, MIG) are never changed.

Standard library only (plus :mod:`hami_ray.core.errors`), so that it imports on a GPU machine without
Ray or pydantic.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hami_ray.core.errors import DeviceError
from node_actors.processes import pid_alive, start_ticks

log = logging.getLogger(__name__)

DEFAULT_CONTROL = "nvidia-cuda-mps-control"
PID_FILE = "nvidia-cuda-mps-control.pid"
CONTROL_LOG = "control.log"
DAEMON_OUTPUT = "control-foreground.log"  # the foreground daemon's stdout and stderr
POLL_S = 0.05
LOG_TAIL_CHARS = 1500
# The control client reports refusals on stdout, not always with a non-zero exit status: "Cannot find MPS
# control daemon process" when the daemon is unreachable, an error or usage line for a refused command.
_ERROR_PREFIXES = ("error", "cannot", "invalid", "unknown", "unrecognized", "failed", "usage")


class MpsError(DeviceError):
    """The MPS control daemon could not be started, answered an error, or is missing; str() says why."""


@dataclass(frozen=True, slots=True)
class MpsState:
    """What a status view shows of the daemon.

    Args:
        running: the daemon process is alive (no command is sent to find out).
        pid: its pid, None when none runs.
        restarts: how many times :meth:`MpsDaemon.check` restarted it.
        reason: why it is not running, or the last failure, in words; None when nothing failed.
        started_at: when it was started or adopted (the daemon's clock), None when none runs.
    """

    running: bool
    pid: int | None
    restarts: int
    reason: str | None
    started_at: float | None


class MpsDaemon:
    """Supervisor of one CUDA MPS control daemon with its own pipe and log directories.

    Args:
        state_dir: the node's state directory; the pipe directory is ``<state_dir>/mps/pipe`` and the
            log directory ``<state_dir>/mps/log``.
        control: the control program: a name looked up on ``PATH``, a path, or an argv prefix such as
            ``[sys.executable, "/x/fake_mps_control.py"]``.
        devices: GPU uuids the daemon serves; when given, the daemon starts with
            ``CUDA_VISIBLE_DEVICES=<uuid>,<uuid>`` (uuids, because clients see the daemon's renumbering).
        timeout_s: the bound on one control command, on start-up, and on each stage of stopping.
        clock: the wall clock for :attr:`MpsState.started_at`; deadlines use ``time.monotonic``.

    Example::

        daemon = MpsDaemon("/var/lib/hami-ray", devices=["GPU-8a1f..."])
        daemon.start()
        env = daemon.client_env()  # {"CUDA_MPS_PIPE_DIRECTORY": ".../mps/pipe", ...}
        if daemon.check():
            ...  # restarted: limits set on the old daemon are gone
        daemon.stop()
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, control: str | Sequence[str] = DEFAULT_CONTROL,
                 devices: Sequence[str] = (), timeout_s: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self._argv = [control] if isinstance(control, str) else list(control)
        if not self._argv:
            raise ValueError("control must name a program")
        root = Path(state_dir) / "mps"
        self.pipe_dir = root / "pipe"
        self.log_dir = root / "log"
        self._devices = tuple(devices)
        self._timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None  # our foreground child
        self._adopted: tuple[int, int | None] | None = None  # (pid, start ticks) of a previous incarnation's
        self._wanted = False  # start() was called and stop() was not: check() keeps it running
        self._restarts = 0
        self._reason: str | None = None
        self._started_at: float | None = None

    @property
    def pid(self) -> int | None:
        """The daemon's pid, None when none is started or adopted."""
        if self._proc is not None:
            return self._proc.pid
        return self._adopted[0] if self._adopted is not None else None

    @property
    def _program(self) -> str:
        # The argv element that is the control program itself: the one naming MPS, else the first (an
        # interpreter prefix such as [python, fake_mps_control.py] names the script second).
        return next((arg for arg in self._argv if "mps" in os.path.basename(arg).lower()), self._argv[0])

    def client_env(self) -> dict[str, str]:
        """The variables a client (a worker process) needs to join this daemon.

        Returns:
            ``CUDA_MPS_PIPE_DIRECTORY`` and ``CUDA_MPS_LOG_DIRECTORY``. A client without them would run
            silently outside MPS, on the default pipe directory, with no limits.

        Example: ``{"CUDA_MPS_PIPE_DIRECTORY": "/var/lib/hami-ray/mps/pipe",
        "CUDA_MPS_LOG_DIRECTORY": "/var/lib/hami-ray/mps/log"}``.
        """
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir)}

    def available(self) -> str | None:
        """Whether the control program can be run.

        Returns:
            None when it can; else the reason, e.g. ``"nvidia-cuda-mps-control is not installed (not on
            PATH)"``.
        """
        first, program = self._argv[0], self._program
        if os.sep not in first:
            if shutil.which(first) is None:
                return f"{first} is not installed (not on PATH)"
        elif not os.path.exists(first):
            return f"{first} is not installed (no such file)"
        elif not os.access(first, os.X_OK):
            return f"{first} is not executable"
        # An interpreter prefix runs a script: it must exist too.
        if program != first and os.sep in program and not os.path.exists(program):
            return f"{program} is not installed (no such file)"
        return None

    def start(self) -> None:
        """Start the daemon, or adopt the one a previous node actor left on the same pipe directory.

        Returns once the daemon answers ``get_server_list`` and supports pinned device memory limits.
        Starting a running daemon does nothing.

        Raises:
            MpsError: the control program is missing, the daemon exited or did not answer within
                ``timeout_s`` (the message ends with the tail of ``control.log``), or it does not support
                memory limits; no daemon of ours is left running.

        Example: ``MpsDaemon(state_dir).start()``.
        """
        with self._lock:
            self._wanted = True
            self._start_locked()

    def command(self, line: str) -> str:
        """Run the control program once with ``line`` on its stdin.

        Args:
            line: one control command, e.g. ``"get_server_list"`` or ``"start_server -uid 1000"``.

        Returns:
            Its stdout, stripped.

        Raises:
            MpsError: a non-zero exit, no answer within ``timeout_s``, or output that starts with an error
                (``Cannot find MPS control daemon process`` when no daemon listens on the pipe directory).

        Example: ``daemon.command("get_default_active_thread_percentage") == "100.0"``.
        """
        env = {**os.environ, **self.client_env()}
        try:
            done = subprocess.run(list(self._argv), input=line + "\n", capture_output=True, text=True, env=env,
                                  timeout=self._timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:  # run() has killed and reaped the client
            raise MpsError(f"MPS control command {line!r} did not answer in {self._timeout_s:g} s") from exc
        except OSError as exc:
            raise MpsError(f"cannot run {self._program}: {exc}") from exc
        out = done.stdout.strip()
        first = out.splitlines()[0].strip() if out else ""
        if done.returncode != 0 or first.lower().startswith(_ERROR_PREFIXES):
            why = first or done.stderr.strip() or f"exit status {done.returncode}"
            raise MpsError(f"MPS control command {line!r} failed: {why}")
        return out

    def server_list(self) -> list[int]:
        """The pids of the MPS servers the daemon runs (``get_server_list``).

        Returns:
            One pid per server; ``[]`` before the first client connects (servers start lazily).

        Raises:
            MpsError: as :meth:`command`, or an answer that is not a list of pids.

        Example: ``daemon.server_list() == [41237]``.
        """
        out = self.command("get_server_list")
        try:
            return [int(word) for word in out.split()]
        except ValueError as exc:
            raise MpsError(f"unexpected get_server_list output: {out[:200]!r}") from exc

    def healthy(self) -> bool:
        """Whether the daemon process is alive and answers ``get_server_list``.

        Example: ``daemon.healthy() is False`` after the daemon was killed.
        """
        return self._why_unhealthy() is None

    def check(self) -> bool:
        """The tick's health check: restart the daemon when it is dead or does not answer.

        Does nothing before :meth:`start` or after :meth:`stop`.

        Returns:
            True when it restarted the daemon: limits set on the old one are gone, and clients of the old
            one have lost it, so the caller marks the slices it served.

        Raises:
            MpsError: the restart failed; the next check tries again.

        Example: ``if daemon.check(): ...`` (the node agent then marks the slices the daemon served).
        """
        with self._lock:
            if not self._wanted:
                return False
            why = self._why_unhealthy()
            if why is None:
                return False
            log.warning("MPS control daemon (pid %s) is unhealthy, restarting: %s", self.pid, why)
            self._reason = why
            # It did not answer get_server_list within timeout_s; it would not take `quit` either.
            self._stop_locked(quit_first=False)
            self._start_locked()
            self._restarts += 1
            self._reason = f"restarted after: {why}"
            return True

    def stop(self) -> None:
        """Quit the daemon and its servers; signal it when ``quit`` does not end it within ``timeout_s``.

        Idempotent; never raises for a daemon that is already gone.

        Example: ``daemon.stop(); daemon.pid is None``.
        """
        with self._lock:
            self._wanted = False
            if self.pid is not None:
                self._stop_locked()
                self._reason = "stopped"

    def state(self) -> MpsState:
        """A snapshot for status views; cheap (no control command is run).

        Example: ``MpsState(running=True, pid=41200, restarts=0, reason=None, started_at=1718000000.0)``.
        """
        pid = self.pid
        running = pid is not None and self._alive()
        return MpsState(running=running, pid=pid if running else None, restarts=self._restarts,
                        reason=self._reason, started_at=self._started_at if running else None)

    # -- internals; the *_locked methods run under self._lock ------------------------------------------------

    def _alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None  # also reaps it
        if self._adopted is not None:
            pid, ticks = self._adopted
            # The pid with the start time names the process even after pids are recycled.
            return pid_alive(pid) and (ticks is None or start_ticks(pid) == ticks)
        return False

    def _why_unhealthy(self) -> str | None:
        pid = self.pid
        if pid is None:
            return "the MPS control daemon is not running"
        if not self._alive():
            status = f" (exit status {self._proc.returncode})" if self._proc is not None else ""
            return f"the MPS control daemon (pid {pid}) exited{status}"
        try:
            self.server_list()
        except MpsError as exc:
            return f"the MPS control daemon (pid {pid}) does not answer: {exc}"
        return None

    def _start_locked(self) -> None:
        if self.pid is not None and self._alive():
            return
        self._proc, self._adopted = None, None  # a dead one, already reaped by _alive()
        missing = self.available()
        if missing is not None:
            self._reason = missing
            raise MpsError(f"cannot start the MPS control daemon: {missing}")
        self.pipe_dir.mkdir(mode=0o755, parents=True, exist_ok=True)  # MPS servers run as the client's
        self.log_dir.mkdir(mode=0o755, parents=True, exist_ok=True)  # uid and must reach both
        if self._adopt():
            return
        try:
            self._spawn()
            self._probe_memory_limits()
        except MpsError as exc:
            self._reason = str(exc)
            raise
        self._started_at = self._clock()
        self._reason = None
        log.info("MPS control daemon started, pid %s, pipe directory %s", self.pid, self.pipe_dir)

    def _adopt(self) -> bool:
        """Adopt a daemon of a previous incarnation named by the pid file, or clear the pipe directory.

        A daemon that is ours (its command line names the control program) but does not answer is
        stopped: no second daemon can serve the same pipe directory.
        """
        pid = _read_pid(self.pipe_dir / PID_FILE)
        if pid is None:  # a daemon run with -f may leave no pid file: look for one serving this directory
            pid = self._find_serving()
        if pid is not None and pid != os.getpid() and pid_alive(pid) and self._is_control(pid):
            self._adopted = (pid, start_ticks(pid))
            try:
                self.server_list()
            except MpsError as exc:
                log.warning("MPS control daemon pid %d left on %s does not answer, stopping it: %s",
                            pid, self.pipe_dir, exc)
                self._terminate(pid, quit_first=False, ticks=self._adopted[1])
                self._adopted = None
            else:
                self._started_at = self._clock()
                self._reason = None
                log.info("adopted the MPS control daemon pid %d on %s", pid, self.pipe_dir)
                return True
        # No live daemon owns the directory: its pid file, sockets and pipes are leftovers of a dead one.
        for entry in self.pipe_dir.iterdir():
            if not entry.is_dir() or entry.is_symlink():
                entry.unlink(missing_ok=True)
        return False

    def _find_serving(self) -> int | None:
        """A live control daemon (our program, started with ``-f`` or ``-d``) whose environment names this
        pipe directory; None when there is none or procfs cannot tell."""
        want = f"CUDA_MPS_PIPE_DIRECTORY={self.pipe_dir}".encode()
        try:
            pids = [int(e) for e in os.listdir("/proc") if e.isdigit()]
        except OSError:
            return None
        for pid in pids:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if not any(a in (b"-f", b"-d") for a in argv) or not self._is_control(pid):
                    continue
                if want in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    return pid
            except OSError:
                continue
        return None

    def _is_control(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return os.path.basename(self._program).encode() in cmdline

    def _spawn(self) -> None:
        env = {**os.environ, **self.client_env()}
        if self._devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self._devices)
        with (self.log_dir / DAEMON_OUTPUT).open("ab") as output:  # the child keeps its own descriptor
            try:
                self._proc = subprocess.Popen([*self._argv, "-f"], stdin=subprocess.DEVNULL, stdout=output,
                                              stderr=subprocess.STDOUT, env=env, start_new_session=True)
            except OSError as exc:
                raise MpsError(f"cannot run {self._program}: {exc}") from exc
        deadline = time.monotonic() + self._timeout_s
        last = "no answer yet"
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise MpsError(f"the MPS control daemon exited at start with status {code}{self._log_tail()}")
            if time.monotonic() >= deadline:
                self._stop_locked(quit_first=False)  # it never answered
                raise MpsError(f"the MPS control daemon did not answer within {self._timeout_s:g} s "
                               f"({last}){self._log_tail()}")
            try:
                self.server_list()
                return
            except MpsError as exc:
                last = str(exc)
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))

    def _probe_memory_limits(self) -> None:
        # Without pinned device memory limits MPS would share compute only; refuse rather than hand out
        # slices whose memory nothing enforces (nvidia-isolation.md §1, "Memory limit").
        try:
            self.command("get_default_device_pinned_mem_limit 0")
        except MpsError as exc:
            self._stop_locked()
            raise MpsError("the MPS control daemon does not support pinned device memory limits (needs a CUDA "
                           f"11.5-era driver or newer): {exc}") from exc

    def _stop_locked(self, *, quit_first: bool = True) -> None:
        proc, adopted = self._proc, self._adopted
        if proc is not None:
            if proc.poll() is None:
                asked = quit_first and self._quit()
                try:
                    proc.wait(timeout=self._timeout_s if asked else 0)
                except subprocess.TimeoutExpired:
                    self._signal_child(proc)
            self._forget_pid_file(proc.pid)
        elif adopted is not None:
            pid, ticks = adopted
            if self._alive():
                self._terminate(pid, quit_first=quit_first, ticks=ticks)
            self._forget_pid_file(pid)
        self._proc, self._adopted, self._started_at = None, None, None

    def _quit(self) -> bool:
        try:
            self.command("quit")
        except MpsError as exc:
            log.warning("MPS control daemon did not take 'quit': %s", exc)
            return False
        return True

    def _signal_child(self, proc: subprocess.Popen[bytes]) -> None:
        # Our child leads its own session (start_new_session), so its group holds what it spawned and
        # nothing else; the pid cannot be recycled before we reap it.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            log.warning("MPS control daemon pid %d: sending %s", proc.pid, sig.name)
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=self._timeout_s)
                return
            except subprocess.TimeoutExpired:
                continue
        proc.wait()  # pragma: no cover - SIGKILL did not end it within timeout_s

    def _terminate(self, pid: int, *, quit_first: bool, ticks: int | None = None) -> None:
        """Stop a daemon that is not our child: ``quit``, then SIGTERM, then SIGKILL, waiting on its pid."""

        def gone() -> bool:
            return not pid_alive(pid) or (ticks is not None and start_ticks(pid) != ticks)

        steps: list[signal.Signals | None] = [None] if quit_first else []
        steps += [signal.SIGTERM, signal.SIGKILL]
        for step in steps:
            if step is None:
                if not self._quit():
                    continue
            else:
                log.warning("MPS control daemon pid %d: sending %s", pid, step.name)
                try:
                    os.kill(pid, step)
                except (ProcessLookupError, PermissionError):
                    return
            if _wait_until(gone, self._timeout_s):
                return

    def _forget_pid_file(self, pid: int) -> None:
        # A killed daemon leaves its pid file; remove it only while it still names the daemon we stopped.
        path = self.pipe_dir / PID_FILE
        if _read_pid(path) == pid:
            path.unlink(missing_ok=True)

    def _log_tail(self) -> str:
        # Both files: where a foreground daemon writes its complaints differs between driver versions.
        tails = []
        for name in (CONTROL_LOG, DAEMON_OUTPUT):
            try:
                text = (self.log_dir / name).read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                tails.append(f"; {name} ends: {text[-LOG_TAIL_CHARS:]}")
        return "".join(tails)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True
