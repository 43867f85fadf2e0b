"""NvidiaBackend against an injected pynvml-shaped fake (no GPU needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hami_ray.core.errors import DeviceError
from hami_ray.core.model import DeviceGrant, DeviceMode
from node_actors.backends.base import DeviceBackend
from node_actors.backends.nvidia import NvidiaBackend
from node_actors.isolation import IsolationConfig
from tests.node_actors.fake_nvml import FakeGpu, FakeNvml


def four_gpus() -> FakeNvml:
    bus = [f"00000000:{i + 1:02X}:00.0" for i in range(4)]
    gpus = [
        FakeGpu("GPU-0", bus=bus[0], numa=0, nvlinks=[bus[1].lower(), bus[1]], used_mib=9000, util=40,
                processes=[(4242, 9000), (99, None)]),
        FakeGpu("GPU-1", bus=bus[1], numa=0, nvlinks=[bus[0], bus[0]]),
        FakeGpu("GPU-2", bus=bus[2], numa=-1, nvlinks=["0000:ff:00.0"]),  # to an NVSwitch
        FakeGpu("GPU-3", name="NVIDIA A100 MIG", bus=bus[3], numa=1, mig=1, memory_mib=40960,
                nvlinks=["0000:ff:01.0", "0000:ff:02.0"]),
    ]
    # NVML topology levels: 10 single switch, 40 same CPU (NODE), 50 cross CPU (SYSTEM)
    return FakeNvml(gpus, topology={(0, 1): 10, (0, 2): 40, (2, 3): 50})


def backend(nvml: FakeNvml, tmp_path: Path) -> NvidiaBackend:
    return NvidiaBackend(IsolationConfig(state_dir=tmp_path), nvml=nvml)


def test_discovery(tmp_path: Path) -> None:
    nvml = four_gpus()
    b = backend(nvml, tmp_path)
    assert isinstance(b, DeviceBackend) and b.available
    devs = b.discover()
    assert [d.uuid for d in devs] == ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]
    assert devs[0].model == "NVIDIA A100-SXM4-80GB" and devs[0].memory_mib == 81920 and devs[0].vendor == "NVIDIA"
    assert [d.numa for d in devs] == [0, 0, 0, 1]  # -1 (unknown) reads as 0
    assert [d.mode for d in devs] == [DeviceMode.SHARED] * 3 + [DeviceMode.MIG]
    assert devs[0].links["GPU-1"] == 50 + 2 * 100  # single switch + two NVLinks
    assert devs[1].links["GPU-0"] == devs[0].links["GPU-1"]  # symmetric
    assert devs[0].links["GPU-2"] == 20  # same CPU, no NVLink
    assert devs[2].links["GPU-3"] == 10 + 100  # cross CPU + one link through the NVSwitch
    assert devs[0].links["GPU-3"] == 10  # default level 50 in the fake
    env = b.isolation_env([DeviceGrant(uuid="GPU-1", memory_mib=8192, cores=25)], "r-0")
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-1" and env["CUDA_DEVICE_MEMORY_LIMIT_0"] == "8192m"
    b.close()
    b.close()
    assert nvml.shutdowns == 1


def test_health_and_usage(tmp_path: Path) -> None:
    nvml = four_gpus()
    b = backend(nvml, tmp_path)
    b.discover()
    assert b.health() == {"GPU-0": True, "GPU-1": True, "GPU-2": True, "GPU-3": True}
    sample = b.usage()
    assert sample.device("GPU-0").used_mib == 9000 and sample.device("GPU-0").utilization == 40  # type: ignore[union-attr]
    assert sample.per_process("GPU-0") == {4242: 9000}  # a process with unknown usage is left out
    nvml.gpus[1].uuid = "GPU-replaced"  # the device at index 1 is no longer the one we know
    assert b.health()["GPU-1"] is False
    nvml.fail.add("nvmlDeviceGetMemoryInfo")
    assert set(b.health().values()) == {False}
    b.close()


def test_failing_init_or_missing_library_means_no_devices(tmp_path: Path) -> None:
    nvml = FakeNvml([FakeGpu("GPU-0")], fail={"nvmlInit"})
    b = backend(nvml, tmp_path)
    assert not b.available
    assert b.discover() == [] and b.health() == {} and b.usage().devices == ()
    b.close()
    assert nvml.shutdowns == 0


def test_nvml_error_during_usage_is_a_device_error(tmp_path: Path) -> None:
    nvml = four_gpus()
    b = backend(nvml, tmp_path)
    b.discover()
    nvml.fail.add("nvmlDeviceGetComputeRunningProcesses")
    with pytest.raises(DeviceError, match="sampling usage") as info:
        b.usage()
    assert isinstance(info.value.__cause__, nvml.NVMLError)
    nvml.fail.add("nvmlDeviceGetCount")
    with pytest.raises(DeviceError, match="discovering"):
        b.discover()
    b.close()
