"""hami-ray: isolated fractional accelerator slices for Ray tasks and Kubernetes pods, one ledger.

The Ray user API (``init``, ``remote``, ``lease``, ``status``, ``current_slice``, ``shutdown``) loads Ray
on first use, so the placement engine (requests, ledger, scheduler, errors) imports without it.
"""

from typing import Any

from hami_ray.core.errors import (
    AnnotationFormatError,
    HamiRayError,
    InvalidRequest,
    InvariantViolation,
    LeaseError,
    LeaseNotFound,
    LeaseTokenMismatch,
    Unschedulable,
    UnknownPolicy,
)
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import Allocation, ClusterSnapshot, Device, DeviceGrant, Lease, LeaseState, Node, SliceRequest
from hami_ray.core.names import DevicePolicyName, NodePolicyName
from hami_ray.core.request import slice_request
from hami_ray.core.scheduler import Scheduler

__version__ = "0.1.0"

_RUNTIME = ("attach", "check", "current_slice", "init", "lease", "lost_leases", "metrics_address", "queue_depth",
            "remote", "shutdown", "status", "NotInitialized", "NotRunning", "SliceQuotaExceeded")


def __getattr__(name: str) -> Any:
    if name == "SliceQuotaExceeded":
        from hami_ray.core.errors import SliceQuotaExceeded

        return SliceQuotaExceeded
    if name in _RUNTIME:
        from hami_ray.runtime import api

        return getattr(api, name)
    raise AttributeError(f"module 'hami_ray' has no attribute {name!r}")


__all__ = [
    "Allocation",
    "AnnotationFormatError",
    "ClusterSnapshot",
    "Device",
    "DeviceGrant",
    "DevicePolicyName",
    "HamiRayError",
    "InvalidRequest",
    "InvariantViolation",
    "Lease",
    "LeaseError",
    "LeaseNotFound",
    "LeaseState",
    "LeaseTokenMismatch",
    "Ledger",
    "Node",
    "NodePolicyName",
    "NotInitialized",
    "NotRunning",
    "Scheduler",
    "SliceQuotaExceeded",
    "SliceRequest",
    "UnknownPolicy",
    "Unschedulable",
    "__version__",
    "attach",
    "check",
    "current_slice",
    "init",
    "lease",
    "lost_leases",
    "metrics_address",
    "queue_depth",
    "remote",
    "shutdown",
    "slice_request",
    "status",
]
