#!/usr/bin/env python3
"""A stand-in for ``nvidia-cuda-mps-control``: the control daemon and its stdin client, without a GPU.

Used by ``tests/node_actors/test_mps.py`` to drive :class:`node_actors.mps.MpsDaemon` through the same
lifecycle as the real tool (nvidia-isolation.md §1). Standard library only; run it as
``python fake_mps_control.py [-f | -d]``.

- ``-f``: run the control daemon in the foreground (how a supervisor runs it); ``-d``: daemonise (double
  fork) and return once the daemon answers.
- no argument: client mode. Read commands from stdin, one per line, send each to the daemon and print
  the reply. A daemon that cannot be reached prints ``Cannot find MPS control daemon process`` and exits
  1, as the real tool does. A command the daemon refuses prints a line starting ``Error:`` and still exits
  0, so that callers must read the output, not only the exit status.

The daemon reads ``CUDA_MPS_PIPE_DIRECTORY`` (default ``/tmp/nvidia-mps``) and ``CUDA_MPS_LOG_DIRECTORY``
(default ``/var/log/nvidia-mps``), writes ``nvidia-cuda-mps-control.pid`` in the pipe directory, appends
to ``control.log`` (and ``server.log``) in the log directory, and serves one command per connection on
the Unix socket ``<pipe dir>/control``. Commands: ``get_server_list``, ``start_server -uid <uid>``,
``get_default_device_pinned_mem_limit <dev>``, ``set_default_device_pinned_mem_limit <dev> <value>``,
``get_default_active_thread_percentage``, ``set_default_active_thread_percentage <pct>``, ``ps``, ``quit``.

Test switches: ``FAKE_MPS_NO_MEMLIMIT=1`` makes the pinned-memory-limit commands unknown (a pre-11.5
driver); ``FAKE_MPS_FAIL_START=1`` makes ``-f``/``-d`` log an error to ``control.log`` and exit 1.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

PID_FILE = "nvidia-cuda-mps-control.pid"
SOCKET = "control"
NOT_FOUND = "Cannot find MPS control daemon process"
# A server only waits for its parent (the daemon) to go away, the way an MPS server dies with its daemon;
# polling getppid() needs no prctl and works wherever the daemon is reparented to.
SERVER_CODE = "import os, time\nparent = os.getppid()\nwhile os.getppid() == parent:\n    time.sleep(0.1)\n"
MEM_LIMIT = re.compile(r"^\d+[MG]$")


def _dirs() -> tuple[Path, Path]:
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")).resolve()
    logs = Path(os.environ.get("CUDA_MPS_LOG_DIRECTORY", "/var/log/nvidia-mps")).resolve()
    return pipe, logs


def _log(logs: Path, name: str, text: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with (logs / name).open("a") as out:
        out.write(f"[{stamp}.{int(time.time() * 1000) % 1000:03d}] {text}\n")


class Daemon:
    """The control daemon's state: servers by uid and the default settings it hands to new servers."""

    def __init__(self, pipe: Path, logs: Path) -> None:
        self.pipe = pipe
        self.logs = logs
        self.servers: dict[int, subprocess.Popen[bytes]] = {}  # uid -> server
        self.mem_limits: dict[str, str] = {}
        self.thread_pct = 100.0
        self.listener: socket.socket | None = None

    def serve(self) -> int:
        self.pipe.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        if os.environ.get("FAKE_MPS_FAIL_START") == "1":
            _log(self.logs, "control.log", "Error: fake start failure requested (FAKE_MPS_FAIL_START=1)")
            print("fake MPS control daemon failed to start", file=sys.stderr)
            return 1
        # Bind a relative name from inside the pipe directory: sun_path holds only 108 bytes and pytest's
        # tmp paths can be longer.
        os.chdir(self.pipe)
        if _connect() is not None:
            _log(self.logs, "control.log", "Error: an instance of this daemon is already running")
            return 1
        try:
            os.unlink(SOCKET)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(SOCKET)
        self.listener.listen(16)
        (self.pipe / PID_FILE).write_text(f"{os.getpid()}\n")
        devices = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
        _log(self.logs, "control.log", f"control daemon started pid={os.getpid()} devices={devices}")
        try:
            while True:
                conn, _ = self.listener.accept()
                quitting = False
                with conn:
                    try:
                        conn.settimeout(5.0)
                        line = _read_all(conn).decode(errors="replace").strip()
                        if not line:
                            continue  # a probe that connected and hung up (`-d` waiting for readiness)
                        _log(self.logs, "control.log", f"cmd: {line}")
                        quitting = line == "quit"
                        conn.sendall(b"" if quitting else self.handle(line).encode())
                    except OSError as exc:  # a client that went away must not take the daemon down
                        _log(self.logs, "control.log", f"client connection failed: {exc}")
                if quitting:
                    _log(self.logs, "control.log", "quit: exiting")
                    return 0
        except SystemExit:  # SIGTERM/SIGINT (see _on_sigterm)
            _log(self.logs, "control.log", "signalled: exiting")
            return 0
        finally:
            self.cleanup()

    def handle(self, line: str) -> str:
        words = line.split()
        if not words:
            return "Error: empty command"
        cmd, args = words[0], words[1:]
        no_memlimit = os.environ.get("FAKE_MPS_NO_MEMLIMIT") == "1"
        if cmd == "get_server_list":
            return "\n".join(str(pid) for pid in self._live_servers())
        if cmd == "start_server" and len(args) == 2 and args[0] == "-uid" and args[1].isdigit():
            return self._start_server(int(args[1]))
        if cmd == "get_default_device_pinned_mem_limit" and not no_memlimit:
            return self.mem_limits.get(args[0], "0") if len(args) == 1 else "Error: usage: " + cmd + " <dev>"
        if cmd == "set_default_device_pinned_mem_limit" and not no_memlimit:
            if len(args) != 2 or not MEM_LIMIT.match(args[1]):
                return f"Error: usage: {cmd} <dev> <value>, value an integer followed by M or G"
            self.mem_limits[args[0]] = args[1]
            return ""
        if cmd == "get_default_active_thread_percentage" and not args:
            return f"{self.thread_pct:.1f}"
        if cmd == "set_default_active_thread_percentage" and len(args) == 1:
            try:
                pct = float(args[0])
            except ValueError:
                pct = -1.0
            if not 0.0 <= pct <= 100.0:
                return f"Error: invalid active thread percentage {args[0]!r}"
            self.thread_pct = pct
            return ""
        if cmd == "ps" and not args:
            return "PID\tID\tSERVER\tDEVICE\tNAMESPACE\tCOMMAND"
        return f"Error: unknown command {line!r}"

    def _live_servers(self) -> list[int]:
        for uid, server in list(self.servers.items()):
            if server.poll() is not None:  # reaps it
                del self.servers[uid]
        return [server.pid for server in self.servers.values()]

    def _start_server(self, uid: int) -> str:
        self._live_servers()
        if uid not in self.servers:
            server = subprocess.Popen([sys.executable, "-c", SERVER_CODE], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.servers[uid] = server
            _log(self.logs, "server.log", f"server started pid={server.pid} uid={uid}")
        return ""

    def cleanup(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        for server in self.servers.values():
            if server.poll() is None:
                server.terminate()
        for server in self.servers.values():
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        self.servers.clear()
        if self.listener is not None:
            self.listener.close()
        for name in (SOCKET, PID_FILE):
            try:
                (self.pipe / name).unlink()
            except FileNotFoundError:
                pass


def _read_all(conn: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _connect() -> socket.socket | None:
    """A connection to the daemon of the current directory (the pipe directory), or None."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(SOCKET)
    except OSError:
        sock.close()
        return None
    return sock


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)  # unwinds through Daemon.serve's finally: servers, socket and pid file go


def run_daemon(foreground: bool) -> int:
    pipe, logs = _dirs()
    if not foreground:
        return _daemonise(pipe)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigterm)
    return Daemon(pipe, logs).serve()


def _daemonise(pipe: Path) -> int:
    if os.environ.get("FAKE_MPS_FAIL_START") == "1":
        return run_daemon(foreground=True)  # fails at once, in this process, with the same log line
    first = os.fork()
    if first == 0:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os._exit(run_daemon(foreground=True))
    os.waitpid(first, 0)
    # Return once the daemon answers, so that a client started right after `-d` finds it.
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        try:
            os.chdir(pipe)
        except OSError:
            pass
        else:
            sock = _connect()
            if sock is not None:
                sock.close()
                return 0
        time.sleep(0.02)
    print("fake MPS control daemon did not come up", file=sys.stderr)
    return 1


def run_client() -> int:
    pipe, _ = _dirs()
    for raw in sys.stdin:
        line = raw.strip()
        if not line:
            continue
        sock = None
        try:
            os.chdir(pipe)
            sock = _connect()
        except OSError:
            pass
        if sock is None:
            print(NOT_FOUND)
            return 1
        with sock:
            sock.sendall(line.encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            reply = _read_all(sock).decode(errors="replace")
        if reply:
            print(reply.rstrip("\n"))
        sys.stdout.flush()
    return 0


def main(argv: list[str]) -> int:
    if argv == ["-f"]:
        return run_daemon(foreground=True)
    if argv == ["-d"]:
        return run_daemon(foreground=False)
    if not argv:
        return run_client()
    print(f"usage: {Path(sys.argv[0]).name} [-f | -d]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
