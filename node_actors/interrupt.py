"""Stopping an overrunning task without killing its process: the node actor's quota verdict, handed to
a slice worker through its state directory and a signal.

A hami-ray worker process arms itself once (:func:`arm`): it installs a ``SIGUSR1`` handler and leaves
``<state_dir>/interruptible/<pid>`` holding its start time. When its slice stays over its memory limit,
the node actor writes the verdict next to it (``<pid>.verdict``, JSON) and signals the process
(:func:`interrupt`); the handler raises :class:`~hami_ray.core.errors.SliceQuotaExceeded` in the running
task, which fails with it while the process (and a lane's other tasks) live on. A process that still
overruns after another grace period is killed, as is any process that never armed itself.

Called by :mod:`hami_ray.runtime.worker` (arm, take the verdict) and :class:`node_actors.agent.NodeAgent`
(interruptible, interrupt). A marker left by a dead process never matches a new one with the same pid:
the start time differs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from node_actors.processes import start_ticks

INTERRUPT_DIR = "interruptible"
SIGNAL = signal.SIGUSR1


def _dir(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / INTERRUPT_DIR


def arm(state_dir: str | os.PathLike[str], handler: Callable[[int, FrameType | None], Any]) -> None:
    """Install ``handler`` for the verdict signal and say so (call from the main thread)."""
    signal.signal(SIGNAL, handler)
    signal.siginterrupt(SIGNAL, False)  # system calls in the task resume; the handler runs between bytecodes
    directory = _dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / str(os.getpid())).write_text(str(start_ticks(os.getpid())))


def interruptible(state_dir: str | os.PathLike[str], pid: int) -> bool:
    """Whether ``pid`` armed itself (and is the process that did)."""
    try:
        marked = (_dir(state_dir) / str(pid)).read_text().strip()
    except OSError:
        return False
    return marked == str(start_ticks(pid))


def interrupt(state_dir: str | os.PathLike[str], pid: int, verdict: dict[str, Any]) -> bool:
    """Leave ``verdict`` for ``pid`` and signal it; False when it could not be left (a full disk) or
    signalled."""
    path = _dir(state_dir) / f"{pid}.verdict"
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(verdict))
        os.replace(tmp, path)
    except OSError:  # the state disk is full: the task is not told; the deadline still stops it
        tmp.unlink(missing_ok=True)
        return False
    try:
        os.kill(pid, SIGNAL)
    except OSError:
        path.unlink(missing_ok=True)
        return False
    return True


def take_verdict(state_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """This process's verdict, removed once read; None when there is none (or it does not parse)."""
    path = _dir(state_dir) / f"{os.getpid()}.verdict"
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    return body if isinstance(body, dict) else None
