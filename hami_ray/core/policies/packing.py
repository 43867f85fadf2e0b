"""``packing``: fill partly used devices first, idle nodes last (the FGD paper's GpuPacking baseline).

Scores: a node with every device idle: max(33 - f, f) (f = idle devices); otherwise take the least idle
fitting devices: if u > 0 of them are idle, max(50 - u, 33); else r = sum(left x 100 // 1000) and
max(100 - r // 10, 50). Device-less requests score 0. Devices: best fit.
Example: a 0.3-GPU slice, node with one device at 400 left and one idle: r = 40, score 96.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from hami_ray.core.names import DevicePolicyName
from hami_ray.core.policies.framework import BoolArray, ClusterView, CycleState, DeviceChoice
from hami_ray.core.policies.shares import MILLI, default_cols, left_milli


def packing_score(left: list[float], fit: list[bool], count: int, devices: int) -> int:
    idle = sum(1 for v in left if v >= MILLI)
    if idle == devices:
        return max(33 - idle, idle)
    order = sorted(range(len(left)), key=lambda c: left[c])
    chosen = [c for c in order if fit[c]][:count]
    used_idle = sum(1 for c in chosen if left[c] >= MILLI)
    if used_idle > 0:
        return max(50 - used_idle, 33)
    r = sum(int(left[c]) * 100 // MILLI for c in chosen)
    return max(100 - r // 10, 50)


class PackingDevicePolicy:
    name: ClassVar[DevicePolicyName] = DevicePolicyName.PACKING
    joint: ClassVar[bool] = True
    cacheable: ClassVar[bool] = True

    def select(self, view: ClusterView, row: int, fit: BoolArray, state: CycleState) -> DeviceChoice | None:
        request = state.request
        left = left_milli(view, row)
        cols = default_cols(fit, left, request)
        if cols is None:
            return None
        if request.count == 0:
            return DeviceChoice(cols, 0.0)
        exists = view.index.exists[row]
        present = np.nonzero(exists)[0]
        score = packing_score([float(left[c]) for c in present], [bool(fit[c]) for c in present],
                              request.count, int(present.size))
        return DeviceChoice(cols, float(score))
