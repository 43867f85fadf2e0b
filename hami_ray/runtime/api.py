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
from hami_ray.runtime.placement import PLACEMENT_NAME, PREEMPT_GRACE_S, PlacementActor, slice_meta  # noqa: F401 - slice_meta: gangs
from hami_ray.runtime.worker import (
    NAMESPACE,
    current_slice,
    job_queue,
    pid_namespace,
    report_simulated_memory,
    slice_actor_class,
)

RAY_TASK_OPTIONS = frozenset({"num_cpus", "memory", "resources", "name", "max_retries", "retry_exceptions",
                              "runtime_env", "max_calls"})
RAY_ACTOR_OPTIONS = frozenset({"num_cpus", "memory", "resources", "name", "max_restarts", "max_task_retries",
                               "max_concurrency", "runtime_env", "lifetime"})


def _request(options: dict[str, Any]) -> SliceRequest:
    return slice_request(options, default_queue=job_queue())


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
HEAD_RESOURCE = "node:__internal_head__"  # Ray's own resource of the head node


def init(address: str | None = None, *, simulate: str | None = None, state_root: str | None = None,
         simulate_per_node: dict[str, str] | None = None, agent: dict[str, Any] | None = None,
         node: dict[str, Any] | None = None, metrics_port: int | None = _UNSET,
         preempt_grace_s: float | None = None, **ray_kwargs: Any) -> None:
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
        preempt_grace_s: how long a preempted slice's processes may stay after the notice (its running
            tasks are interrupted at the notice); default 10 s.
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
        "preempt_grace_s": PREEMPT_GRACE_S if preempt_grace_s is None else float(preempt_grace_s),
    }
    given = {"simulate": simulate, "simulate_for": simulate_per_node, "state_root": state_root, "agent": agent,
             "node": node, "metrics_port": metrics_port,
             "preempt_grace_s": None if preempt_grace_s is None else float(preempt_grace_s)}
    # On the head node, as Ray Serve's controller: a placement actor on a worker host would die with that host,
    # and its successor could not know which of that host's leases were lost (the head's death ends the
    # cluster anyway)
    _placement = PlacementActor.options(name=PLACEMENT_NAME, namespace=NAMESPACE, lifetime="detached",
                                        get_if_exists=True, resources={HEAD_RESOURCE: 0.001}).remote(config)
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


GROUP_OPTIONS = ("slice_group", "slice_index")


def _group_target(options: dict[str, Any]) -> tuple[SliceGroup | None, int]:
    """``slice_group=``/``slice_index=`` of ``.options()``: which reserved slice of a gang to run in.

    Raises:
        InvalidRequest: a group that is not a :class:`SliceGroup`, or an index out of its range.
    """
    group, index = options.get("slice_group"), options.get("slice_index", 0)
    if group is None:
        return None, 0
    if not isinstance(group, SliceGroup):
        raise InvalidRequest("slice_group", f"expected what hami_ray.slice_group() returned, got {type(group).__name__}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(group):
        raise InvalidRequest("slice_index", f"expected 0..{len(group) - 1}, got {index!r}")
    return group, index


class RemoteFunction:
    """What ``@hami_ray.remote`` makes of a function: ``.remote()`` and ``.options()`` as Ray's."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        self._group, self._index = _group_target(options)
        options = {k: v for k, v in options.items() if k not in GROUP_OPTIONS}
        ours, self._ray_options = _split(options, RAY_TASK_OPTIONS)
        self._fn = fn
        self._options = options
        self._request = _request(ours)
        self._request_json = self._request.model_dump(mode="json")
        self._lane_key = json.dumps(self._request_json, sort_keys=True)
        self._fn_ref: Any = None
        self.__name__ = getattr(fn, "__name__", "task")

    def options(self, **options: Any) -> RemoteFunction:
        merged = {**self._options, **options}
        if self._group is not None and "slice_group" not in options:
            merged.update(slice_group=self._group, slice_index=options.get("slice_index", self._index))
        clone = RemoteFunction(self._fn, merged)
        clone._fn_ref = self._fn_ref
        return clone

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        handle = _handle()
        if self._fn_ref is None:
            self._fn_ref = ray.put(self._fn)
        if self._group is not None:
            return self._group.submit(self._index, self._fn_ref, self._ray_options, args, kwargs)
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
        self._group, self._index = _group_target(options)
        self._options = options
        options = {k: v for k, v in options.items() if k not in GROUP_OPTIONS}
        ours, self._ray_options = _split(options, RAY_ACTOR_OPTIONS)
        self._cls = cls
        self._request = _request(ours)

    def options(self, **options: Any) -> ActorClass:
        return ActorClass(self._cls, {**self._options, **options})

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        handle = _handle()
        owner = f"actor:{self._cls.__name__}"
        if self._group is not None:  # a slice the gang holds: the actor uses it, the gang keeps it
            return self._group.start_actor(self._index, self._cls, self._ray_options, args, kwargs)
        grant = ray.get(handle.acquire.remote(self._request.model_dump(mode="json"), owner, time.time()))
        lease = Lease.model_validate(grant["lease"])
        try:
            return start_actor_in(grant, self._cls, self._ray_options, args, kwargs,
                                  retake={"request": self._request.model_dump(mode="json"), "owner": owner})
        except Exception:
            ray.get(handle.release.remote(lease.lease_id, lease.token))
            raise


def start_actor_in(grant: dict[str, Any], cls: type, ray_options: dict[str, Any], args: tuple[Any, ...],
                   kwargs: dict[str, Any], retake: dict[str, Any] | None = None) -> Any:
    """Start ``cls`` as an actor in the slice of ``grant``: on its node, with its environment from the start.
    ``retake`` (``{"request", "owner"}``): what a restart of the actor by Ray (``max_restarts``) asks for,
    on the same node, when its slice is gone (preempted, or freed with its dead process)."""
    node = grant["lease"]["allocation"]["node"]
    env = {**ray_options.get("runtime_env", {}).get("env_vars", {}), **grant["env"]}
    runtime_env = {**ray_options.get("runtime_env", {}), "env_vars": env}
    opts = {k: v for k, v in ray_options.items() if k != "runtime_env"}
    return ray.remote(slice_actor_class(cls)).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False), runtime_env=runtime_env, **opts,
    ).remote({**slice_meta(grant, grant["state_root"]), **({"retake": retake} if retake else {})}, *args, **kwargs)


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

    def preemption(self) -> dict[str, Any] | None:
        """The preemption notice of this slice, if it is being taken back: ``{"for_queue", "reason",
        "grace_s", "deadline"}`` (``deadline``: the placement actor's ``time.time()`` when the slice goes).
        A driver holding a slice asks between steps and stops using the devices before the deadline."""
        notice: dict[str, Any] | None = ray.get(_handle().lease_notice.remote(self.lease_id))
        return notice


@contextmanager
def lease(**options: Any) -> Iterator[LeaseHandle]:
    """Hold a slice in the driver: ``with hami_ray.lease(gpu_memory="2GiB") as lease: ...``."""
    request = _request(options)
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


class SliceGroup:
    """A gang of slices held all together (``hami_ray.slice_group``), as Ray's placement group holds
    bundles: run tasks and actors in slice ``i`` with ``.options(slice_group=group, slice_index=i)``; give
    them all back with :meth:`release` (or a ``with`` block). Held by this driver's Ray job: freed if the
    driver dies."""

    def __init__(self, grants: list[dict[str, Any]], strategy: str) -> None:
        self._grants = grants
        self.strategy = strategy
        self.slices = [LeaseHandle(Lease.model_validate(g["lease"]), g["env"]) for g in grants]
        self._released = False

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def nodes(self) -> list[str]:
        """The node of each slice, in bundle order."""
        return [h.lease.allocation.node for h in self.slices]

    def _live(self, index: int) -> dict[str, Any]:
        if self._released:
            raise InvalidRequest("slice_group", "this gang was released")
        return self._grants[index]

    def submit(self, index: int, fn_ref: Any, ray_options: dict[str, Any], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Any:
        """Run a task in slice ``index`` (on its node, in a worker started with the slice's environment)."""
        from hami_ray.runtime.worker import run_in_slice  # noqa: PLC0415

        grant = self._live(index)
        lease = self.slices[index].lease
        user_env = dict(ray_options.get("runtime_env") or {})
        opts = {k: v for k, v in ray_options.items() if k != "runtime_env"}
        env_vars = {**user_env.get("env_vars", {}), **grant["env"]}
        return run_in_slice.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(lease.allocation.node, soft=False),
            runtime_env={**user_env, "env_vars": env_vars}, **opts,
        ).remote(fn_ref, slice_meta(grant, grant["state_root"]), grant["env"], *args, **kwargs)

    def start_actor(self, index: int, cls: type, ray_options: dict[str, Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        """Start an actor in slice ``index``; the slice stays the gang's when the actor ends."""
        return start_actor_in(self._live(index), cls, ray_options, args, kwargs)

    def release(self) -> None:
        """Give every slice back (idempotent)."""
        if self._released:
            return
        self._released = True
        calls = _calls_or_raise()
        for held in self.slices:
            calls.call("release", lease_id=held.lease_id, token=held.lease.token, node=held.lease.allocation.node)

    def __enter__(self) -> SliceGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def slice_group(bundles: list[dict[str, Any]], strategy: str = "PACK", *, priority: int = 0,
                name: str = "", queue: str | None = None) -> SliceGroup:
    """Reserve a gang of slices, all or none, like a Ray placement group: ``bundles`` are
    ``@hami_ray.remote`` keywords, one dict per slice. Waits in the queue as one request (``priority``, then
    submission order) and never holds part of the gang while it waits.

    Args:
        bundles: e.g. ``[{"gpus": 1, "gpu_memory": "40GiB"}] * 4``.
        strategy: ``PACK`` (one node if possible), ``STRICT_PACK`` (one node), ``SPREAD`` (different nodes
            if possible), ``STRICT_SPREAD`` (different nodes).
        priority: larger is served first.
        name: how operators see its slices' owner (``gang:<name>``; default ``gang:<driver pid>``), as Ray's
            ``placement_group(name=...)``.
        queue: the team queue the gang is served from, as one request (default: the job's
            ``$HAMI_RAY_QUEUE``, then ``default``).

    Returns:
        The held gang: ``.slices`` (devices and environment of each), ``.nodes``; run work in slice ``i``
        with ``.options(slice_group=group, slice_index=i)``; ``.release()``.

    Raises:
        InvalidRequest: a malformed bundle or unknown strategy.
        Unschedulable: the gang could not fit even an empty cluster (at once, with the reason).
    """
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidRequest("priority", f"expected an integer, got {priority!r}")
    extra = {"priority": priority, **({"queue": queue} if queue else {})}
    requests = [_request({**bundle, **extra}).model_dump(mode="json") for bundle in bundles]
    context = ray.get_runtime_context()
    grants = ray.get(_handle().acquire_group.remote(requests, str(strategy).upper(), f"gang:{name or os.getpid()}",
                                                    "driver", context.get_job_id(), time.time()))
    group = SliceGroup(grants, str(strategy).upper())
    here = context.get_node_id()
    for grant, held in zip(grants, group.slices):
        actor = ray.get_actor(grant["node_actor"], namespace=NAMESPACE)
        mine = here == held.lease.allocation.node
        ray.get(actor.claim.remote(held.lease_id, os.getpid() if mine else None, pid_namespace() if mine else None))
    return group


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


def apply_queues(text: str) -> list[dict[str, Any]]:
    """Apply team queue definitions (YAML, see :mod:`hami_ray.core.queues`), as ``hami-ray queues apply``;
    returns the queues as :func:`queues` does. Kept by the placement actor across its restarts.

    Raises:
        QueueConfigError: invalid definitions (queue and field named); the old ones stay.
    """
    rows: list[dict[str, Any]] = ray.get(_handle().apply_queues.remote(text))
    return rows


def queues() -> list[dict[str, Any]]:
    """Per team queue: guaranteed, limit, used, borrowed, share, waiting and preempted (amounts in
    ``{"memory_mib", "cores", "devices"}``)."""
    rows: list[dict[str, Any]] = ray.get(_handle().queues.remote())
    return rows


def queue_depth() -> int:
    return int(ray.get(_handle().status.remote())["queue_depth"])


def check(**options: Any) -> None:
    """Raise now if no node could ever hold this request (``Unschedulable`` with ``never``)."""
    request: SliceRequest = _request(options)
    ray.get(_handle().check.remote(request.model_dump(mode="json")))


__all__ = ["init", "attach", "NotRunning", "shutdown", "remote", "lease", "status", "current_slice", "queue_depth", "check", "lost_leases",
           "apply_queues", "queues",
           "NotInitialized", "report_simulated_memory", "slice_group", "SliceGroup"]
