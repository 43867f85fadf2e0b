"""The device backend protocol: what a node actor needs from a vendor's devices, and no more.

A backend is an instance configured through its constructor (the NVML library, a simulation spec, the
isolation settings) that answers five questions: which devices are here (:meth:`DeviceBackend.discover`),
are they healthy (:meth:`~DeviceBackend.health`), how much memory and compute are used, per device and per
process (:meth:`~DeviceBackend.usage`), which environment variables isolate a slice
(:meth:`~DeviceBackend.isolation_env`), and release what you hold (:meth:`~DeviceBackend.close`). It is
modelled on httpx's one-method transport, not on HAMi's 13-method ``Devices`` interface (STYLE, Device
backends). Backends return environment variables as data and never write ``os.environ``.

Implemented by :mod:`node_actors.backends.nvidia`, :mod:`node_actors.backends.simulated` and
:mod:`node_actors.backends.empty`; called by :class:`node_actors.agent.NodeAgent`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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


@runtime_checkable
class DeviceBackend(Protocol):
    """The five things a node actor asks of a device backend."""

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

    def close(self) -> None:
        """Release the vendor library; the backend is unusable afterwards. Idempotent."""
        ...
