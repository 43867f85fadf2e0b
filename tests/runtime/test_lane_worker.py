"""A lane worker (:class:`hami_ray.runtime.worker.SliceWorkerShell`) driven without Ray, against a stand-in
placement actor and node actor: where a waiting lane queues for its slice, and a task whose lane slice was
taken back before the worker got to it (issue 15: the lane-order flake and the lane test that failed with
``LeaseGone``)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hami_ray.core.ids import is_lease_id
from hami_ray.runtime import worker
from hami_ray.runtime.placement import PLACEMENT_NAME

NODE = "n1"
NODE_ACTOR = f"hami-ray-node-{NODE}"
REQUEST = {"count": 1, "memory_mib": 16384, "include_uuids": ["GPU-t4"]}


class _Call:
    """``actor.method.remote(...)`` answered at once: the stand-in ``ray.get`` returns what it got."""

    def __init__(self, fn: Any) -> None:
        self.remote = fn


@dataclass
class Placement:
    """The placement actor as a lane worker sees it: ``acquire`` (recorded: the place each ask queues at)
    grants a fresh lease at once; ``release`` and ``waiting``."""

    state_root: str
    waiting_now: int = 0
    asked: list[float] = field(default_factory=list)
    processes: list[dict[str, Any] | None] = field(default_factory=list)
    tickets: list[str | None] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    granted: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.acquire, self.release, self.waiting = _Call(self._acquire), _Call(self._release), _Call(lambda: self.waiting_now)

    def _acquire(self, request: dict[str, Any], owner: str, submitted: float,
                 process: dict[str, Any] | None = None, ticket: str | None = None) -> dict[str, Any]:
        self.asked.append(submitted)
        self.processes.append(process)
        self.tickets.append(ticket)
        lease_id = f"lease-{len(self.asked)}"
        self.granted.append(lease_id)
        return grant(lease_id, request["include_uuids"], self.state_root)

    def _release(self, lease_id: str, token: str, node: str) -> bool:
        self.released.append(lease_id)
        return True


@dataclass
class NodeActor:
    """Holds the leases it was told of; ``activate`` answers whether the lease is still held."""

    held: set[str] = field(default_factory=set)
    activated: list[str] = field(default_factory=list)
    starting: list[bool] = field(default_factory=list)
    disowned: list[tuple[int, int | None, list[str] | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.activate, self.finish = _Call(self._activate), _Call(lambda lease_id, pid: None)
        self.disown = _Call(lambda pid, pidns=None, keep=None: self.disowned.append((pid, pidns, keep)) or [])

    def _activate(self, lease_id: str, pid: int, pidns: int | None = None, starting: bool = False) -> bool:
        self.activated.append(lease_id)
        self.starting.append(starting)
        return lease_id in self.held


def grant(lease_id: str, uuids: list[str], state_root: str) -> dict[str, Any]:
    slices = [[{"uuid": u, "memory_mib": 16384, "cores": 100} for u in uuids]]
    return {"lease": {"lease_id": lease_id, "token": "t", "allocation": {"node": NODE, "slices": slices}},
            "env": {}, "node_actor": NODE_ACTOR, "state_root": state_root}


@dataclass
class Stage:
    placement: Placement
    node: NodeActor

    def shell(self) -> worker.SliceWorkerShell:
        # idle_s: never given back by its watchdog thread while a test looks (it gives back when told to)
        return worker.SliceWorkerShell(idle_s=3600.0, term_s=2.0)


@pytest.fixture
def stage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Stage]:
    placement, node = Placement(str(tmp_path)), NodeActor()

    def get_actor(name: str, namespace: str | None = None) -> Any:
        return {PLACEMENT_NAME: placement, NODE_ACTOR: node}[name]

    def get(value: Any, timeout: float | None = None) -> Any:
        return value() if callable(value) else value  # a function's ObjectRef is the function itself here

    context = SimpleNamespace(get_node_id=lambda: NODE)
    monkeypatch.setattr(worker, "ray", SimpleNamespace(get_actor=get_actor, get=get, get_runtime_context=lambda: context))
    for name, value in (("_actors", {}), ("_fns", {}), ("_held", None), ("_current", None), ("_devices", ("", ())),
                        ("_bound", None),
                        ("_armed", "not in this test process")):  # _armed: no quota-verdict handler installed here
        monkeypatch.setattr(worker, name, value)
    before = signal.getsignal(worker.CANCEL_SIGNAL)
    yield Stage(placement, node)
    signal.signal(worker.CANCEL_SIGNAL, before)


def _task() -> str:
    info = worker.current_slice()
    assert info is not None
    return info.lease_id


FN = [lambda: _task]  # fn_holder: what ray.get turns into the function


def test_a_waiting_lane_queues_at_its_own_place_whichever_worker_serves_it(stage: Stage) -> None:
    """The place a waiting lane's worker asks at is when the driver opened the lane: the same for a fresh
    worker and for one back from the idle pool (which asked for an earlier lane), and again after it gave
    the slice back when idle. Lanes opened one after another so queue in that order, whichever worker asks
    first. Before the fix, a worker that had held a slice once asked at the moment it got to ask."""
    shell = stage.shell()
    shell._hold(REQUEST, "task:f", 100.0)  # lane opened at 100.0
    shell._give_back()  # idle between two of the lane's tasks
    shell._hold(REQUEST, "task:f", 100.0)  # the lane's next task
    shell._give_back()
    shell._hold(REQUEST, "task:f", 105.0)  # back from the idle pool for a lane opened at 105.0
    assert stage.placement.asked == [100.0, 100.0, 105.0]
    # each ask names this process, so that a slice granted after it died is reaped with it
    assert {(p or {}).get("node") for p in stage.placement.processes} == {NODE}
    assert {(p or {}).get("pid") for p in stage.placement.processes} == {os.getpid()}
    # and a ticket of its own, so that Ray running it again on a restarted placement actor gets the same slice
    assert all(is_lease_id(t) for t in stage.placement.tickets) and len(set(stage.placement.tickets)) == 3
    shell._give_back()


def test_a_slice_held_for_one_lane_is_not_used_for_the_next(stage: Stage) -> None:
    """A worker still holding its last lane's slice when the driver hands it a new lane gives that slice
    back and queues at the new lane's place: never ahead of lanes that waited before it."""
    shell = stage.shell()
    first = shell._hold(REQUEST, "task:f", 100.0)
    assert shell._hold(REQUEST, "task:f", 100.0) is first  # the same lane keeps its slice
    second = shell._hold(REQUEST, "task:f", 107.0)
    assert second is not first and stage.placement.released == ["lease-1"]
    assert stage.placement.asked == [100.0, 107.0]
    shell._give_back()


def test_past_its_term_while_others_wait_a_lane_queues_behind_them(stage: Stage) -> None:
    """A lane past its term while others wait gives its slice back and asks again at that moment (behind
    those waiting); it keeps that place when it later gives the slice back idle and asks again."""
    shell = stage.shell()
    shell._hold(REQUEST, "task:f", 100.0)
    stage.placement.waiting_now = 3
    shell._own_since -= 10.0  # its term (2 s) is long over
    before = time.time()
    shell._hold(REQUEST, "task:f", 100.0)
    renewed = stage.placement.asked[-1]
    assert before <= renewed <= time.time() and stage.placement.released == ["lease-1"]
    shell._give_back()
    shell._hold(REQUEST, "task:f", 100.0)
    assert stage.placement.asked == [100.0, renewed, renewed]
    shell._give_back()


def test_a_gap_between_a_lanes_tasks_keeps_its_slice_until_the_driver_ends_the_lane(stage: Stage) -> None:
    """A waiting lane's worker (built as the driver builds it) that had no task for a while (the next one
    is queued, but late to arrive on a loaded machine) keeps its slice: only the driver knows more are
    queued. When the driver ends the lane (it asks the worker's binding) the slice goes back. Before the
    fix the watchdog gave it back after 50 ms idle and a later lane went first (a lane's first 2 tasks, 35
    of the next lane, then the first lane's other 33: 1 burst in 16 beside a busy loop)."""
    stage.node.held.add("lease-1")
    shell = worker.SliceWorkerShell()
    assert shell.run_pending("f", FN, REQUEST, "task:f", 100.0) == "lease-1"
    shell._own_last -= 1.0  # a second without a task
    shell._give_back(if_idle=True)  # what the watchdog does every CANCEL_POLL_S
    assert shell.run_pending("f", FN, REQUEST, "task:f", 100.0) == "lease-1"  # the lane's next task, same slice
    assert stage.placement.released == [] and stage.placement.asked == [100.0]
    assert shell.binding() is None  # the driver ends the lane
    assert stage.placement.released == ["lease-1"]
    # and its node actor hears that this process holds no slice now but the one the placement actor frees (any
    # other bound to it, that it never heard of, goes)
    assert stage.node.disowned == [(os.getpid(), worker.pid_namespace(), ["lease-1"])]


def test_a_lane_task_whose_slice_went_before_the_worker_started_runs_in_a_new_one(stage: Stage) -> None:
    """The driver's lane lease was preempted (or reaped) before its worker got to activate it: the task did
    not run, so it runs now in a slice the worker acquires through the queue, pinned to the same devices
    (as a task preempted while running is); the lane's later tasks too. Before the fix it failed with
    ``LeaseGone``, and so did every later task of the lane."""
    gone = grant("lease-gone", ["GPU-t4"], stage.placement.state_root)
    meta = {"lease_id": "lease-gone", "node_actor": NODE_ACTOR, "node": NODE,
            "slices": gone["lease"]["allocation"]["slices"], "state_dir": ""}
    stage.node.held.update({"lease-1", "lease-2"})  # what the queue grants; never lease-gone
    shell = stage.shell()
    retry = {"request": {"count": 1, "memory_mib": 16384}, "owner": "task:f"}
    assert shell.run("f", FN, meta, {}, retry) == "lease-1"
    assert stage.node.activated[0] == "lease-gone" and stage.placement.granted == ["lease-1"]
    assert shell.run("f", FN, meta, {}, retry) == "lease-2"  # the lane's next task: not sent to the gone slice
    assert "lease-gone" not in stage.node.activated[1:]
    shell._give_back()


def test_a_lane_task_whose_node_actor_answers_no_still_fails_when_no_slice_can_be_had(stage: Stage) -> None:
    """Every slice the queue grants is gone too: after ``PREEMPT_RETRIES`` tries the task fails with
    ``LeaseGone`` (it never ran), as a task preempted on every try fails with ``SlicePreempted``."""
    gone = grant("lease-gone", ["GPU-t4"], stage.placement.state_root)
    meta = {"lease_id": "lease-gone", "node_actor": NODE_ACTOR, "node": NODE,
            "slices": gone["lease"]["allocation"]["slices"], "state_dir": ""}
    shell = stage.shell()
    with pytest.raises(worker.LeaseGone):
        shell.run("f", FN, meta, {}, {"request": {"count": 1, "memory_mib": 16384}, "owner": "task:f"})
    assert len(stage.placement.granted) == worker.PREEMPT_RETRIES


def test_a_pool_workers_task_starts_only_in_a_slice_its_node_actor_confirms(stage: Stage) -> None:
    """A task sent to the pool of slice workers (``run_in_slice``: ``confirm``) waits for its node actor's
    answer, and asks as one about to start work (refused during a preemption notice too): a slice gone
    (preempted and freed before a slow worker got to it) raises ``LeaseGone`` with nothing recorded, so the
    placement actor runs the task again. Before the fix the worker told the node actor without waiting and
    ran the task outside any slice (tests/runtime/test_queues.py has the same on Ray)."""
    gone = grant("lease-gone", ["GPU-t4"], stage.placement.state_root)
    meta = {"lease_id": "lease-gone", "node_actor": NODE_ACTOR, "node": NODE,
            "slices": gone["lease"]["allocation"]["slices"], "state_dir": ""}
    with pytest.raises(worker.LeaseGone):
        worker.enter_slice(meta, {}, confirm=True)
    assert worker.current_slice() is None and stage.node.starting == [True]
    stage.node.held.add("lease-gone")  # still held: the task starts
    assert worker.enter_slice(meta, {}, confirm=True) is worker.current_slice() is not None
    worker.leave_slice(meta, None)
    worker.enter_slice(meta, {})  # an actor's slice: told without waiting (not as a task about to start)
    assert stage.node.starting == [True, True, False]
