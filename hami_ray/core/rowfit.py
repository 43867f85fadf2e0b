"""Per node: does a request fit now, and if not, the first reason why; cached per request shape.

Every decision of :class:`hami_ray.core.scheduler.Scheduler` needs, for every alive node, whether the
request fits there (to choose among the nodes that do) and, when none does, the first reason each node
fails (the ``0/N nodes are available: ...`` counts). Computing that from the device columns costs a
pass over every device of the cluster (800,000 at 100,000 nodes x 8), most of it on nodes that did not
change since the last request of the same shape. :class:`RowCache` keeps one answer per row and per
key and recomputes only the rows whose :attr:`CapacityIndex.version` moved (the ledger bumps a row's
version on every allocation, release and inventory change of that node), so a steady stream of
decisions touches a few rows in the device columns and the rest in a handful of one-dimensional
comparisons (DESIGN: "index free capacity instead of scanning every node").

:func:`row_fits` (cheap: fits or not) and :func:`row_codes` (the first reason) are the computations
themselves, over any subset of rows; :func:`could_ever_fit` is the inventory-only ``never`` test. Called
by the scheduler only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from hami_ray.core.index import CapacityIndex
from hami_ray.core.model import FULL_CORES, SliceRequest
from hami_ray.core.policies.framework import ALL, BoolArray, ClusterView, IntArray, Rows
from hami_ray.core.verdict import Reason

Int8Array = npt.NDArray[np.int8]
FITS = -1  # the code of a row where every request fits now
UNKNOWN = -2  # some request does not fit; which reason comes first is worked out when asked (:func:`row_codes`)
REASONS = list(Reason)
CODE = {reason: i for i, reason in enumerate(REASONS)}
G = TypeVar("G", bound=np.generic)
CACHE_CELLS = 32_000_000  # rows x keys a RowCache keeps: 32 MB of int8 codes (320 shapes at 100,000 nodes)


def numa_ok(index: CapacityIndex, devices: BoolArray, count: int, rows: Rows = ALL) -> BoolArray:
    """Per row of ``rows``: some NUMA node has ``count`` of the marked ``devices`` (one line per row)."""
    numa, exists = index.numa[rows], index.exists[rows]
    ok = np.zeros(devices.shape[0], dtype=bool)
    for node in np.unique(numa[exists]):  # NUMA ids absent from these rows cannot hold anything there
        ok |= np.count_nonzero(devices & (numa == node), axis=1) >= count
    return ok


def row_fits(view: ClusterView, reqs: Sequence[SliceRequest], host: SliceRequest, rows: Rows = ALL) -> Int8Array:
    """For each row of ``rows``: :data:`FITS` where :func:`row_codes` would say so, else :data:`UNKNOWN`.

    The cheap half of :func:`row_codes` (a decision needs the reasons only when nothing fits): the host
    has room, and each request with devices has ``count`` devices that pass :meth:`ClusterView.device_fit`
    (on one NUMA node with ``numa_bind``). Example: ``row_fits(view, [req], req)`` -> ``array([-1, -2, ...])``.
    """
    idx = view.index
    cpu_cap, hmem_cap = idx.cpu_cap[rows], idx.hmem_cap[rows]
    ok = np.ones(cpu_cap.shape[0], dtype=bool)
    if host.cpu_milli:
        ok &= (cpu_cap == 0) | (cpu_cap - idx.cpu_used[rows] >= host.cpu_milli)
    if host.host_memory_mib:
        ok &= (hmem_cap == 0) | (hmem_cap - idx.hmem_used[rows] >= host.host_memory_mib)
    for request in reqs:
        if request.count > 0:
            fit = view.device_fit(request, rows)
            ok &= (numa_ok(idx, fit, request.count, rows) if request.numa_bind
                   else np.count_nonzero(fit, axis=1) >= request.count)
    out: Int8Array = np.where(ok, np.int8(FITS), np.int8(UNKNOWN))
    return out


def row_codes(view: ClusterView, reqs: Sequence[SliceRequest], host: SliceRequest, rows: Rows = ALL) -> Int8Array:
    """For each row of ``rows``: :data:`FITS` if every request fits its node now, else the index in
    :class:`Reason` of the first reason it does not (static reasons first, as kube-scheduler lists them).

    ``host``: the CPU and host memory of all ``reqs`` together. A row fits exactly when each request with
    devices has ``count`` devices that pass :meth:`ClusterView.device_fit` (on one NUMA node with
    ``numa_bind``) and the host has room; whether the requests fit *together* is left to the caller.
    Example: ``row_codes(view, [req], req, np.array([0, 5]))`` -> ``array([-1, 10], dtype=int8)``.
    """
    idx = view.index
    cpu_cap, hmem_cap = idx.cpu_cap[rows], idx.hmem_cap[rows]
    out = np.full(cpu_cap.shape[0], FITS, dtype=np.int8)
    unset = np.ones(cpu_cap.shape[0], dtype=bool)

    def mark(failed: BoolArray, reason: Reason) -> None:
        hit = unset & failed
        out[hit] = CODE[reason]
        unset[hit] = False

    device_reqs = [r for r in reqs if r.count > 0]
    typed_of = []
    for request in device_reqs:  # static reasons first: they hold whatever the load
        vendor = np.count_nonzero(view.vendor_ok(request, rows), axis=1)
        typed = view.model_mask(request)[idx.model_id[rows]] & idx.exists[rows]
        mark(vendor == 0, Reason.VENDOR_MISMATCH)
        mark(vendor < request.count, Reason.TOO_FEW_DEVICES)
        mark(np.count_nonzero(typed, axis=1) < request.count, Reason.TYPE_MISMATCH)
        if request.isolation is not None:
            typed &= view.grade_ok(request, rows)
            mark(np.count_nonzero(typed, axis=1) < request.count, Reason.ISOLATION_BELOW)
        uuid = view.uuid_ok(request, rows)
        if uuid is not None:
            typed &= uuid
            mark(np.count_nonzero(typed, axis=1) < request.count, Reason.UUID_MISMATCH)
        typed_of.append(typed)
    if host.cpu_milli:
        mark((cpu_cap > 0) & (cpu_cap - idx.cpu_used[rows] < host.cpu_milli), Reason.INSUFFICIENT_CPU)
    if host.host_memory_mib:
        mark((hmem_cap > 0) & (hmem_cap - idx.hmem_used[rows] < host.host_memory_mib),
             Reason.INSUFFICIENT_HOST_MEMORY)
    if device_reqs:
        slot_used, excl = idx.slot_used[rows], idx.excl[rows]
        free_mem, free_cores = idx.mem_cap[rows] - idx.mem_used[rows], idx.core_cap[rows] - idx.core_used[rows]
        slot_free, healthy = slot_used < idx.slot_cap[rows], idx.healthy[rows]
    for request, typed in zip(device_reqs, typed_of):
        need = request.count
        step = typed & healthy
        mark(np.count_nonzero(step, axis=1) < need, Reason.UNHEALTHY)
        step &= slot_free
        mark(np.count_nonzero(step, axis=1) < need, Reason.SLICES_EXHAUSTED)
        step &= ~excl
        if request.cores >= FULL_CORES:
            step &= slot_used == 0
        mark(np.count_nonzero(step, axis=1) < need, Reason.EXCLUSIVE_CONFLICT)
        step &= free_mem >= view.memory_need(request, rows)
        mark(np.count_nonzero(step, axis=1) < need, Reason.INSUFFICIENT_MEMORY)
        step &= free_cores >= max(request.cores, 1)
        mark(np.count_nonzero(step, axis=1) < need, Reason.INSUFFICIENT_CORES)
        if request.numa_bind:
            mark(~numa_ok(idx, step, need, rows), Reason.NUMA_MISMATCH)
    return out


def could_ever_fit(view: ClusterView, reqs: Sequence[SliceRequest], host: SliceRequest) -> bool:
    """Would some node hold every request of ``reqs`` (``host``: their CPU and memory) if it were empty?
    Yes while no node is known: nodes may join. Reads the inventory only (a full pass; callers keep it).

    Example: ``could_ever_fit(view, [SliceRequest(count=9)], SliceRequest())`` is False on 8-GPU nodes.
    """
    idx = view.index
    if not idx.alive.any():
        return True
    ok = idx.alive.copy()
    if host.cpu_milli:
        ok &= (idx.cpu_cap == 0) | (idx.cpu_cap >= host.cpu_milli)
    if host.host_memory_mib:
        ok &= (idx.hmem_cap == 0) | (idx.hmem_cap >= host.host_memory_mib)
    exclusive = np.zeros_like(idx.exists)  # devices some whole-device container could take
    exclusive_need = 0
    for request in reqs:
        if request.count == 0:
            continue
        dev = view.type_ok(request) & (idx.mem_cap >= view.memory_need(request)) & (idx.core_cap >= request.cores)
        uuid = view.uuid_ok(request)
        if uuid is not None:
            dev &= uuid
        # each container on its own must fit an empty node ...
        ok &= numa_ok(idx, dev, request.count) if request.numa_bind else dev.sum(axis=1) >= request.count
        if request.exclusive:
            exclusive |= dev
            exclusive_need += request.count
    # ... and whole-device containers cannot share their devices
    if exclusive_need:
        ok &= exclusive.sum(axis=1) >= exclusive_need
    return bool(ok.any())


class RowCache(Generic[G]):
    """Per key, one value per row of the index, recomputed only on rows whose version moved since.

    ``compute(rows)`` must depend on nothing but the state of those rows (what a row's version covers).
    The rows to recompute come from :meth:`CapacityIndex.changed_since`, so a refresh costs the rows that
    moved, not a pass over the cluster. Keys are kept least recently used first, at most ``cells`` values
    in all (at least 16 keys). The array returned is the cache's own: a caller may refine values of rows
    that have not moved (as :meth:`Scheduler._reasons` does) but must not keep it across ledger changes.
    Example: ``cache.get(request.shape(), lambda rows: row_fits(view, [request], request, rows))``.
    """

    def __init__(self, index: CapacityIndex, dtype: type[G], cells: int = CACHE_CELLS) -> None:
        self.index = index
        self.dtype = dtype
        self.cells = cells
        self._entries: OrderedDict[Hashable, _Entry[G]] = OrderedDict()

    def get(self, key: Hashable, compute: Callable[[Rows], npt.NDArray[G]]) -> npt.NDArray[G]:
        """The up-to-date values of every row for ``key``."""
        idx = self.index
        size = idx.version.shape[0]
        entry = self._entries.get(key)
        moved = None if entry is None or entry.values.shape[0] != size else idx.changed_since(entry.mark)
        if entry is None or moved is None or len(moved) * 4 > size:  # new, or most rows moved: one pass
            entry = _Entry(np.asarray(compute(ALL), dtype=self.dtype).copy(), idx.changed)
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > max(16, self.cells // max(size, 1)):
                self._entries.popitem(last=False)
        elif moved:
            stale: IntArray = np.unique(np.array(moved, dtype=np.int64))
            entry.values[stale] = compute(stale)
            entry.mark = idx.changed
        self._entries.move_to_end(key)
        return entry.values


@dataclass(slots=True)
class _Entry(Generic[G]):
    values: npt.NDArray[G]
    mark: int  # the index's ``changed`` when ``values`` were last brought up to date
