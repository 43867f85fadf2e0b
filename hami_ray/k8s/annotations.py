"""HAMi's pod annotations as the bridge writes and reads them (hami.md §1.2, §1.4).

Written on the Binding (the API server puts them on the pod with its node): ``hami.io/vgpu-node``,
``hami.io/vgpu-time``, ``hami.io/bind-phase=allocating``, ``hami.io/bind-time`` and, per vendor the pod
asks for, its ``...-devices-to-allocate`` and ``...-devices-allocated`` (the device plugin erases the
first as it serves containers). Read back: every vendor's allocated devices per container, what a bound
pod holds. The pod also gets the label ``hami.io/vgpu-node=<node>`` (:func:`node_label`; HAMi's vGPUmonitor
selects pods by it), by a patch before the Binding (a Binding carries annotations only).
"""

from __future__ import annotations

import re
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
TO_ALLOCATE_KEYS = tuple(v.to_allocate for v in VENDORS if v.to_allocate)
NODE_LABEL = "hami.io/vgpu-node"  # a label too: HAMi's vGPUmonitor lists the pods of its node by it
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def node_label(node: str) -> dict[str, str] | None:
    """The pod labels HAMi's scheduler sets for ``node``, or None when the name cannot be a label value
    (longer than 63 characters: HAMi's own patch would fail there too).

    Example: ``node_label("gpu-1") == {"hami.io/vgpu-node": "gpu-1"}``.
    """
    if len(node) > 63 or not _LABEL_VALUE.match(node):
        return None
    return {NODE_LABEL: node}


def asks_devices(annotations: Mapping[str, str] | None) -> bool:
    """Whether a pod's annotations (or a Binding's) name devices for some vendor's device plugin."""
    return annotations is not None and any(key in annotations for key in TO_ALLOCATE_KEYS)


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
