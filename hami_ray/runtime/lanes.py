"""Lanes: the driver keeps a slice it just used for the next task of the same shape.

A task through the placement actor costs four Ray calls and a relayed result. When a driver submits
many tasks of one shape, most of that is the same work again: so, like Ray's own owner-side worker
leases, the driver holds a *lane* per slice: a lease from the placement actor and a slice worker (an
actor the driver owns, on the lease's node) to which it sends its tasks directly, up to ``depth`` at a
time, in order. The lease is acquired once per lane and released when the lane has had nothing to do
for ``idle_s``, or has drained after its ``term_s``.

Fairness: a lane opens only when nobody waits in the placement actor's queue and the slice fits now
(``acquire(wait=False)``); when it cannot, the task goes through the queue as before (priority, then
submission order). A lane takes new tasks for ``term_s`` only, then drains and gives its slice back,
so a driver with a lane never holds a slice against waiting requests for longer than that.

Isolation is the same as a task's through the queue: one task at a time per slice, the slice's
environment applied before the user's code runs, the worker's process attached to the lease (reaped
when it dies, stopped when it overruns). The worker actors belong to the driver, so they (and, within
the reap interval, their leases) go when the driver goes.

Used by :meth:`hami_ray.runtime.api.RemoteFunction.remote`; ``HAMI_RAY_LANES=0`` turns lanes off.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from hami_ray.core.errors import HamiRayError
from hami_ray.runtime.fastpath import PlacementCalls
from hami_ray.runtime.worker import PROCESS_START_KEYS, WORKER_MARK, SliceWorker

log = logging.getLogger(__name__)

LANES_ENV = "HAMI_RAY_LANES"
MAX_DEPTH = 1024  # tasks sent to one lane's worker before it finished them (queued by the driver's Ray, no process)
IDLE_S = 0.05  # a drained lane waits this long for the next task of its shape, then gives its slice back
TERM_S = 2.0  # while others wait: a lane takes new tasks this long after it opened, then drains and gives back
FIRST_SERVICE_S = TERM_S / 32  # how long a task of a shape not seen yet is assumed to take
BACKOFF_S = 0.05  # after the placement actor said "not now", no new lane of this shape is asked for this long
MAX_PENDING = 4  # lanes of one shape waiting for a slice (a worker process each); later tasks join the last
NODES_TTL_S = 5.0  # how long the nodes that could hold a shape are remembered
WORKER_IDLE_S = 60.0  # an idle slice worker is stopped after this long
MAX_IDLE_WORKERS = 16  # per node


def lanes_enabled() -> bool:
    return os.environ.get(LANES_ENV, "1") not in ("0", "false", "no")


@dataclass(eq=False)
class Lane:
    """A slice this driver holds and the worker its tasks go to; or, ``pending``, a worker that waits
    for a slice itself (``request``: pinned to its node's devices) with the tasks queued to it."""

    key: str
    grant: dict[str, Any] | None
    meta: dict[str, Any] | None
    env: dict[str, str] | None
    worker: Any
    pool_key: tuple[str, str]
    opened: float
    in_flight: int = 0
    last: float = 0.0
    busy_since: float | None = None  # when its worker last started on a task with no gap before it
    dead: bool = False
    request: dict[str, Any] | None = None  # pending lanes: what the worker asks for
    submitted: float = 0.0  # pending lanes: when opened (time.time()), their place in the queue whichever worker
    # serves them (also how a worker from the idle pool tells this lane from those it served before)


@dataclass
class LaneStats:
    opened: int = 0
    pending: int = 0
    refused: int = 0
    closed: int = 0
    tasks: int = 0
    workers_started: int = 0


@dataclass(eq=False)
class _IdleWorker:
    handle: Any
    bound: str | None  # the slice environment (JSON) CUDA was initialised under there, if any
    since: float = field(default_factory=time.monotonic)


class LaneClient:
    """The driver's lanes, by shape; thread-safe (Ray calls completion callbacks from its own thread)."""

    def __init__(self, placement: Any, *, max_depth: int = MAX_DEPTH, idle_s: float = IDLE_S,
                 term_s: float = TERM_S, backoff_s: float = BACKOFF_S) -> None:
        self._placement = placement
        self._calls = PlacementCalls(placement)
        self.max_depth, self.idle_s, self.term_s, self.backoff_s = max_depth, idle_s, term_s, backoff_s
        self._lock = threading.Lock()
        self._lanes: dict[str, list[Lane]] = {}
        self._refused_until: dict[str, float] = {}
        self._service_s: dict[str, float] = {}  # per shape: how long a task takes (moving average)
        self._nodes: dict[str, tuple[float, list[Any]]] = {}  # per shape: (when asked, lane_nodes answer)
        self.contended = False  # others wait in the placement actor's queue (as last heard)
        self._idle: dict[tuple[str, str], list[_IdleWorker]] = {}
        self._doomed: list[Any] = []  # workers to kill, handed over by Ray's callbacks to the lanes thread
        self._wake = threading.Event()
        self._stopped = False
        self.stats = LaneStats()
        self._closer = threading.Thread(target=self._close_loop, name="hami-ray-lanes", daemon=True)
        self._closer.start()

    # --- submit ------------------------------------------------------------------------------
    def submit(self, key: str, request: dict[str, Any], owner: str, fn_id: str, fn_ref: Any, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Any | None:
        """Send a task down a lane of its shape (opening one if the cluster has room now); None when
        it has to wait in the placement actor's queue instead."""
        lane = self._lane_for(key, request, owner)
        if lane is None:
            return None
        try:
            if lane.request is not None:
                ref = lane.worker.run_pending.remote(fn_id, [fn_ref], lane.request, owner, lane.submitted, *args,
                                                     **kwargs)
            else:
                ref = lane.worker.run.remote(fn_id, [fn_ref], lane.meta, lane.env, {"request": request, "owner": owner},
                                             *args, **kwargs)
        except Exception:
            self._finished(lane, None)
            raise
        ref._on_completed(functools.partial(self._finished, lane))
        return ref

    def _lane_for(self, key: str, request: dict[str, Any], owner: str) -> Lane | None:
        now = time.monotonic()
        with self._lock:
            if self._stopped:
                return None
            best = self._usable(key, now)
            if best is not None and best.in_flight == 0:
                return self._take(best)
            may_open = now >= self._refused_until.get(key, 0.0)
        if may_open:
            lane = self._open(key, request, owner)
            if lane is not None:
                return lane
            with self._lock:
                self._refused_until[key] = time.monotonic() + self.backoff_s
                self.stats.refused += 1
        with self._lock:
            best = self._usable(key, time.monotonic())
            if best is not None and best.in_flight < self.depth(key):
                return self._take(best)
        return self._pending(key, request)

    @staticmethod
    def _take(lane: Lane) -> Lane:
        """One more task for ``lane`` (under the lock)."""
        lane.in_flight += 1
        if lane.busy_since is None:
            lane.busy_since = time.monotonic()
        return lane

    def _pending(self, key: str, request: dict[str, Any]) -> Lane | None:
        """A lane that waits for its slice: the newest of this shape while it has room (or when there
        are ``MAX_PENDING`` already), else a new one on the next node that could hold it. Tasks fill
        the lanes one after another, and the lanes queue in that order: so they start in order."""
        with self._lock:
            pending = [x for x in self._lanes.get(key, ()) if x.request is not None and not x.dead]
            last = pending[-1] if pending else None
            if last is not None and (last.in_flight < self.depth(key) or len(pending) >= MAX_PENDING):
                return self._take(last)
        nodes = self._lane_nodes(key, request)
        if not nodes:
            return None  # nothing could hold it, or no answer: the queue path says why
        node, uuids, start_env = nodes[len(pending) % len(nodes)]
        start = {WORKER_MARK: "1", **start_env}
        pool_key = (node, json.dumps(start, sort_keys=True))
        worker = self._worker(pool_key, None, node, start)
        lane = Lane(key, None, None, None, worker, pool_key, time.monotonic(), in_flight=1,
                    busy_since=time.monotonic(), request={**request, "include_uuids": uuids}, submitted=time.time())
        with self._lock:
            self._lanes.setdefault(key, []).append(lane)
            self.stats.pending += 1
        return lane

    def _lane_nodes(self, key: str, request: dict[str, Any]) -> list[Any]:
        now = time.monotonic()
        cached = self._nodes.get(key)
        if cached is not None and now - cached[0] < NODES_TTL_S:
            return cached[1]
        try:
            nodes = list(ray.get(self._placement.lane_nodes.remote(request)))
        except RayError as exc:
            log.debug("no lane nodes for %s: %s", key, exc)
            nodes = []
        self._nodes[key] = (now, nodes)
        return nodes

    def depth(self, key: str) -> int:
        """How many tasks of this shape a lane may hold: about a term's worth of work, so a lane that
        stops taking tasks because others wait drains within about a term."""
        service = self._service_s.get(key, FIRST_SERVICE_S)
        return max(2, min(self.max_depth, int(self.term_s / max(service, 1e-6))))

    def _usable(self, key: str, now: float) -> Lane | None:
        lanes = [x for x in self._lanes.get(key, ()) if x.request is None
                 and not x.dead and (not self.contended or now - x.opened < self.term_s)]
        return min(lanes, key=lambda x: x.in_flight, default=None)

    def _open(self, key: str, request: dict[str, Any], owner: str) -> Lane | None:
        try:
            grant = self._calls.call("acquire", request=request, owner=owner, submitted=time.time(), wait=False)
        except (RayError, HamiRayError) as exc:  # never fits, bad request, restarting: the queue path says so
            log.debug("lane for %s not opened: %s", owner, exc)
            return None
        if "lease" not in grant:  # {"waiting": n}: not now
            self.contended = grant.get("waiting", 0) > 0
            return None
        self.contended = False
        from hami_ray.runtime.placement import slice_meta  # noqa: PLC0415 - placement imports the worker

        env = grant["env"]
        node = grant["lease"]["allocation"]["node"]
        start = {WORKER_MARK: "1", **{k: env[k] for k in PROCESS_START_KEYS if k in env}}
        pool_key = (node, json.dumps(start, sort_keys=True))
        worker = self._worker(pool_key, json.dumps(env, sort_keys=True), node, start)
        lane = Lane(key, grant, slice_meta(grant, grant["state_root"]), env, worker, pool_key, time.monotonic(),
                    in_flight=1, busy_since=time.monotonic())
        with self._lock:
            self._lanes.setdefault(key, []).append(lane)
            self.stats.opened += 1
        return lane

    def _worker(self, pool_key: tuple[str, str], env_json: str | None, node: str, start: dict[str, str]) -> Any:
        """An idle worker of this node free for this slice (never bound to another; for a pending lane,
        ``env_json`` None, bound to none), or a new one."""
        with self._lock:
            idle = self._idle.get(pool_key, [])
            for i, w in enumerate(idle):
                if w.bound is None or (env_json is not None and w.bound == env_json):
                    return idle.pop(i).handle
            self.stats.workers_started += 1
        return SliceWorker.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            runtime_env={"env_vars": start},
        ).remote()

    # --- completion and closing --------------------------------------------------------------
    def _finished(self, lane: Lane, result: Any) -> None:
        """A task of ``lane`` ended (``result`` is its value or its error); runs on Ray's io thread (never
        blocks there: see :meth:`_park`)."""
        with self._lock:
            now = time.monotonic()
            lane.in_flight -= 1
            lane.last = now
            if lane.busy_since is not None and lane.request is None:  # a pending lane's first task also waited
                old = self._service_s.get(lane.key)
                took = now - lane.busy_since
                self._service_s[lane.key] = took if old is None else 0.8 * old + 0.2 * took
            lane.busy_since = now if lane.in_flight else None
            self.stats.tasks += 1
            if isinstance(result, RayActorError):
                lane.dead = True  # its worker died (killed, or stopped for overrunning): no more tasks there
            if lane.in_flight == 0:
                self._wake.set()

    def _close_loop(self) -> None:
        while not self._stopped:
            self._wake.wait(self.idle_s)
            self._wake.clear()
            try:
                self._close_due()
            except Exception:  # noqa: BLE001 - a long-running loop never dies on one bad object
                log.exception("closing lanes failed")

    def _close_due(self) -> None:
        now = time.monotonic()
        due: list[Lane] = []
        with self._lock:
            for key, lanes in list(self._lanes.items()):
                keep = []
                for lane in lanes:
                    drained = lane.in_flight == 0
                    over = self.contended and now - lane.opened >= self.term_s
                    if drained and (lane.dead or over or now - lane.last >= self.idle_s):
                        due.append(lane)
                    else:
                        keep.append(lane)
                if keep:
                    self._lanes[key] = keep
                else:
                    del self._lanes[key]
            stale = [w for pool in self._idle.values() for w in pool if now - w.since > WORKER_IDLE_S]
            for pool in self._idle.values():
                pool[:] = [w for w in pool if w not in stale]
            doomed, self._doomed = [*self._doomed, *(w.handle for w in stale)], []
        for lane in due:
            self._close(lane)
        for handle in doomed:
            ray.kill(handle)

    def _close(self, lane: Lane) -> None:
        if lane.grant is not None:  # a pending lane's worker gives its own back when asked its binding, below
            lease = lane.grant["lease"]
            self._calls.call("release", lease_id=lease["lease_id"], token=lease["token"],
                             node=lease["allocation"]["node"])
        with self._lock:
            self.stats.closed += 1
        if lane.dead:
            ray.kill(lane.worker)
            return
        binding = lane.worker.binding.remote()
        binding._on_completed(functools.partial(self._park, lane))

    def _park(self, lane: Lane, bound: Any) -> None:
        """Back to the idle pool, with the slice it is bound to (CUDA initialised there), if any."""
        if isinstance(bound, BaseException):
            return  # it died meanwhile
        # A worker not kept is killed by another thread: this one is Ray's io thread (an _on_completed
        # callback), and a ray.kill here would wait for ever for the GCS's answer, which only it delivers.
        with self._lock:
            stopped = self._stopped
            pool = self._idle.setdefault(lane.pool_key, [])
            if not stopped and len(pool) < MAX_IDLE_WORKERS:
                pool.append(_IdleWorker(lane.worker, json.dumps(bound, sort_keys=True) if bound is not None else None))
                return
            if not stopped:
                self._doomed.append(lane.worker)  # the lanes thread kills it
        if stopped:  # the lanes thread is gone: a thread of its own
            threading.Thread(target=ray.kill, args=(lane.worker,), name="hami-ray-lane-kill", daemon=True).start()
        self._wake.set()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until no lane is open (each closes once idle); False if some still are after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._lanes:
                    return True
            time.sleep(self.idle_s)
        return False

    def waiting_lanes(self) -> int:
        """Lanes whose worker waits for (or holds) a slice of its own."""
        with self._lock:
            return sum(1 for v in self._lanes.values() for x in v if x.request is not None and not x.dead)

    def close(self) -> None:
        """Give every slice back and stop the workers (``hami_ray.shutdown``)."""
        with self._lock:
            self._stopped = True
            lanes = [x for v in self._lanes.values() for x in v]
            idle = [*(w.handle for pool in self._idle.values() for w in pool), *self._doomed]
            self._lanes.clear()
            self._idle.clear()
            self._doomed.clear()
        self._wake.set()
        for lane in lanes:
            try:
                if lane.grant is not None:  # answered before the hami-ray actors may go
                    lease = lane.grant["lease"]
                    self._calls.call("release", lease_id=lease["lease_id"], token=lease["token"],
                                     node=lease["allocation"]["node"])
                ray.kill(lane.worker)
            except Exception:  # noqa: BLE001 - shutting down: the node actors reap what is left
                pass
        self._calls.close()
        for handle in idle:
            try:
                ray.kill(handle)
            except Exception:  # noqa: BLE001
                pass
