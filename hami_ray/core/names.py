"""Policy names: enums, never bare strings (HAMi passes ``policy string`` around; we do not).

Called by requests (per-request overrides), the policy registry and the settings.
"""

from __future__ import annotations

from enum import StrEnum

from hami_ray.core.errors import UnknownPolicy


class NodePolicyName(StrEnum):
    """How a node is chosen among those that fit (HAMi's ``hami.io/node-scheduler-policy``)."""

    BINPACK = "binpack"
    SPREAD = "spread"


class DevicePolicyName(StrEnum):
    """How devices are chosen (HAMi's ``hami.io/gpu-scheduler-policy``, plus the FGD paper's set).

    The FGD family (random .. fgd) scores node and device together ("joint" policies): the
    node policy then only breaks ties.
    """

    BINPACK = "binpack"
    SPREAD = "spread"
    TOPOLOGY = "topology-aware"
    NUMA = "numa"
    RANDOM = "random"
    DOTPROD = "dotprod"
    CLUSTERING = "clustering"
    PACKING = "packing"
    BESTFIT = "bestfit"
    FGD = "fgd"
    FGD_PLUS = "fgd-plus"


def node_policy_name(value: object, field: str = "node_policy") -> NodePolicyName:
    """Parse a node policy name; raises :class:`UnknownPolicy` naming the choices."""
    try:
        return NodePolicyName(str(value).strip().lower())
    except ValueError:
        choices = ", ".join(p.value for p in NodePolicyName)
        raise UnknownPolicy(field, f"unknown node policy {value!r} (choose from {choices})") from None


def device_policy_name(value: object, field: str = "device_policy") -> DevicePolicyName:
    """Parse a device policy name; raises :class:`UnknownPolicy` naming the choices."""
    try:
        return DevicePolicyName(str(value).strip().lower())
    except ValueError:
        choices = ", ".join(p.value for p in DevicePolicyName)
        raise UnknownPolicy(field, f"unknown device policy {value!r} (choose from {choices})") from None
