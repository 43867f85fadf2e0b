"""The policy framework: the view policies read, the per-attempt state, the extension points, the registry.

Shaped like the Kubernetes scheduling framework: a policy implements only the extension points it
needs, as small ``Protocol``s; per-attempt scratch lives in :class:`CycleState`, never on the policy;
a registry maps names to factories and rejects duplicates.

Two kinds of policy:
- a :class:`NodePolicy` scores every candidate node at once (vectorised, 0-100);
- a :class:`DevicePolicy` picks the devices on one node (``select``). A *joint* device policy (the
  FGD paper's family) also scores the node by the devices it would pick, and the scheduler then
  chooses the node by that score; the node policy only breaks ties.

Called by :mod:`hami_ray.core.scheduler`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import numpy.typing as npt

from hami_ray.core.model import FULL_CORES, SliceRequest
from hami_ray.core.names import DevicePolicyName, NodePolicyName

if TYPE_CHECKING:
    from hami_ray.core.index import CapacityIndex

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]
Rows = int | slice | IntArray  # which rows of the index a question is about
ALL = slice(None)  # every row


@dataclass
class CycleState:
    """Scratch data of one placement attempt (Kubernetes' ``CycleState``)."""

    request: SliceRequest
    rng: np.random.Generator
    data: dict[str, object] = field(default_factory=dict)


def _matches(model: str, names: Sequence[str]) -> bool:
    lowered = model.lower()
    return any(n.lower() in lowered for n in names)


class ClusterView:
    """Read-only vectorised questions about the cluster's free capacity, for filters and policies."""

    def __init__(self, index: CapacityIndex, where: Callable[[str], tuple[int, int] | None],
                 links: Callable[[int, int, int], int] | None = None) -> None:
        self.index = index
        self._where = where
        self._links = links
        self._type_masks: dict[tuple[object, ...], BoolArray] = {}

    def pair_score(self, row: int, a: int, b: int) -> int:
        """Link score between two devices of a node (0 when unknown)."""
        return 0 if self._links is None else self._links(row, a, b)

    def model_mask(self, request: SliceRequest) -> BoolArray:
        """Per interned model: vendor matches and ``include_types``/``exclude_types`` pass.

        HAMi's ``CheckType``: case-insensitive substring match against the card model.
        """
        key = (request.vendor, request.include_types, request.exclude_types, len(self.index.models))
        mask = self._type_masks.get(key)
        if mask is None:
            idx = self.index
            mask = np.array([
                vendor.lower() == request.vendor.lower()
                and (not request.include_types or _matches(model, request.include_types))
                and not (request.exclude_types and _matches(model, request.exclude_types))
                for model, vendor in zip(idx.models, idx.model_vendors)
            ] + [False], dtype=bool)  # model_id -1 (no device) maps to the last entry
            if len(self._type_masks) > 256:
                self._type_masks.clear()
            self._type_masks[key] = mask
        return mask

    def vendor_ok(self, request: SliceRequest, rows: Rows = ALL) -> BoolArray:
        """Per device of ``rows`` (every row by default): present and of the request's vendor."""
        idx = self.index
        vend = np.array([v.lower() == request.vendor.lower() for v in idx.model_vendors] + [False], dtype=bool)
        ok: BoolArray = vend[idx.model_id[rows]] & idx.exists[rows]
        return ok

    def type_ok(self, request: SliceRequest, rows: Rows = ALL) -> BoolArray:
        """Per device: the model passes (:meth:`model_mask`) and the slice would hold the request's
        isolation floor there (:meth:`grade_ok`)."""
        idx = self.index
        ok: BoolArray = self.model_mask(request)[idx.model_id[rows]] & idx.exists[rows]
        return ok if request.isolation is None else ok & self.grade_ok(request, rows)

    def grade_ok(self, request: SliceRequest, rows: Rows = ALL) -> BoolArray:
        """Per device: a slice of this request would hold at least its isolation floor."""
        idx = self.index
        floor = 0 if request.isolation is None else request.isolation.rank
        grade = idx.grade_whole if request.cores >= FULL_CORES else idx.grade
        ok: BoolArray = grade[rows] >= floor
        return ok

    def uuid_ok(self, request: SliceRequest, rows: Rows = ALL) -> BoolArray | None:
        """Per device: allowed by ``include_uuids``/``exclude_uuids``; None when unconstrained.

        With ``rows`` (an int, a slice or an array of rows) only those rows, without building the
        whole cluster's mask: a decision reads one row, or the few rows that changed.
        """
        if not request.include_uuids and not request.exclude_uuids:
            return None
        idx = self.index
        if isinstance(rows, slice) and rows == ALL:
            if request.include_uuids:
                mask = np.zeros_like(idx.exists)
                for uuid in request.include_uuids:
                    w = self._where(uuid)
                    if w is not None:
                        mask[w] = True
            else:
                mask = idx.exists.copy()
            for uuid in request.exclude_uuids:
                w = self._where(uuid)
                if w is not None:
                    mask[w] = False
            return mask
        if isinstance(rows, slice):
            picked: IntArray = np.arange(idx.exists.shape[0])[rows]
        else:
            picked = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        where = {int(r): i for i, r in enumerate(picked.tolist())}
        sub = np.zeros((picked.size, idx.width), dtype=bool) if request.include_uuids else idx.exists[picked]
        for uuids, value in ((request.include_uuids, True), (request.exclude_uuids, False)):
            for uuid in uuids:
                w = self._where(uuid)
                if w is not None and w[0] in where:
                    sub[where[w[0]], w[1]] = value
        out: BoolArray = sub[0] if isinstance(rows, int | np.integer) else sub
        return out

    def memory_need(self, request: SliceRequest, rows: Rows = ALL) -> IntArray:
        """MiB the request takes on each device (percent requests resolve per device)."""
        cap = self.index.mem_cap[rows]
        if request.memory_mib is not None:
            return np.full(cap.shape, request.memory_mib, dtype=np.int64)
        pct = 100.0 if request.memory_percent is None else request.memory_percent
        need: IntArray = (cap * pct / 100).astype(np.int64)
        return need

    def device_fit(self, request: SliceRequest, rows: Rows = ALL) -> BoolArray:
        """Per device: one slice of ``request`` fits now (HAMi's per-device ``Fit`` checks).

        ``rows``: only these rows (an int, a slice or an array of rows; every row by default).
        Example: ``view.device_fit(SliceRequest(memory_mib=4096), np.array([3, 7]))`` has shape (2, width).
        """
        idx = self.index
        slot_used = idx.slot_used[rows]
        core_cap, core_used = idx.core_cap[rows], idx.core_used[rows]
        fit = self.type_ok(request, rows) & idx.healthy[rows] & (slot_used < idx.slot_cap[rows]) & ~idx.excl[rows]
        fit &= (idx.mem_cap[rows] - idx.mem_used[rows]) >= self.memory_need(request, rows)
        fit &= (core_cap - core_used) >= request.cores
        if request.cores >= FULL_CORES:
            fit &= slot_used == 0
        elif request.cores == 0:
            fit &= core_used < core_cap  # HAMi's CardComputeUnitsExhausted
        uuid = self.uuid_ok(request, rows)
        if uuid is not None:
            fit &= uuid
        return fit

    def host_fit(self, request: SliceRequest) -> BoolArray:
        """Per node: alive, and CPU and host memory fit where they are tracked."""
        idx = self.index
        ok = idx.alive.copy()
        if request.cpu_milli:
            ok &= (idx.cpu_cap == 0) | (idx.cpu_cap - idx.cpu_used >= request.cpu_milli)
        if request.host_memory_mib:
            ok &= (idx.hmem_cap == 0) | (idx.hmem_cap - idx.hmem_used >= request.host_memory_mib)
        return ok


@dataclass(frozen=True, slots=True)
class DeviceChoice:
    """Columns (device positions on the node) picked for one slice, and the node score they earn."""

    cols: tuple[int, ...]
    score: float = 0.0


class NodePolicy(Protocol):
    name: ClassVar[NodePolicyName]

    def score(self, view: ClusterView, rows: IntArray, state: CycleState) -> FloatArray:
        """Scores 0-100 for the candidate rows; the scheduler takes the highest."""


class DevicePolicy(Protocol):
    name: ClassVar[DevicePolicyName]
    joint: ClassVar[bool]  # True: ``select``'s score also chooses the node
    cacheable: ClassVar[bool]  # True: select depends only on the row's state and the request

    def select(self, view: ClusterView, row: int, fit: BoolArray, state: CycleState) -> DeviceChoice | None:
        """Pick ``request.count`` devices among ``fit`` (a bool per column of ``row``), or None."""


class LearningPolicy(Protocol):
    """A device policy that learns from the requests it sees (FGD's target workload)."""

    def observe(self, request: SliceRequest) -> None: ...

    @property
    def generation(self) -> int:
        """Changes whenever what ``select`` returns may change for the same state (caches key on it)."""


NodeFactory = Callable[[], NodePolicy]
DeviceFactory = Callable[[], DevicePolicy]


class Registry:
    """Names to policy factories; registering a name twice is an error (Kubernetes' registry.go)."""

    def __init__(self) -> None:
        self.node: dict[NodePolicyName, NodeFactory] = {}
        self.device: dict[DevicePolicyName, DeviceFactory] = {}

    def add_node(self, name: NodePolicyName, factory: NodeFactory) -> None:
        if name in self.node:
            raise ValueError(f"node policy {name} registered twice")
        self.node[name] = factory

    def add_device(self, name: DevicePolicyName, factory: DeviceFactory) -> None:
        if name in self.device:
            raise ValueError(f"device policy {name} registered twice")
        self.device[name] = factory


def usage_score(used: FloatArray, capacity: FloatArray) -> FloatArray:
    """``used / capacity`` where capacity > 0, else 0 (the building block of HAMi's formulas)."""
    out = np.zeros_like(used, dtype=np.float64)
    np.divide(used, capacity, out=out, where=capacity > 0)
    return out


def take_ordered(fit: BoolArray, order: Sequence[int] | IntArray, count: int) -> tuple[int, ...] | None:
    """The first ``count`` fitting columns in ``order``, or None if fewer fit."""
    picked = [int(c) for c in order if fit[c]][:count]
    return tuple(picked) if len(picked) == count else None
