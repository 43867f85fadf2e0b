"""NvidiaBackend against an injected pynvml-shaped fake (no GPU needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hami_ray.core.errors import DeviceError
from hami_ray.core.model import DeviceGrant, DeviceMode
from node_actors.backends.base import DeviceBackend
from node_actors.backends.nvidia import NvidiaBackend
from node_actors.isolation import IsolationConfig
from tests.node_actors.fake_nvml import FakeGpu, FakeMig, FakeNvml


def four_gpus() -> FakeNvml:
    bus = [f"00000000:{i + 1:02X}:00.0" for i in range(4)]
    gpus = [
        FakeGpu("GPU-0", bus=bus[0], numa=0, nvlinks=[bus[1].lower(), bus[1]], used_mib=9000, util=40,
                processes=[(4242, 9000), (99, None)]),
        FakeGpu("GPU-1", bus=bus[1], numa=0, nvlinks=[bus[0], bus[0]]),
        FakeGpu("GPU-2", bus=bus[2], numa=-1, nvlinks=["0000:ff:00.0"]),  # to an NVSwitch
        FakeGpu("GPU-3", name="NVIDIA A100 MIG", bus=bus[3], numa=1, mig=1, memory_mib=40960,
                nvlinks=["0000:ff:01.0", "0000:ff:02.0"], instances=[
                    FakeMig("MIG-3a", processes=[(555, 3000)], used_mib=3000), None,  # slot 1 is empty
                    FakeMig("MIG-3b", name="NVIDIA A100-SXM4-80GB MIG 3g.40gb", memory_mib=40192, sms=42,
                            slices=3)]),
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
    # the GPU in MIG mode is offered as its instances, never itself
    assert [d.uuid for d in devs] == ["GPU-0", "GPU-1", "GPU-2", "MIG-3a", "MIG-3b"]
    assert devs[0].model == "NVIDIA A100-SXM4-80GB" and devs[0].memory_mib == 81920 and devs[0].vendor == "NVIDIA"
    assert [d.numa for d in devs] == [0, 0, 0, 1, 1]  # -1 (unknown) reads as 0
    assert [d.mode for d in devs] == [DeviceMode.SHARED] * 3 + [DeviceMode.MIG] * 2
    mig_a, mig_b = devs[3], devs[4]
    assert (mig_a.memory_mib, mig_a.cores, mig_a.slice_capacity) == (9856, 13, 1)  # 14 of the parent's 108 SMs
    assert (mig_b.model, mig_b.memory_mib, mig_b.cores) == ("NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40192, 39)
    assert mig_a.isolation == "mig" and mig_a.links == {}
    assert devs[0].links["GPU-1"] == 50 + 2 * 100  # single switch + two NVLinks
    assert devs[1].links["GPU-0"] == devs[0].links["GPU-1"]  # symmetric
    assert devs[0].links["GPU-2"] == 20  # same CPU, no NVLink
    assert "GPU-3" not in devs[2].links  # the MIG parent is not a device
    env = b.isolation_env([DeviceGrant(uuid="GPU-1", memory_mib=8192, cores=25)], "r-0")
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-1" and env["CUDA_DEVICE_MEMORY_LIMIT_0"] == "8192m"
    b.close()
    b.close()
    assert nvml.shutdowns == 1


def test_health_and_usage(tmp_path: Path) -> None:
    nvml = four_gpus()
    b = backend(nvml, tmp_path)
    b.discover()
    assert b.health() == {"GPU-0": True, "GPU-1": True, "GPU-2": True, "MIG-3a": True, "MIG-3b": True}
    sample = b.usage()
    assert sample.per_process("MIG-3a") == {555: 3000} and sample.device("MIG-3a").used_mib == 3000  # type: ignore[union-attr]
    assert sample.device("GPU-0").used_mib == 9000 and sample.device("GPU-0").utilization == 40  # type: ignore[union-attr]
    assert sample.per_process("GPU-0") == {4242: 9000}  # a process with unknown usage is left out
    nvml.gpus[1].uuid = "GPU-replaced"  # the device at index 1 is no longer the one we know
    assert b.health()["GPU-1"] is False
    nvml.gpus[3].instances[0] = None  # an admin destroyed the instance
    assert b.health()["MIG-3a"] is False and b.health()["MIG-3b"] is True
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
