"""What runs inside a Ray worker for a slice: the in-task wrapper and ``current_slice()``.

Tasks: the slice's environment (visibility, HAMi-core limits) arrives as an argument and is applied to
``os.environ`` before the user's function runs, so one pool of workers serves every slice shape and
device (only ``LD_PRELOAD``, read by the loader at process start, is in the ``runtime_env``). CUDA reads
these variables once, when it initialises; so a process in which CUDA got loaded stays *bound* to the
slice it had then, and a later task for another slice raises :class:`WorkerBound` before any user code
runs: the placement actor resubmits it with the whole slice environment as its ``runtime_env``, to a
process of its own. Actors get their slice's whole environment as ``runtime_env`` (a process each).

Per-lease data (the lease id) is kept in a module global that ``current_slice()`` reads; the wrapper
tells the node actor which process holds the lease, so the lease is freed if the process dies and the
process is stopped if it overruns its slice.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from hami_ray.core.errors import HamiRayError
from hami_ray.core.model import DeviceGrant

NAMESPACE = "hami-ray"
PROCESS_START_KEYS = ("LD_PRELOAD",)  # read by the dynamic loader when a process starts, never later
WORKER_MARK = "HAMI_RAY_WORKER"  # in every slice worker's runtime_env: a pool of their own, not Ray's
_SLICE_KEYS = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_SM_LIMIT", "HAMI_RAY_SLICE",
               "XLA_PYTHON_CLIENT_MEM_FRACTION")


class WorkerBound(HamiRayError):
    """This worker process initialised CUDA under another slice; it cannot run this one."""

    def __init__(self, bound: str, wanted: str) -> None:
        super().__init__(f"worker {os.getpid()} initialised CUDA with devices {bound!r}; "
                         f"a task for {wanted!r} needs a process of its own")
        self.bound, self.wanted = bound, wanted

    def __reduce__(self) -> tuple[Any, ...]:
        return (WorkerBound, (self.bound, self.wanted))


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
_original: dict[str, str | None] = {}  # os.environ before any slice touched a key
_bound: dict[str, str] | None = None  # the slice environment CUDA initialised under, in this process


def _cuda_loaded() -> bool:
    """Has this process loaded the CUDA driver (after which visibility and limits are fixed)?"""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return "libcuda.so" in maps.read()
    except OSError:
        return False


def apply_env(env: dict[str, str]) -> None:
    """Make ``env`` this process's slice environment (keys of an earlier slice are put back first).

    Raises:
        WorkerBound: CUDA was initialised here under a different slice environment.
    """
    if _bound is not None and _bound != env:
        raise WorkerBound(_bound.get("CUDA_VISIBLE_DEVICES", ""), env.get("CUDA_VISIBLE_DEVICES", ""))
    for key in list(_original):
        if key not in env:
            _restore(key)
    for key, value in env.items():
        if key not in PROCESS_START_KEYS:
            _original.setdefault(key, os.environ.get(key))
            os.environ[key] = value


def _restore(key: str) -> None:
    old = _original.pop(key)
    if old is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = old


def current_slice() -> SliceInfo | None:
    """The slice of the running hami-ray task or actor, or None outside one."""
    return _current


def enter_slice(meta: dict[str, Any], env: dict[str, str] | None = None) -> SliceInfo:
    """Apply the slice environment (a task's ``env``; an actor has its own in ``os.environ`` already),
    record the slice for ``current_slice()`` and tell the node actor this process holds it.

    Raises:
        WorkerBound: see :func:`apply_env`; nothing was recorded or told.
    """
    global _current
    if env is not None:
        apply_env(env)
    devices = tuple(DeviceGrant.model_validate(g) for part in meta["slices"] for g in part)
    env = {k: v for k, v in os.environ.items() if k in _SLICE_KEYS or k.startswith("CUDA_DEVICE_MEMORY_LIMIT")}
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


def leave_slice(meta: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> None:
    """Forget the slice; for a task, tell the node actor this process is done with the lease, and bind
    the process to ``env`` if the task loaded CUDA."""
    global _current, _bound
    _current = None
    if env is not None and _bound is None and _cuda_loaded():
        _bound = dict(env)
    if meta is not None:
        actor = _actors.get(meta["node_actor"])
        if actor is not None:
            actor.finish.remote(meta["lease_id"], os.getpid())


@ray.remote
def run_in_slice(fn: Callable[..., Any], meta: dict[str, Any], env: dict[str, str], *args: Any,
                 **kwargs: Any) -> Any:
    """The task the placement actor submits: enter the slice, run the user's function, leave."""
    enter_slice(meta, env)
    try:
        return fn(*args, **kwargs)
    finally:
        leave_slice(meta, env)


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
