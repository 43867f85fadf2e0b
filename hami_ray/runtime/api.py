"""The user API, mirroring Ray's: ``init``, ``remote`` (functions and classes), ``.options``, ``lease``,
``status``, ``current_slice``.

    import hami_ray
    hami_ray.init()

    @hami_ray.remote(gpus=1, gpu_memory="4GiB", gpu_cores=25)
    def infer(batch): ...

    refs = [infer.remote(b) for b in batches]   # returns at once, even when the cluster is full

A task call goes to the placement actor, which waits for a slice (as a coroutine, not a process), starts
the task on the slice's node with the slice's environment, and frees the slice when the task ends,
fails or is cancelled. An actor's slice is acquired before the actor starts (``.remote()`` waits for
it) and lives as long as the actor's process. Bad keywords fail at decoration or ``.options()`` time.
"""

from __future__ import annotations

import getpass
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from hami_ray.core.errors import HamiRayError, InvalidRequest
from hami_ray.core.model import DeviceGrant, Lease, SliceRequest
from hami_ray.observe.metrics import DEFAULT_PORT as DEFAULT_METRICS_PORT
from hami_ray.observe.model import ClusterStatus, status_from
from hami_ray.core.request import KEYWORDS, slice_request
from hami_ray.runtime.fastpath import PlacementCalls
from hami_ray.runtime.lanes import LaneClient, lanes_enabled
from hami_ray.runtime.placement import PLACEMENT_NAME, PlacementActor, slice_meta
from hami_ray.runtime.worker import (
    NAMESPACE,
    current_slice,
    pid_namespace,
    report_simulated_memory,
    slice_actor_class,
)

RAY_TASK_OPTIONS = frozenset({"num_cpus", "memory", "resources", "name", "max_retries", "retry_exceptions",
                              "runtime_env", "max_calls"})
RAY_ACTOR_OPTIONS = frozenset({"num_cpus", "memory", "resources", "name", "max_restarts", "max_concurrency",
                               "runtime_env", "lifetime"})


class NotInitialized(HamiRayError):
    """The hami-ray API was used before ``hami_ray.init()``."""

    def __init__(self) -> None:
        super().__init__("hami-ray is not initialised: call hami_ray.init() first (it connects to or starts Ray)")


_placement: Any = None
_lanes: LaneClient | None = None
_calls: PlacementCalls | None = None  # acquire/release over the fast path (or Ray calls)


def _handle() -> Any:
    if _placement is None:
        raise NotInitialized()
    return _placement


def _calls_or_raise() -> PlacementCalls:
    if _calls is None:
        raise NotInitialized()
    return _calls


_UNSET: Any = object()


def init(address: str | None = None, *, simulate: str | None = None, state_root: str | None = None,
         simulate_per_node: dict[str, str] | None = None, agent: dict[str, Any] | None = None,
         node: dict[str, Any] | None = None, metrics_port: int | None = _UNSET,
         **ray_kwargs: Any) -> None:
    """Connect to Ray (or start a local one) and make sure the hami-ray actors run.

    Args:
        address: Ray address; None starts or joins a local Ray like ``ray.init()``.
        simulate: simulated devices for every node, e.g. ``"4xA100-80GB,2xT4-16GB"``; defaults to
            ``$HAMI_RAY_SIMULATE``. Real NVIDIA GPUs win where NVML sees them.
        state_root: where node actors keep journals (default: ``<tmp>/hami-ray-<user>``).
        simulate_per_node: per Ray node id, its own simulation spec; a node started with
            ``$HAMI_RAY_NODE_SIMULATE`` in its environment uses that instead of ``simulate``.
        agent: node agent settings (``tolerance_mib``, ``grace_s``, ``reap_interval_s``).
        node: node isolation settings over each node's environment: ``isolation`` (``auto``, ``mps``,
            ``hami-core``, ``watchdog``; ``$HAMI_RAY_ISOLATION``), ``libvgpu_path`` (``$HAMI_RAY_LIBVGPU``),
            ``mps_control`` (``$HAMI_RAY_MPS_CONTROL``).
        metrics_port: where the placement actor serves Prometheus metrics on its node (HAMi's 9395;
            0: any free port, see ``status()``; None: not served).
        **ray_kwargs: passed to ``ray.init`` when Ray is not initialised yet.

    Raises:
        InvalidRequest: hami-ray already runs on this Ray cluster (another driver, or an earlier
            ``init()``) with other settings than the ones given here: they would be silently ignored.
    """
    global _placement, _lanes, _calls
    if not ray.is_initialized():
        ray.init(address=address, **ray_kwargs)
    config = {
        "simulate": simulate if simulate is not None else os.environ.get("HAMI_RAY_SIMULATE"),
        "simulate_for": simulate_per_node or {},
        "state_root": state_root or os.path.join(tempfile.gettempdir(), f"hami-ray-{getpass.getuser()}"),
        "agent": agent or {},
        "node": node or {},
        "metrics_port": DEFAULT_METRICS_PORT if metrics_port is _UNSET else metrics_port,
    }
    given = {"simulate": simulate, "simulate_for": simulate_per_node, "state_root": state_root, "agent": agent,
             "node": node, "metrics_port": metrics_port}
    _placement = PlacementActor.options(name=PLACEMENT_NAME, namespace=NAMESPACE, lifetime="detached",
                                        get_if_exists=True).remote(config)
    running = ray.get(_placement.settings.remote())
    differ = sorted(k for k, v in given.items() if v is not None and v is not _UNSET and running.get(k) != v)
    if differ:
        _placement = None
        shown = ", ".join(f"{k}={running.get(k)!r} (asked: {given[k]!r})" for k in differ)
        raise InvalidRequest("init", f"hami-ray already runs on this Ray cluster with other settings: {shown}; "
                                     "call init() with the same settings (or none), or stop it first with "
                                     "hami_ray.shutdown(stop_cluster=True)")
    if _calls is not None:
        _calls.close()
    _calls = PlacementCalls(_placement)
    if _lanes is None and lanes_enabled():
        _lanes = LaneClient(_placement)


class NotRunning(HamiRayError):
    """No hami-ray placement actor runs on this Ray cluster."""

    def __init__(self) -> None:
        super().__init__("no hami-ray runs on this Ray cluster: start it with hami_ray.init() (or `hami-ray demo`)")


def attach(address: str | None = "auto", **ray_kwargs: Any) -> None:
    """Connect to a Ray cluster where hami-ray already runs, to look at it (``hami-ray status``): starts
    nothing, and tasks submitted from here take the queue path.

    Raises:
        NotRunning: no placement actor on that cluster.
    """
    global _placement, _calls
    if not ray.is_initialized():
        ray.init(address=address, **ray_kwargs)
    try:
        _placement = ray.get_actor(PLACEMENT_NAME, namespace=NAMESPACE)
    except ValueError:
        raise NotRunning() from None
    if _calls is not None:
        _calls.close()
    _calls = PlacementCalls(_placement)


def shutdown(stop_cluster: bool = False) -> None:
    """End what this driver started: its lanes (their slices go back) and its connections; the
    cluster's hami-ray actors keep serving other drivers. Ray itself keeps running.

    Args:
        stop_cluster: also stop the cluster's hami-ray actors (the placement actor and every node actor;
            every lease on the cluster ends), as an operator would.
    """
    global _placement, _lanes, _calls
    if _lanes is not None:
        _lanes.close()
        _lanes = None
    if _calls is not None:
        _calls.close()
        _calls = None
    if _placement is None:
        return
    if not stop_cluster:
        _placement = None
        return
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor.get("namespace") == NAMESPACE:
            try:
                ray.kill(ray.get_actor(actor["name"], namespace=NAMESPACE), no_restart=True)
            except ValueError:
                pass
    _placement = None


def _split(options: dict[str, Any], ray_keys: frozenset[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    ours = {k: v for k, v in options.items() if k in KEYWORDS}
    theirs = {k: v for k, v in options.items() if k not in KEYWORDS}
    unknown = sorted(set(theirs) - ray_keys)
    if unknown:
        slice_request({unknown[0]: None})  # raises InvalidRequest naming it, with the known keywords
    return ours, theirs


class RemoteFunction:
    """What ``@hami_ray.remote`` makes of a function: ``.remote()`` and ``.options()`` as Ray's."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        ours, self._ray_options = _split(options, RAY_TASK_OPTIONS)
        self._fn = fn
        self._options = options
        self._request = slice_request(ours)
        self._request_json = self._request.model_dump(mode="json")
        self._lane_key = json.dumps(self._request_json, sort_keys=True)
        self._fn_ref: Any = None
        self.__name__ = getattr(fn, "__name__", "task")

    def options(self, **options: Any) -> RemoteFunction:
        merged = {**self._options, **options}
        clone = RemoteFunction(self._fn, merged)
        clone._fn_ref = self._fn_ref
        return clone

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        handle = _handle()
        if self._fn_ref is None:
            self._fn_ref = ray.put(self._fn)
        owner = f"task:{self.__name__}"
        if _lanes is not None and not self._ray_options:  # Ray options (CPUs, runtime_env...) need a task of their own
            ref = _lanes.submit(self._lane_key, self._request_json, owner, self._fn_ref.hex(), self._fn_ref, args,
                                kwargs)
            if ref is not None:
                return ref
        return handle.run.remote(self._request_json, owner, [self._fn_ref], [args], [kwargs], self._ray_options,
                                 time.time())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"remote function {self.__name__} cannot be called directly: use .remote()")


class ActorClass:
    """What ``@hami_ray.remote`` makes of a class: ``.remote()`` starts the actor in its own slice."""

    def __init__(self, cls: type, options: dict[str, Any]) -> None:
        ours, self._ray_options = _split(options, RAY_ACTOR_OPTIONS)
        self._cls = cls
        self._options = options
        self._request = slice_request(ours)

    def options(self, **options: Any) -> ActorClass:
        return ActorClass(self._cls, {**self._options, **options})

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        handle = _handle()
        owner = f"actor:{self._cls.__name__}"
        grant = ray.get(handle.acquire.remote(self._request.model_dump(mode="json"), owner, time.time()))
        lease = Lease.model_validate(grant["lease"])
        env = {**self._ray_options.get("runtime_env", {}).get("env_vars", {}), **grant["env"]}
        runtime_env = {**self._ray_options.get("runtime_env", {}), "env_vars": env}
        opts = {k: v for k, v in self._ray_options.items() if k != "runtime_env"}
        try:
            return ray.remote(slice_actor_class(self._cls)).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(lease.allocation.node, soft=False),
                runtime_env=runtime_env, **opts,
            ).remote(slice_meta(grant, grant["state_root"]), *args, **kwargs)
        except Exception:
            ray.get(handle.release.remote(lease.lease_id, lease.token))
            raise


def remote(*args: Any, **options: Any) -> Any:
    """``@hami_ray.remote`` or ``@hami_ray.remote(gpus=1, gpu_memory="4GiB", gpu_cores=25, ...)``.

    Raises:
        InvalidRequest: a malformed or unknown keyword (at decoration time).
    """
    if len(args) == 1 and not options and callable(args[0]):
        return _wrap(args[0], {})
    if args:
        raise TypeError("use @hami_ray.remote or @hami_ray.remote(**options)")
    slice_request({k: v for k, v in options.items() if k in KEYWORDS})  # validate now

    def decorate(target: Any) -> Any:
        return _wrap(target, options)

    return decorate


def _wrap(target: Any, options: dict[str, Any]) -> Any:
    if isinstance(target, type):
        return ActorClass(target, options)
    return RemoteFunction(target, options)


@dataclass(frozen=True)
class LeaseHandle:
    """A driver-side slice: ``env`` to apply to a subprocess, ``devices`` held."""

    lease: Lease
    env: dict[str, str]

    @property
    def devices(self) -> tuple[DeviceGrant, ...]:
        return self.lease.allocation.devices

    @property
    def lease_id(self) -> str:
        return self.lease.lease_id


@contextmanager
def lease(**options: Any) -> Iterator[LeaseHandle]:
    """Hold a slice in the driver: ``with hami_ray.lease(gpu_memory="2GiB") as lease: ...``."""
    request = slice_request(options)
    calls = _calls_or_raise()
    context = ray.get_runtime_context()
    job = context.get_job_id()
    grant = calls.call("acquire", request=request.model_dump(mode="json"), owner=f"driver:{os.getpid()}",
                       holder="driver", job=job)
    held = LeaseHandle(Lease.model_validate(grant["lease"]), grant["env"])
    try:
        actor = ray.get_actor(grant["node_actor"], namespace=NAMESPACE)
        # The driver's liveness is its Ray job's (the placement actor frees the lease when the job ends),
        # never a pid checked on another host. On the slice's own node the pid also lets enforcement count
        # what this process holds on the device.
        here = context.get_node_id() == held.lease.allocation.node
        ray.get(actor.claim.remote(held.lease_id, os.getpid() if here else None, pid_namespace() if here else None))
        yield held
    finally:
        calls.call("release", lease_id=held.lease_id, token=held.lease.token, node=held.lease.allocation.node)


def status() -> ClusterStatus:
    """The cluster as ``hami-ray status`` shows it: per node and device the allocation, the usage the
    node actors last sampled and every slice with its owner; the summary (allocated and used memory,
    fragmentation, queue), the waiting requests and why, and the live leases (``.leases``)."""
    return status_from(ray.get(_handle().status.remote()))


def lost_leases() -> list[Lease]:
    """The most recent leases (up to 100) whose node left the cluster while they were live."""
    data = ray.get(_handle().status.remote())
    return [Lease.model_validate(x) for x in data["lost"]]


def metrics_address() -> tuple[str, int] | None:
    """Where the placement actor serves ``/metrics`` (host, port), or None when it does not."""
    data = ray.get(_handle().status.remote())
    port = data.get("metrics_port")
    return None if port is None else (str(data.get("host", "")), int(port))


def queue_depth() -> int:
    return int(ray.get(_handle().status.remote())["queue_depth"])


def check(**options: Any) -> None:
    """Raise now if no node could ever hold this request (``Unschedulable`` with ``never``)."""
    request: SliceRequest = slice_request(options)
    ray.get(_handle().check.remote(request.model_dump(mode="json")))


__all__ = ["init", "attach", "NotRunning", "shutdown", "remote", "lease", "status", "current_slice", "queue_depth", "check", "lost_leases",
           "NotInitialized", "report_simulated_memory"]
