"""A ``pynvml``-shaped fake, injected into :class:`NvidiaBackend` (never patched into ``sys.modules``).

Only the functions and constants the backend calls exist; each GPU is a dict. ``fail`` names functions
that raise ``NVMLError`` from now on, to test error translation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

MIB = 1024 * 1024


class NVMLError(Exception):
    def __init__(self, value: int = 999) -> None:
        self.value = value
        super().__init__(f"fake NVML error {value}")


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA A100-SXM4-80GB"
    memory_mib: int = 81920
    used_mib: int = 0
    util: int = 0
    numa: int = 0
    bus: str = "00000000:00:00.0"
    mig: int = 0
    nvlinks: list[str] = field(default_factory=list)  # remote bus id per active link
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, MiB or None)
    compute_mode: int = 0  # NVML_COMPUTEMODE_DEFAULT
    capability: tuple[int, int] = (8, 0)
    sms: int = 108
    instances: list[FakeMig | None] = field(default_factory=list)  # MIG slots (None: empty)


@dataclass
class FakeMig:
    """One MIG instance of a FakeGpu in MIG mode."""

    uuid: str
    name: str = "NVIDIA A100-SXM4-80GB MIG 1g.10gb"
    memory_mib: int = 9856
    used_mib: int = 0
    sms: int = 14
    slices: int = 1
    processes: list[tuple[int, int | None]] = field(default_factory=list)


class FakeNvml:
    """Module-shaped: ``fake.nvmlInit()``, ``fake.NVMLError``, ``fake.NVML_FEATURE_ENABLED``..."""

    NVMLError = NVMLError
    NVML_FEATURE_ENABLED = 1
    NVML_DEVICE_MIG_ENABLE = 1
    NVML_NVLINK_MAX_LINKS = 4

    def __init__(self, gpus: list[FakeGpu], topology: dict[tuple[int, int], int] | None = None,
                 fail: set[str] | None = None, cuda_version: int = 12040) -> None:
        self.gpus = gpus
        self.cuda_version = cuda_version
        self.topology = topology or {}
        self.fail = fail or set()
        self.inits = 0
        self.shutdowns = 0

    def _check(self, name: str) -> None:
        if name in self.fail:
            raise NVMLError()

    def nvmlInit(self) -> None:
        self._check("nvmlInit")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        self._check("nvmlDeviceGetHandleByIndex")
        if i >= len(self.gpus):
            raise NVMLError(2)
        return i

    def _dev(self, h: Any) -> Any:
        if isinstance(h, tuple):
            mig = self.gpus[h[0]].instances[h[1]] if h[1] < len(self.gpus[h[0]].instances) else None
            if mig is None:
                raise NVMLError(6)  # NOT_FOUND: the instance is gone
            return mig
        return self.gpus[h]

    def nvmlDeviceGetUUID(self, h: Any) -> bytes:
        return self._dev(h).uuid.encode()  # old pynvml returns bytes

    def nvmlDeviceGetName(self, h: Any) -> str:
        return self._dev(h).name

    def nvmlDeviceGetMemoryInfo(self, h: Any) -> Any:
        self._check("nvmlDeviceGetMemoryInfo")
        g = self._dev(h)
        return SimpleNamespace(total=g.memory_mib * MIB, used=g.used_mib * MIB, free=(g.memory_mib - g.used_mib) * MIB)

    def nvmlDeviceGetComputeMode(self, h: int) -> int:
        return self.gpus[h].compute_mode

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return self.gpus[h].capability

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda_version

    def nvmlDeviceGetMaxMigDeviceCount(self, h: int) -> int:
        return len(self.gpus[h].instances) if self.gpus[h].mig else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: int, slot: int) -> tuple[int, int]:
        if slot >= len(self.gpus[h].instances) or self.gpus[h].instances[slot] is None:
            raise NVMLError(6)  # NOT_FOUND: an empty slot
        return (h, slot)

    def nvmlDeviceGetAttributes(self, h: Any) -> Any:
        d = self._dev(h)
        return SimpleNamespace(multiprocessorCount=d.sms, gpuInstanceSliceCount=getattr(d, "slices", 7),
                               memorySizeMB=d.memory_mib)

    def nvmlDeviceGetNumaNodeId(self, h: int) -> int:
        return self.gpus[h].numa

    def nvmlDeviceGetMigMode(self, h: int) -> tuple[int, int]:
        return (self.gpus[h].mig, self.gpus[h].mig)

    def nvmlDeviceGetPciInfo(self, h: int) -> Any:
        return SimpleNamespace(busId=self.gpus[h].bus)

    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        if link >= len(self.gpus[h].nvlinks):
            raise NVMLError(3)  # NOT_SUPPORTED
        return 1

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: int, link: int) -> Any:
        return SimpleNamespace(busId=self.gpus[h].nvlinks[link])

    def nvmlDeviceGetTopologyCommonAncestor(self, a: int, b: int) -> int:
        return self.topology.get((min(a, b), max(a, b)), 50)

    def nvmlDeviceGetUtilizationRates(self, h: Any) -> Any:
        if isinstance(h, tuple):
            raise NVMLError(3)  # NOT_SUPPORTED on MIG devices
        return SimpleNamespace(gpu=self.gpus[h].util, memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, h: Any) -> list[Any]:
        self._check("nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=None if mib is None else mib * MIB)
                for pid, mib in self._dev(h).processes]
