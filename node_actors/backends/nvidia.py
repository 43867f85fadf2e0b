"""The NVIDIA device backend over NVML (``nvidia-ml-py``'s ``pynvml``).

``pynvml`` is imported lazily, and a missing library or an ``NVMLError`` from ``nvmlInit`` means "no
NVIDIA devices", never a crash, as Ray's ``nvidia_gpu.py`` does. NVML errors after that are translated
into :class:`~hami_ray.core.errors.DeviceError` at this edge. Optional queries (NUMA node, MIG mode,
topology, NVLink) fall back to defaults when the driver does not support them.

Pair scores follow HAMi's ``calculate_score.go`` (hami.md §2.4), which sums go-gpuallocator's link
types: the PCIe path between two GPUs (``nvmlDeviceGetTopologyCommonAncestor``: cross-CPU 10, same CPU
20, host bridge 30, multi-switch 40, single switch 50, same board 60) plus 100 per active NVLink.

Tests inject a ``pynvml``-shaped object through the constructor instead of patching ``sys.modules``.
Chosen by :func:`node_actors.backends.detect_backend`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hami_ray.core.errors import DeviceError
from hami_ray.core.model import Device, DeviceGrant, DeviceMode
from node_actors.backends.base import DeviceSample, ProcessSample, UsageSample
from node_actors.isolation import IsolationConfig, build_env

log = logging.getLogger(__name__)

MIB = 1024 * 1024
NVLINK_SCORE = 100
# NVML_TOPOLOGY_* level -> HAMi pair score
TOPOLOGY_SCORES = {0: 60, 10: 50, 20: 40, 30: 30, 40: 20, 50: 10}
DEFAULT_MAX_NVLINKS = 18


def load_pynvml() -> Any | None:
    """``pynvml`` if installed, else None (no NVIDIA devices)."""
    try:
        return importlib.import_module("pynvml")  # lazy on purpose: a node without the SDK still starts
    except ImportError:
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bus(bus_id: str | bytes) -> str:
    """Normalise a PCI bus id: NVML writes the domain with 4 or 8 hex digits."""
    parts = _text(bus_id).strip().lower().split(":")
    if len(parts) == 3:
        return f"{int(parts[0], 16):04x}:{parts[1]}:{parts[2]}"
    return ":".join(parts)


class NvidiaBackend:
    """NVIDIA GPUs seen through NVML.

    Args:
        isolation: the node's isolation settings (HAMi-core library, MPS, state directory).
        nvml: a ``pynvml``-shaped module; None imports the real one (absent: no devices).
    """

    def __init__(self, isolation: IsolationConfig, nvml: Any | None = None) -> None:
        self._isolation = isolation
        self._nvml: Any = nvml if nvml is not None else load_pynvml()
        self._ready = False
        self._devices: list[Device] = []
        self._by_uuid: dict[str, Device] = {}
        if self._nvml is None:
            return
        try:
            self._nvml.nvmlInit()
        except (self._nvml.NVMLError, OSError) as exc:
            log.info("NVML did not initialise (%s): no NVIDIA devices on this node", exc)
            return
        self._ready = True

    @property
    def available(self) -> bool:
        """Whether NVML initialised (it may still see no devices)."""
        return self._ready

    @contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        try:
            yield
        except self._nvml.NVMLError as exc:
            raise DeviceError(f"NVML failed while {what}: {exc}") from exc

    # --- discovery ---------------------------------------------------------------------------
    def discover(self) -> list[Device]:
        """List the GPUs with memory, NUMA node, MIG mode and pair scores.

        Raises:
            DeviceError: NVML failed while listing devices.
        """
        if not self._ready:
            return []
        nv = self._nvml
        with self._translated("discovering devices"):
            handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]
            uuids = [_text(nv.nvmlDeviceGetUUID(h)) for h in handles]
            links = self._pair_scores(handles, uuids)
            devices = [
                Device(uuid=uuids[i], index=i, vendor="NVIDIA", model=_text(nv.nvmlDeviceGetName(h)),
                       memory_mib=int(nv.nvmlDeviceGetMemoryInfo(h).total) // MIB, numa=self._numa(h),
                       links=links[i], mode=self._mode(h))
                for i, h in enumerate(handles)
            ]
        self._devices = devices
        self._by_uuid = {d.uuid: d for d in devices}
        return list(devices)

    def _optional(self, name: str, *args: Any) -> Any:
        """Call an NVML function the driver may lack or not support; None when it cannot answer."""
        fn = getattr(self._nvml, name, None)
        if fn is None:
            return None
        try:
            return fn(*args)
        except self._nvml.NVMLError:
            return None

    def _numa(self, handle: Any) -> int:
        numa = self._optional("nvmlDeviceGetNumaNodeId", handle)
        return max(int(numa), 0) if numa is not None else 0

    def _mode(self, handle: Any) -> DeviceMode:
        modes = self._optional("nvmlDeviceGetMigMode", handle)
        enabled = getattr(self._nvml, "NVML_DEVICE_MIG_ENABLE", 1)
        return DeviceMode.MIG if modes is not None and modes[0] == enabled else DeviceMode.SHARED

    def _nvlink_peers(self, handle: Any) -> list[str]:
        """Remote bus ids of this GPU's active NVLinks, one entry per link."""
        enabled = getattr(self._nvml, "NVML_FEATURE_ENABLED", 1)
        peers = []
        for link in range(getattr(self._nvml, "NVML_NVLINK_MAX_LINKS", DEFAULT_MAX_NVLINKS)):
            if self._optional("nvmlDeviceGetNvLinkState", handle, link) != enabled:
                continue
            remote = self._optional("nvmlDeviceGetNvLinkRemotePciInfo", handle, link)
            if remote is not None:
                peers.append(_bus(remote.busId))
        return peers

    def _pair_scores(self, handles: list[Any], uuids: list[str]) -> list[dict[str, int]]:
        buses = [_bus(self._nvml.nvmlDeviceGetPciInfo(h).busId) for h in handles]
        gpu_buses = set(buses)
        nvlinks = [self._nvlink_peers(h) for h in handles]
        # A link whose far end is no GPU goes to an NVSwitch, which reaches every switched GPU.
        switched = [sum(1 for b in peers if b not in gpu_buses) for peers in nvlinks]
        scores: list[dict[str, int]] = [{} for _ in handles]
        for i in range(len(handles)):
            for j in range(i + 1, len(handles)):
                level = self._optional("nvmlDeviceGetTopologyCommonAncestor", handles[i], handles[j])
                links = nvlinks[i].count(buses[j]) + min(switched[i], switched[j])
                score = TOPOLOGY_SCORES.get(level, 0) + NVLINK_SCORE * links
                scores[i][uuids[j]] = scores[j][uuids[i]] = score
        return scores

    # --- health and usage --------------------------------------------------------------------
    def health(self) -> dict[str, bool]:
        """A device is healthy while NVML still finds it at its index, with its uuid, and answers."""
        out: dict[str, bool] = {}
        if not self._ready:
            return out
        nv = self._nvml
        for dev in self._devices:
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(dev.index)
                nv.nvmlDeviceGetMemoryInfo(handle)
                out[dev.uuid] = _text(nv.nvmlDeviceGetUUID(handle)) == dev.uuid
            except nv.NVMLError:
                out[dev.uuid] = False
        return out

    def usage(self) -> UsageSample:
        """Used memory and utilisation per GPU, and used memory per compute process.

        Raises:
            DeviceError: NVML failed while sampling.
        """
        if not self._ready:
            return UsageSample()
        nv = self._nvml
        devices: list[DeviceSample] = []
        processes: list[ProcessSample] = []
        with self._translated("sampling usage"):
            for dev in self._devices:
                handle = nv.nvmlDeviceGetHandleByIndex(dev.index)
                used = int(nv.nvmlDeviceGetMemoryInfo(handle).used) // MIB
                rates = self._optional("nvmlDeviceGetUtilizationRates", handle)  # not on MIG devices
                devices.append(DeviceSample(dev.uuid, used, int(rates.gpu) if rates is not None else 0))
                per_pid: dict[int, int] = {}
                for proc in nv.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.usedGpuMemory is not None:  # None: the driver cannot tell (no permission)
                        per_pid[int(proc.pid)] = per_pid.get(int(proc.pid), 0) + int(proc.usedGpuMemory) // MIB
                processes.extend(ProcessSample(dev.uuid, pid, mib) for pid, mib in sorted(per_pid.items()))
        return UsageSample(devices=tuple(devices), processes=tuple(processes))

    def isolation_env(self, devices: Sequence[DeviceGrant], region: str) -> dict[str, str]:
        return build_env(devices, self._by_uuid, region, self._isolation)

    def close(self) -> None:
        """Shut NVML down (once)."""
        if not self._ready:
            return
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as exc:
            log.warning("nvmlShutdown failed: %s", exc)
        finally:
            self._ready = False
