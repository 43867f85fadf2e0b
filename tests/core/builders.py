"""Small builders for core tests, in the style of Kubernetes' ``st.MakePod()`` test wrappers.

    node = make_node("n1").gpus(4, mem="80GiB", model="A100").cpu(64).build()
    ledger = Ledger([node])
    lease = hold(ledger, "n1", ("GPU-n1-0", 8192, 30))          # a raw grant
    lease = allocate(ledger, Scheduler(ledger).place(request))   # a scheduler placement

Device uuids are ``GPU-<node>-<index>`` so that tests can name them without looking them up. Memory
sizes are parsed here with a tiny parser of our own (``"80GiB"``, ``"512MiB"``, an int of MiB), so a
bug in :mod:`hami_ray.core.units` cannot hide behind the builders.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Self

from hami_ray.core.ledger import Ledger
from hami_ray.core.model import (
    DEFAULT_SPLIT_COUNT,
    DEFAULT_VENDOR,
    Allocation,
    Device,
    DeviceGrant,
    DeviceMode,
    Lease,
    LeaseState,
    Node,
)

_SIZE = re.compile(r"^(\d+)(GiB|MiB)$")
_ids = itertools.count(1)


def mib(size: int | str) -> int:
    """``"80GiB"`` -> 81920, ``"512MiB"`` -> 512, ``4096`` -> 4096 (test-only, independent of units.py)."""
    if isinstance(size, int):
        return size
    match = _SIZE.match(size)
    if match is None:
        raise ValueError(f"builder size must look like '80GiB' or '512MiB', got {size!r}")
    number, unit = int(match.group(1)), match.group(2)
    return number * 1024 if unit == "GiB" else number


def uuid_of(node: str, index: int) -> str:
    return f"GPU-{node}-{index}"


class NodeBuilder:
    """Accumulates devices and host capacity; :meth:`build` returns a frozen :class:`Node`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._devices: list[dict[str, object]] = []
        self._links: dict[int, dict[int, int]] = {}
        self._cpu_milli = 0
        self._memory_mib = 0
        self._labels: dict[str, str] = {}

    def gpus(
        self,
        count: int,
        mem: int | str = "80GiB",
        model: str = "A100",
        *,
        vendor: str = DEFAULT_VENDOR,
        cores: int = 100,
        numa: int = 0,
        split: int = DEFAULT_SPLIT_COUNT,
        memory_scaling: float = 1.0,
        core_scaling: float = 1.0,
        healthy: bool = True,
        mode: DeviceMode = DeviceMode.SHARED,
        isolation: str = "none",
        whole_isolation: str | None = None,
    ) -> Self:
        """Append ``count`` identical devices (call again for a mixed node)."""
        for _ in range(count):
            self._devices.append({
                "vendor": vendor, "model": model, "memory_mib": mib(mem), "cores": cores, "numa": numa,
                "split_count": split, "memory_scaling": memory_scaling, "core_scaling": core_scaling,
                "healthy": healthy, "mode": mode, "isolation": isolation, "whole_isolation": whole_isolation,
            })
        return self

    def cpu(self, cores: int) -> Self:
        """Host CPU capacity in whole cores (stored as milli)."""
        self._cpu_milli = cores * 1000
        return self

    def memory(self, size: int | str) -> Self:
        """Host memory capacity."""
        self._memory_mib = mib(size)
        return self

    def link(self, a: int, b: int, score: int) -> Self:
        """A symmetric pair score between devices ``a`` and ``b`` (NVLink 100, cross-CPU 10)."""
        self._links.setdefault(a, {})[b] = score
        self._links.setdefault(b, {})[a] = score
        return self

    def unhealthy(self, *indexes: int) -> Self:
        for i in indexes:
            self._devices[i]["healthy"] = False
        return self

    def label(self, key: str, value: str) -> Self:
        self._labels[key] = value
        return self

    def build(self) -> Node:
        devices = []
        for i, spec in enumerate(self._devices):
            links = {uuid_of(self.name, j): s for j, s in sorted(self._links.get(i, {}).items())}
            devices.append(Device.model_validate({"uuid": uuid_of(self.name, i), "index": i, "links": links,
                                                  **spec}))
        return Node(name=self.name, devices=tuple(devices), cpu_milli=self._cpu_milli,
                    memory_mib=self._memory_mib, labels=dict(self._labels))


def make_node(name: str) -> NodeBuilder:
    return NodeBuilder(name)


def lease_of(allocation: Allocation, *, lease_id: str | None = None, owner: str = "test",
             token: str | None = None, created_at: float | None = None,
             state: LeaseState = LeaseState.RESERVED) -> Lease:
    """A lease around an allocation, with fresh id and token unless given."""
    n = next(_ids)
    return Lease(lease_id=lease_id or f"lease-{n}", owner=owner, allocation=allocation,
                 token=token or f"token-{n}", created_at=float(n) if created_at is None else created_at,
                 state=state)


def allocate(ledger: Ledger, allocation: Allocation, **kw: object) -> Lease:
    """Record ``allocation`` (e.g. from ``Scheduler.place``) in ``ledger`` as a lease; returns it."""
    return ledger.allocate(lease_of(allocation, **kw))  # type: ignore[arg-type]


def grants(*specs: tuple[str, int, int]) -> tuple[DeviceGrant, ...]:
    return tuple(DeviceGrant(uuid=u, memory_mib=m, cores=c) for u, m, c in specs)


def raw_allocation(node: str, *specs: tuple[str, int, int], cpu_milli: int = 0, host_memory_mib: int = 0,
                   slices: Sequence[Sequence[tuple[str, int, int]]] | None = None) -> Allocation:
    """An allocation of one slice made of ``(uuid, memory_mib, cores)`` grants, or of several ``slices``."""
    parts = tuple(grants(*s) for s in slices) if slices is not None else (grants(*specs),)
    return Allocation(node=node, slices=parts, cpu_milli=cpu_milli, host_memory_mib=host_memory_mib)


def hold(ledger: Ledger, node: str, *specs: tuple[str, int, int], cpu_milli: int = 0,
         host_memory_mib: int = 0, **kw: object) -> Lease:
    """Allocate raw grants on ``node`` (to set up a used cluster without the scheduler)."""
    alloc = raw_allocation(node, *specs, cpu_milli=cpu_milli, host_memory_mib=host_memory_mib)
    return allocate(ledger, alloc, **kw)
