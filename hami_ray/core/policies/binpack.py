"""``binpack``: fill the busiest node and the busiest device that still fit (HAMi's default node policy).

Keeps whole nodes and whole devices free for large requests. Node and device scores are HAMi's
(see :mod:`allocation_score`). Example: devices at 10 % and 60 % used, a 10 % request goes to the 60 %
one (score 10*(0.2+0.0+0.7)=9 beats 10*(0.2+0.0+0.2)=4).
"""

from __future__ import annotations

from typing import ClassVar

from hami_ray.core.names import DevicePolicyName, NodePolicyName
from hami_ray.core.policies.allocation_score import device_order, device_usage_scores, node_usage_scores
from hami_ray.core.policies.framework import (
    BoolArray,
    ClusterView,
    CycleState,
    DeviceChoice,
    FloatArray,
    IntArray,
    take_ordered,
)


class BinpackNodePolicy:
    name: ClassVar[NodePolicyName] = NodePolicyName.BINPACK
    reverse: ClassVar[bool] = False
    row_local: ClassVar[bool] = True  # a row's score depends on that row only: the scheduler keeps it per row

    def score(self, view: ClusterView, rows: IntArray, state: CycleState) -> FloatArray:
        return node_usage_scores(view, rows, reverse=self.reverse)


class BinpackDevicePolicy:
    name: ClassVar[DevicePolicyName] = DevicePolicyName.BINPACK
    joint: ClassVar[bool] = False
    cacheable: ClassVar[bool] = True
    reverse: ClassVar[bool] = False

    def select(self, view: ClusterView, row: int, fit: BoolArray, state: CycleState) -> DeviceChoice | None:
        request = state.request
        mem = view.memory_need(request, row)
        scores = device_usage_scores(view, row, mem, request.cores)
        cols = take_ordered(fit, device_order(scores, reverse=self.reverse), request.count)
        return None if cols is None else DeviceChoice(cols)
