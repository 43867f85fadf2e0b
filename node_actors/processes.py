"""Process liveness and termination on this node, without psutil.

Called by the node agent (reaping leases of dead holders, stopping processes that overrun their slice)
and by :mod:`node_actors.simulated_usage` (ignoring reports of dead processes). Linux-first: a zombie
counts as dead, because a Ray worker is the raylet's child, not the node actor's, and the node actor
cannot reap it.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie.

    Example: ``pid_alive(os.getpid()) is True``.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    except OSError as exc:  # pragma: no cover - other errnos mean it is not ours to see
        return exc.errno != errno.ESRCH
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no procfs (macOS) or it just exited: trust os.kill
    # Format: "pid (comm) S ..."; comm may hold spaces and parentheses, so split at the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return bool(fields) and fields[0] in ("Z", "X")


def kill(pid: int) -> bool:
    """Send SIGKILL; True when the process is gone or was signalled.

    Returns False when the signal was not permitted (the process belongs to another user).
    """
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return True



def start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks since boot, ``/proc/<pid>/stat`` field 22): with the pid,
    names one process even after pids are recycled. None without procfs or when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])  # field 22 overall; fields here start at field 3 (state)
    except (IndexError, ValueError):
        return None
