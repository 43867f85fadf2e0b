"""A first-class simulated device backend, as httpx ships ``MockTransport``.

``SimulatedBackend(spec="4xA100-80GB,2xT4-16GB", node_name="n1", state_dir=...)`` pretends to own six
GPUs: uuids ``GPU-sim-n1-0`` .. ``-5``, the first half on NUMA node 0 and the rest on 1, NVLink-style
pair scores between devices of the same model. Memory in a model name is a marketing size, taken as
GiB (``80GB`` is 81920 MiB). Processes report what they "use" through
:mod:`node_actors.simulated_usage`, so enforcement and status work end to end without a GPU.

Chosen by :func:`node_actors.backends.detect_backend` when ``HAMI_RAY_SIMULATE`` holds a spec; used by
tests, demos and CI.

A stand-in for NVML failing: while the file ``<state_dir>/sim-faults/usage-error`` exists, sampling
raises :class:`DeviceError` with its text (as the NVIDIA backend translates an ``NVMLError``), so the
node actor's handling of a failing device library can be exercised without one (``bench/chaos.py``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from hami_ray.core.errors import DeviceError, InvalidRequest
from hami_ray.core.grades import Isolation
from hami_ray.core.model import Device, DeviceGrant
from node_actors import simulated_usage
from node_actors.backends.base import DeviceSample, IsolationReport, Maintenance, ProcessSample, UsageSample
from node_actors.isolation import IsolationConfig, build_env

SIMULATE_ENV = "HAMI_RAY_SIMULATE"
FAULTS_DIR = "sim-faults"
USAGE_ERROR = "usage-error"  # in FAULTS_DIR: while it exists, usage() raises DeviceError with its text
NVLINK_SCORE = 100  # one NVLink (hami.md §2.4 pair scores)
SAME_CPU_SCORE = 20
CROSS_CPU_SCORE = 10

_ITEM = re.compile(r"^(?:(\d+)\s*[xX]\s*)?([A-Za-z0-9][A-Za-z0-9_.]*(?:-[A-Za-z0-9_.]+)*?-(\d+)GB)$", re.I)


def parse_spec(spec: str) -> list[tuple[str, int]]:
    """Parse ``"4xA100-80GB,2xT4-16GB"`` into one ``(model, memory MiB)`` per device.

    A count of 1 may be left out (``"T4-16GB"``). Sizes are GiB: ``A100-80GB`` is 81920 MiB.

    Raises:
        InvalidRequest: naming ``HAMI_RAY_SIMULATE``, for an empty spec, a malformed item, a zero
            count or a zero size.

    Example: ``parse_spec("2xT4-16GB") == [("T4-16GB", 16384), ("T4-16GB", 16384)]``.
    """
    items = [part.strip() for part in spec.split(",")]
    if not any(items):
        raise InvalidRequest(SIMULATE_ENV, "empty device spec; expected e.g. '4xA100-80GB,2xT4-16GB'")
    out: list[tuple[str, int]] = []
    for item in items:
        match = _ITEM.match(item)
        if match is None:
            raise InvalidRequest(
                SIMULATE_ENV, f"cannot read {item!r}; expected <count>x<model>-<GiB>GB, e.g. '4xA100-80GB'")
        count = int(match.group(1) or 1)
        model, gib = match.group(2), int(match.group(3))
        if count < 1 or gib < 1:
            raise InvalidRequest(SIMULATE_ENV, f"{item!r}: count and memory must be at least 1")
        out.extend([(model, gib * 1024)] * count)
    return out


def simulated_devices(spec: str, node_name: str) -> list[Device]:
    """The devices a spec describes on one node (stable uuids ``GPU-sim-<node>-<i>``)."""
    parsed = parse_spec(spec)
    half = (len(parsed) + 1) // 2
    uuids = [f"GPU-sim-{node_name}-{i}" for i in range(len(parsed))]
    numa = [0 if i < half else 1 for i in range(len(parsed))]
    devices = []
    for i, (model, mib) in enumerate(parsed):
        links = {}
        for j, (peer_model, _) in enumerate(parsed):
            if j == i:
                continue
            if peer_model == model:
                links[uuids[j]] = NVLINK_SCORE
            else:
                links[uuids[j]] = SAME_CPU_SCORE if numa[i] == numa[j] else CROSS_CPU_SCORE
        devices.append(Device(uuid=uuids[i], index=i, model=model, memory_mib=mib, numa=numa[i], links=links))
    return devices


class SimulatedBackend:
    """Devices that exist only on paper, with usage reported by processes through files."""

    def __init__(self, spec: str, node_name: str, state_dir: str | os.PathLike[str], *,
                 isolation: IsolationConfig | None = None, grade: Isolation = Isolation.NONE) -> None:
        """Parse ``spec`` now, so a bad ``HAMI_RAY_SIMULATE`` fails at start-up. ``grade``: the isolation
        grade the devices claim (``none``: nothing real is isolated; tests pretend others).

        Raises:
            InvalidRequest: the spec is malformed.
        """
        self.state_dir = Path(state_dir)
        self._grade = grade
        self._devices = [d.model_copy(update={"isolation": grade}) for d in simulated_devices(spec, node_name)]
        self._by_uuid = {d.uuid: d for d in self._devices}
        self._healthy = {d.uuid: True for d in self._devices}
        self._isolation = isolation or IsolationConfig(state_dir=self.state_dir)

    def discover(self) -> list[Device]:
        return [d.model_copy(update={"healthy": self._healthy[d.uuid]}) for d in self._devices]

    def health(self) -> dict[str, bool]:
        return dict(self._healthy)

    def set_healthy(self, uuid: str, healthy: bool) -> None:
        """Simulate a device failing or recovering (tests, chaos demos)."""
        if uuid not in self._healthy:
            raise KeyError(uuid)
        self._healthy[uuid] = healthy

    def usage(self) -> UsageSample:
        """Sum the live processes' reports per device; reports on unknown devices are ignored.

        Raises:
            DeviceError: the stand-in NVML error file exists (see the module's docstring).
        """
        fault = self.state_dir / FAULTS_DIR / USAGE_ERROR
        if fault.exists():
            try:
                text = fault.read_text().strip()
            except OSError:
                text = ""
            raise DeviceError(text or "simulated NVML error")
        processes: list[ProcessSample] = []
        used = dict.fromkeys(self._by_uuid, 0)
        for pid, body in simulated_usage.read(self.state_dir).items():
            for uuid, mib in sorted(body.items()):
                if uuid in used:
                    used[uuid] += mib
                    processes.append(ProcessSample(uuid=uuid, pid=pid, used_mib=mib))
        devices = tuple(DeviceSample(uuid=u, used_mib=m, utilization=0) for u, m in used.items())
        return UsageSample(devices=devices, processes=tuple(processes))

    def isolation_env(self, devices: Sequence[DeviceGrant], region: str) -> dict[str, str]:
        return build_env(devices, self._by_uuid, region, self._isolation)

    def isolation_report(self) -> IsolationReport:
        """Grade ``none`` (nothing real to isolate) unless a test said otherwise."""
        return IsolationReport(best=self._grade, devices=tuple((d.uuid, self._grade, None) for d in self._devices))

    def maintain(self) -> Maintenance:
        """Nothing to keep running."""
        return Maintenance()

    def close(self) -> None:
        """Nothing to release."""
