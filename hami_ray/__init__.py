"""hami-ray: isolated fractional accelerator slices for Ray tasks and Kubernetes pods, one ledger.

Today the package exports the placement engine (requests, ledger, scheduler, errors); the Ray user
API (``hami_ray.init``, ``hami_ray.remote``, ``hami_ray.lease``) joins it with the runtime.
"""

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
    "Scheduler",
    "SliceRequest",
    "UnknownPolicy",
    "Unschedulable",
    "__version__",
    "slice_request",
]
