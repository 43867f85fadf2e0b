"""``numa``: keep a slice's devices on one NUMA node, packing the NUMA node that fits most tightly.

With ``numa_bind`` on the request (HAMi's ``nvidia.com/numa-bind``) one NUMA node is a must; without
it, one NUMA node is preferred and otherwise the fewest NUMA nodes are used. Within a NUMA node, the
busiest fitting devices go first (binpack order).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from hami_ray.core.names import DevicePolicyName
from hami_ray.core.policies.allocation_score import device_order, device_usage_scores
from hami_ray.core.policies.framework import BoolArray, ClusterView, CycleState, DeviceChoice


class NumaDevicePolicy:
    name: ClassVar[DevicePolicyName] = DevicePolicyName.NUMA
    joint: ClassVar[bool] = False
    cacheable: ClassVar[bool] = True

    def select(self, view: ClusterView, row: int, fit: BoolArray, state: CycleState) -> DeviceChoice | None:
        request = state.request
        order = device_order(device_usage_scores(view, row, view.memory_need(request, row), request.cores),
                             reverse=False)
        numa = view.index.numa[row]
        groups: dict[int, list[int]] = {}
        for col in order:
            if fit[col]:
                groups.setdefault(int(numa[col]), []).append(int(col))
        # tightest group that holds the whole slice: fewest fitting devices, then lowest NUMA id
        whole = sorted((len(cols), node) for node, cols in groups.items() if len(cols) >= request.count)
        if whole:
            return DeviceChoice(tuple(groups[whole[0][1]][: request.count]))
        if request.numa_bind:
            return None
        picked: list[int] = []
        for _, node in sorted(((-len(c), n) for n, c in groups.items())):
            picked.extend(groups[node])
        if len(picked) < request.count:
            return None
        return DeviceChoice(tuple(np.array(picked[: request.count]).tolist()))
