"""``bestfit``: the node with the least weighted leftover (the FGD paper's BestFit baseline).

leftover s = 0.5 (cpu left - cpu) / 128 CPUs + 0.5 (idle milli - demand) / 8 devices; raw =
int(100 (1 - s)); scores are then normalised over the candidates to 0-100 with integer division, as
the artifact's NormalizeScore. Devices: best fit.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from hami_ray.core.names import DevicePolicyName
from hami_ray.core.policies.framework import BoolArray, ClusterView, CycleState, DeviceChoice, FloatArray
from hami_ray.core.policies.shares import (
    MAX_SPEC_CPU_MILLI,
    MAX_SPEC_DEVICES,
    MILLI,
    cpu_left,
    default_cols,
    demand_milli,
    left_milli,
)


class BestFitDevicePolicy:
    name: ClassVar[DevicePolicyName] = DevicePolicyName.BESTFIT
    joint: ClassVar[bool] = True
    cacheable: ClassVar[bool] = True

    def select(self, view: ClusterView, row: int, fit: BoolArray, state: CycleState) -> DeviceChoice | None:
        request = state.request
        left = left_milli(view, row)
        cols = default_cols(fit, left, request)
        if cols is None:
            return None
        spare = (0.5 * (cpu_left(view, row) - request.cpu_milli) / MAX_SPEC_CPU_MILLI
                 + 0.5 * (float(left.sum()) - demand_milli(view, row, request) * request.count)
                 / (MAX_SPEC_DEVICES * MILLI))
        return DeviceChoice(cols, float(int((1 - spare) * 100)))

    @staticmethod
    def normalize(scores: FloatArray) -> FloatArray:
        finite = np.isfinite(scores)
        if not finite.any():
            return scores
        lo, hi = scores[finite].min(), scores[finite].max()
        if hi == lo:
            return np.where(finite, 0.0, scores)
        norm: FloatArray = np.where(finite, np.floor((scores - lo) * 100 / (hi - lo)), scores)
        return norm
