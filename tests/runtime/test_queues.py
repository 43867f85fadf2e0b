"""Team queues on the Ray runtime (issue 14): definitions applied and kept, admission by limit, and
preemption: a reclaimed task is interrupted with ``SlicePreempted``, runs again in a new slice and
completes; a driver's lease is told through the lease; a task whose worker comes after its slice was
reclaimed (or during the notice) does not start there, and runs in a new slice.

The shared test cluster has two A100-80GB on its head node; these tests use only them (``gpu_type``).
Every test leaves the definitions as it found them (no queues)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import hami_ray
from hami_ray.core.errors import Unschedulable
from hami_ray.core.queues import QueueConfigError
from hami_ray.core.request import slice_request
from hami_ray.runtime import api
from hami_ray.runtime.placement import PLACEMENT_NAME, slice_meta
from hami_ray.runtime.worker import NAMESPACE, LeaseGone, run_in_slice
from tests.runtime.conftest import RayCluster, live_leases, wait_until

TEAMS = """
queues:
  - name: org
  - name: org/team-a
    guaranteed: {memory: 80GiB, cores: 100, devices: 1}
  - name: org/team-b
    limit: {memory: 160GiB}
"""


@pytest.fixture
def teams(hami: RayCluster) -> Iterator[None]:
    assert wait_until(lambda: live_leases() == 0)
    api.apply_queues(TEAMS)
    try:
        yield
    finally:
        assert wait_until(lambda: live_leases() == 0, timeout=120)
        api.apply_queues("queues: []")


def _row(name: str) -> dict[str, object]:
    return next(r for r in api.queues() if r["queue"] == name)


def test_definitions_are_applied_kept_and_a_bad_one_changes_nothing(teams: None) -> None:
    assert {"org", "org/team-a", "org/team-b", "default"} <= {r["queue"] for r in api.queues()}
    with pytest.raises(QueueConfigError, match="org/team-a.*guaranteed.memory"):
        api.apply_queues(TEAMS.replace("devices: 1}", "devices: 1}\n    limit: {memory: 40GiB}"))
    assert _row("org/team-a")["guaranteed"] == {"memory_mib": 81920, "cores": 100, "devices": 1}
    placement = ray.get_actor("hami-ray-placement", namespace="hami-ray")
    ray.kill(placement, no_restart=False)  # a restarted placement actor serves the same queues
    assert wait_until(lambda: _safe_rows() is not None and "org/team-a" in _safe_rows(), timeout=60)  # type: ignore[operator]


def _safe_rows() -> list[str] | None:
    try:
        return [str(r["queue"]) for r in api.queues()]
    except ray.exceptions.RayError:
        return None


def test_a_request_names_a_known_queue_that_takes_work_and_fits_its_limit(teams: None) -> None:
    @hami_ray.remote(gpus=1, gpu_type="A100", queue="org/nobody")
    def lost() -> None: ...

    with pytest.raises(ray.exceptions.RayError, match="unknown queue 'org/nobody'"):
        ray.get(lost.options(max_retries=0).remote(), timeout=60)
    with pytest.raises(ray.exceptions.RayError, match="has child queues"):
        ray.get(lost.options(queue="org", max_retries=0).remote(), timeout=60)
    with pytest.raises(Unschedulable, match=r"queue org/team-b.*alone needs memory 240 GiB.*limit.memory 160 GiB"):
        api.check(gpus=3, gpu_memory="80GiB", queue="org/team-b")


def test_a_reclaimed_task_runs_again_and_completes(teams: None, tmp_path: Path) -> None:
    """team-b borrows both A100s (it guarantees nothing); team-a, under its guarantee, asks for one: one
    of team-b's tasks is interrupted with SlicePreempted, team-a's task runs once the victim is gone,
    and the victim runs again in a new slice (its max_retries) and completes."""

    @hami_ray.remote(gpus=1, gpu_type="A100", queue="org/team-b")
    def borrower(name: str) -> str:
        marker = tmp_path / name
        if marker.exists():
            return f"{name}: done on retry"
        marker.write_text("started")
        while not (tmp_path / "stop").exists():  # runs until preempted (or told to stop)
            time.sleep(0.05)
        return f"{name}: done first time"

    @hami_ray.remote(gpus=1, gpu_type="A100", queue="org/team-a")
    def owed() -> str:
        return hami_ray.current_slice().devices[0].uuid

    first = [borrower.options(max_retries=2).remote(n) for n in ("b1", "b2")]
    assert wait_until(lambda: (tmp_path / "b1").exists() and (tmp_path / "b2").exists(), timeout=120)
    assert _row("org/team-b")["used"]["devices"] == 2  # type: ignore[index]
    started = time.time()
    uuid = ray.get(owed.options(max_retries=0).remote(), timeout=120)
    assert uuid.startswith("GPU-") or uuid
    (tmp_path / "stop").write_text("")
    results = sorted(ray.get(first, timeout=180))
    assert "done on retry" in " ".join(results), results  # one of them was preempted and ran again
    assert sum("done on retry" in r for r in results) == 1
    assert _row("org/team-b")["preempted"] >= 1 and time.time() - started < 120


def test_a_drivers_lease_is_told_of_its_preemption(teams: None) -> None:
    """A driver of team-b holds both A100s; team-a's request reclaims one: the lease's holder sees the
    notice (queue, reason, deadline) and the slice goes after the grace."""
    seen: list[dict[str, object] | None] = []
    done = threading.Event()

    def hold() -> None:
        with api.lease(gpus=1, gpu_type="A100", queue="org/team-b") as one, \
                api.lease(gpus=1, gpu_type="A100", queue="org/team-b") as two:
            while not done.is_set():
                notices = [one.preemption(), two.preemption()]
                if any(notices):
                    seen.extend(n for n in notices if n)
                    break
                time.sleep(0.1)
            done.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert wait_until(lambda: _row("org/team-b")["used"]["devices"] == 2, timeout=60)  # type: ignore[index]

        @hami_ray.remote(gpus=1, gpu_type="A100", queue="org/team-a")
        def owed() -> int:
            return 1

        assert ray.get(owed.options(max_retries=0).remote(), timeout=120) == 1
        assert seen and seen[0]["for_queue"] == "org/team-a" and seen[0]["reason"] == "reclaim"
    finally:
        done.set()
        holder.join(timeout=60)


def test_a_preempted_actor_is_restarted_by_ray_in_a_new_slice(teams: None) -> None:
    """Two team-b actors hold both A100s (max_restarts=1); team-a reclaims one: that actor's process is
    stopped after the grace, Ray restarts it, and the restarted actor takes a new slice on its node
    (waiting in the queue until team-a's work is done) before its __init__ runs again."""

    @hami_ray.remote(gpus=1, gpu_type="A100", queue="org/team-b")
    class Model:
        def __init__(self) -> None:
            self.started = time.time()

        def where(self) -> tuple[str, float]:
            return hami_ray.current_slice().devices[0].uuid, self.started

    actors = [Model.options(max_restarts=1, max_task_retries=3).remote() for _ in range(2)]
    try:
        first = ray.get([a.where.remote() for a in actors], timeout=120)

        @hami_ray.remote(gpus=1, gpu_type="A100", queue="org/team-a")
        def owed() -> str:
            return hami_ray.current_slice().devices[0].uuid

        taken = ray.get(owed.options(max_retries=0).remote(), timeout=120)
        assert taken in {uuid for uuid, _ in first}
        after = ray.get([a.where.remote() for a in actors], timeout=180)  # the restarted one answers once it has a slice
        restarted = [i for i in range(2) if after[i][1] != first[i][1]]
        assert len(restarted) == 1, (first, after)
        assert _row("org/team-b")["used"]["devices"] == 2  # type: ignore[index]
    finally:
        for actor in actors:
            ray.kill(actor)


def _a100_node() -> str:
    return next(n.name for n in api.status().nodes if any(d.model.startswith("A100") for d in n.devices))


def test_a_task_whose_slice_is_taken_back_before_its_worker_starts_runs_only_in_a_new_slice(
        teams: None, tmp_path: Path) -> None:
    """A task's worker may start long after its slice was reserved (a loaded host; here Ray holds it back
    until all of its node's memory resource is free). team-b holds one A100 (not preemptible) and its task
    the other; team-a reclaims the task's before the worker starts: the worker must not run the task in the
    slice it lost (team-a's by then), and the task runs in a new slice once team-a is done. Before the fix
    the worker told its node actor without waiting for the answer and ran the task anyway, outside any
    slice, where no notice reached it: a task that runs until preempted never ended
    (test_k8s_bridge.py's test_one_queue_policy_for_ray_tasks_and_pods, under load)."""
    node = _a100_node()
    memory = int(next(n["Resources"]["memory"] for n in ray.nodes() if n["NodeID"] == node))
    gate, runs = tmp_path / "gate", tmp_path / "runs"
    runs.mkdir()

    @ray.remote(num_cpus=0)
    def hold(started: str, until: str) -> None:
        import os  # noqa: PLC0415

        open(started, "w").close()
        while not os.path.exists(until):
            time.sleep(0.05)

    holding = hold.options(memory=int(memory * 0.9), scheduling_strategy=NodeAffinitySchedulingStrategy(
        node, soft=False)).remote(str(tmp_path / "holding"), str(gate))
    assert wait_until(lambda: (tmp_path / "holding").exists(), timeout=60)

    @hami_ray.remote(gpus=1, gpu_type="A100", queue="org/team-b")
    def borrower(runs: str) -> str:
        import os  # noqa: PLC0415

        lease_id = hami_ray.current_slice().lease_id
        open(os.path.join(runs, lease_id), "w").close()  # where the task's body ran
        return lease_id

    granted, done = threading.Event(), threading.Event()

    def owed() -> None:
        with api.lease(gpus=1, gpu_type="A100", queue="org/team-a"):
            granted.set()
            done.wait(120)

    try:
        with api.lease(gpus=1, gpu_type="A100", queue="org/team-b", preemptible=False):
            task = borrower.options(max_retries=2, memory=int(memory * 0.2)).remote(str(runs))
            assert wait_until(lambda: _row("org/team-b")["used"]["devices"] == 2, timeout=60)  # type: ignore[index]
            lost = next(x.lease_id for x in api.status().leases if x.owner == "task:borrower")
            holder = threading.Thread(target=owed)
            holder.start()
            try:
                assert granted.wait(60)  # the task's slice was reclaimed and freed: team-a holds that A100
                assert lost not in {x.lease_id for x in api.status().leases}
                gate.touch()  # the task's worker starts now
                # it does not run there: the task waits for a slice again (both A100s are held)
                assert wait_until(lambda: _row("org/team-b")["waiting"] == 1, timeout=60), list(runs.iterdir())
                assert list(runs.iterdir()) == []
            finally:
                done.set()
                holder.join(timeout=60)
            ran = ray.get(task, timeout=120)  # in the A100 team-a gave back
        assert ran != lost and [p.name for p in runs.iterdir()] == [ran]
        assert _row("org/team-b")["preempted"] >= 1
    finally:
        gate.touch()
        ray.get(holding, timeout=60)


def test_a_task_does_not_start_in_a_slice_under_a_preemption_notice(hami: RayCluster) -> None:
    """A pool worker that comes to its slice during a preemption notice's grace does not start the task:
    the node actor refuses it (``LeaseGone``, the task did not run; the placement actor runs it again), so
    it never runs on a slice being taken back, to be stopped at the deadline whether or not a tick told it.
    Before the fix the task ran."""
    assert wait_until(lambda: live_leases() == 0)
    placement = ray.get_actor(PLACEMENT_NAME, namespace=NAMESPACE)
    request = slice_request({"gpus": 1, "gpu_memory": "1GiB", "gpu_type": "A100"}).model_dump(mode="json")
    grant = ray.get(placement.acquire.remote(request, "task:late"))
    lease = grant["lease"]
    try:
        node_actor = ray.get_actor(grant["node_actor"], namespace=NAMESPACE)
        assert ray.get(node_actor.preempt.remote(lease["lease_id"], "org/team-a", "reclaim", 120.0))
        ref = run_in_slice.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            lease["allocation"]["node"], soft=False)).remote(lambda: "ran", slice_meta(grant, grant["state_root"]),
                                                              grant["env"])
        with pytest.raises(LeaseGone):
            ray.get(ref, timeout=60)
        held = next(x for x in ray.get(node_actor.info.remote())["leases"] if x["lease_id"] == lease["lease_id"])
        assert held["pids"] == []  # nothing to stop at the deadline
    finally:
        ray.get(placement.release.remote(lease["lease_id"], lease["token"], lease["allocation"]["node"]))
