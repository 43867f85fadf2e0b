"""Issue 12 on the node side without a GPU: grade choice on NVIDIA devices (MPS run by the node through the
stand-in control program, compute modes, old GPUs, HAMi-core by setting), and enforcement that sees every
process: a task's child, a worker in its own PID namespace while NVML reports host pids, a recycled pid,
and a failing sampler shown as ``degraded`` until it recovers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hami_ray.core.errors import SliceQuotaExceeded
from hami_ray.core.grades import Isolation
from hami_ray.core.model import Allocation, DeviceGrant, Lease
from node_actors.agent import NodeAgent
from node_actors.backends.nvidia import NvidiaBackend
from node_actors.isolation import IsolationConfig
from node_actors.pids import ProcessTable
from node_actors.processes import pid_alive, start_ticks
from node_actors.settings import AgentSettings, NodeSettings
from tests.helpers import wait_for
from tests.node_actors.conftest import FakeClock
from tests.node_actors.fake_nvml import FakeGpu, FakeNvml

FAKE_MPS = Path(__file__).with_name("fake_mps_control.py")


def gpus() -> FakeNvml:
    return FakeNvml([FakeGpu("GPU-0", bus="00000000:01:00.0"),
                     FakeGpu("GPU-1", bus="00000000:02:00.0", compute_mode=3),  # EXCLUSIVE_PROCESS
                     FakeGpu("GPU-2", bus="00000000:03:00.0", capability=(6, 1), name="Tesla P100")])


@pytest.fixture
def backends() -> Iterator[list[NvidiaBackend]]:
    made: list[NvidiaBackend] = []
    yield made
    for b in made:
        b.close()


def nvidia(tmp_path: Path, made: list[NvidiaBackend], nvml: FakeNvml | None = None, **cfg: object) -> NvidiaBackend:
    config = IsolationConfig(state_dir=tmp_path, **{"mps_control": str(FAKE_MPS), **cfg})  # type: ignore[arg-type]
    b = NvidiaBackend(config, nvml=nvml or gpus())
    made.append(b)
    return b


def test_auto_runs_mps_where_it_can_and_says_why_not_elsewhere(tmp_path: Path, backends: list[NvidiaBackend]) -> None:
    b = nvidia(tmp_path, backends)
    devs = {d.uuid: d for d in b.discover()}
    assert devs["GPU-0"].isolation is Isolation.MPS
    assert devs["GPU-0"].whole_isolation is Isolation.WATCHDOG  # a whole GPU does not go through MPS
    assert devs["GPU-1"].isolation is Isolation.WATCHDOG and devs["GPU-2"].isolation is Isolation.WATCHDOG
    report = b.isolation_report()
    assert report.best is Isolation.MPS and report.host_pids
    notes = {uuid: note for uuid, _, note in report.devices}
    assert "compute mode EXCLUSIVE_PROCESS" in (notes["GPU-1"] or "")
    assert "compute capability 6.1" in (notes["GPU-2"] or "")
    assert report.mps is not None and report.mps["running"]
    # the daemon runs under the node's state directory and serves only the GPU that can take MPS
    pipe = tmp_path / "mps" / "pipe"
    assert (pipe / "nvidia-cuda-mps-control.pid").exists()
    assert "GPU-0" in (tmp_path / "mps" / "log" / "control.log").read_text()
    env = b.isolation_env([DeviceGrant(uuid="GPU-0", memory_mib=8192, cores=30)], "r-0")
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(pipe)
    assert env["CUDA_MPS_LOG_DIRECTORY"] == str(tmp_path / "mps" / "log")
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=8192M" and env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    whole = b.isolation_env([DeviceGrant(uuid="GPU-0", memory_mib=81920, cores=100)], "r-0")
    assert not any(k.startswith("CUDA_MPS_") for k in whole)
    pid = report.mps["pid"]
    b.close()  # the node actor exits: the daemon stops
    assert wait_for(lambda: not pid_alive(pid), timeout=10)


def test_a_killed_daemon_is_restarted_and_a_dead_one_falls_back(tmp_path: Path,
                                                                  backends: list[NvidiaBackend]) -> None:
    b = nvidia(tmp_path, backends)
    b.discover()
    first = b.isolation_report().mps
    assert first is not None
    os.kill(first["pid"], signal.SIGKILL)
    done = b.maintain()
    assert done.restarted and not done.changed
    again = b.isolation_report().mps
    assert again is not None and again["pid"] != first["pid"] and again["restarts"] == 1
    assert not b.maintain().restarted  # healthy: nothing to do
    # the control program disappears and the daemon dies: MPS devices fall back, with the reason
    os.kill(again["pid"], signal.SIGKILL)
    b._mps._argv = ["/nonexistent/nvidia-cuda-mps-control"]  # type: ignore[union-attr]  # noqa: SLF001
    done = b.maintain()
    assert done.changed and dict((u, g) for u, g, _ in done.grades)["GPU-0"] is Isolation.WATCHDOG
    assert b.isolation_report().best is Isolation.WATCHDOG
    assert "could not be restarted" in (b.isolation_report().mps_reason or "")


def test_settings_choose_hami_core_or_watchdog(tmp_path: Path, backends: list[NvidiaBackend]) -> None:
    lib = tmp_path / "libvgpu.so"
    lib.write_bytes(b"\x7fELF")
    hami = nvidia(tmp_path / "a", backends, setting="hami-core", libvgpu_path=lib)
    assert {d.isolation for d in hami.discover()} == {Isolation.HAMI_CORE}
    assert hami.isolation_report().mps is None  # no daemon started
    env = hami.isolation_env([DeviceGrant(uuid="GPU-0", memory_mib=8192, cores=30)], "r-0")
    assert env["LD_PRELOAD"] == str(lib)
    watch = nvidia(tmp_path / "b", backends, setting="watchdog", libvgpu_path=lib)
    assert {d.isolation for d in watch.discover()} == {Isolation.WATCHDOG}
    missing = nvidia(tmp_path / "c", backends, mps_control="/nonexistent/nvidia-cuda-mps-control")
    devs = missing.discover()
    assert {d.isolation for d in devs} == {Isolation.WATCHDOG}
    assert "not" in (missing.isolation_report().mps_reason or "")  # "... is not installed"


def test_node_settings_come_from_the_environment(tmp_path: Path) -> None:
    s = NodeSettings.load({"HAMI_RAY_ISOLATION": "HAMi_core", "HAMI_RAY_LIBVGPU": "/opt/hami/libvgpu.so",
                           "HAMI_RAY_MPS_CONTROL": "/opt/bin/mps"})
    assert (s.isolation, str(s.libvgpu_path), s.mps_control) == ("hami-core", "/opt/hami/libvgpu.so", "/opt/bin/mps")
    assert NodeSettings.load({"HAMI_RAY_ISOLATION": "mps"}, {"isolation": "watchdog"}).isolation == "watchdog"
    with pytest.raises(Exception, match="unknown node isolation setting 'strong'"):
        NodeSettings.load({"HAMI_RAY_ISOLATION": "strong"})


# --- enforcement that sees every process ------------------------------------------------------------
def lease_on(uuid: str, mib: int, lease_id: str = "l1", **kw: object) -> Lease:
    grant = DeviceGrant(uuid=uuid, memory_mib=mib, cores=30)
    return Lease(lease_id=lease_id, owner="task", token="t", allocation=Allocation(node="n", slices=((grant,),)),
                 **kw)  # type: ignore[arg-type]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # its own session (start_new_session): children too
        except (ProcessLookupError, PermissionError):
            pass
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
        for stream in (p.stdout, p.stderr):
            if stream is not None:
                stream.close()


def watchdog_agent(tmp_path: Path, nvml: FakeNvml, clock: FakeClock) -> NodeAgent:
    backend = NvidiaBackend(IsolationConfig(state_dir=tmp_path / "b", setting="watchdog"), nvml=nvml)
    settings = AgentSettings(tolerance_mib=64, grace_s=5.0, reap_interval_s=0.0, reserve_grace_s=60.0)
    return NodeAgent("n", backend, tmp_path, clock=clock, settings=settings)


def test_a_child_of_the_task_overrunning_is_counted_and_stopped(tmp_path: Path,
                                                                procs: list[subprocess.Popen[bytes]]) -> None:
    # the worker forks a child (a DataLoader worker, say) that takes the memory; only the worker registered
    code = "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']);" \
           " print(c.pid, flush=True); time.sleep(300)"
    worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    procs.append(worker)
    assert worker.stdout is not None
    child = int(worker.stdout.readline())
    nvml = FakeNvml([FakeGpu("GPU-0", processes=[(child, 9000)])])  # NVML sees the child, not the worker
    clock = FakeClock()
    agent = watchdog_agent(tmp_path, nvml, clock)
    try:
        agent.reserve(lease_on("GPU-0", 8192))
        agent.activate("l1", worker.pid)
        sample = agent.sample()
        assert sample.slice("l1", "GPU-0").used_mib == 9000  # type: ignore[union-attr]
        assert agent.tick() == []  # over, within the grace
        clock.advance(6)
        stopped = agent.tick()
        assert [type(e) for e in stopped] == [SliceQuotaExceeded] and stopped[0].pid == child
        assert stopped[0].action == "killed"
        assert wait_for(lambda: not pid_alive(child), timeout=10) and worker.wait(timeout=10) == -signal.SIGKILL
        assert agent.leases() == []
    finally:
        agent.close()


def test_a_reused_pid_is_neither_counted_nor_killed(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    # a journaled lease names pid P, but P is now another process (its start time differs)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    procs.append(other)
    real = start_ticks(other.pid)
    assert real is not None
    nvml = FakeNvml([FakeGpu("GPU-0", processes=[(other.pid, 9000)])])
    clock = FakeClock()
    agent = watchdog_agent(tmp_path, nvml, clock)
    try:
        agent.reserve(lease_on("GPU-0", 8192, pids=(other.pid,), pid_starts={other.pid: real - 7}))
        assert agent.sample().slice("l1", "GPU-0").used_mib == 0  # type: ignore[union-attr]
        clock.advance(60)
        assert agent.tick() == []
        assert other.poll() is None  # alive: never killed
        assert agent.leases() == []  # its holder is gone (the pid names someone else): reaped
        assert [e.kind for e in agent.events("l1")][-1] == "reaped"
    finally:
        agent.close()


def test_a_worker_in_its_own_pid_namespace_is_mapped_to_nvml_host_pids(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is not installed")
    code = "import os, time; print(os.getpid(), os.stat('/proc/self/ns/pid').st_ino, flush=True); time.sleep(300)"
    box = subprocess.Popen([unshare, "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-c", code],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    procs.append(box)
    assert box.stdout is not None
    line = box.stdout.readline().decode()
    if not line:
        refusal = box.stderr.read().decode() if box.stderr else ""
        print(f"unshare --pid refused: {refusal}")
        pytest.skip(f"unshare --pid refused here: {refusal.strip()}")
    inner_pid, inner_ns = (int(x) for x in line.split())
    table = ProcessTable.scan()
    host_pid = table.resolve(inner_pid, inner_ns)
    assert host_pid is not None and host_pid != inner_pid
    nvml = FakeNvml([FakeGpu("GPU-0", processes=[(host_pid, 9000)])])  # NVML: host pids, always
    clock = FakeClock()
    agent = watchdog_agent(tmp_path, nvml, clock)
    try:
        agent.reserve(lease_on("GPU-0", 8192))
        lease = agent.activate("l1", inner_pid, inner_ns)  # the worker says who it is, in its own namespace
        assert lease.pids == (host_pid,)
        assert agent.sample().slice("l1", "GPU-0").used_mib == 9000  # type: ignore[union-attr]
        agent.tick()
        clock.advance(6)
        assert [e.pid for e in agent.tick()] == [host_pid]
        assert wait_for(lambda: not pid_alive(host_pid), timeout=10)
    finally:
        agent.close()


def test_an_nvml_error_in_the_tick_shows_degraded_until_it_recovers(tmp_path: Path) -> None:
    nvml = FakeNvml([FakeGpu("GPU-0")])
    agent = watchdog_agent(tmp_path, nvml, FakeClock())
    try:
        assert agent.enforcement == "ok" and agent.isolation_status()["reason"] is None
        nvml.fail.add("nvmlDeviceGetComputeRunningProcesses")
        assert agent.tick() == []  # never raises
        status = agent.isolation_status()
        assert status["enforcement"] == "degraded" and "sampling usage" in status["reason"]
        assert agent.tick() == [] and agent.enforcement == "degraded"
        nvml.fail.clear()
        agent.tick()
        assert agent.enforcement == "ok" and agent.isolation_status()["reason"] is None
        assert agent.isolation_status()["isolation"] == "watchdog"
    finally:
        agent.close()


def test_the_agent_marks_slices_when_mps_restarts_and_regrades_when_it_cannot(
        tmp_path: Path, backends: list[NvidiaBackend]) -> None:
    b = nvidia(tmp_path / "b", backends)
    agent = NodeAgent("n", b, tmp_path, clock=FakeClock())
    try:
        shared = agent.reserve(lease_on("GPU-0", 8192, lease_id="shared"))
        assert agent.grade_of(shared) is Isolation.MPS
        assert agent.isolation_status()["mps"]["running"]
        os.kill(agent.isolation_status()["mps"]["pid"], signal.SIGKILL)
        agent.tick()
        status = agent.isolation_status()
        assert "restarted" in status["marks"]["shared"] and status["enforcement"] == "ok"
        assert [e.kind for e in agent.events("shared")][-1] == "marked"
        assert agent.leases() == [shared]  # no lease is lost
        # now it dies for good: the node's inventory falls back, so a floor of mps no longer lands here
        os.kill(status["mps"]["pid"], signal.SIGKILL)
        b._mps._argv = ["/nonexistent/nvidia-cuda-mps-control"]  # type: ignore[union-attr]  # noqa: SLF001
        agent.tick()
        grades = {d.uuid: d.isolation for d in agent.node().devices}
        assert grades["GPU-0"] is Isolation.WATCHDOG
        assert agent.isolation_status()["isolation"] == "watchdog"
        assert [x.lease_id for x in agent.leases()] == ["shared"]
        assert agent.grade_of(agent.leases()[0]) is Isolation.WATCHDOG
    finally:
        agent.close()
