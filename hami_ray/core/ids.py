"""Typed identifiers shared by every layer (as kopf's ``ids.py``)."""

from typing import NewType

NodeName = NewType("NodeName", str)
DeviceUuid = NewType("DeviceUuid", str)
LeaseId = NewType("LeaseId", str)
