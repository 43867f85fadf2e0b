"""Placement policies, one per file, and the default registry that maps names to them."""

from __future__ import annotations

from hami_ray.core.names import DevicePolicyName, NodePolicyName
from hami_ray.core.policies.bestfit import BestFitDevicePolicy
from hami_ray.core.policies.binpack import BinpackDevicePolicy, BinpackNodePolicy
from hami_ray.core.policies.clustering import ClusteringDevicePolicy
from hami_ray.core.policies.dotprod import DotProdDevicePolicy
from hami_ray.core.policies.fgd import FgdDevicePolicy
from hami_ray.core.policies.fgd_plus import FgdPlusDevicePolicy
from hami_ray.core.policies.framework import Registry
from hami_ray.core.policies.numa import NumaDevicePolicy
from hami_ray.core.policies.packing import PackingDevicePolicy
from hami_ray.core.policies.random_fit import RandomDevicePolicy
from hami_ray.core.policies.spread import SpreadDevicePolicy, SpreadNodePolicy
from hami_ray.core.policies.topology import TopologyDevicePolicy


def registry() -> Registry:
    """A registry holding every built-in policy."""
    reg = Registry()
    reg.add_node(NodePolicyName.BINPACK, BinpackNodePolicy)
    reg.add_node(NodePolicyName.SPREAD, SpreadNodePolicy)
    for name, factory in (
        (DevicePolicyName.BINPACK, BinpackDevicePolicy),
        (DevicePolicyName.SPREAD, SpreadDevicePolicy),
        (DevicePolicyName.TOPOLOGY, TopologyDevicePolicy),
        (DevicePolicyName.NUMA, NumaDevicePolicy),
        (DevicePolicyName.RANDOM, RandomDevicePolicy),
        (DevicePolicyName.DOTPROD, DotProdDevicePolicy),
        (DevicePolicyName.CLUSTERING, ClusteringDevicePolicy),
        (DevicePolicyName.PACKING, PackingDevicePolicy),
        (DevicePolicyName.BESTFIT, BestFitDevicePolicy),
        (DevicePolicyName.FGD, FgdDevicePolicy),
        (DevicePolicyName.FGD_PLUS, FgdPlusDevicePolicy),
    ):
        reg.add_device(name, factory)
    return reg


__all__ = ["registry"]
