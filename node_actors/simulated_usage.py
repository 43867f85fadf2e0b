"""Simulated device-memory use, reported by any process on a node and read by the simulated backend.

A process that "uses" a simulated device says so with :func:`report`; the file
``<state_dir>/sim-usage/<pid>.json`` then holds ``{uuid: MiB}`` for that process, written atomically
(a temporary file renamed over the old one), so a reader never sees half a file.
:class:`node_actors.backends.simulated.SimulatedBackend` reads them all in :func:`read`, skipping files
of dead processes and files it cannot parse: a stray file must never crash a node actor.

Called from tasks and tests (``report``/``clear``) and by the simulated backend (``read``). Threads of
one process that report concurrently may lose one another's update (last writer wins); report from one
thread per process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

from node_actors.processes import pid_alive

log = logging.getLogger(__name__)

USAGE_DIR = "sim-usage"


def _dir(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / USAGE_DIR


def _load(path: Path) -> dict[str, int] | None:
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    out = {}
    for uuid, mib in body.items():
        if not isinstance(mib, int) or isinstance(mib, bool) or mib < 0:
            return None
        out[str(uuid)] = mib
    return out


def _write(path: Path, body: dict[str, int]) -> None:
    if not body:
        path.unlink(missing_ok=True)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def report(state_dir: str | os.PathLike[str], uuid: str, mib: int, pid: int | None = None) -> None:
    """Record that process ``pid`` (default: this one) holds ``mib`` MiB on device ``uuid``.

    Args:
        state_dir: the node's state directory (the simulated backend's ``state_dir``).
        uuid: a simulated device uuid, e.g. ``GPU-sim-node1-0``.
        mib: memory now held on that device; 0 forgets the device.
        pid: the process that holds it; defaults to ``os.getpid()``.

    Raises:
        ValueError: ``mib`` is negative.

    Example: ``report("/tmp/hami-ray", "GPU-sim-node1-0", 9000)``.
    """
    if mib < 0:
        raise ValueError(f"memory in use cannot be negative: {mib}")
    pid = os.getpid() if pid is None else pid
    folder = _dir(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{pid}.json"
    body = _load(path) or {}
    if mib:
        body[uuid] = mib
    else:
        body.pop(uuid, None)
    _write(path, body)


def clear(state_dir: str | os.PathLike[str], pid: int | None = None, uuid: str | None = None) -> None:
    """Forget what ``pid`` (default: this process) reported: on one device, or on all when ``uuid`` is None."""
    pid = os.getpid() if pid is None else pid
    path = _dir(state_dir) / f"{pid}.json"
    if uuid is None:
        path.unlink(missing_ok=True)
        return
    body = _load(path)
    if body is not None:
        body.pop(uuid, None)
        _write(path, body)


def read(state_dir: str | os.PathLike[str]) -> dict[int, dict[str, int]]:
    """Reports of live processes: ``{pid: {uuid: MiB}}``.

    Files of dead processes are removed (so a reused pid does not inherit them); malformed files are
    skipped with a warning. Never raises for a bad file.
    """
    folder = _dir(state_dir)
    out: dict[int, dict[str, int]] = {}
    try:
        paths = sorted(folder.glob("*.json"))
    except OSError:
        return out
    for path in paths:
        try:
            pid = int(path.stem)
        except ValueError:
            continue
        if not pid_alive(pid):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            continue
        body = _load(path)
        if body is None:
            log.warning("ignoring malformed simulated usage file %s", path)
            continue
        out[pid] = body
    return out
