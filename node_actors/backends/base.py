"""The device backend protocol: what a node actor needs from a vendor's devices, and no more.

A backend is an instance configured through its constructor (the NVML library, a simulation spec, the
isolation settings) that answers these questions: which devices are here (:meth:`DeviceBackend.discover`),
are they healthy (:meth:`~DeviceBackend.health`), how much memory and compute are used, per device and per
process (:meth:`~DeviceBackend.usage`), which environment variables isolate a slice
(:meth:`~DeviceBackend.isolation_env`), how strongly do slices hold and is that still so
(:meth:`~DeviceBackend.isolation_report`, :meth:`~DeviceBackend.maintain`), and release what you hold
(:meth:`~DeviceBackend.close`). It is
modelled on httpx's one-method transport, not on HAMi's 13-method ``Devices`` interface (STYLE, Device
backends). Backends return environment variables as data and never write ``os.environ``.

Implemented by :mod:`node_actors.backends.nvidia`, :mod:`node_actors.backends.simulated` and
:mod:`node_actors.backends.empty`; called by :class:`node_actors.agent.NodeAgent`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from hami_ray.core.grades import Isolation

if TYPE_CHECKING:
    from hami_ray.core.model import Device, DeviceGrant


@dataclass(frozen=True, slots=True)
class DeviceSample:
    """Used memory and compute of one device at one moment."""

    uuid: str
    used_mib: int
    utilization: int  # percent of the device's compute, 0-100


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """Device memory one process holds on one device."""

    uuid: str
    pid: int
    used_mib: int


@dataclass(frozen=True, slots=True)
class UsageSample:
    """What a backend saw in one :meth:`DeviceBackend.usage` call."""

    devices: tuple[DeviceSample, ...] = ()
    processes: tuple[ProcessSample, ...] = ()

    def device(self, uuid: str) -> DeviceSample | None:
        """The sample of one device, or None when the backend did not report it."""
        return next((d for d in self.devices if d.uuid == uuid), None)

    def per_process(self, uuid: str) -> dict[int, int]:
        """Used MiB by pid on one device.

        Example: ``sample.per_process("GPU-0") == {4242: 9000}``.
        """
        out: dict[int, int] = {}
        for p in self.processes:
            if p.uuid == uuid:
                out[p.pid] = out.get(p.pid, 0) + p.used_mib
        return out


@dataclass(frozen=True, slots=True)
class IsolationReport:
    """How a node's devices are isolated: what status shows per node and per device.

    ``devices``: (uuid, grade of a shared slice, why not stronger or None). ``host_pids``: the backend's
    per-process samples name host (initial PID namespace) pids, as NVML's do; the simulated backend's
    name pids as the reporting process saw them.
    """

    best: Isolation = Isolation.NONE
    devices: tuple[tuple[str, Isolation, str | None], ...] = ()
    mps: dict[str, Any] | None = None
    mps_reason: str | None = None
    host_pids: bool = False


@dataclass(frozen=True, slots=True)
class Maintenance:
    """What one :meth:`DeviceBackend.maintain` pass did: ``restarted`` the MPS daemon (its slices are
    marked), ``changed`` device grades (the node's inventory must be updated), with a ``note``."""

    restarted: bool = False
    changed: bool = False
    note: str | None = None
    grades: tuple[tuple[str, Isolation, Isolation | None], ...] = ()  # when changed: (uuid, shared, whole)


@runtime_checkable
class DeviceBackend(Protocol):
    """What a node actor asks of a device backend."""

    def discover(self) -> list[Device]:
        """The devices of this node, in index order; empty when the vendor library is missing.

        Raises:
            DeviceError: the library loaded but failed while listing devices.
        """
        ...

    def health(self) -> dict[str, bool]:
        """Health by device uuid (a device that stopped answering is unhealthy)."""
        ...

    def usage(self) -> UsageSample:
        """Used memory and utilisation per device, and used memory per process per device.

        Raises:
            DeviceError: the vendor library failed while sampling.
        """
        ...

    def isolation_env(self, devices: Sequence[DeviceGrant], region: str) -> dict[str, str]:
        """Environment variables that confine a process to ``devices`` (DESIGN, Isolation 1-4).

        ``region`` names the slice's shared accounting region (HAMi-core's cache file). It is built by
        the node agent from stable slice facts, never from a lease id or token: Ray reuses workers per
        identical ``runtime_env``, so per-lease data must stay out of the environment.

        Raises:
            InvalidRequest: a grant names a device this backend does not have.
        """
        ...

    def isolation_report(self) -> IsolationReport:
        """The node's grades and the state of what enforces them (for status and metrics)."""
        ...

    def maintain(self) -> Maintenance:
        """Keep isolation running (health-check the MPS daemon); called on every tick. Never raises for
        a failure it can report."""
        ...

    def close(self) -> None:
        """Release the vendor library and stop what isolation started; the backend is unusable afterwards.
        Idempotent."""
        ...
