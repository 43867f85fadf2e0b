"""NodeAgent: reservations, releases, restarts, reaping and enforcement, with real child processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hami_ray.core.errors import (
    InvalidRequest,
    LeaseNotFound,
    LeaseTokenMismatch,
    ReservationRefused,
    SliceQuotaExceeded,
)
from hami_ray.core.model import Allocation, DeviceGrant, LeaseState
from node_actors import simulated_usage
from node_actors.agent import NodeAgent
from node_actors.backends.simulated import SimulatedBackend
from node_actors.journal import Journal
from tests.helpers import wait_for
from tests.node_actors.conftest import NODE, PYTHON, FakeClock, make_lease, uuid

Spawn = Callable[..., subprocess.Popen[bytes]]


# --- reserve / release ----------------------------------------------------------------------------
def test_reserve_journals_and_conflicts_are_refused(agent: NodeAgent, clock: FakeClock) -> None:
    lease = agent.reserve(make_lease((0, 60000, 50), lease_id="a"))
    assert lease.created_at == clock.now and lease.state is LeaseState.RESERVED
    assert [l.lease_id for l in agent.leases()] == ["a"]
    assert agent.events(lease_id="a")[0].kind == "reserved"
    with pytest.raises(ReservationRefused, match="memory over capacity"):
        agent.reserve(make_lease((0, 30000, 10), lease_id="b"))  # 60000 + 30000 > 81920
    with pytest.raises(ReservationRefused, match="cores over capacity"):
        agent.reserve(make_lease((0, 1000, 60), lease_id="c"))
    assert agent.reserve(make_lease((0, 21920, 50), lease_id="d")).lease_id == "d"  # exactly fills it
    assert {l.lease_id for l in agent.leases()} == {"a", "d"}


def test_reserve_retry_is_idempotent_but_a_different_lease_with_the_same_id_is_refused(agent: NodeAgent) -> None:
    first = agent.reserve(make_lease((0, 1024, 0), lease_id="a"))
    assert agent.reserve(make_lease((0, 1024, 0), lease_id="a")) == first
    with pytest.raises(ReservationRefused, match="other contents"):
        agent.reserve(make_lease((1, 1024, 0), lease_id="a"))


def test_reserve_refuses_other_node_unknown_and_unhealthy_devices(agent: NodeAgent, backend: SimulatedBackend) -> None:
    with pytest.raises(ReservationRefused, match="for node other"):
        agent.reserve(make_lease((0, 1024, 0), node="other"))
    bogus = make_lease((0, 1, 0)).model_copy(update={"allocation": Allocation(
        node=NODE, slices=((DeviceGrant(uuid="GPU-nope", memory_mib=1, cores=0),),))})
    with pytest.raises(ReservationRefused, match="GPU-nope"):
        agent.reserve(bogus)
    backend.set_healthy(uuid(1), False)
    assert agent.refresh_health()[uuid(1)] is False
    assert not next(d for d in agent.node().devices if d.uuid == uuid(1)).healthy
    with pytest.raises(ReservationRefused, match="unhealthy"):
        agent.reserve(make_lease((1, 1024, 0)))


def test_release_token_idempotency_and_unknown(agent: NodeAgent) -> None:
    lease = agent.reserve(make_lease((0, 1024, 0), token="right"))
    with pytest.raises(LeaseTokenMismatch):
        agent.release(lease.lease_id, "wrong")
    freed = agent.release(lease.lease_id, "right")
    assert freed is not None and freed.state is LeaseState.RELEASED
    assert agent.release(lease.lease_id, "right") is None
    assert agent.leases() == []
    with pytest.raises(LeaseNotFound):
        agent.release("never-held", "x")


def test_activate_and_attach_pid(agent: NodeAgent) -> None:
    lease = agent.reserve(make_lease((0, 1024, 0)))
    assert agent.activate(lease.lease_id, 111).state is LeaseState.ACTIVE
    assert agent.attach_pid(lease.lease_id, 222).pids == (111, 222)
    assert agent.attach_pid(lease.lease_id, 222).pids == (111, 222)
    with pytest.raises(InvalidRequest):
        agent.activate(lease.lease_id, 0)
    with pytest.raises(LeaseNotFound):
        agent.activate("nope", 1)


# --- restart --------------------------------------------------------------------------------------
def test_restart_restores_leases_slots_and_release_stays_idempotent(
        make_agent: Callable[[], NodeAgent]) -> None:
    first = make_agent()
    kept = first.reserve(make_lease((0, 8192, 30), (1, 8192, 30), lease_id="kept"))
    first.reserve(make_lease((0, 8192, 30), (1, 8192, 30), lease_id="kept-2"))
    first.activate("kept", os.getpid())
    gone = first.reserve(make_lease((2, 1024, 0), lease_id="gone"))
    first.release(gone.lease_id, gone.token)
    env = first.isolation_env("kept-2")
    first.close()

    second = make_agent()
    leases = {l.lease_id: l for l in second.leases()}
    assert set(leases) == {"kept", "kept-2"}
    assert leases["kept"].pids == (os.getpid(),) and leases["kept"].allocation == kept.allocation
    assert second.isolation_env("kept-2") == env  # same slot after the restart
    assert second.release("gone", gone.token) is None  # ended before the restart
    with pytest.raises(ReservationRefused):
        second.reserve(make_lease((0, 80000, 0)))  # restored leases hold the capacity
    assert second.reap() == []  # this test process is alive


def test_restart_drops_leases_that_no_longer_fit(tmp_path: Path, clock: FakeClock) -> None:
    big = NodeAgent(NODE, SimulatedBackend("2xA100-80GB", NODE, tmp_path), tmp_path, clock=clock)
    big.reserve(make_lease((1, 1024, 0), lease_id="on-dev-1"))
    big.close()
    small = NodeAgent(NODE, SimulatedBackend("1xA100-80GB", NODE, tmp_path), tmp_path, clock=clock)
    assert small.leases() == []
    assert [l.lease_id for l in small.lost] == ["on-dev-1"]
    assert small.events(kind="lost")[0].lease_id == "on-dev-1"
    small.close()
    assert Journal(tmp_path).leases() == []


# --- reaping --------------------------------------------------------------------------------------
def test_reap_frees_lease_of_killed_child(agent: NodeAgent, spawn: Spawn) -> None:
    child = spawn("sleep", "30")
    lease = agent.reserve(make_lease((0, 1024, 0)))
    agent.activate(lease.lease_id, child.pid)
    assert agent.reap() == []
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    freed = agent.reap()
    assert [l.lease_id for l in freed] == [lease.lease_id]
    assert agent.leases() == []
    assert agent.events(lease_id=lease.lease_id)[-1].kind == "reaped"
    assert agent.release(lease.lease_id, lease.token) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="zombie detection reads /proc")
def test_reap_treats_an_unwaited_zombie_as_dead(agent: NodeAgent, spawn: Spawn) -> None:
    child = spawn("sleep", "30")
    lease = agent.reserve(make_lease((0, 1024, 0)))
    agent.activate(lease.lease_id, child.pid)
    os.kill(child.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not agent.reap():
        time.sleep(0.02)  # the kernel turns it into a zombie asynchronously; we never wait() for it
    assert agent.leases() == []


def test_reap_drops_dead_pids_but_keeps_lease_with_a_live_one(agent: NodeAgent, spawn: Spawn) -> None:
    dead, live = spawn("sleep", "30"), spawn("sleep", "30")
    lease = agent.reserve(make_lease((0, 1024, 0)))
    agent.activate(lease.lease_id, dead.pid)
    agent.attach_pid(lease.lease_id, live.pid)
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait(timeout=10)
    assert agent.reap() == []
    assert agent.leases()[0].pids == (live.pid,)


def test_a_holder_bound_with_its_start_time_is_reaped_when_gone_or_when_its_pid_names_another_process(
        agent: NodeAgent, spawn: Spawn) -> None:
    """The placement actor binds a requester that may have died while it waited (``start`` as the process
    read it): a dead one is reaped at the next reap, and a live pid that started at another time (the
    requester's pid reused) is not taken for it."""
    from node_actors.processes import start_ticks  # noqa: PLC0415

    gone, other = spawn("sleep", "30"), spawn("sleep", "30")
    started = start_ticks(gone.pid)
    assert started is not None
    os.kill(gone.pid, signal.SIGKILL)
    gone.wait(timeout=10)
    first = agent.reserve(make_lease((0, 1024, 0)))
    agent.activate(first.lease_id, gone.pid, start=started)
    real = start_ticks(other.pid)
    assert real is not None
    second = agent.reserve(make_lease((1, 1024, 0)))
    agent.activate(second.lease_id, other.pid, start=real - 1)  # as if the requester had this pid before
    assert sorted(l.lease_id for l in agent.reap()) == sorted([first.lease_id, second.lease_id])
    assert agent.leases() == []


def test_unclaimed_reservation_expires_after_grace(agent: NodeAgent, clock: FakeClock) -> None:
    lease = agent.reserve(make_lease((0, 1024, 0)))
    clock.advance(59)
    assert agent.reap() == []
    clock.advance(2)  # reserve_grace_s = 60
    assert [l.lease_id for l in agent.reap()] == [lease.lease_id]
    assert agent.events(lease_id=lease.lease_id)[-1].kind == "expired"


def test_restored_lease_of_dead_process_is_freed_at_first_tick(make_agent: Callable[[], NodeAgent],
                                                               spawn: Spawn) -> None:
    child = spawn("sleep", "30")
    first = make_agent()
    lease = first.reserve(make_lease((0, 1024, 0)))
    first.activate(lease.lease_id, child.pid)
    first.close()
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    second = make_agent()
    assert [l.lease_id for l in second.leases()] == [lease.lease_id]
    assert second.tick() == []
    assert second.leases() == []


# --- enforcement ----------------------------------------------------------------------------------
def _reporting_child(spawn: Spawn, state_dir: Path, device: str, mib: int) -> subprocess.Popen[bytes]:
    code = (f"from node_actors import simulated_usage as s; s.report({str(state_dir)!r}, {device!r}, {mib}); "
            "import time; time.sleep(60)")
    return _reported(spawn(PYTHON, "-c", code), state_dir)


def _reported(child: subprocess.Popen[bytes], state_dir: Path) -> subprocess.Popen[bytes]:
    """``child`` once its usage report is there."""
    deadline = time.monotonic() + 30
    while not (state_dir / "sim-usage" / f"{child.pid}.json").exists():
        assert child.poll() is None, child.stderr.read().decode() if child.stderr else "child died"
        assert time.monotonic() < deadline, "child never reported its usage"
        time.sleep(0.02)
    return child


def test_enforce_kills_a_child_over_its_slice_after_grace(agent: NodeAgent, clock: FakeClock, tmp_path: Path,
                                                          spawn: Spawn) -> None:
    child = _reporting_child(spawn, tmp_path, uuid(0), 9000)
    lease = agent.reserve(make_lease((0, 8192, 30)))
    agent.activate(lease.lease_id, child.pid)
    sample = agent.sample()
    assert sample.slice(lease.lease_id, uuid(0)).used_mib == 9000  # type: ignore[union-attr]
    assert agent.enforce() == []  # over, but the grace period starts now
    clock.advance(10)
    assert agent.enforce() == []  # not longer than grace yet
    assert child.poll() is None
    clock.advance(1)
    [error] = agent.enforce()
    assert isinstance(error, SliceQuotaExceeded)
    assert (error.lease_id, error.uuid, error.used_mib, error.limit_mib, error.pid) == (
        lease.lease_id, uuid(0), 9000, 8192, child.pid)
    assert lease.lease_id in str(error)
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert agent.leases() == []
    event = agent.events(lease_id=lease.lease_id)[-1]
    assert event.kind == "quota-exceeded" and event.detail["used_mib"] == 9000
    assert agent.release(lease.lease_id, lease.token) is None  # the runtime's later release is a no-op


def _armed_child(spawn: Spawn, state_dir: Path, device: str, mib: int, *, lets_go: bool) -> subprocess.Popen[bytes]:
    """A child that arms itself for verdicts and reports ``mib``; on a verdict it writes it to
    ``verdict-seen`` and, if ``lets_go``, gives its memory back (as a task that fails would), else keeps it."""
    code = f"""
import json, time
from node_actors import interrupt, simulated_usage as s
state = {str(state_dir)!r}
def on_verdict(signum, frame):
    open(state + "/verdict-seen", "w").write(json.dumps(interrupt.take_verdict(state)))
    if {lets_go!r}:
        s.clear(state)
interrupt.arm(state, on_verdict)
s.report(state, {device!r}, {mib})
while True:
    time.sleep(0.05)
"""
    return _reported(spawn(PYTHON, "-c", code), state_dir)


def test_an_armed_process_gets_the_verdict_first_and_lives_on(agent: NodeAgent, clock: FakeClock, tmp_path: Path,
                                                                spawn: Spawn) -> None:
    child = _armed_child(spawn, tmp_path, uuid(0), 9000, lets_go=True)
    lease = agent.reserve(make_lease((0, 8192, 30)))
    agent.activate(lease.lease_id, child.pid)
    assert agent.enforce() == []
    clock.advance(11)
    [error] = agent.enforce()
    assert error.action == "interrupted" and "its task was interrupted" in str(error)
    assert (error.lease_id, error.used_mib, error.limit_mib, error.pid) == (lease.lease_id, 9000, 8192, child.pid)
    assert _read_when_written(tmp_path / "verdict-seen", "the child never got the verdict")["limit_mib"] == 8192
    # the child gives its memory back after writing what it saw: wait for that, not for a while
    assert wait_for(lambda: child.pid not in simulated_usage.read(tmp_path), timeout=10), "the child kept its memory"
    assert child.poll() is None  # alive, and its lease too
    assert [x.lease_id for x in agent.leases()] == [lease.lease_id]
    assert agent.events(lease_id=lease.lease_id)[-1].kind == "interrupted"
    clock.advance(30)
    assert agent.enforce() == []  # it gave its memory back: nothing more happens


def test_an_armed_process_that_keeps_overrunning_is_killed(agent: NodeAgent, clock: FakeClock, tmp_path: Path,
                                                           spawn: Spawn) -> None:
    child = _armed_child(spawn, tmp_path, uuid(0), 9000, lets_go=False)
    lease = agent.reserve(make_lease((0, 8192, 30)))
    agent.activate(lease.lease_id, child.pid)
    agent.enforce()
    clock.advance(11)
    [first] = agent.enforce()
    assert first.action == "interrupted"
    clock.advance(5)
    assert agent.enforce() == []  # still over: a new grace period starts after the verdict
    clock.advance(9)
    assert agent.enforce() == []
    clock.advance(2)
    [second] = agent.enforce()
    assert second.action == "killed"
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert agent.leases() == []


def test_a_stale_marker_of_a_recycled_pid_is_not_trusted(tmp_path: Path) -> None:
    from node_actors import interrupt

    (tmp_path / interrupt.INTERRUPT_DIR).mkdir()
    (tmp_path / interrupt.INTERRUPT_DIR / str(os.getpid())).write_text("12345")  # another process's start time
    assert not interrupt.interruptible(tmp_path, os.getpid())
    assert not interrupt.interruptible(tmp_path, 999_999_999)


def test_below_limit_plus_tolerance_nothing_happens(agent: NodeAgent, clock: FakeClock, tmp_path: Path,
                                                    spawn: Spawn) -> None:
    child = _reporting_child(spawn, tmp_path, uuid(0), 8192 + 64)  # at limit + tolerance: still fine
    lease = agent.reserve(make_lease((0, 8192, 30)))
    agent.activate(lease.lease_id, child.pid)
    for _ in range(3):
        assert agent.enforce() == []
        clock.advance(100)
    assert child.poll() is None
    assert [l.lease_id for l in agent.leases()] == [lease.lease_id]


def test_dipping_under_the_limit_restarts_the_grace_period(agent: NodeAgent, clock: FakeClock, tmp_path: Path,
                                                           spawn: Spawn) -> None:
    child = spawn("sleep", "30")
    lease = agent.reserve(make_lease((0, 8192, 30)))
    agent.activate(lease.lease_id, child.pid)
    simulated_usage.report(tmp_path, uuid(0), 9000, pid=child.pid)
    assert agent.enforce() == []
    clock.advance(8)
    simulated_usage.report(tmp_path, uuid(0), 100, pid=child.pid)
    assert agent.enforce() == []
    simulated_usage.report(tmp_path, uuid(0), 9000, pid=child.pid)
    clock.advance(8)
    assert agent.enforce() == []  # 16 s since it first went over, but only 0 s in this stretch
    clock.advance(11)
    assert len(agent.enforce()) == 1
    assert child.wait(timeout=10) == -signal.SIGKILL


def test_slice_usage_sums_the_lease_processes(agent: NodeAgent, tmp_path: Path, spawn: Spawn) -> None:
    a, b, stranger = spawn("sleep", "30"), spawn("sleep", "30"), spawn("sleep", "30")
    lease = agent.reserve(make_lease((0, 8192, 30)))
    agent.activate(lease.lease_id, a.pid)
    agent.attach_pid(lease.lease_id, b.pid)
    simulated_usage.report(tmp_path, uuid(0), 3000, pid=a.pid)
    simulated_usage.report(tmp_path, uuid(0), 5000, pid=b.pid)
    simulated_usage.report(tmp_path, uuid(0), 7000, pid=stranger.pid)
    usage = agent.sample().slice(lease.lease_id, uuid(0))
    assert usage is not None
    assert (usage.used_mib, usage.limit_mib, usage.top_pid) == (8000, 8192, b.pid)


def test_finish_ends_the_lease_when_its_last_holder_is_done(agent: NodeAgent) -> None:
    """A task returned in a reused worker: the process lives on, the lease must not."""
    lease = agent.reserve(make_lease((0, 1024, 10)))
    agent.activate(lease.lease_id, os.getpid())
    agent.attach_pid(lease.lease_id, 1)  # pid 1 is alive: a second holder
    assert agent.finish(lease.lease_id, os.getpid()) is None  # one holder left: still live
    assert [x.lease_id for x in agent.leases()] == [lease.lease_id]
    ended = agent.finish(lease.lease_id, 1)
    assert ended is not None and agent.leases() == []
    assert agent.release(lease.lease_id, lease.token) is None  # the owner's release is then a no-op
    assert agent.finish(lease.lease_id, 1) is None


def test_a_process_that_disowns_its_slices_leaves_all_but_those_it_keeps(agent: NodeAgent) -> None:
    """A lane worker says, when its lane ends, that it holds no slice: one bound to it at a grant whose answer
    it never got ends; one another process shares keeps that process; a kept one, another process's, a
    driver's and a pod's stay as they are."""
    me = os.getpid()
    alone = agent.reserve(make_lease((0, 1024, 10), lease_id="alone"))
    agent.activate(alone.lease_id, me)
    shared = agent.reserve(make_lease((0, 1024, 10), lease_id="shared"))
    agent.activate(shared.lease_id, me)
    agent.attach_pid(shared.lease_id, 1)
    kept = agent.reserve(make_lease((0, 1024, 10), lease_id="kept"))
    agent.activate(kept.lease_id, me)
    other = agent.reserve(make_lease((1, 1024, 10), lease_id="other"))
    agent.activate(other.lease_id, 1)
    driver = agent.reserve(make_lease((1, 1024, 10), lease_id="driver").model_copy(
        update={"holder": "driver", "job": "01000000"}))
    agent.claim(driver.lease_id, me)
    pod = agent.reserve(make_lease((1, 1024, 10), lease_id="pod").model_copy(update={"holder": "pod"}))

    assert sorted(agent.disown(me, keep=["kept"])) == ["alone", "shared"]
    held = {x.lease_id: x.pids for x in agent.leases()}
    assert held == {"shared": (1,), "kept": (me,), "other": (1,), "driver": (me,), pod.lease_id: ()}
    assert agent.events(lease_id="alone")[-1].kind == "finished"
    assert agent.release(alone.lease_id, alone.token) is None  # the placement actor's release is then a no-op
    assert agent.disown(me, keep=["kept"]) == []


# --- preemption -----------------------------------------------------------------------------------
def _read_when_written(path: Path, what: str) -> dict[str, object]:
    """The JSON the child writes to ``path``, once it is all there."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            assert time.monotonic() < deadline, what
            time.sleep(0.02)


def test_preemption_interrupts_the_task_at_once_and_frees_the_slice_after_the_grace(
        agent: NodeAgent, clock: FakeClock, tmp_path: Path, spawn: Spawn) -> None:
    child = _armed_child(spawn, tmp_path, uuid(0), 1000, lets_go=False)
    lease = agent.reserve(make_lease((0, 8192, 30)))
    agent.activate(lease.lease_id, child.pid)
    notice = agent.preempt(lease.lease_id, "org/team-a", "reclaim", grace_s=10)
    assert notice == {"deadline": clock.now + 10, "interrupted": [child.pid]}
    told = _read_when_written(tmp_path / "verdict-seen", "the child never got the notice")
    assert (told["kind"], told["for_queue"], told["reason"], told["grace_s"]) == (
        "preempted", "org/team-a", "reclaim", 10)
    assert agent.preempt(lease.lease_id, "org/team-b", grace_s=1) == {"deadline": clock.now + 10, "interrupted": []}
    assert agent.preempting() == {lease.lease_id: clock.now + 10}
    clock.advance(9)
    agent.tick()
    assert child.poll() is None  # held until the grace ends
    assert [x.lease_id for x in agent.leases()] == [lease.lease_id]
    clock.advance(1)
    agent.tick()
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert agent.leases() == [] and agent.preempting() == {}
    kinds = [e.kind for e in agent.events(lease_id=lease.lease_id)]
    assert kinds[-2:] == ["preempting", "preempted"]
    assert agent.events(lease_id=lease.lease_id)[-1].detail["for_queue"] == "org/team-a"
    assert agent.release(lease.lease_id, lease.token) is None  # the runtime's later release is a no-op


def test_a_process_that_starts_on_a_slice_under_notice_gets_the_notice_at_the_next_tick(
        agent: NodeAgent, clock: FakeClock, tmp_path: Path, spawn: Spawn) -> None:
    """The notice came before the task's process registered (its activation is fire-and-forget): the next
    tick tells it, so it stops its work instead of being killed at the deadline."""
    lease = agent.reserve(make_lease((0, 8192, 30)))
    assert agent.preempt(lease.lease_id, "org/team-a", "reclaim", grace_s=10)["interrupted"] == []
    child = _armed_child(spawn, tmp_path, uuid(0), 1000, lets_go=False)
    agent.activate(lease.lease_id, child.pid)
    agent.tick()
    told = _read_when_written(tmp_path / "verdict-seen", "the late process never got the notice")
    assert (told["kind"], told["for_queue"]) == ("preempted", "org/team-a")
    agent.tick()  # told once only
    assert [x.lease_id for x in agent.leases()] == [lease.lease_id]


def test_a_preempted_slice_whose_holder_finishes_in_the_grace_is_freed_then(agent: NodeAgent, clock: FakeClock) -> None:
    lease = agent.reserve(make_lease((0, 8192, 30)))
    agent.activate(lease.lease_id, os.getpid())
    assert agent.preempt(lease.lease_id, "q", grace_s=5)["interrupted"] == []  # this process never armed itself
    agent.finish(lease.lease_id, os.getpid())
    assert agent.leases() == [] and agent.preempting() == {}
    clock.advance(10)
    agent.tick()  # nothing left to stop (and this test process is not killed)
    assert agent.events(lease_id=lease.lease_id)[-1].kind == "finished"


def test_a_driver_lease_is_freed_at_the_deadline_and_a_notice_outlives_a_restart(
        make_agent: Callable[[], NodeAgent], clock: FakeClock) -> None:
    first = make_agent()
    lease = first.reserve(make_lease((0, 8192, 30)).model_copy(update={"holder": "driver", "job": "01000000"}))
    first.claim(lease.lease_id)
    first.preempt(lease.lease_id, "team-b", "priority", grace_s=20)
    first.close()
    clock.advance(5)
    second = make_agent()  # restarted: the notice is journaled, the slice still goes when it was due
    assert second.preempting() == {lease.lease_id: clock.now + 15}
    clock.advance(15)
    second.tick()
    assert second.leases() == []
    assert second.events(lease_id=lease.lease_id)[-1].kind == "preempted"


def test_preempting_a_lease_that_is_gone_says_so(agent: NodeAgent) -> None:
    with pytest.raises(LeaseNotFound):
        agent.preempt("never-held", "q")
