"""b. Two 8 GiB slices on one GPU, under every grade available there.

Task B (6 GiB held, exact fp32 matmuls checked against a CPU product) starts first; once its loop runs,
task A tries to allocate 12 GiB in 1 GiB steps in its own slice. Under ``mps`` and ``hami-core`` A
must get CUDA out-of-memory inside its slice; under ``watchdog`` nothing stops the allocation, so this test
drives the node actor's enforcement arithmetic itself (NVML samples every 0.5 s, ``slice_usage`` and
``QuotaWatch``) and kills A with ``kill_checked``, as ``NodeAgent`` does. B runs on for 2 s after A hit its
limit, then is told to stop; it must finish with every product exact, having run throughout.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hami_ray.core.grades import Isolation
from node_actors.enforcement import QuotaWatch, slice_usage
from node_actors.pids import ProcessTable, kill_checked
from node_actors.processes import start_ticks
from node_actors.settings import DEFAULT_TOLERANCE_MIB
from tests.gpu.harness import SETUP_S, STOP_S, Worker, WorkerFailed, record, wait_for_file, worker_env
from tests.gpu.slices import SLICE_GRADES, Grant, NodeUnderTest

pytestmark = pytest.mark.gpu

SLICE_MIB = 8192
SLICE_GIB = SLICE_MIB // 1024
CORES = 50
A_GIB, A_STEP_GIB = 12, 1
A_FLOOR_GIB = SLICE_GIB // 2  # A must get at least this far: a limit far below the slice is a failure too
B_HOLD_GIB = 6
B_SECONDS = 40.0  # B's loop at most: covers A's start-up (torch import, CUDA init) and the watchdog's grace
B_AFTER_S = 2.0  # B keeps running this long after A hit its limit, then is told to stop
B_SIZE = 2048
INTERVAL_S = 0.5  # the watchdog's sampling period here (the node actor's tick is slower)
GRACE_S = 2.0
WATCH_S = 60.0  # A must be over its limit and stopped within this, from its start
EXIT_S = 10.0  # a SIGKILLed CUDA process must be gone within this


def _lease(lease_id: str, pid: int, grant: Grant) -> SimpleNamespace:
    """A lease as ``slice_usage`` reads one (``lease_id``, ``pids``, ``allocation.devices``)."""
    return SimpleNamespace(lease_id=lease_id, pids=(pid,), allocation=SimpleNamespace(devices=(grant,)))


def _enforce(node: NodeUnderTest, a: Worker, leases: list[SimpleNamespace]) -> dict[str, Any]:
    """Sample, attribute, watch and kill, as the node actor's enforcement pass does, until A is stopped.

    Raises:
        WorkerFailed: A exited on its own, or was not found over its limit in time.
    """
    watch = QuotaWatch(DEFAULT_TOLERANCE_MIB, GRACE_S)
    a_start = start_ticks(a.pid)
    first_over: float | None = None
    peak: dict[str, int] = {}
    samples = 0
    sample = None
    deadline = time.monotonic() + WATCH_S
    next_tick = time.monotonic()
    while time.monotonic() < deadline:
        sample = node.backend.usage()
        now = time.monotonic()
        samples += 1
        table = ProcessTable.scan()
        members = {lease.lease_id: table.descendants(lease.pids) for lease in leases}
        usages = slice_usage(leases, sample, members)  # type: ignore[arg-type]  # duck-typed leases
        for u in usages:
            peak[u.lease_id] = max(peak.get(u.lease_id, 0), u.used_mib)
        if first_over is None and any(u.lease_id == "A" and watch.over(u) for u in usages):
            first_over = now
        due = watch.due(usages, now)
        if due:
            signalled = kill_checked(a.pid, a_start)
            t_kill, wall_kill = time.monotonic(), time.time()
            a.wait(EXIT_S)
            t_exit = time.monotonic()
            assert first_over is not None
            return {"due": sorted({u.lease_id for u in due}), "signalled": signalled, "samples": samples,
                    "peak_mib": peak, "decide_s": t_kill - first_over, "exit_s": t_exit - t_kill,
                    "stopped_s": t_exit - first_over, "t_event": wall_kill, "returncode": a.proc.returncode}
        if a.proc.poll() is not None:
            raise WorkerFailed(f"A exited ({a.proc.returncode}) before the watchdog stopped it{a.tail()}")
        next_tick += INTERVAL_S
        time.sleep(max(0.0, next_tick - time.monotonic()))
    raise WorkerFailed(f"the watchdog did not find A (pid {a.pid}) over its limit within {WATCH_S:g} s: "
                       f"peak MiB per lease {peak}, last NVML processes {sample.processes if sample else None}")


@pytest.mark.parametrize("grade", SLICE_GRADES, ids=lambda g: g.value)
def test_two_slices_on_one_gpu(sliced: NodeUnderTest, grade: Isolation, tmp_path: Path) -> None:
    why = sliced.grade_reason(grade) or sliced.sharing_refused(grade)
    if why is None and grade is Isolation.WATCHDOG:
        why = sliced.watchdog_reason()
    if why is not None:
        pytest.skip(f"no {grade.value} slices here: {why}")
    assert sliced.gpu is not None
    uuid = sliced.gpu.uuid
    env_a = sliced.env(grade, SLICE_MIB, CORES, slot=0)
    env_b = sliced.env(grade, SLICE_MIB, CORES, slot=1)
    figures: dict[str, Any] = {"slice_mib": SLICE_MIB, "cores": CORES, "a_wants_gib": A_GIB}
    record("b_two_slices", grade.value, figures)  # filled in below; kept even when an assert fails
    ready, stop = tmp_path / "b.ready", tmp_path / "b.stop"
    b_cmd = ["matmul", "--dtype", "exact", "--size", str(B_SIZE), "--seconds", str(B_SECONDS),
             "--hold-gib", str(B_HOLD_GIB), "--ready", str(ready), "--stop", str(stop)]
    a_cmd = ["alloc", "--gib", str(A_GIB), "--step", str(A_STEP_GIB)]
    if grade is Isolation.WATCHDOG:
        a_cmd += ["--hold", str(WATCH_S + SETUP_S)]  # nothing stops it but the watchdog
    with Worker(b_cmd, worker_env(env_b), tmp_path, "b") as b:
        wait_for_file(ready, b)
        with Worker(a_cmd, worker_env(env_a), tmp_path, "a") as a:
            if grade is Isolation.WATCHDOG:
                leases = [_lease("A", a.pid, Grant(uuid, SLICE_MIB, CORES)),
                          _lease("B", b.pid, Grant(uuid, SLICE_MIB, CORES))]
                stopped = _enforce(sliced, a, leases)
                a.drained(STOP_S)
                figures["a"] = {**(a.poll_result() or {}), **stopped}  # its report of 12 GiB held, if it came
            else:
                got = a.result(SETUP_S)
                got["returncode"] = a.wait(STOP_S)
                figures["a"] = got
        time.sleep(B_AFTER_S)  # B must outlive its neighbour's out-of-memory or kill
        stop.write_text("stop")
        got_b = b.result(B_SECONDS + SETUP_S)
        got_b["returncode"] = b.wait(STOP_S)
        figures["b"] = got_b
    event = figures["a"]["t_event"]
    figures["overlap"] = got_b["t_start"] <= event <= got_b["t_end"]

    a_res = figures["a"]
    if grade is Isolation.WATCHDOG:
        bound = GRACE_S + 2 * INTERVAL_S
        figures["bound_s"] = bound
        assert a_res["due"] == ["A"], f"the watchdog found {a_res['due']} over, not A alone: {a_res}"
        assert a_res["signalled"] is True, a_res
        assert a_res["decide_s"] <= bound, f"A was killed {a_res['decide_s']:.2f} s after it was over (> {bound} s)"
        assert a_res["returncode"] is not None and a_res["returncode"] < 0, a_res  # killed by a signal
    else:
        assert a_res["oom"], f"A was not refused inside its {SLICE_GIB} GiB slice: {a_res}"
        assert A_FLOOR_GIB <= a_res["reached_gib"] <= SLICE_GIB, f"A held {a_res['reached_gib']} GiB: {a_res}"
        assert a_res["returncode"] == 0, a_res
    assert got_b["returncode"] == 0 and got_b["iters"] > 0, got_b
    assert got_b["mismatches"] == 0, f"B's products differ from the CPU's: {got_b}"
    assert figures["overlap"], f"A's limit ({event}) fell outside B's loop [{got_b['t_start']}, {got_b['t_end']}]"
