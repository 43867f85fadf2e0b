"""HAMi's pod annotations as the bridge writes and reads them (hami.md §1.2, §1.4).

Written on the Binding (the API server puts them on the pod with its node): ``hami.io/vgpu-node``,
``hami.io/vgpu-time``, ``hami.io/bind-phase=allocating``, ``hami.io/bind-time`` and, per vendor the pod
asks for, its ``...-devices-to-allocate`` and ``...-devices-allocated`` (the device plugin erases the
first as it serves containers). Read back: every vendor's allocated devices per container, what a bound
pod holds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from hami_ray.core.codec import decode_pod_devices, encode_pod_devices
from hami_ray.core.hami import ContainerRequest
from hami_ray.core.model import Allocation, DeviceGrant
from hami_ray.core.vendors import VENDORS, vendor_by_type

NODE_ANNOTATION = "hami.io/vgpu-node"
TIME_ANNOTATION = "hami.io/vgpu-time"
TO_ALLOCATE_ANNOTATION = "hami.io/vgpu-devices-to-allocate"
BIND_PHASE_ANNOTATION = "hami.io/bind-phase"
BIND_TIME_ANNOTATION = "hami.io/bind-time"
ALLOCATED_KEYS = tuple((v.allocated, v.type_word) for v in VENDORS if v.allocated)


def binding_annotations(node: str, containers: Sequence[ContainerRequest], allocation: Allocation | None) -> dict[str, str]:
    """HAMi's pod annotations for a placement: the node and times, and per vendor asked for, the devices of
    every container (a container without that vendor's devices is an empty entry, as HAMi writes it)."""
    now = str(int(time.time()))
    out = {NODE_ANNOTATION: node, TIME_ANNOTATION: now, BIND_PHASE_ANNOTATION: "allocating", BIND_TIME_ANNOTATION: now}
    if allocation is None:
        return out
    grants = iter(allocation.slices)
    per_container = [(c.request.vendor, list(next(grants))) if c.request is not None else (None, [])
                     for c in containers]
    for word in dict.fromkeys(v for v, _ in per_container if v is not None):
        vendor = vendor_by_type(word)
        if vendor is None or vendor.to_allocate is None or vendor.allocated is None:
            continue
        encoded = encode_pod_devices([g if v == word else [] for v, g in per_container], type_word=word)
        out[vendor.to_allocate] = encoded
        out[vendor.allocated] = encoded
    return out


def allocated(annotations: Mapping[str, str]) -> list[list[DeviceGrant]]:
    """Per container, the devices every vendor's ``...-devices-allocated`` annotation gives it.

    Raises:
        AnnotationFormatError: an annotation that does not decode (the key is named).
    """
    per_container: list[list[DeviceGrant]] = []
    for key, _ in ALLOCATED_KEYS:
        value = annotations.get(key)
        if value is None:
            continue
        for i, devices in enumerate(decode_pod_devices(value, field=key)):
            while len(per_container) <= i:
                per_container.append([])
            per_container[i].extend(DeviceGrant(uuid=d.uuid, memory_mib=d.memory_mib, cores=d.cores) for d in devices)
    return per_container
