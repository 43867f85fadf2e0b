"""``spread``: the least busy node and device that fit (HAMi's default device policy).

The same scorer as :mod:`binpack` with ``reverse`` set: fewer neighbours per slice, more
fragmentation (HAMi #882).
"""

from __future__ import annotations

from typing import ClassVar

from hami_ray.core.names import DevicePolicyName, NodePolicyName
from hami_ray.core.policies.binpack import BinpackDevicePolicy, BinpackNodePolicy


class SpreadNodePolicy(BinpackNodePolicy):
    name: ClassVar[NodePolicyName] = NodePolicyName.SPREAD
    reverse: ClassVar[bool] = True


class SpreadDevicePolicy(BinpackDevicePolicy):
    name: ClassVar[DevicePolicyName] = DevicePolicyName.SPREAD
    reverse: ClassVar[bool] = True
