"""hami-ray: isolated fractional accelerator slices for Ray tasks and Kubernetes pods, one ledger.

The Ray user API (``init``, ``remote``, ``lease``, ``status``, ``current_slice``, ``shutdown``) loads Ray
on first use, so the placement engine (requests, ledger, scheduler, errors) imports without it.
"""

from typing import Any

# Every export loads on first use (PEP 562), so ``node_actors``' plain classes (the GPU conformance suite
# runs them on machines without pydantic or Ray) can import ``hami_ray.core.errors`` alone.
_CORE = {
    "AnnotationFormatError": "hami_ray.core.errors", "HamiRayError": "hami_ray.core.errors",
    "InvalidRequest": "hami_ray.core.errors", "InvariantViolation": "hami_ray.core.errors",
    "LeaseError": "hami_ray.core.errors", "LeaseNotFound": "hami_ray.core.errors",
    "LeaseTokenMismatch": "hami_ray.core.errors", "Unschedulable": "hami_ray.core.errors",
    "UnknownPolicy": "hami_ray.core.errors", "SliceQuotaExceeded": "hami_ray.core.errors",
    "SlicePreempted": "hami_ray.core.errors", "QueueConfigError": "hami_ray.core.queues",
    "Isolation": "hami_ray.core.grades",
    "Ledger": "hami_ray.core.ledger",
    "Allocation": "hami_ray.core.model", "ClusterSnapshot": "hami_ray.core.model", "Device": "hami_ray.core.model",
    "DeviceGrant": "hami_ray.core.model", "Lease": "hami_ray.core.model", "LeaseState": "hami_ray.core.model",
    "Node": "hami_ray.core.model", "SliceRequest": "hami_ray.core.model",
    "DevicePolicyName": "hami_ray.core.names", "NodePolicyName": "hami_ray.core.names",
    "slice_request": "hami_ray.core.request", "Scheduler": "hami_ray.core.scheduler",
}

__version__ = "0.1.0"

_RUNTIME = ("apply_queues", "attach", "check", "current_slice", "init", "lease", "lost_leases", "metrics_address", "queue_depth",
            "queues", "remote", "shutdown", "slice_group", "SliceGroup", "status", "NotInitialized", "NotRunning")


def __getattr__(name: str) -> Any:
    if name in _CORE:
        import importlib

        return getattr(importlib.import_module(_CORE[name]), name)
    if name in _RUNTIME:
        from hami_ray.runtime import api

        return getattr(api, name)
    if name in ("sliced", "NodeCannotHold"):
        from hami_ray.runtime import replicas

        return getattr(replicas, name)
    if name == "serve":  # hami_ray.serve.deployment: Serve replicas on slices
        import importlib

        return importlib.import_module("hami_ray.serve")
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
    "Isolation",
    "Lease",
    "LeaseError",
    "LeaseNotFound",
    "LeaseState",
    "LeaseTokenMismatch",
    "Ledger",
    "Node",
    "NodeCannotHold",
    "NodePolicyName",
    "NotInitialized",
    "NotRunning",
    "QueueConfigError",
    "Scheduler",
    "SliceGroup",
    "SlicePreempted",
    "SliceQuotaExceeded",
    "SliceRequest",
    "UnknownPolicy",
    "Unschedulable",
    "__version__",
    "apply_queues",
    "attach",
    "check",
    "current_slice",
    "init",
    "lease",
    "lost_leases",
    "metrics_address",
    "queue_depth",
    "queues",
    "remote",
    "shutdown",
    "slice_group",
    "slice_request",
    "sliced",
    "status",
]
