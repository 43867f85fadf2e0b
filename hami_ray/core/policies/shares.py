"""Device shares in "milli" (1000 = one whole device), the unit of the FGD paper's policies.

A device's idle share is the smaller of its free memory and free cores, each as a fraction of the
device: on one-dimensional inputs (memory and cores proportional, as the openb trace's ``gpu_milli``)
it is exactly the paper's ``MilliGpuLeft``. A request's per-device demand is the larger of its memory
and cores fractions. Pure helpers for :mod:`random_fit`, :mod:`dotprod`, :mod:`clustering`,
:mod:`packing`, :mod:`bestfit` and :mod:`fgd`.
"""

from __future__ import annotations

import numpy as np

from hami_ray.core.model import FULL_CORES, SliceRequest
from hami_ray.core.policies.framework import BoolArray, ClusterView, FloatArray, IntArray

MILLI = 1000
MAX_SPEC_CPU_MILLI = 128_000  # the artifact's normalisers (MaxSpecCpu, MaxSpecGpu = 8 devices)
MAX_SPEC_DEVICES = 8


def left_milli(view: ClusterView, row: int) -> FloatArray:
    """Idle share of each device column of ``row`` in milli (0 for absent or unhealthy devices)."""
    idx = view.index
    mem_cap = np.maximum(idx.mem_cap[row], 1)
    core_cap = np.maximum(idx.core_cap[row], 1)
    share = np.minimum((mem_cap - idx.mem_used[row]) / mem_cap, (core_cap - idx.core_used[row]) / core_cap)
    out: FloatArray = np.where(idx.exists[row] & idx.healthy[row], np.round(share * MILLI, 6), 0.0)
    return out


def demand_milli(view: ClusterView, row: int, request: SliceRequest) -> float:
    """Per-device demand of ``request`` in milli, on the first device of ``row``."""
    if request.count == 0:
        return 0.0
    idx = view.index
    cols = idx.exists[row].nonzero()[0]
    if cols.size == 0:
        return 0.0
    col = int(cols[0])
    mem = request.memory_on(int(idx.mem_cap[row, col])) / max(int(idx.mem_cap[row, col]), 1)
    cores = request.cores / max(int(idx.core_cap[row, col]), 1)
    return float(round(max(mem, cores) * MILLI, 6))


def cpu_left(view: ClusterView, row: int) -> int:
    idx = view.index
    return int(idx.cpu_cap[row] - idx.cpu_used[row])


def is_sharing(request: SliceRequest) -> bool:
    """The artifact's "sharing pod": one device, less than all of it."""
    return request.count == 1 and request.cores < FULL_CORES


def best_fit_col(fit: BoolArray, left: FloatArray) -> int:
    """The fitting column with the least idle share; ties to the lower column (gpusel "best")."""
    masked = np.where(fit, left, np.inf)
    return int(np.argmin(masked))


def exclusive_cols(fit: BoolArray, left: FloatArray, count: int) -> tuple[int, ...] | None:
    """``count`` fitting columns, least idle first, ties by column (``Sub``/``AllocateExclusiveGpuId``)."""
    order: IntArray = np.argsort(np.where(fit, left, np.inf), kind="stable")
    picked = tuple(int(c) for c in order[:count] if fit[c])
    return picked if len(picked) == count else None


def default_cols(fit: BoolArray, left: FloatArray, request: SliceRequest) -> tuple[int, ...] | None:
    """The artifact's default GPU choice: best fit for a sharing slice, else least-idle devices."""
    if request.count == 0:
        return ()
    if is_sharing(request):
        return (best_fit_col(fit, left),) if fit.any() else None
    return exclusive_cols(fit, left, request.count)
