"""Slices for processes that Ray's own libraries place: Ray Serve replicas and Ray Data's actor pools.

Serve's controller and Ray Data's executor start their actors themselves, on nodes they choose. A slice
for such an actor is taken *by the actor's own process*, on its own node, before any user code runs:

- the process asks the placement actor for a slice of the request pinned to its node's devices (the
  node's devices are chosen by the policy, as for any request; the request waits in the placement
  actor's queue by priority, then submission, while the node is full);
- it applies the slice's environment to ``os.environ`` (``CUDA_VISIBLE_DEVICES`` by uuid, HAMi-core's
  limits, MPS limits, JAX's fraction, the PyTorch cap) and tells the node actor its pid, so the slice
  lives exactly as long as the process: the node actor frees it when the process dies (a replica
  killed, a pool scaled down), and a graceful stop gives it back at once.

A node that could never hold the request fails the actor at once with :class:`NodeCannotHold`
(naming the nodes that could), so the library places it again.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any

import ray

from hami_ray.core.errors import HamiRayError, InvalidRequest
from hami_ray.core.ids import new_lease_id
from hami_ray.core.model import SliceRequest
from hami_ray.core.request import KEYWORDS, slice_request
from hami_ray.runtime.placement import PLACEMENT_NAME, slice_meta
from hami_ray.runtime.worker import NAMESPACE, PROCESS_START_KEYS, enter_slice, job_queue, this_process

log = logging.getLogger(__name__)
GIVE_BACK_TIMEOUT_S = 5.0

_held: dict[str, Any] | None = None  # this process's own slice (one per process)
_lock = threading.Lock()


class NodeCannotHold(HamiRayError):
    """The node that a library (Serve, Data) put this actor on could never hold its slice."""

    def __init__(self, node: str, owner: str, request: str, able: list[str]) -> None:
        self.node, self.owner, self.request, self.able = node, owner, request, able
        where = ", ".join(able) if able else "none"
        super().__init__(f"{owner}: node {node} could never hold {request}; nodes that could: {where}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (NodeCannotHold, (self.node, self.owner, self.request, self.able))


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """hami-ray's slice keywords (validated now) and everything else."""
    ours = {k: v for k, v in options.items() if k in KEYWORDS}
    return slice_request(ours, default_queue=job_queue()).model_dump(mode="json"), {k: v for k, v in options.items() if k not in KEYWORDS}


def take_slice(request: dict[str, Any], owner: str) -> dict[str, Any]:
    """Hold a slice of ``request`` on this process's node for as long as this process lives, its
    environment applied to ``os.environ``; returns the grant. A second call returns the slice held.

    Raises:
        NodeCannotHold: this node could never hold the request (another could).
        Unschedulable, InvalidRequest: no node could ever hold it, or the request is malformed.
    """
    global _held
    with _lock:
        if _held is not None:
            return _held
        node = ray.get_runtime_context().get_node_id()
        placement = ray.get_actor(PLACEMENT_NAME, namespace=NAMESPACE)
        able: list[tuple[str, list[str], Any]] = ray.get(placement.lane_nodes.remote(request))  # raises Unschedulable when none ever could
        uuids = next((list(ids) for name, ids, _ in able if name == node), None)
        if uuids is None:
            raise NodeCannotHold(node, owner, _describe(request), [name for name, _, _ in able])
        grant: dict[str, Any] = ray.get(placement.acquire.remote({**request, "include_uuids": uuids}, owner,
                                                                 time.time(), process=this_process(),
                                                                 ticket=new_lease_id()))
        try:
            enter_slice(slice_meta(grant, grant["state_root"]), _started_env(grant["env"], owner), lane=True)
        except BaseException:
            _give_back(grant)
            raise
        _held = grant
        return grant


def _started_env(env: dict[str, str], owner: str) -> dict[str, str]:
    """The slice's environment as this already running process can honour it: what the dynamic loader
    reads at process start (HAMi-core's ``LD_PRELOAD``) comes too late here, so a slice graded
    ``hami-core`` holds at ``watchdog`` in this process unless the library started it with the preload
    (``runtime_env={"env_vars": {"LD_PRELOAD": ...}}``); ``current_slice().isolation`` says which."""
    late = [k for k in PROCESS_START_KEYS if env.get(k) and env[k] not in os.environ.get(k, "")]
    if not late:
        return env
    try:
        slice_doc = json.loads(env.get("HAMI_RAY_SLICE", "{}"))
    except ValueError:
        slice_doc = {}
    if slice_doc.get("isolation") == "hami-core":
        slice_doc["isolation"] = "watchdog"
        slice_doc["note"] = "HAMi-core not preloaded in this process: the node's watchdog enforces the slice"
        env = {**env, "HAMI_RAY_SLICE": json.dumps(slice_doc)}
    log.warning("%s: %s was not set when this process started, so the slice holds at %s here",
                owner, ", ".join(late), slice_doc.get("isolation", "watchdog"))
    return env


def give_back() -> bool:
    """Free this process's slice now (a graceful stop); the node actor would free it when the process
    ends anyway. Returns whether one was held."""
    global _held
    with _lock:
        grant, _held = _held, None
    if grant is None:
        return False
    _give_back(grant)
    return True


def _give_back(grant: dict[str, Any]) -> None:
    """Release and wait for the answer, from inside a Ray task only. An actor process that exits (Ray
    Data ends its pool) collects its instance outside any task: Ray (2.60) then derives the same task id
    for the same call in every such process, the placement actor runs the "two attempts" of one task at
    once and Ray aborts it (``Check failed: erased == 1``). There the node actor frees the slice when the
    process is gone, within its reaping interval."""
    if sys.is_finalizing() or ray.get_runtime_context().get_task_id() is None:
        return
    lease = grant["lease"]
    try:
        ray.get(ray.get_actor(PLACEMENT_NAME, namespace=NAMESPACE).release.remote(
            lease["lease_id"], lease["token"], lease["allocation"]["node"]), timeout=GIVE_BACK_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - stopping: the node actor frees it when the process ends
        pass


def _describe(request: dict[str, Any]) -> str:
    return SliceRequest.model_validate(request).describe()


def sliced(cls: type, **options: Any) -> type:
    """``cls`` as a class whose instance holds a slice of ``options`` for its process's life: the slice is
    taken on the process's node before ``cls.__init__`` runs and given back by ``__del__`` (which Serve
    calls on a graceful stop). For classes that Ray's libraries start as actors themselves:

        ds.map_batches(hami_ray.sliced(Model, gpu_memory="4GiB"), compute=ActorPoolStrategy(size=6))  # Ray Data
        serve.deployment(hami_ray.sliced(Model, gpu_memory="10GiB"))                                  # Ray Serve

    Raises:
        InvalidRequest: a malformed slice keyword (now, not in the actor).
        TypeError: ``cls`` is not a class.
    """
    if not isinstance(cls, type):
        raise TypeError(f"hami_ray.sliced takes a class (an actor holds its slice for its life), got {cls!r}")
    request, rest = split_options(options)
    if rest:
        raise InvalidRequest(next(iter(rest)), "not a slice keyword (give Ray's options to map_batches or Serve)")
    return slice_holder(cls, request)


def slice_holder(cls: type, request: dict[str, Any]) -> type:
    """A subclass of ``cls`` that takes its slice of ``request`` before the user's ``__init__``."""

    class SliceHolder(cls):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            take_slice(request, _owner(cls.__name__))
            super().__init__(*args, **kwargs)

        def __del__(self) -> None:  # Serve calls it on a graceful stop (scale down, redeploy, delete)
            try:
                user_del = getattr(super(), "__del__", None)
                if user_del is not None:
                    user_del()
            finally:
                give_back()

    SliceHolder.__name__ = cls.__name__
    SliceHolder.__qualname__ = cls.__qualname__
    SliceHolder.__module__ = cls.__module__
    SliceHolder.__doc__ = cls.__doc__
    return SliceHolder


def _owner(name: str) -> str:
    """Who holds the slice, as operators read it: ``serve:<app>/<deployment>#<replica>`` in a Serve
    replica, ``data:<class>`` in a Ray Data pool actor, else ``actor:<class>``."""
    if "ray.serve" in sys.modules:
        try:
            from ray import serve  # noqa: PLC0415 - Serve is optional

            ctx = serve.get_replica_context()
            return f"serve:{ctx.app_name}/{ctx.deployment}#{ctx.replica_tag}"
        except Exception:  # noqa: BLE001, S110 - not in a replica
            pass
    if "ray.data" in sys.modules:
        return f"data:{name}"
    return f"actor:{name}"
