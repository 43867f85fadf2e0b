"""``dotprod``: Tetris-like alignment of node-free and request vectors (the FGD paper's baseline).

Vectors over (CPU, devices), normalised by 128 CPUs and 8 devices (the artifact's ``merge``/``max``
options): node n = (cpu left, device share left), request p = (cpu, demand x count);
score = int(100 x (1 - n.p / 2)), so the node whose free resources align least wins. Devices: best fit.
Example: a 1-GPU request on an idle 8-GPU, 96-CPU node with 8 CPUs asked:
n.p = 0.75 x 0.0625 + 1 x 0.125 = 0.172, score = int(100 x 0.914) = 91.
"""

from __future__ import annotations

from typing import ClassVar

from hami_ray.core.names import DevicePolicyName
from hami_ray.core.policies.framework import BoolArray, ClusterView, CycleState, DeviceChoice
from hami_ray.core.policies.shares import (
    MAX_SPEC_CPU_MILLI,
    MAX_SPEC_DEVICES,
    MILLI,
    cpu_left,
    default_cols,
    demand_milli,
    left_milli,
)


def dot_score(cpu_free: float, share_free: float, cpu_req: float, share_req: float) -> int:
    cpu_max, dev_max = MAX_SPEC_CPU_MILLI, MAX_SPEC_DEVICES * MILLI
    dot = (cpu_free / cpu_max) * (cpu_req / cpu_max) + (share_free / dev_max) * (share_req / dev_max)
    return int(100 * (1 - dot / 2))


class DotProdDevicePolicy:
    name: ClassVar[DevicePolicyName] = DevicePolicyName.DOTPROD
    joint: ClassVar[bool] = True
    cacheable: ClassVar[bool] = True

    def select(self, view: ClusterView, row: int, fit: BoolArray, state: CycleState) -> DeviceChoice | None:
        request = state.request
        left = left_milli(view, row)
        cols = default_cols(fit, left, request)
        if cols is None:
            return None
        score = dot_score(cpu_left(view, row), float(left.sum()), request.cpu_milli,
                          demand_milli(view, row, request) * request.count)
        return DeviceChoice(cols, float(score))
