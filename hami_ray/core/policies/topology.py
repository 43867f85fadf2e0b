"""``topology-aware``: multi-device slices on the best-linked devices (NVLink highest).

HAMi's rule (``calculate_score.go``): for one device, take the fitting device whose pair scores to the
others sum lowest, keeping well-linked devices together for later multi-device requests; for several,
the combination with the highest sum of pairwise scores. Pair scores come from ``Device.links``
(cross-CPU 10 ... NVLink 100 per link). Ties: lower columns first.
"""

from __future__ import annotations

from itertools import combinations
from typing import ClassVar

from hami_ray.core.names import DevicePolicyName
from hami_ray.core.policies.framework import BoolArray, ClusterView, CycleState, DeviceChoice

MAX_COMBINATIONS = 5000  # enough for 8 choose 4 many times over; beyond it the best seen so far wins


class TopologyDevicePolicy:
    name: ClassVar[DevicePolicyName] = DevicePolicyName.TOPOLOGY
    joint: ClassVar[bool] = False
    cacheable: ClassVar[bool] = True

    def select(self, view: ClusterView, row: int, fit: BoolArray, state: CycleState) -> DeviceChoice | None:
        count = state.request.count
        cols = [int(c) for c in fit.nonzero()[0]]
        if len(cols) < count:
            return None
        pair = view.pair_score
        if count == 1:
            everyone = [int(c) for c in view.index.exists[row].nonzero()[0]]
            best = min(cols, key=lambda c: (sum(pair(row, c, o) for o in everyone if o != c), c))
            return DeviceChoice((best,))
        best_set: tuple[int, ...] | None = None
        best_score = -1
        for n, combo in enumerate(combinations(cols, count)):
            if n >= MAX_COMBINATIONS:
                break
            total = sum(pair(row, a, b) for a, b in combinations(combo, 2))
            if total > best_score:
                best_set, best_score = combo, total
        return None if best_set is None else DeviceChoice(best_set, float(best_score))
