"""The NVIDIA device backend over NVML (``nvidia-ml-py``'s ``pynvml``).

``pynvml`` is imported lazily, and a missing library or an ``NVMLError`` from ``nvmlInit`` means "no
NVIDIA devices", never a crash, as Ray's ``nvidia_gpu.py`` does. NVML errors after that are translated
into :class:`~hami_ray.core.errors.DeviceError` at this edge. Optional queries (NUMA node, MIG mode,
topology, NVLink) fall back to defaults when the driver does not support them.

A GPU in MIG mode is offered as its MIG instances (``MIG-...`` uuids, each with its own memory and its
share of the parent's SMs, mode ``mig``): each is handed out whole and the parent is never sliced. The
backend reads the MIG layout and compute modes and never changes them.

Isolation grades (:mod:`hami_ray.core.grades`) are chosen here, per device, at discovery: ``mig`` for MIG
instances; ``mps`` where the node's setting allows it and the GPU can take it (default or prohibited-free
compute mode, Volta or newer, a driver with MPS memory limits, the control program installed), in which
case this backend starts and supervises the node's one MPS control daemon (:class:`node_actors.mps.MpsDaemon`);
else ``hami-core`` where ``libvgpu.so`` is installed; else ``watchdog``. Every weaker-than-possible
choice is noted with its reason (:meth:`NvidiaBackend.isolation_report`).

Pair scores follow HAMi's ``calculate_score.go`` (hami.md §2.4), which sums go-gpuallocator's link
types: the PCIe path between two GPUs (``nvmlDeviceGetTopologyCommonAncestor``: cross-CPU 10, same CPU
20, host bridge 30, multi-switch 40, single switch 50, same board 60) plus 100 per active NVLink.

Tests inject a ``pynvml``-shaped object through the constructor instead of patching ``sys.modules``.
Chosen by :func:`node_actors.backends.detect_backend`.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from dataclasses import dataclass, field

from hami_ray.core.errors import DeviceError
from hami_ray.core.grades import AUTO, Isolation, strongest
from node_actors.backends.base import DeviceSample, IsolationReport, Maintenance, ProcessSample, UsageSample
from node_actors.isolation import IsolationConfig, build_env
from node_actors.mps import MpsDaemon, MpsError

if TYPE_CHECKING:
    from hami_ray.core.model import Device, DeviceGrant

log = logging.getLogger(__name__)

MIB = 1024 * 1024
NVLINK_SCORE = 100
# NVML_TOPOLOGY_* level -> HAMi pair score
TOPOLOGY_SCORES = {0: 60, 10: 50, 20: 40, 30: 30, 40: 20, 50: 10}
DEFAULT_MAX_NVLINKS = 18
MIG_GPU_SLICES = 7  # GPU instance slices of a whole A100/H100/H200, when NVML cannot count the parent's SMs
MPS_MIN_CUDA = 11050  # MPS pinned memory limits arrived with CUDA 11.5-era drivers (nvidia-isolation.md §1)
MPS_MIN_MAJOR = 7  # MPS limits need Volta or newer
COMPUTE_MODES = {0: "DEFAULT", 1: "EXCLUSIVE_THREAD", 2: "PROHIBITED", 3: "EXCLUSIVE_PROCESS"}


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One device this backend offers, as NVML describes it (plain data: no pydantic, for the GPU suite).

    A MIG instance has ``mig`` set, its parent's uuid and index, its slot under the parent, and its share
    of the parent's SMs in percent (``sm_share``).
    """

    uuid: str
    index: int
    name: str
    memory_mib: int
    numa: int = 0
    bus: str = ""
    mig: bool = False
    parent_uuid: str | None = None
    parent_index: int | None = None
    slot: int | None = None
    sm_share: int = 100
    compute_mode: int | None = None
    capability: tuple[int, int] | None = None
    isolation: Isolation = Isolation.WATCHDOG
    whole_isolation: Isolation | None = None
    vendor: str = "NVIDIA"
    note: str | None = field(default=None, compare=False)  # why a weaker grade than could be

    def grade_for(self, cores: int) -> Isolation:
        """As :meth:`hami_ray.core.model.Device.grade_for`."""
        if self.mig or cores < 100 or self.whole_isolation is None:
            return self.isolation
        return self.whole_isolation


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
        self._gpus: list[GpuInfo] = []
        self._devices: list[Device] = []
        self._by_uuid: dict[str, GpuInfo] = {}
        self._mps: MpsDaemon | None = None
        self._mps_reason: str | None = None  # why no MPS daemon serves this node
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
    def gpus(self) -> list[GpuInfo]:
        """The devices this node offers, graded, as plain data (MIG instances in place of their parent).

        The first call chooses grades and starts the MPS daemon where one is wanted.

        Raises:
            DeviceError: NVML failed while listing devices.
        """
        if not self._ready:
            return []
        nv = self._nvml
        with self._translated("discovering devices"):
            out: list[GpuInfo] = []
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                base = GpuInfo(uuid=_text(nv.nvmlDeviceGetUUID(h)), index=i, name=_text(nv.nvmlDeviceGetName(h)),
                               memory_mib=int(nv.nvmlDeviceGetMemoryInfo(h).total) // MIB, numa=self._numa(h),
                               bus=_bus(nv.nvmlDeviceGetPciInfo(h).busId),
                               compute_mode=self._optional("nvmlDeviceGetComputeMode", h),
                               capability=self._capability(h))
                if self._mig_enabled(h):
                    out.extend(self._mig_instances(h, base))
                else:
                    out.append(base)
        self._gpus = self._grade(out)
        self._by_uuid = {g.uuid: g for g in self._gpus}
        return list(self._gpus)

    def discover(self) -> list[Device]:
        """List the devices with memory, NUMA node, mode, grade and pair scores.

        Raises:
            DeviceError: NVML failed while listing devices.
        """
        from hami_ray.core.model import Device, DeviceMode  # noqa: PLC0415 - pydantic stays out of gpus()

        gpus = self.gpus()
        if not gpus:
            return []
        with self._translated("discovering devices"):
            whole = [g for g in gpus if not g.mig]
            links = self._pair_scores([self._nvml.nvmlDeviceGetHandleByIndex(g.index) for g in whole],
                                      [g.uuid for g in whole])
        by_uuid = {g.uuid: links[i] for i, g in enumerate(whole)}
        devices = [
            Device(uuid=g.uuid, index=n, vendor="NVIDIA", model=g.name, memory_mib=g.memory_mib, numa=g.numa,
                   links=by_uuid.get(g.uuid, {}), mode=DeviceMode.MIG if g.mig else DeviceMode.SHARED,
                   cores=g.sm_share, isolation=g.isolation, whole_isolation=g.whole_isolation)
            for n, g in enumerate(gpus)
        ]
        self._devices = devices
        return list(devices)

    def _mig_enabled(self, handle: Any) -> bool:
        modes = self._optional("nvmlDeviceGetMigMode", handle)
        return modes is not None and modes[0] == getattr(self._nvml, "NVML_DEVICE_MIG_ENABLE", 1)

    def _capability(self, handle: Any) -> tuple[int, int] | None:
        cc = self._optional("nvmlDeviceGetCudaComputeCapability", handle)
        return (int(cc[0]), int(cc[1])) if cc is not None else None

    def _mig_instances(self, parent: Any, base: GpuInfo) -> list[GpuInfo]:
        """The MIG instances of a GPU in MIG mode; empty slots are skipped. The layout is read, never changed."""
        nv = self._nvml
        attrs = self._optional("nvmlDeviceGetAttributes", parent)
        parent_sms = int(attrs.multiprocessorCount) if attrs is not None and attrs.multiprocessorCount else 0
        out = []
        for slot in range(int(self._optional("nvmlDeviceGetMaxMigDeviceCount", parent) or 0)):
            mig = self._optional("nvmlDeviceGetMigDeviceHandleByIndex", parent, slot)
            if mig is None:
                continue  # NVML_ERROR_NOT_FOUND: an empty slot
            info = self._optional("nvmlDeviceGetAttributes", mig)
            if parent_sms and info is not None:
                share = round(100 * int(info.multiprocessorCount) / parent_sms)
            elif info is not None:
                share = round(100 * int(info.gpuInstanceSliceCount) / MIG_GPU_SLICES)
            else:
                share = 100 // MIG_GPU_SLICES
            out.append(GpuInfo(uuid=_text(nv.nvmlDeviceGetUUID(mig)), index=base.index, name=_text(nv.nvmlDeviceGetName(mig)),
                               memory_mib=int(nv.nvmlDeviceGetMemoryInfo(mig).total) // MIB, numa=base.numa,
                               bus=base.bus, mig=True, parent_uuid=base.uuid, parent_index=base.index, slot=slot,
                               sm_share=max(1, min(100, share)), capability=base.capability,
                               isolation=Isolation.MIG, whole_isolation=Isolation.MIG))
        return out

    # --- isolation grades --------------------------------------------------------------------
    def _fallback(self) -> tuple[Isolation, str | None]:
        """The grade of a whole GPU without MPS, and why it is not stronger."""
        cfg = self._isolation
        if cfg.setting == Isolation.WATCHDOG.value:
            return Isolation.WATCHDOG, "the node's isolation setting is watchdog"
        if cfg.libvgpu() is not None:
            return Isolation.HAMI_CORE, None
        return Isolation.WATCHDOG, f"HAMi-core is not installed ({cfg.libvgpu_path or 'no libvgpu.so path set'})"

    def mps_refusal(self, gpu: GpuInfo) -> str | None:
        """Why MPS cannot serve this GPU, or None. Reads settings and NVML only; changes nothing."""
        if gpu.mig:
            return "a MIG instance (isolated by the GPU itself)"
        if self._isolation.setting not in (AUTO, Isolation.MPS.value):
            return f"the node's isolation setting is {self._isolation.setting}"
        mode = gpu.compute_mode
        if mode is not None and mode != 0:
            return (f"compute mode {COMPUTE_MODES.get(mode, mode)}: MPS would take the GPU from slices "
                    "outside it (hami-ray never changes compute modes)")
        if gpu.capability is not None and gpu.capability[0] < MPS_MIN_MAJOR:
            return f"compute capability {gpu.capability[0]}.{gpu.capability[1]}: MPS limits need Volta (7.0) or newer"
        cuda = self._optional("nvmlSystemGetCudaDriverVersion")
        if cuda is not None and int(cuda) < MPS_MIN_CUDA:
            return f"the driver supports CUDA {int(cuda) // 1000}.{int(cuda) % 1000 // 10}: MPS memory limits need 11.5"
        return None

    def _grade(self, gpus: list[GpuInfo]) -> list[GpuInfo]:
        fallback, why_not_hami = self._fallback()
        refusals = {g.uuid: self.mps_refusal(g) for g in gpus}
        eligible = [g.uuid for g in gpus if refusals[g.uuid] is None]
        if eligible and self._mps is None and self._mps_reason is None:
            daemon = MpsDaemon(self._isolation.state_dir, control=self._isolation.mps_control, devices=eligible)
            reason = daemon.available()
            if reason is None:
                try:
                    daemon.start()
                    self._mps = daemon
                except MpsError as exc:
                    reason = f"the MPS daemon did not start: {exc}"
            self._mps_reason = reason
        out = []
        for g in gpus:
            if g.mig:
                out.append(g)
                continue
            refusal = refusals[g.uuid] or (self._mps_reason if self._mps is None else None)
            if refusal is None:
                out.append(_replace(g, isolation=Isolation.MPS, whole_isolation=fallback, note=why_not_hami))
            else:
                note = f"no mps: {refusal}" + (f"; no hami-core: {why_not_hami}" if why_not_hami else "")
                out.append(_replace(g, isolation=fallback, whole_isolation=None, note=note))
        return out

    def isolation_report(self) -> IsolationReport:
        """The node's best grade, each device's grade and note, and the MPS daemon's state."""
        mps = self._mps.state() if self._mps is not None else None
        return IsolationReport(
            best=strongest(g.isolation for g in self._gpus),
            devices=tuple((g.uuid, g.isolation, g.note) for g in self._gpus),
            mps=None if mps is None else {"running": mps.running, "pid": mps.pid, "restarts": mps.restarts,
                                           "reason": mps.reason},
            mps_reason=self._mps_reason, host_pids=True)

    def maintain(self) -> Maintenance:
        """Health-check the MPS daemon: restart it if it died (the caller marks the slices it served); if it
        cannot be restarted, MPS devices fall back to their next grade (``changed``).

        Raises nothing: a failed restart is reported in the answer and the isolation report.
        """
        if self._mps is None:
            return Maintenance()
        try:
            restarted = self._mps.check()
        except MpsError as exc:
            log.error("MPS daemon could not be restarted: %s; slices fall back to %s", exc, self._fallback()[0])
            self._mps.stop()
            self._mps = None
            self._mps_reason = f"the MPS daemon died and could not be restarted: {exc}"
            self._gpus = self._grade(self._gpus)
            self._by_uuid = {g.uuid: g for g in self._gpus}
            self._devices = [d.model_copy(update={"isolation": self._by_uuid[d.uuid].isolation,
                                                  "whole_isolation": self._by_uuid[d.uuid].whole_isolation})
                             for d in self._devices]
            return Maintenance(restarted=False, changed=True, note=self._mps_reason,
                               grades=tuple((g.uuid, g.isolation, g.whole_isolation) for g in self._gpus))
        return Maintenance(restarted=restarted, changed=False,
                           note="the MPS daemon died and was restarted" if restarted else None)


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
        """Pair scores between whole GPUs (MIG instances have none: no peer access between instances)."""
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
    def _handle(self, gpu: GpuInfo) -> Any:
        """The NVML handle of a device now: MIG handles die with their instance and may be reused, so an
        instance is looked up again under its parent and its uuid checked.

        Raises:
            NVMLError: the device (or instance) is gone or does not answer.
        """
        nv = self._nvml
        handle = nv.nvmlDeviceGetHandleByIndex(gpu.parent_index if gpu.mig else gpu.index)
        if gpu.mig:
            handle = nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, gpu.slot)
        return handle

    def health(self) -> dict[str, bool]:
        """A device is healthy while NVML still finds it where it was, with its uuid, and answers."""
        out: dict[str, bool] = {}
        if not self._ready:
            return out
        nv = self._nvml
        for gpu in self._gpus:
            try:
                handle = self._handle(gpu)
                nv.nvmlDeviceGetMemoryInfo(handle)
                out[gpu.uuid] = _text(nv.nvmlDeviceGetUUID(handle)) == gpu.uuid
            except nv.NVMLError:
                out[gpu.uuid] = False
        return out

    def usage(self) -> UsageSample:
        """Used memory and utilisation per device, and used memory per compute process (MPS clients
        included). The pids are host pids (NVML ignores PID namespaces: nvidia-docker #1483).

        Raises:
            DeviceError: NVML failed while sampling.
        """
        if not self._ready:
            return UsageSample()
        nv = self._nvml
        devices: list[DeviceSample] = []
        processes: list[ProcessSample] = []
        with self._translated("sampling usage"):
            for gpu in self._gpus:
                handle = self._handle(gpu)
                used = int(nv.nvmlDeviceGetMemoryInfo(handle).used) // MIB
                rates = self._optional("nvmlDeviceGetUtilizationRates", handle)  # not on MIG devices
                devices.append(DeviceSample(gpu.uuid, used, int(rates.gpu) if rates is not None else 0))
                per_pid: dict[int, int] = {}
                listed = list(nv.nvmlDeviceGetComputeRunningProcesses(handle))
                if self._mps is not None:  # MPS clients are listed here too on some drivers
                    listed += list(self._optional("nvmlDeviceGetMPSComputeRunningProcesses", handle) or [])
                for proc in listed:
                    if proc.usedGpuMemory is not None:  # None: the driver cannot tell (unknown, never 0)
                        pid = int(proc.pid)
                        per_pid[pid] = max(per_pid.get(pid, 0), int(proc.usedGpuMemory) // MIB)
                processes.extend(ProcessSample(gpu.uuid, pid, mib) for pid, mib in sorted(per_pid.items()))
        return UsageSample(devices=tuple(devices), processes=tuple(processes))

    def mps_env(self) -> dict[str, str] | None:
        """The MPS daemon's client variables while it runs, else None."""
        return self._mps.client_env() if self._mps is not None else None

    def isolation_env(self, devices: Sequence[DeviceGrant], region: str) -> dict[str, str]:
        return build_env(devices, self._by_uuid, region, self._isolation, self.mps_env())

    def close(self) -> None:
        """Stop the MPS daemon and shut NVML down (once)."""
        if self._mps is not None:
            try:
                self._mps.stop()
            finally:
                self._mps = None
        if not self._ready:
            return
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as exc:
            log.warning("nvmlShutdown failed: %s", exc)
        finally:
            self._ready = False


def _replace(gpu: GpuInfo, **changes: Any) -> GpuInfo:
    return dataclasses.replace(gpu, **changes)
