"""The isolation environment: exact contents, and what must never be in it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hami_ray.core.errors import InvalidRequest
from hami_ray.core.grades import Isolation
from hami_ray.core.model import Device, DeviceGrant
from node_actors.agent import NodeAgent
from node_actors.isolation import IsolationConfig, build_env, memory_fraction, visibility_for
from node_actors.backends.simulated import SimulatedBackend
from tests.node_actors.conftest import NODE, SPEC, make_lease, uuid


def inventory(vendor: str = "NVIDIA", grade: str = "watchdog", whole: str | None = None) -> dict[str, Device]:
    devices = [
        Device(uuid="GPU-a", index=0, vendor=vendor, model="A100", memory_mib=81920, isolation=grade,
               whole_isolation=whole),
        Device(uuid="GPU-b", index=1, vendor=vendor, model="A100", memory_mib=81920, isolation=grade,
               whole_isolation=whole),
        Device(uuid="GPU-c", index=2, vendor=vendor, model="T4", memory_mib=16384, isolation=grade,
               whole_isolation=whole),
    ]
    return {d.uuid: d for d in devices}


MPS_ENV = {"CUDA_MPS_PIPE_DIRECTORY": "/s/mps/pipe", "CUDA_MPS_LOG_DIRECTORY": "/s/mps/log"}


def grants(cores: int = 30) -> list[DeviceGrant]:
    # slice order differs from index order on purpose: the slice decides device 0 and 1
    return [DeviceGrant(uuid="GPU-c", memory_mib=4096, cores=cores),
            DeviceGrant(uuid="GPU-a", memory_mib=20480, cores=cores)]


def test_two_device_slice_exact_env(tmp_path: Path) -> None:
    env = build_env(grants(), inventory(), "abc-0", IsolationConfig(state_dir=tmp_path))
    assert env == {
        "CUDA_VISIBLE_DEVICES": "GPU-c,GPU-a",
        "NVIDIA_VISIBLE_DEVICES": "GPU-c,GPU-a",
        "CUDA_DEVICE_MEMORY_LIMIT_0": "4096m",
        "CUDA_DEVICE_MEMORY_LIMIT_1": "20480m",
        "CUDA_DEVICE_SM_LIMIT": "30",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.25",  # min(4096/16384, 20480/81920)
        "HAMI_RAY_SLICE": '{"devices":[{"cores":30,"device_mib":16384,"memory_mib":4096,"uuid":"GPU-c"},'
                          '{"cores":30,"device_mib":81920,"memory_mib":20480,"uuid":"GPU-a"}],"isolation":"watchdog"}',
    }
    assert json.loads(env["HAMI_RAY_SLICE"])["devices"][1]["uuid"] == "GPU-a"


@pytest.mark.parametrize("cores", [0, 100])
def test_no_sm_limit_for_zero_or_whole_cores(tmp_path: Path, cores: int) -> None:
    env = build_env(grants(cores), inventory(grade="mps", whole="watchdog"), "r", IsolationConfig(state_dir=tmp_path),
                    MPS_ENV)
    assert "CUDA_DEVICE_SM_LIMIT" not in env
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in env
    # whole-device slices do not go through MPS
    assert ("CUDA_MPS_PIPE_DIRECTORY" in env) is (cores == 0)
    assert json.loads(env["HAMI_RAY_SLICE"])["isolation"] == ("mps" if cores == 0 else "watchdog")


def test_ld_preload_only_when_library_exists(tmp_path: Path) -> None:
    lib = tmp_path / "libvgpu.so"
    missing = IsolationConfig(state_dir=tmp_path, libvgpu_path=lib)
    hami = inventory(grade="hami-core")
    assert "LD_PRELOAD" not in build_env(grants(), hami, "r", missing)
    assert "CUDA_DEVICE_MEMORY_SHARED_CACHE" not in build_env(grants(), hami, "r", missing)
    lib.write_bytes(b"\x7fELF")
    env = build_env(grants(), hami, "r", missing)
    assert env["LD_PRELOAD"] == str(lib)
    assert env["CUDA_DEVICE_MEMORY_SHARED_CACHE"] == str(tmp_path / "vgpu" / "r.cache")  # HAMi-core's region
    assert json.loads(env["HAMI_RAY_SLICE"])["isolation"] == "hami-core"
    assert "LD_PRELOAD" not in build_env(grants(), hami, "r", IsolationConfig(state_dir=tmp_path))
    assert "LD_PRELOAD" not in build_env(grants(), inventory(grade="mps"), "r", missing, MPS_ENV)  # MPS instead


def test_mps_vars_only_when_configured(tmp_path: Path) -> None:
    plain = build_env(grants(), inventory(), "r", IsolationConfig(state_dir=tmp_path), MPS_ENV)
    assert not any(k.startswith("CUDA_MPS_") for k in plain)
    mps = build_env(grants(), inventory(grade="mps"), "r", IsolationConfig(state_dir=tmp_path), MPS_ENV)
    assert mps["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=4096M,1=20480M"
    assert mps["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    assert mps["CUDA_MPS_PIPE_DIRECTORY"] == "/s/mps/pipe" and mps["CUDA_MPS_LOG_DIRECTORY"] == "/s/mps/log"
    # the daemon is gone: the slice holds what it holds without MPS, and says so
    gone = build_env(grants(), inventory(grade="mps", whole="watchdog"), "r", IsolationConfig(state_dir=tmp_path))
    assert not any(k.startswith("CUDA_MPS_") for k in gone)
    assert json.loads(gone["HAMI_RAY_SLICE"])["isolation"] == "watchdog"


def test_mig_instance_env_is_visibility_only(tmp_path: Path) -> None:
    mig = Device(uuid="MIG-4f1c", index=0, model="A100 MIG 1g.10gb", memory_mib=9856, cores=14, mode="mig",
                 isolation="mig")
    env = build_env([DeviceGrant(uuid="MIG-4f1c", memory_mib=9856, cores=14)], {mig.uuid: mig}, "r",
                    IsolationConfig(state_dir=tmp_path), MPS_ENV)
    assert env["CUDA_VISIBLE_DEVICES"] == "MIG-4f1c"
    assert not any(k.startswith("CUDA_MPS_") or k.startswith("CUDA_DEVICE_") for k in env)
    assert json.loads(env["HAMI_RAY_SLICE"])["isolation"] == "mig"


@pytest.mark.parametrize(("vendor", "names", "ids"), [
    ("AMD", ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"), "2,0"),
    ("DCU", ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"), "2,0"),
    ("Ascend910B", ("ASCEND_VISIBLE_DEVICES",), "2,0"),
    ("MLU", ("MLU_VISIBLE_DEVICES",), "2,0"),
])
def test_other_vendors_by_index_without_cuda_layers(tmp_path: Path, vendor: str, names: tuple[str, ...],
                                                    ids: str) -> None:
    lib = tmp_path / "libvgpu.so"
    lib.write_bytes(b"")
    env = build_env(grants(), inventory(vendor), "r", IsolationConfig(state_dir=tmp_path, libvgpu_path=lib), MPS_ENV)
    for name in names:
        assert env[name] == ids
    assert not any(k.startswith("CUDA_") or k == "LD_PRELOAD" for k in env)
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" in env


def test_unknown_vendor_device_or_mixed_slice_is_refused(tmp_path: Path) -> None:
    cfg = IsolationConfig(state_dir=tmp_path)
    with pytest.raises(InvalidRequest, match="no isolation"):
        visibility_for("Vastai")
    with pytest.raises(InvalidRequest, match="not on this node"):
        build_env([DeviceGrant(uuid="GPU-x", memory_mib=1, cores=0)], inventory(), "r", cfg)
    mixed = inventory() | {"GPU-m": Device(uuid="GPU-m", index=3, vendor="AMD", model="MI300", memory_mib=196608)}
    with pytest.raises(InvalidRequest, match="one vendor"):
        build_env([DeviceGrant(uuid="GPU-a", memory_mib=1, cores=0), DeviceGrant(uuid="GPU-m", memory_mib=1, cores=0)],
                  mixed, "r", cfg)


def test_empty_slice_hides_devices(tmp_path: Path) -> None:
    assert build_env([], inventory(), "r", IsolationConfig(state_dir=tmp_path)) == {"CUDA_VISIBLE_DEVICES": ""}


def test_zero_memory_grant_is_not_unlimited(tmp_path: Path) -> None:
    env = build_env([DeviceGrant(uuid="GPU-a", memory_mib=0, cores=10)], inventory(), "r",
                    IsolationConfig(state_dir=tmp_path))
    assert env["CUDA_DEVICE_MEMORY_LIMIT_0"] == "1m"  # HAMi-core reads 0 as "no limit"


def test_memory_fraction_rounds_down_and_caps() -> None:
    devs = list(inventory().values())
    assert memory_fraction([DeviceGrant(uuid="GPU-c", memory_mib=1000, cores=0)], devs[2:]) == "0.061"
    assert memory_fraction([DeviceGrant(uuid="GPU-c", memory_mib=99999, cores=0)], devs[2:]) == "1"


def test_agent_env_has_no_lease_id_or_token(agent: NodeAgent) -> None:
    lease = agent.reserve(make_lease((0, 8192, 30), (1, 8192, 30), lease_id="lease-secret-id", token="tok-XYZ"))
    env = agent.isolation_env(lease.lease_id)
    assert env["CUDA_VISIBLE_DEVICES"] == f"{uuid(0)},{uuid(1)}"
    blob = json.dumps(env)
    assert "lease-secret-id" not in blob
    assert "tok-XYZ" not in blob


def test_agent_env_shared_cache_by_shape_and_slot(tmp_path: Path) -> None:
    lib = tmp_path / "libvgpu.so"
    lib.write_bytes(b"\x7fELF")  # HAMi-core installed: each live slice needs its own accounting region
    backend = SimulatedBackend(SPEC, NODE, tmp_path, isolation=IsolationConfig(state_dir=tmp_path, libvgpu_path=lib),
                               grade=Isolation.HAMI_CORE)  # pretend HAMi-core holds these simulated devices
    agent = NodeAgent(NODE, backend, tmp_path)
    try:
        a = agent.reserve(make_lease((0, 8192, 30)))
        b = agent.reserve(make_lease((0, 8192, 30)))  # same shape, held at the same time
        env_a, env_b = agent.isolation_env(a.lease_id), agent.isolation_env(b.lease_id)
        cache = "CUDA_DEVICE_MEMORY_SHARED_CACHE"
        assert env_a[cache] != env_b[cache]  # separate HAMi-core accounting regions
        agent.release(a.lease_id, a.token)
        c = agent.reserve(make_lease((0, 8192, 30)))
        assert agent.isolation_env(c.lease_id) == env_a  # identical runtime_env: Ray may reuse the worker
    finally:
        agent.close()


def test_agent_env_is_one_per_shape_without_hami_core(agent: NodeAgent) -> None:
    """No HAMi-core: two live slices of one shape share one environment, so Ray reuses workers."""
    a = agent.reserve(make_lease((0, 8192, 30)))
    b = agent.reserve(make_lease((0, 8192, 30)))
    assert agent.isolation_env(a.lease_id) == agent.isolation_env(b.lease_id)
