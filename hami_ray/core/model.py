"""The data model of hami-ray: devices, nodes, slice requests, allocations, leases, snapshots.

Every layer speaks these pydantic models (frozen: they are values). The ledger keeps its own mutable
usage counters and hands out these values; the Ray runtime and the Kubernetes bridge send them over
the wire as JSON.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hami_ray.core.grades import Isolation
from hami_ray.core.names import DevicePolicyName, NodePolicyName

DEFAULT_SPLIT_COUNT = 10  # HAMi's deviceSplitCount: at most this many slices per device
DEFAULT_MEMORY_SCALING = 1.0  # HAMi's deviceMemoryScaling (> 1 oversubscribes)
DEFAULT_CORE_SCALING = 1.0  # HAMi's deviceCoreScaling
FULL_CORES = 100  # one whole device, in percent
DEFAULT_VENDOR = "NVIDIA"
DEFAULT_QUEUE = "default"  # the team queue of work that names none (hami_ray.core.queues, issue 14)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeviceMode(StrEnum):
    SHARED = "shared"  # sliced by memory and cores
    EXCLUSIVE = "exclusive"  # whole device only
    MIG = "mig"  # a MIG instance: handed out whole, never sliced (its parent GPU is not offered at all)


class Device(_Frozen):
    """One physical accelerator as discovered by a backend.

    ``links`` maps a peer uuid to a pair score (HAMi's ``calculate_score.go`` scale: cross-CPU 10 ..
    NVLink 100 per link). ``isolation`` is the grade a shared slice of this device holds;
    ``whole_isolation`` the grade of a whole-device (100-core) slice, which does not go through MPS
    (None: the same as ``isolation``). A MIG instance's cores are its share of its parent's SMs.
    """

    uuid: str
    index: int = Field(ge=0)
    vendor: str = DEFAULT_VENDOR
    model: str
    memory_mib: int = Field(gt=0)
    cores: int = Field(default=FULL_CORES, gt=0)
    numa: int = 0
    healthy: bool = True
    links: dict[str, int] = Field(default_factory=dict)
    mode: DeviceMode = DeviceMode.SHARED
    split_count: int = Field(default=DEFAULT_SPLIT_COUNT, ge=1)
    memory_scaling: float = Field(default=DEFAULT_MEMORY_SCALING, gt=0)
    core_scaling: float = Field(default=DEFAULT_CORE_SCALING, gt=0)
    isolation: Isolation = Isolation.NONE
    whole_isolation: Isolation | None = None

    def grade_for(self, cores: int) -> Isolation:
        """The grade a slice of ``cores`` percent holds on this device.

        Example: an MPS device with ``whole_isolation="watchdog"`` gives ``mps`` for 30 cores and
        ``watchdog`` for 100.
        """
        if self.mode is DeviceMode.MIG or cores < FULL_CORES or self.whole_isolation is None:
            return self.isolation
        return self.whole_isolation

    @property
    def memory_capacity_mib(self) -> int:
        """Schedulable memory: physical x ``memory_scaling`` (HAMi registers ``devmem`` scaled)."""
        return int(self.memory_mib * self.memory_scaling)

    @property
    def core_capacity(self) -> int:
        return int(self.cores * self.core_scaling)

    @property
    def slice_capacity(self) -> int:
        return 1 if self.mode in (DeviceMode.EXCLUSIVE, DeviceMode.MIG) else self.split_count


K8S_NODE_LABEL = "hami-ray.io/k8s-node"  # a Ray node's Kubernetes node (pods placed there bind to it)


class Node(_Frozen):
    """A host with devices. ``cpu_milli``/``memory_mib`` of 0 mean "not tracked"."""

    name: str
    devices: tuple[Device, ...] = ()
    cpu_milli: int = Field(default=0, ge=0)
    memory_mib: int = Field(default=0, ge=0)
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique_devices(self) -> Node:
        uuids = [d.uuid for d in self.devices]
        if len(set(uuids)) != len(uuids):
            raise ValueError(f"node {self.name}: duplicate device uuids")
        return self


class SliceRequest(_Frozen):
    """What one workload (a Ray task, an actor, a container) asks for, per device.

    Memory is either ``memory_mib`` or ``memory_percent`` (of the device, resolved once it is
    chosen); neither means the whole device, as HAMi's default. ``cores`` is percent of a device;
    100 makes the slice exclusive. ``priority``: larger is served first from the queue.
    ``task_priority`` is HAMi's ``nvidia.com/priority`` (0 high, 1 low), handed to HAMi-core.
    ``isolation``: the weakest grade the slice may hold (None: any). ``queue``: the team queue it is
    served from (:mod:`hami_ray.core.queues`); ``preemptible=False`` opts the slice out of being
    preempted for other work. Neither changes where it fits, so neither is part of :meth:`shape`.
    """

    vendor: str = DEFAULT_VENDOR
    count: int = Field(default=1, ge=0)
    memory_mib: int | None = Field(default=None, gt=0)
    memory_percent: float | None = Field(default=None, gt=0, le=100)
    cores: int = Field(default=0, ge=0, le=100)
    cpu_milli: int = Field(default=0, ge=0)
    host_memory_mib: int = Field(default=0, ge=0)
    include_types: tuple[str, ...] = ()
    exclude_types: tuple[str, ...] = ()
    include_uuids: tuple[str, ...] = ()
    exclude_uuids: tuple[str, ...] = ()
    numa_bind: bool = False
    priority: int = 0
    task_priority: int | None = None
    node_policy: NodePolicyName | None = None
    device_policy: DevicePolicyName | None = None
    isolation: Isolation | None = None
    queue: str = DEFAULT_QUEUE
    preemptible: bool = True

    @model_validator(mode="after")
    def _one_memory_form(self) -> SliceRequest:
        if self.memory_mib is not None and self.memory_percent is not None:
            raise ValueError("give memory in MiB or as a percent, not both")
        return self

    @property
    def exclusive(self) -> bool:
        return self.cores >= FULL_CORES

    def memory_on(self, device_capacity_mib: int) -> int:
        """MiB this request takes on a device of that (scaled) capacity; rounds down like HAMi."""
        if self.memory_mib is not None:
            return self.memory_mib
        percent = 100.0 if self.memory_percent is None else self.memory_percent
        return int(device_capacity_mib * percent / 100)

    def describe(self) -> str:
        """Short and human: ``"1 GPU x 4096 MiB, 25 % cores, A100"``."""
        if self.memory_mib is not None:
            memory = f"{self.memory_mib} MiB"
        elif self.memory_percent is not None:
            memory = f"{self.memory_percent:g} % memory"
        else:
            memory = "whole"
        kind = "GPU" if self.vendor == DEFAULT_VENDOR else f"{self.vendor} device"
        parts = [f"{self.count} {kind} x {memory}"]
        if self.cores:
            parts.append(f"{self.cores} % cores")
        if self.include_types:
            parts.append("/".join(self.include_types))
        if self.isolation is not None:
            parts.append(f"isolation >= {self.isolation.value}")
        return ", ".join(parts)

    def shape(self) -> tuple[object, ...]:
        """A hashable key of everything placement depends on (caches and the FGD workload use it)."""
        return (
            self.vendor, self.count, self.memory_mib, self.memory_percent, self.cores, self.cpu_milli,
            self.host_memory_mib, self.include_types, self.exclude_types, self.include_uuids,
            self.exclude_uuids, self.numa_bind, self.isolation,
        )


class DeviceGrant(_Frozen):
    """One device's part of an allocation."""

    uuid: str
    memory_mib: int = Field(ge=0)
    cores: int = Field(ge=0, le=100)


Slices = Annotated[tuple[tuple[DeviceGrant, ...], ...], Field(min_length=1)]


class Allocation(_Frozen):
    """A node and, per slice (one per container; one for a Ray task), the devices it holds."""

    node: str
    slices: Slices
    cpu_milli: int = Field(default=0, ge=0)
    host_memory_mib: int = Field(default=0, ge=0)

    @property
    def devices(self) -> tuple[DeviceGrant, ...]:
        return tuple(g for s in self.slices for g in s)


class LeaseState(StrEnum):
    RESERVED = "reserved"
    ACTIVE = "active"
    RELEASED = "released"
    LOST = "lost"


class Lease(_Frozen):
    """An allocation held by an owner, released by presenting ``token``.

    ``holder``: ``"process"`` (a Ray task or actor: freed when its processes die or never come),
    ``"pod"`` (a Kubernetes pod: held until the bridge frees it, when the pod is gone or finished), or
    ``"driver"`` (a driver's ``hami_ray.lease()``: held while the Ray ``job`` it belongs to lives; the driver
    may run on another host, so its pid is never checked by the slice's node). ``queue`` and
    ``preemptible`` come from the request (:mod:`hami_ray.core.queues` accounts and preempts by them);
    snapshots written before they existed load with the defaults.
    """

    lease_id: str
    owner: str
    allocation: Allocation
    token: str
    state: LeaseState = LeaseState.RESERVED
    pids: tuple[int, ...] = ()
    pid_starts: dict[int, int] = Field(default_factory=dict)  # pid -> start time (clock ticks): the same process
    priority: int = 0
    created_at: float = 0.0
    holder: Literal["process", "pod", "driver"] = "process"
    job: str = ""  # the Ray job (hex id) of a "driver" holder
    queue: str = DEFAULT_QUEUE
    preemptible: bool = True


class ClusterSnapshot(_Frozen):
    """Nodes and live leases: enough to restore a ledger exactly (``Ledger.restore``)."""

    version: int = 1
    nodes: tuple[Node, ...] = ()
    leases: tuple[Lease, ...] = ()
