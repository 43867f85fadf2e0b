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

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import ray

from hami_ray.core.errors import HamiRayError, SlicePreempted, SliceQuotaExceeded
from hami_ray.core.ids import new_lease_id
from hami_ray.core.model import DeviceGrant
from hami_ray.runtime import framework_caps
from node_actors import interrupt
from node_actors.processes import start_ticks

log = logging.getLogger(__name__)
NAMESPACE = "hami-ray"
PROCESS_START_KEYS = ("LD_PRELOAD",)  # read by the dynamic loader when a process starts, never later
CANCEL_POLL_S = 0.2
CANCEL_AFTER_S = 1.0
CANCEL_SIGNAL = signal.SIGUSR2
WORKER_MARK = "HAMI_RAY_WORKER"  # in every slice worker's runtime_env: a pool of their own, not Ray's
_SLICE_KEYS = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_SM_LIMIT", "HAMI_RAY_SLICE",
               "XLA_PYTHON_CLIENT_MEM_FRACTION", "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY",
               "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")


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

    @property
    def memory_fraction(self) -> tuple[float, ...]:
        """Per device, the slice's share of the device's memory (rounded down to 3 decimals): what
        frameworks that size themselves take, e.g. vLLM's ``gpu_memory_utilization`` (a share of the
        *total* device memory, nvidia-isolation.md §4). Example: 20 GiB of an 80 GiB A100 gives ``(0.25,)``.
        """
        try:
            rows = json.loads(self.env.get("HAMI_RAY_SLICE", "{}")).get("devices", [])
            totals = {str(r["uuid"]): int(r.get("device_mib") or 0) for r in rows}
        except (ValueError, TypeError, KeyError, AttributeError):
            totals = {}
        out = []
        for d in self.devices:
            total = totals.get(d.uuid, 0)
            out.append(min(1.0, int(1000 * d.memory_mib / total) / 1000) if total > 0 else 1.0)
        return tuple(out)

    @property
    def isolation(self) -> str:
        """How strongly the slice holds: ``mig``, ``mps``, ``hami-core``, ``watchdog`` or ``none``
        (``status --json``'s word for it)."""
        try:
            return str(json.loads(self.env.get("HAMI_RAY_SLICE", "{}")).get("isolation", "none"))
        except ValueError:
            return "none"


_current: SliceInfo | None = None
_actors: dict[str, Any] = {}
_fns: dict[str, Callable[..., Any]] = {}  # a lane worker loads each function once, not once per task
_held: str | None = None  # the lease this process last told its node actor it holds (lane workers)
_devices: tuple[str, tuple[DeviceGrant, ...]] = ("", ())  # the last lease's devices, parsed once
_armed: str | None = None  # the state directory the node actor leaves quota verdicts for this process in
_reported: str | None = None  # the state directory this task reported simulated memory use to
_original: dict[str, str | None] = {}  # os.environ before any slice touched a key
_bound: dict[str, str] | None = None  # the slice environment CUDA initialised under, in this process


# a waiting lane's worker keeps its slice until the driver ends the lane (only the driver knows whether more
# tasks are queued to it: a worker that gave the slice back in a gap between two of them let a later lane
# go first, issue 15); a slice left this long with no task goes back anyway (a driver that stopped ending lanes)
OWN_IDLE_S = 10.0
DISOWN_TIMEOUT_S = 30.0
PREEMPT_RETRIES = 3  # a lane's task whose slice is preempted runs again this often (Ray's default max_retries)
QUEUE_ENV = "HAMI_RAY_QUEUE"  # the job's team queue: requests that name none go there (then to "default")


def job_queue() -> str | None:
    """The queue this process's job runs in: ``$HAMI_RAY_QUEUE`` (set it in the job's ``runtime_env``
    ``env_vars`` or the driver's environment), None when unset."""
    return os.environ.get(QUEUE_ENV) or None

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


class LeaseGone(HamiRayError):
    """The lease a task was sent with is no longer held on its node, or is being taken back (a preemption
    notice): the task did not run. Its worker (a lane's) or the placement actor runs it again in a new slice."""

    def __init__(self, lease_id: str) -> None:
        super().__init__(f"lease {lease_id} is no longer held on its node (or is being taken back); the task did "
                         "not run")
        self.lease_id = lease_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (LeaseGone, (self.lease_id,))


def enter_slice(meta: dict[str, Any], env: dict[str, str] | None = None, *, lane: bool = False,
                interruptible: bool = False, confirm: bool = False) -> SliceInfo:
    """Apply the slice environment (a task's ``env``; an actor has its own in ``os.environ`` already),
    record the slice for ``current_slice()`` and tell the node actor this process holds it: waiting for
    the answer once per lease in a lane worker (``lane``) and for every task with ``confirm`` (a task sent
    to the pool of slice workers), so that work starts only in a slice its node still holds and is not
    taking back; else (an actor) without waiting.

    Raises:
        WorkerBound: see :func:`apply_env`; nothing was recorded or told.
        LeaseGone: (``lane``, ``confirm``) the lease is no longer held on the node, or is under a preemption
            notice; nothing was recorded.
    """
    global _current, _held, _devices
    lease_id = meta["lease_id"]
    if env is not None:
        apply_env(env)
    if _devices[0] != lease_id:
        _devices = (lease_id, tuple(DeviceGrant.model_validate(g) for part in meta["slices"] for g in part))
    seen = {k: v for k, v in (os.environ if env is None else env).items()
            if k in _SLICE_KEYS or k.startswith("CUDA_DEVICE_MEMORY_LIMIT")}
    actor = _actors.get(meta["node_actor"])
    if actor is None:  # one GCS lookup per worker process, not per task
        actor = _actors[meta["node_actor"]] = ray.get_actor(meta["node_actor"], namespace=NAMESPACE)
    info = SliceInfo(lease_id, meta["node"], _devices[1], seen, meta.get("state_dir", ""))
    if not (lane or confirm):
        actor.activate.remote(lease_id, os.getpid(), pid_namespace())  # fire and forget: no round trip
    elif confirm or _held != lease_id:
        # A worker may come to its slice long after it was reserved (a loaded host, a new process), when the
        # slice is under a preemption notice or even freed: told without waiting, the node actor refused it
        # silently and the task ran outside any slice, where no notice reached it (the reclaimed task of
        # tests/runtime/test_k8s_bridge.py whose retry never came). So it waits for the answer, asking as a
        # process about to start work (refused under a notice too); ready to be told before it asks, so
        # that a notice given once the node actor took it interrupts the task rather than being lost.
        _current = info
        if interruptible:
            _arm(info.state_dir)
        try:
            held = ray.get(actor.activate.remote(lease_id, os.getpid(), pid_namespace(), starting=True))
        except BaseException:  # the notice came meanwhile (SlicePreempted), or the node actor is gone
            _current = None
            actor.finish.remote(lease_id, os.getpid())  # if it took this process: never stopped with the slice
            raise
        if not held:
            _current = None
            raise LeaseGone(lease_id)
        if lane:
            _held = lease_id
    _current = info
    if interruptible:
        _arm(info.state_dir)  # once per process
    framework_caps.install(os.environ.get("HAMI_RAY_SLICE") if env is None else env.get("HAMI_RAY_SLICE"))
    return info


_pidns: list[int | None] = []


def this_process() -> dict[str, Any]:
    """This process as the placement actor binds a slice it asks for itself (``acquire(process=...)``):
    its Ray node, pid, PID namespace and start time."""
    return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "pidns": pid_namespace(),
            "start": start_ticks(os.getpid())}


def pid_namespace() -> int | None:
    """This process's PID namespace (inode of ``/proc/self/ns/pid``), read once: the node actor maps a
    worker in a namespace of its own to the pid NVML reports."""
    if not _pidns:
        try:
            _pidns.append(os.stat("/proc/self/ns/pid").st_ino)
        except OSError:
            _pidns.append(None)
    return _pidns[0]


def _check_cancelled(signum: int, frame: FrameType | None) -> None:
    """In the task's thread: stop it if ``ray.cancel`` flagged it."""
    if _current is not None and ray.get_runtime_context().is_canceled():
        raise KeyboardInterrupt("cancelled (ray.cancel)")


def _arm(state_dir: str) -> None:
    """Let the node actor interrupt this process's running task when its slice overruns (once per
    process; only from the main thread, where Ray runs tasks and Python runs signal handlers)."""
    global _armed
    if _armed is not None or not state_dir or threading.current_thread() is not threading.main_thread():
        return
    try:
        interrupt.arm(state_dir, _on_verdict)
    except (OSError, ValueError):
        return
    _armed = state_dir


def _on_verdict(signum: int, frame: FrameType | None) -> None:
    """The node actor's quota verdict arrived: fail the running task with it."""
    verdict = interrupt.take_verdict(_armed) if _armed else None
    info = _current
    if verdict is None or info is None or verdict.get("lease_id") != info.lease_id:
        return  # between tasks, or meant for an earlier one: nothing to stop
    if verdict.get("kind") == "preempted":
        raise SlicePreempted(str(verdict["lease_id"]), str(verdict.get("for_queue", "")),
                             str(verdict.get("reason", "reclaim")), float(verdict.get("grace_s", 0.0)))
    raise SliceQuotaExceeded(str(verdict["lease_id"]), str(verdict["uuid"]), int(verdict["used_mib"]),
                             int(verdict["limit_mib"]), int(verdict["pid"]), action="interrupted")


def report_simulated_memory(mib: int, device: int = 0) -> None:
    """Simulated backend only: say this process now uses ``mib`` MiB on the slice's ``device``-th device
    (what NVML would report on real hardware), so enforcement can be exercised without a GPU."""
    from node_actors.simulated_usage import report  # noqa: PLC0415 - only for simulated nodes

    global _reported
    info = current_slice()
    if info is None:
        raise RuntimeError("report_simulated_memory() is for code running in a hami-ray slice")
    report(info.state_dir, info.devices[device].uuid, mib)
    _reported = info.state_dir  # a task's memory is its own: given back when it ends (see leave_slice)


def leave_slice(meta: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> None:
    """Forget the slice; for a task, tell the node actor this process is done with the lease, and bind
    the process to ``env`` if the task loaded CUDA."""
    global _current, _bound, _reported
    _current = None
    if _reported:
        from node_actors.simulated_usage import clear  # noqa: PLC0415 - only for simulated nodes

        clear(_reported, pid=os.getpid())
        _reported = None
    if env is not None and _bound is None and _cuda_loaded():
        _bound = dict(env)
    if meta is not None:
        actor = _actors.get(meta["node_actor"])
        if actor is not None:
            actor.finish.remote(meta["lease_id"], os.getpid())


@ray.remote
def run_in_slice(fn: Callable[..., Any], meta: dict[str, Any], env: dict[str, str], *args: Any,
                 **kwargs: Any) -> Any:
    """The task the placement actor (or a gang) submits: enter the slice, run the user's function, leave.

    Raises:
        LeaseGone: the slice was gone, or being taken back, before this worker got to it: ``fn`` did not run.
    """
    enter_slice(meta, env, interruptible=True, confirm=True)
    try:
        return fn(*args, **kwargs)
    finally:
        leave_slice(meta, env)


class SliceWorkerShell:
    """A lane's worker (see :mod:`hami_ray.runtime.lanes`): runs the lane's tasks one at a time.

    ``run``: the driver holds the lane's lease and sends its slice with every task. ``run_pending``: the
    lane had to wait, so this worker acquires the lease itself (pinned to its node's devices), waiting in
    the placement actor's queue as one request for all the tasks queued here; it gives the slice back
    when the driver ends the lane (:meth:`binding`, once the lane had nothing to do for the lanes'
    ``IDLE_S``), and, while others wait, at the first task after ``term_s`` (then queues again behind
    them); a slice with no task for ``idle_s`` goes back anyway.

    ``ray.cancel`` of a running task interrupts it (``KeyboardInterrupt``), as for a Ray task. Ray only
    flags a running actor task as cancelled, and only the thread running it can read the flag: so once
    a task has run for ``CANCEL_AFTER_S``, a watchdog thread signals the process every
    ``CANCEL_POLL_S`` (``SIGUSR2``, system calls restarted) and the handler, in the task's thread, raises
    if the flag is set. Shorter tasks are never signalled."""

    def __init__(self, idle_s: float = OWN_IDLE_S, term_s: float = 2.0) -> None:
        self._running = False
        self._env: dict[str, str] | None = None
        self._idle_s, self._term_s = idle_s, term_s
        self._own: dict[str, Any] | None = None  # a lease this worker acquired itself (run_pending)
        self._preempted: set[str] = set()  # lane leases taken back while this worker ran their tasks
        self._own_key = ""
        self._own_since = self._own_last = self._asked = 0.0
        self._lane = 0.0  # the waiting lane whose tasks it runs now: its ``submitted`` (run_pending)
        self._place = 0.0  # where that lane queues: its ``submitted``, or when it renewed or lost its slice
        self._lock = threading.Lock()
        self._started = 0.0
        signal.signal(CANCEL_SIGNAL, _check_cancelled)
        signal.siginterrupt(CANCEL_SIGNAL, False)
        threading.Thread(target=self._watch, name="hami-ray-lane-worker", daemon=True).start()

    def run(self, fn_id: str, fn_holder: list[Any], meta: dict[str, Any], env: dict[str, str], retry: dict[str, Any],
            *args: Any, **kwargs: Any) -> Any:
        """``retry``: ``{"request", "owner"}``, what to ask for if the lane's slice is preempted."""
        if self._own is not None:
            self._give_back()
        if meta["lease_id"] in self._preempted:  # the driver's lane slice was taken back: ours from here on
            return self._rerun(fn_id, fn_holder, meta, retry, args, kwargs, PREEMPT_RETRIES)
        try:
            return self._run(fn_id, fn_holder, meta, env, args, kwargs)
        except (SlicePreempted, LeaseGone):  # LeaseGone: taken back before this worker got to run (issue 15)
            self._preempted.add(meta["lease_id"])
            return self._rerun(fn_id, fn_holder, meta, retry, args, kwargs, PREEMPT_RETRIES)

    def run_pending(self, fn_id: str, fn_holder: list[Any], request: dict[str, Any], owner: str, submitted: float,
                    *args: Any, **kwargs: Any) -> Any:
        """``submitted``: when the driver opened the lane (the lanes of a burst queue in that order, whichever
        worker starts first)."""
        try:
            grant = self._hold(request, owner, submitted)
        except BaseException:
            self._running = False
            raise
        try:
            return self._run(fn_id, fn_holder, grant["meta"], grant["env"], args, kwargs)
        except (SlicePreempted, LeaseGone):
            self._place = time.time()  # the lane lost its slice: it queues again behind those waiting now
            return self._rerun(fn_id, fn_holder, grant["meta"], {"request": request, "owner": owner}, args, kwargs,
                               PREEMPT_RETRIES, lane=submitted)

    def _rerun(self, fn_id: str, fn_holder: list[Any], lost: dict[str, Any], retry: dict[str, Any],
               args: tuple[Any, ...], kwargs: dict[str, Any], retries: int, lane: float | None = None) -> Any:
        """Run a task whose slice was preempted again, up to ``retries`` times (Ray's default ``max_retries``
        of a task), in a slice this worker acquires itself through the queue: pinned to the preempted slice's
        devices, so the process keeps the devices it may have initialised CUDA on. ``lane``: the waiting lane
        the task is of (its ``submitted``; the slice is then kept for its next tasks), None for a driver's lane."""
        with self._lock:
            if self._own is not None and self._own["lease"]["lease_id"] == lost["lease_id"]:
                self._own = None  # preempted: the node actor frees it, nothing to give back
        self._leave(lost)
        uuids = [g["uuid"] for part in lost["slices"] for g in part]
        request = {**retry["request"], "include_uuids": uuids}
        for attempt in range(1, retries + 1):
            log.info("slice %s preempted: task %s runs again (retry %d of %d)", lost["lease_id"], retry["owner"],
                     attempt, retries)
            try:
                grant = self._hold(request, retry["owner"], time.time() if lane is None else lane)
            except BaseException:
                self._running = False
                raise
            try:
                return self._run(fn_id, fn_holder, grant["meta"], grant["env"], args, kwargs)
            except (SlicePreempted, LeaseGone):
                if attempt == retries:
                    raise
                lost = grant["meta"]
                with self._lock:
                    self._own = None
                self._place = time.time()
                self._leave(lost)
        raise AssertionError("unreachable")

    @staticmethod
    def _leave(lost: dict[str, Any]) -> None:
        """This process no longer holds the preempted slice (it runs its next tasks elsewhere): its node
        actor must not stop it when the slice's grace ends, and frees the slice now if nothing else holds it."""
        try:
            ray.get(ray.get_actor(lost["node_actor"], namespace=NAMESPACE).finish.remote(lost["lease_id"], os.getpid()),
                    timeout=30)
        except Exception as exc:  # noqa: BLE001 - the node actor is gone or restarting: it reaps the slice itself
            log.info("could not leave preempted slice %s: %s", lost["lease_id"], exc)

    def _run(self, fn_id: str, fn_holder: list[Any], meta: dict[str, Any], env: dict[str, str],
             args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fn = _fns.get(fn_id)
        if fn is None:
            fn = _fns[fn_id] = ray.get(fn_holder[0])
        enter_slice(meta, env, lane=True, interruptible=True)
        self._env = env
        self._started = time.monotonic()
        self._running = True
        try:
            return fn(*args, **kwargs)
        finally:
            self._own_last = time.monotonic()
            self._running = False
            leave_slice(None, None)  # every task of a lane has the same slice: bound or not, checked when it ends

    def _hold(self, request: dict[str, Any], owner: str, submitted: float) -> dict[str, Any]:
        """This worker's own lease for ``request``: kept, renewed after its term while others wait, or
        acquired (waiting in the queue) at its lane's place: ``submitted``, when the driver opened the lane
        (it also tells the lanes apart), or, once renewed, when it asked again. Never when this process
        happens to ask: a worker back from the idle pool, or one that gave its slice back when idle, would
        queue behind lanes opened after its own, and a burst would not start in order (issue 15)."""
        from hami_ray.runtime.placement import PLACEMENT_NAME, slice_meta  # noqa: PLC0415 - it imports this module

        key = json.dumps(request, sort_keys=True)
        now = time.monotonic()
        placement = ray.get_actor(PLACEMENT_NAME, namespace=NAMESPACE)
        with self._lock:
            own = self._own
            self._running = True  # from here on the idle check leaves the lease alone
        if own is not None and (self._own_key != key or self._lane != submitted):  # held for another lane
            self._give_back()
            own = None
        if self._lane != submitted:
            self._lane = self._place = submitted
        if own is not None and self._over_term(placement, now):
            self._give_back()
            own = None
            self._place = time.time()  # renewing: behind those waiting now
        if own is None:
            grant: dict[str, Any] = dict(ray.get(placement.acquire.remote(request, owner, self._place,
                                                                          process=this_process(),
                                                                          ticket=new_lease_id())))
            grant["meta"] = slice_meta(grant, grant["state_root"])
            with self._lock:
                self._own, self._own_key = grant, key
                self._own_since = self._own_last = time.monotonic()
            own = grant
        return own

    def _over_term(self, placement: Any, now: float) -> bool:
        """Past its term, and (asked at most once a second) somebody waits for a slice."""
        if now - self._own_since < self._term_s or now - self._asked < 1.0:
            return False
        self._asked = now
        return bool(ray.get(placement.waiting.remote()))

    def _give_back(self, if_idle: bool = False) -> str | None:
        """Give this worker's own slice back (``if_idle``: only one left with no task for ``idle_s``); the
        lease id given back, if the placement actor was asked to free one."""
        from hami_ray.runtime.placement import PLACEMENT_NAME  # noqa: PLC0415

        with self._lock:
            if if_idle and (self._running or time.monotonic() - self._own_last <= self._idle_s):
                return None
            own, self._own = self._own, None
        if own is None:
            return None
        lease = own["lease"]
        try:
            ray.get_actor(PLACEMENT_NAME, namespace=NAMESPACE).release.remote(
                lease["lease_id"], lease["token"], lease["allocation"]["node"])
        except Exception as exc:  # noqa: BLE001 - its node actor frees it when told the lane ended (binding)
            log.warning("slice %s not given back to the placement actor: %s", lease["lease_id"], exc)
            return None
        return str(lease["lease_id"])

    def binding(self) -> dict[str, str] | None:
        """The slice environment CUDA was initialised under in this process (None: any slice may come);
        asked when a lane ends, before the worker serves another: the slice it acquired itself for the
        lane goes back now (Ray runs this after the lane's tasks: the driver asks after the last one), and
        its node actor hears that this process holds no slice now (:meth:`_disown`)."""
        global _bound
        given = self._give_back()
        self._disown(keep=[given] if given else [])
        if _bound is None and self._env is not None and _cuda_loaded():
            _bound = dict(self._env)
        return _bound

    @staticmethod
    def _disown(keep: list[str]) -> None:
        """Tell this node's actor that this process holds no slice but ``keep`` (the one it just gave back:
        the placement actor frees that one): one bound to it that it never heard of (the placement actor died
        between granting it and answering) or that it gave back to a placement actor that died before telling
        the node actor would otherwise be held for as long as the worker lives (the idle pool keeps it, and
        the node actor only reaps slices of dead processes)."""
        from node_actors.actor import node_actor_name  # noqa: PLC0415 - the actor shell, only when a lane ends

        try:
            node_actor = ray.get_actor(node_actor_name(ray.get_runtime_context().get_node_id()), namespace=NAMESPACE)
            ray.get(node_actor.disown.remote(os.getpid(), pid_namespace(), keep), timeout=DISOWN_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a restarting node actor: the next lane's end tells it
            log.info("could not tell the node actor that this worker holds no slice: %s", exc)

    def _watch(self) -> None:
        """Have a long task check Ray's cancel flag; give back an own lease left with no task for ``idle_s``."""
        while True:
            time.sleep(CANCEL_POLL_S)
            if self._running and _current is not None and time.monotonic() - self._started > CANCEL_AFTER_S:
                os.kill(os.getpid(), CANCEL_SIGNAL)
            if self._own is not None and not self._running:
                try:
                    self._give_back(if_idle=True)
                except Exception:  # noqa: BLE001 - a long-running loop never dies on one bad object
                    pass


SliceWorker = ray.remote(num_cpus=0, max_restarts=0)(SliceWorkerShell)


def slice_actor_class(cls: type) -> type:
    """A subclass of the user's actor class that enters its slice before the user's ``__init__``."""

    class SliceActor(cls):  # type: ignore[misc]
        def __init__(self, hami_slice_meta: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            retake = hami_slice_meta.get("retake")
            if retake and ray.get_runtime_context().was_current_actor_reconstructed:
                # Ray restarted it (max_restarts): its first slice went with its process (preempted, or
                # reaped), so it takes a new one on this node, through the queue, before the user's __init__
                from hami_ray.runtime.replicas import take_slice  # noqa: PLC0415 - replicas imports this module

                take_slice(retake["request"], retake["owner"])
            else:
                enter_slice(hami_slice_meta)
            super().__init__(*args, **kwargs)

    SliceActor.__name__ = cls.__name__
    SliceActor.__qualname__ = cls.__qualname__
    SliceActor.__module__ = cls.__module__
    return SliceActor
