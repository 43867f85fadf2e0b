"""detect_backend: NVIDIA when NVML sees devices, else simulated when asked, else empty."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hami_ray.core.errors import DeviceError, InvalidRequest
from hami_ray.core.model import DeviceGrant
from node_actors.backends import EmptyBackend, NvidiaBackend, SimulatedBackend, detect_backend
from node_actors.agent import NodeAgent
from node_actors.backends.simulated import FAULTS_DIR, USAGE_ERROR
from node_actors.settings import AgentSettings, BackendSettings
from tests.node_actors.fake_nvml import FakeGpu, FakeNvml


def test_nvidia_wins_when_nvml_sees_devices(tmp_path: Path) -> None:
    nvml = FakeNvml([FakeGpu("GPU-0")])
    chosen = detect_backend(BackendSettings("n", tmp_path, simulate="2xT4-16GB"), nvml=nvml)
    assert isinstance(chosen, NvidiaBackend)
    chosen.close()


@pytest.mark.parametrize("nvml", [FakeNvml([]), FakeNvml([FakeGpu("GPU-0")], fail={"nvmlInit"})])
def test_simulated_when_no_gpu_and_a_spec(tmp_path: Path, nvml: FakeNvml) -> None:
    chosen = detect_backend(BackendSettings("n", tmp_path, simulate="2xT4-16GB"), nvml=nvml)
    assert isinstance(chosen, SimulatedBackend)
    assert [d.uuid for d in chosen.discover()] == ["GPU-sim-n-0", "GPU-sim-n-1"]
    assert nvml.inits == nvml.shutdowns  # an NVML that initialised was shut down again


def test_empty_without_gpu_or_spec(tmp_path: Path) -> None:
    chosen = detect_backend(BackendSettings("n", tmp_path), nvml=FakeNvml([]))
    assert isinstance(chosen, EmptyBackend)
    assert chosen.discover() == [] and chosen.usage().devices == ()
    assert chosen.isolation_env([], "r") == {"CUDA_VISIBLE_DEVICES": ""}
    with pytest.raises(InvalidRequest):
        chosen.isolation_env([DeviceGrant(uuid="GPU-0", memory_mib=1, cores=0)], "r")


def test_bad_spec_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="HAMI_RAY_SIMULATE"):
        detect_backend(BackendSettings("n", tmp_path, simulate="lots of gpus"), nvml=FakeNvml([]))


def test_real_pynvml_on_this_host_never_crashes(tmp_path: Path) -> None:
    # Whatever this machine has (usually no driver in CI), detection returns a backend.
    chosen = detect_backend(BackendSettings("n", tmp_path, simulate="T4-16GB"))
    assert chosen.discover() is not None
    chosen.close()


def test_node_actors_imports_neither_ray_nor_pynvml() -> None:
    code = ("import sys, node_actors.agent, node_actors.backends, node_actors.journal; "
            "bad = sorted(m for m in ('ray', 'pynvml') if m in sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_simulated_stand_in_fails_like_nvml_while_its_fault_file_exists(tmp_path: Path) -> None:
    backend = SimulatedBackend("1xT4-16GB", "n1", tmp_path)
    agent = NodeAgent("n1", backend, tmp_path / "journal", settings=AgentSettings(reap_interval_s=0.0))
    try:
        agent.tick()
        assert agent.enforcement == "ok"
        fault = tmp_path / FAULTS_DIR / USAGE_ERROR
        fault.parent.mkdir()
        fault.write_text("NVML_ERROR_GPU_IS_LOST")
        with pytest.raises(DeviceError, match="GPU_IS_LOST"):
            backend.usage()
        assert agent.tick() == []  # the node actor's loop never dies on it
        assert agent.enforcement == "degraded" and "GPU_IS_LOST" in agent.isolation_status()["reason"]
        fault.unlink()
        agent.tick()
        assert agent.enforcement == "ok" and agent.isolation_status()["reason"] is None
    finally:
        agent.close()
