"""``random``: a uniformly random node that fits, and a random fitting device (the FGD paper's baseline).

As the artifact's Random plugin with ``-gpusel random``: a sharing slice goes to a uniformly random
device with room; whole and multi-device slices take the least idle fitting devices.
"""

from __future__ import annotations

from typing import ClassVar

from hami_ray.core.names import DevicePolicyName
from hami_ray.core.policies.framework import BoolArray, ClusterView, CycleState, DeviceChoice, IntArray
from hami_ray.core.policies.shares import exclusive_cols, is_sharing, left_milli


class RandomDevicePolicy:
    name: ClassVar[DevicePolicyName] = DevicePolicyName.RANDOM
    joint: ClassVar[bool] = True
    cacheable: ClassVar[bool] = False

    def pick_row(self, view: ClusterView, rows: IntArray, state: CycleState) -> int:
        return int(rows[state.rng.integers(rows.size)])

    def select(self, view: ClusterView, row: int, fit: BoolArray, state: CycleState) -> DeviceChoice | None:
        request = state.request
        if request.count == 0:
            return DeviceChoice(())
        cols = fit.nonzero()[0]
        if cols.size < request.count:
            return None
        if is_sharing(request):
            return DeviceChoice((int(cols[state.rng.integers(cols.size)]),))
        picked = exclusive_cols(fit, left_milli(view, row), request.count)
        return None if picked is None else DeviceChoice(picked)
