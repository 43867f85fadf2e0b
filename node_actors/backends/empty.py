"""The backend of a node without accelerators: no devices, no usage, visibility hidden.

Chosen by :func:`node_actors.backends.detect_backend` when neither NVML nor a simulation spec gives
devices, so a CPU-only node still runs a node actor (it serves host CPU and memory leases).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hami_ray.core.errors import InvalidRequest
from node_actors.backends.base import IsolationReport, Maintenance, UsageSample

if TYPE_CHECKING:
    from hami_ray.core.model import Device, DeviceGrant


class EmptyBackend:
    """A backend with no devices."""

    def discover(self) -> list[Device]:
        return []

    def health(self) -> dict[str, bool]:
        return {}

    def usage(self) -> UsageSample:
        return UsageSample()

    def isolation_env(self, devices: Sequence[DeviceGrant], region: str) -> dict[str, str]:
        """Hide every CUDA device; a grant here is a caller's bug.

        Raises:
            InvalidRequest: ``devices`` is not empty.
        """
        if devices:
            raise InvalidRequest("devices", f"device {devices[0].uuid} is not on this node (it has none)")
        return {"CUDA_VISIBLE_DEVICES": ""}

    def isolation_report(self) -> IsolationReport:
        """Grade ``none``: nothing real to isolate."""
        return IsolationReport()

    def maintain(self) -> Maintenance:
        """Nothing to keep running."""
        return Maintenance()

    def close(self) -> None:
        """Nothing to release."""
