"""Typed identifiers shared by every layer (as kopf's ``ids.py``)."""

import re
import secrets
from typing import NewType

NodeName = NewType("NodeName", str)
DeviceUuid = NewType("DeviceUuid", str)
LeaseId = NewType("LeaseId", str)

_LEASE_ID = re.compile(r"lease-[0-9a-f]{16}")


def new_lease_id() -> LeaseId:
    """A new lease id for a Ray task's, actor's or driver's slice (pods' leases are named after the pod)."""
    return LeaseId(f"lease-{secrets.token_hex(8)}")


def is_lease_id(value: object) -> bool:
    """Whether ``value`` has the form :func:`new_lease_id` makes (a caller's ticket must)."""
    return isinstance(value, str) and _LEASE_ID.fullmatch(value) is not None
