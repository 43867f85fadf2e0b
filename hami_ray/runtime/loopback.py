"""Keep a local Ray on 127.0.0.1: Ray turns 127.0.0.1 in an address into the machine's outward address
unless its cluster mode is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), and a driver then connects
to an address nothing listens on. Used by the tests, the benchmarks and ``hami-ray demo``; so is the
count of Ray worker processes on this machine."""

from __future__ import annotations

import os
from pathlib import Path

LOOPBACK = "127.0.0.1"


def pin_ray_to_loopback() -> None:
    """Turn Ray's cluster mode off in this process and in every process it starts from now on."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # inherited by raylets and workers
    from ray._private import ray_constants  # noqa: PLC0415 - read once at import: patch it too

    ray_constants.ENABLE_RAY_CLUSTER = False


def ray_worker_processes() -> int:
    """Ray worker processes on this machine: idle pool workers, task workers and actors alike (Ray
    renames them ``ray::<what they run>``; before that they are ``default_worker.py``)."""
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        count += cmd.startswith(b"ray::") or b"default_worker.py" in cmd
    return count
