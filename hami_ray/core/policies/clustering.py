"""``clustering``: put slices of the same shape together (the FGD paper's GpuClustering baseline).

A slice's tag is ``share-gpu`` (one partial device) or ``<n>-gpu``. Score = base + bonus, with
base = 25 x (8000 - idle milli) // 8000 and bonus 75 when the node holds only this tag, 50 when it
holds it among others, 25 when it holds no device slices, 0 otherwise. Device-less requests score 0.
Devices: best fit. Example: an idle 8-GPU node scores 0 + 25 = 25 for any tag.
"""

from __future__ import annotations

from typing import ClassVar

from hami_ray.core.names import DevicePolicyName
from hami_ray.core.policies.framework import BoolArray, ClusterView, CycleState, DeviceChoice
from hami_ray.core.policies.shares import MAX_SPEC_DEVICES, MILLI, default_cols, is_sharing, left_milli


def request_tag(count: int, sharing: bool) -> str:
    return "share-gpu" if sharing else f"{count}-gpu"


class ClusteringDevicePolicy:
    name: ClassVar[DevicePolicyName] = DevicePolicyName.CLUSTERING
    joint: ClassVar[bool] = True
    cacheable: ClassVar[bool] = True
    memo_across_rows: ClassVar[bool] = False  # the score depends on the tags of the node's slices

    def select(self, view: ClusterView, row: int, fit: BoolArray, state: CycleState) -> DeviceChoice | None:
        request = state.request
        left = left_milli(view, row)
        cols = default_cols(fit, left, request)
        if cols is None:
            return None
        if request.count == 0:
            return DeviceChoice(cols, 0.0)
        full = MAX_SPEC_DEVICES * MILLI
        base = 25 * int(full - int(left.sum())) // full
        tags = view.index.tags[row]
        tag = request_tag(request.count, is_sharing(request))
        if tag in tags:
            bonus = 75 if len(tags) == 1 else 50
        else:
            bonus = 25 if not tags else 0
        return DeviceChoice(cols, float(base + bonus))
