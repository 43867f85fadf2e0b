"""Team queues on the Ray runtime (issue 14): definitions applied and kept, admission by limit, and
preemption: a reclaimed task is interrupted with ``SlicePreempted``, runs again in a new slice and
completes; a driver's lease is told through the lease.

The shared test cluster has two A100-80GB on its head node; these tests use only them (``gpu_type``).
Every test leaves the definitions as it found them (no queues)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

import hami_ray
from hami_ray.core.errors import Unschedulable
from hami_ray.core.queues import QueueConfigError
from hami_ray.runtime import api
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
