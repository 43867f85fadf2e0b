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


class FakeNvml:
    """Module-shaped: ``fake.nvmlInit()``, ``fake.NVMLError``, ``fake.NVML_FEATURE_ENABLED``..."""

    NVMLError = NVMLError
    NVML_FEATURE_ENABLED = 1
    NVML_DEVICE_MIG_ENABLE = 1
    NVML_NVLINK_MAX_LINKS = 4

    def __init__(self, gpus: list[FakeGpu], topology: dict[tuple[int, int], int] | None = None,
                 fail: set[str] | None = None) -> None:
        self.gpus = gpus
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

    def nvmlDeviceGetUUID(self, h: int) -> bytes:
        return self.gpus[h].uuid.encode()  # old pynvml returns bytes

    def nvmlDeviceGetName(self, h: int) -> str:
        return self.gpus[h].name

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        self._check("nvmlDeviceGetMemoryInfo")
        g = self.gpus[h]
        return SimpleNamespace(total=g.memory_mib * MIB, used=g.used_mib * MIB, free=(g.memory_mib - g.used_mib) * MIB)

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

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=self.gpus[h].util, memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        self._check("nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=None if mib is None else mib * MIB)
                for pid, mib in self.gpus[h].processes]
