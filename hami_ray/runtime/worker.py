"""What runs inside a Ray worker for a slice: the in-task wrapper and ``current_slice()``.

The slice's environment (visibility, HAMi-core limits) is the task's ``runtime_env``, applied by Ray
when the worker process starts, before CUDA initialises; workers are reused across tasks with the same
slice shape. Per-lease data (the lease id) arrives as an argument and is kept in a module global that
``current_slice()`` reads; the wrapper tells the node actor which process holds the lease, so the lease
is freed if the process dies and the process is stopped if it overruns its slice.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from hami_ray.core.model import DeviceGrant

NAMESPACE = "hami-ray"


@dataclass(frozen=True)
class SliceInfo:
    """The devices and limits of the slice the current task or actor runs in."""

    lease_id: str
    node: str
    devices: tuple[DeviceGrant, ...]
    env: dict[str, str]
    state_dir: str = ""

    @property
    def memory_mib(self) -> int:
        return sum(d.memory_mib for d in self.devices)

    @property
    def cores(self) -> int:
        return max((d.cores for d in self.devices), default=0)


_current: SliceInfo | None = None
_actors: dict[str, Any] = {}


def current_slice() -> SliceInfo | None:
    """The slice of the running hami-ray task or actor, or None outside one."""
    return _current


def enter_slice(meta: dict[str, Any]) -> SliceInfo:
    """Record the slice for ``current_slice()`` and tell the node actor this process holds it."""
    global _current
    devices = tuple(DeviceGrant.model_validate(g) for part in meta["slices"] for g in part)
    keys = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_SM_LIMIT", "HAMI_RAY_SLICE",
            "XLA_PYTHON_CLIENT_MEM_FRACTION")
    env = {k: v for k, v in os.environ.items() if k in keys or k.startswith("CUDA_DEVICE_MEMORY_LIMIT")}
    _current = SliceInfo(meta["lease_id"], meta["node"], devices, env, meta.get("state_dir", ""))
    actor = _actors.get(meta["node_actor"])
    if actor is None:  # one GCS lookup per worker process, not per task
        actor = _actors[meta["node_actor"]] = ray.get_actor(meta["node_actor"], namespace=NAMESPACE)
    actor.activate.remote(meta["lease_id"], os.getpid())  # fire and forget: no round trip per task
    return _current


def report_simulated_memory(mib: int, device: int = 0) -> None:
    """Simulated backend only: say this process now uses ``mib`` MiB on the slice's ``device``-th device
    (what NVML would report on real hardware), so enforcement can be exercised without a GPU."""
    from node_actors.simulated_usage import report  # noqa: PLC0415 - only for simulated nodes

    info = current_slice()
    if info is None:
        raise RuntimeError("report_simulated_memory() is for code running in a hami-ray slice")
    report(info.state_dir, info.devices[device].uuid, mib)


def leave_slice(meta: dict[str, Any] | None = None) -> None:
    """Forget the slice; for a task, tell the node actor this process is done with the lease."""
    global _current
    _current = None
    if meta is not None:
        actor = _actors.get(meta["node_actor"])
        if actor is not None:
            actor.finish.remote(meta["lease_id"], os.getpid())


@ray.remote
def run_in_slice(fn: Callable[..., Any], meta: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    """The task the placement actor submits: enter the slice, run the user's function, leave."""
    enter_slice(meta)
    try:
        return fn(*args, **kwargs)
    finally:
        leave_slice(meta)


def slice_actor_class(cls: type) -> type:
    """A subclass of the user's actor class that enters its slice before the user's ``__init__``."""

    class SliceActor(cls):  # type: ignore[misc]
        def __init__(self, hami_slice_meta: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            enter_slice(hami_slice_meta)
            super().__init__(*args, **kwargs)

    SliceActor.__name__ = cls.__name__
    SliceActor.__qualname__ = cls.__qualname__
    SliceActor.__module__ = cls.__module__
    return SliceActor
