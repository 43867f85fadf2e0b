"""Reading a Kubernetes pod the way HAMi does: one :class:`SliceRequest` per container.

HAMi's mutating webhook (``MutateAdmission``) fills in defaults and its scheduler
(``GenerateResourceRequests``) turns each container's extended resources into a device request
(hami.md §2.2, §2.3). This module does both steps at once, so a pod written for HAMi asks hami-ray for
exactly what it would have asked HAMi for. Pods are plain dicts shaped like the Kubernetes API JSON.

Called by the Kubernetes bridge (pods → requests before placement) and by the simulator's pod traces.
The result has one entry per container, init containers first, so that entry ``i`` lines up with the
``i``-th ``;``-entry of the allocation annotation written by :mod:`hami_ray.core.codec`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import cast

from pydantic import ValidationError

from hami_ray.core.errors import InvalidRequest, UnknownPolicy
from hami_ray.core.model import SliceRequest
from hami_ray.core.names import DevicePolicyName, NodePolicyName, device_policy_name, node_policy_name
from hami_ray.core.vendors import VENDORS, ResourceRole, Vendor, resource_index

DEFAULT_MEMORY_MIB = 0  # nvidia.defaultMemory: 0 means "whole device" when no memory is asked
DEFAULT_CORES = 0  # nvidia.defaultCores
DEFAULT_GPU_NUM = 1  # nvidia.defaultGPUNum: devices added when only memory/cores are asked
DEFAULT_MEMORY_FACTOR = 1  # nvidia.memoryFactor: gpumem is multiplied by it
DEFAULT_NODE_POLICY = NodePolicyName.BINPACK  # --node-scheduler-policy
DEFAULT_DEVICE_POLICY = DevicePolicyName.SPREAD  # --gpu-scheduler-policy

NODE_POLICY_ANNOTATION = "hami.io/node-scheduler-policy"
DEVICE_POLICY_ANNOTATION = "hami.io/gpu-scheduler-policy"

# Policies HAMi accepts in a gpu-scheduler-policy chain that hami-ray does not implement; they are
# skipped and the next entry of the chain decides.
HAMI_ONLY_DEVICE_POLICIES = frozenset({"mutex"})

_INT32_MAX = 2**31 - 1  # HAMi keeps requests in int32 and rejects what does not fit
_MIB = 1024 * 1024
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})  # Go's strconv.ParseBool
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})

# A Kubernetes quantity: sign, number, then a binary suffix, a decimal suffix or an exponent.
_QUANTITY = re.compile(
    r"^([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)|[eE]([+-]?[0-9]+))?$"
)
_SUFFIX: dict[str, Fraction] = {
    "": Fraction(1), "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000),
    "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
    "P": Fraction(10**15), "E": Fraction(10**18),
    "Ki": Fraction(2**10), "Mi": Fraction(2**20), "Gi": Fraction(2**30), "Ti": Fraction(2**40),
    "Pi": Fraction(2**50), "Ei": Fraction(2**60),
}


@dataclass(frozen=True)
class HamiConfig:
    """The part of HAMi's scheduler configuration that shapes a request (hami.md §2.3 defaults).

    ``node_policy``/``device_policy`` are the scheduler-wide defaults (HAMi's flags); a pod's
    annotations override them. ``vendors`` is the table of resource names (customisable as in
    HAMi's device ConfigMap).
    """

    default_memory: int = DEFAULT_MEMORY_MIB
    default_cores: int = DEFAULT_CORES
    default_gpu_num: int = DEFAULT_GPU_NUM
    memory_factor: int = DEFAULT_MEMORY_FACTOR
    node_policy: NodePolicyName = DEFAULT_NODE_POLICY
    device_policy: DevicePolicyName = DEFAULT_DEVICE_POLICY
    vendors: tuple[Vendor, ...] = field(default=VENDORS, repr=False)

    def __post_init__(self) -> None:
        if self.default_memory < 0:
            raise InvalidRequest("default_memory", f"must be >= 0 MiB, got {self.default_memory}")
        if not 0 <= self.default_cores <= 100:
            raise InvalidRequest("default_cores", f"must be within 0-100, got {self.default_cores}")
        if self.default_gpu_num < 0:
            raise InvalidRequest("default_gpu_num", f"must be >= 0, got {self.default_gpu_num}")
        if self.memory_factor < 1:
            raise InvalidRequest("memory_factor", f"must be >= 1, got {self.memory_factor}")


@dataclass(frozen=True)
class ContainerRequest:
    """One container of a pod and what it asks for; ``request`` is ``None`` without devices. ``notes``:
    where its resources were read with HAMi's meaning rather than as written (issue 16), one sentence
    each, for an event on the pod."""

    name: str
    init: bool
    request: SliceRequest | None
    notes: tuple[str, ...] = ()


def parse_quantity(value: object, field: str) -> Fraction:
    """Parse a Kubernetes quantity (``"500m"``, ``"2"``, ``"1Gi"``, ``"1e3"``) exactly.

    Args:
        value: a string as the API server returns it, or an int/float from a hand-built dict.
        field: the resource name reported on error.

    Returns:
        The quantity as an exact fraction, never negative.

    Raises:
        InvalidRequest: not a quantity, or negative.

    Example: ``parse_quantity("500m", "cpu") == Fraction(1, 2)``.
    """
    if isinstance(value, bool):
        raise InvalidRequest(field, f"expected a quantity, got a boolean {value!r}")
    if isinstance(value, int):
        number = Fraction(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequest(field, f"not a quantity: {value!r}")
        number = Fraction(value)
    elif isinstance(value, str):
        match = _QUANTITY.match(value.strip())
        if match is None:
            raise InvalidRequest(field, f"not a Kubernetes quantity: {value!r} (e.g. '2', '500m', '1Gi')")
        sign, digits, suffix, exponent = match.groups()
        number = Fraction(digits) * (_SUFFIX[suffix or ""] if exponent is None else Fraction(10) ** int(exponent))
        if sign == "-":
            number = -number
    else:
        raise InvalidRequest(field, f"expected a quantity, got {type(value).__name__}")
    if number < 0:
        raise InvalidRequest(field, f"must not be negative, got {value!r}")
    return number


def _whole(value: object, field: str) -> int:
    """A whole, int32-safe quantity: Kubernetes extended resources are integers, HAMi int32."""
    number = parse_quantity(value, field)
    if number.denominator != 1:
        raise InvalidRequest(field, f"must be a whole number, got {value!r}")
    if number > _INT32_MAX:
        raise InvalidRequest(field, f"too large (HAMi keeps it in int32), got {value!r}")
    return int(number)


def _mapping(value: object, field: str) -> Mapping[str, object]:
    if value is None:  # Kubernetes drops empty objects to null; treat as empty
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise InvalidRequest(field, f"expected an object with string keys, got {type(value).__name__}")
    return value


def _items(value: object, field: str) -> Sequence[object]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidRequest(field, f"expected a list, got {type(value).__name__}")
    return value


def _names(annotations: Mapping[str, str], key: str | None) -> tuple[str, ...]:
    """A comma list annotation; absent or empty means no constraint (HAMi's ``CheckUUID``)."""
    if key is None or key not in annotations:
        return ()
    return tuple(part.strip() for part in annotations[key].split(",") if part.strip())


def _device_policy(value: str) -> DevicePolicyName | None:
    """The first policy of a HAMi chain (``"mutex,binpack,numa"``) that hami-ray implements."""
    entries = [part.strip().lower() for part in value.split(",") if part.strip()]
    known = [device_policy_name(e, DEVICE_POLICY_ANNOTATION) for e in entries if e not in HAMI_ONLY_DEVICE_POLICIES]
    if known:
        return known[0]
    if entries:
        raise UnknownPolicy(DEVICE_POLICY_ANNOTATION, f"{value!r} names no policy hami-ray implements (mutex is not)")
    return None


@dataclass(frozen=True)
class _PodContext:
    """Pod-level inputs shared by every container."""

    annotations: Mapping[str, str]
    config: HamiConfig
    index: Mapping[str, tuple[Vendor, ResourceRole]]

    def policies(self) -> dict[str, object]:
        """The node/device policy annotations (the config's when absent) as SliceRequest fields."""
        node_policy = self.config.node_policy
        raw_node = self.annotations.get(NODE_POLICY_ANNOTATION, "")
        if raw_node.strip():
            node_policy = node_policy_name(raw_node, NODE_POLICY_ANNOTATION)
        device_policy = _device_policy(self.annotations.get(DEVICE_POLICY_ANNOTATION, ""))
        return {"node_policy": node_policy, "device_policy": device_policy or self.config.device_policy}

    def selectors(self, vendor: Vendor) -> dict[str, object]:
        """The vendor's type/uuid/numa annotations as SliceRequest fields."""
        numa = False
        if vendor.numa_bind is not None and vendor.numa_bind in self.annotations:
            raw = self.annotations[vendor.numa_bind].strip()
            if raw not in _TRUE | _FALSE | {""}:
                raise InvalidRequest(vendor.numa_bind, f"expected 'true' or 'false', got {raw!r}")
            numa = raw in _TRUE
        return {
            "include_types": _names(self.annotations, vendor.use_type),
            "exclude_types": _names(self.annotations, vendor.nouse_type),
            "include_uuids": _names(self.annotations, vendor.use_uuid),
            "exclude_uuids": _names(self.annotations, vendor.nouse_uuid),
            "numa_bind": numa,
        }


def _pod_context(pod: Mapping[str, object], config: HamiConfig) -> _PodContext:
    metadata = _mapping(pod.get("metadata"), "metadata")
    raw = _mapping(metadata.get("annotations"), "metadata.annotations")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise InvalidRequest(key, f"annotation values are strings, got {type(value).__name__}")
    return _PodContext(cast(Mapping[str, str], raw), config, resource_index(config.vendors))


def _device_values(limits: Mapping[str, object], requests: Mapping[str, object], ctx: _PodContext,
                   container: str) -> tuple[Vendor, dict[ResourceRole, tuple[str, int]]] | None:
    """The container's one vendor and its resources by role, as (resource name, whole value)."""
    vendor: Vendor | None = None
    values: dict[ResourceRole, tuple[str, int]] = {}
    for name in [*limits, *(n for n in requests if n not in limits)]:
        entry = ctx.index.get(name)
        if entry is None:
            continue
        owner, role = entry
        if vendor is not None and owner is not vendor:
            raise InvalidRequest(name, f"container {container!r} asks for {vendor.type_word} and "
                                       f"{owner.type_word} devices; one vendor per container")
        vendor = owner
        if role in values:
            raise InvalidRequest(name, f"give either {values[role][0]} or {name}, not both")
        # HAMi reads limits, else requests (GenerateResourceRequests).
        raw = limits[name] if name in limits else requests[name]
        if role is ResourceRole.MEMORY and isinstance(raw, str) and raw.strip().endswith("i"):
            # HAMi drops this container's device request without a word (an "8Gi" is more MiB than int32
            # holds); refuse it with the reason instead.
            raise InvalidRequest(name, f"is a plain number of MiB (8Gi is 8192), got {raw!r}; HAMi would "
                                       "silently drop this container's device request")
        value = _whole(raw, name) if role is not ResourceRole.MEMORY else _memory_mib(raw, name)
        values[role] = (name, value)
    return None if vendor is None else (vendor, values)


def _memory_mib(raw: object, name: str) -> int:
    """A memory resource: whole MiB that fit HAMi's int32. More is a size in bytes or with a decimal
    suffix (``"8G"``), which HAMi drops without a word: refused, saying so."""
    number = parse_quantity(raw, name)
    if number.denominator != 1:
        raise InvalidRequest(name, f"must be a whole number of MiB, got {raw!r}")
    if number > _INT32_MAX:
        raise InvalidRequest(name, f"is a number of MiB; {raw!r} is more than HAMi's int32 holds (a size in bytes? "
                                   "8 GiB is 8192), and HAMi would silently drop this container's device request")
    return int(number)


def _slice_fields(vendor: Vendor, values: dict[ResourceRole, tuple[str, int]], config: HamiConfig,
                  notes: list[str], container: str) -> dict[str, object] | None:
    """Resolve count, memory and cores as HAMi's webhook and scheduler do; None: no device asked.

    HAMi's meaning where it differs from the letter (issue 16), each told in ``notes``: a memory or
    percentage of ``0`` is no memory asked (the whole device, or ``default_memory``); memory together
    with a percentage: the MiB are used.
    """
    count = values.get(ResourceRole.COUNT)
    memory = values.get(ResourceRole.MEMORY)
    percent = values.get(ResourceRole.MEMORY_PERCENTAGE)
    cores = values.get(ResourceRole.CORES)
    priority = values.get(ResourceRole.PRIORITY)
    if memory is not None and memory[1] * config.memory_factor > _INT32_MAX:
        raise InvalidRequest(memory[0], f"{memory[1]} MiB x memory factor {config.memory_factor} overflows int32; "
                                        "HAMi would silently drop this container's device request")
    if percent is not None and not 0 <= percent[1] <= 100:
        raise InvalidRequest(percent[0], f"must be within 0-100 (percent of device memory), got {percent[1]}")
    if cores is not None and cores[1] > 100:
        raise InvalidRequest(cores[0], f"must be within 0-100 (percent of device compute), got {cores[1]}")
    # HAMi's webhook gives whole compute (gpucores 100) to an explicit count without cores when the memory
    # is exclusive: a percentage of 100 if one is given, else no memory resource at all.
    exclusive = percent[1] == 100 if percent is not None else memory is None
    mib = memory[1] if memory is not None and memory[1] > 0 else None  # GenerateResourceRequests: 0 is unset
    pct = percent[1] if percent is not None and percent[1] > 0 else None
    if mib is not None and memory is not None:
        used = f"{memory[0]}={mib} is used"
    elif pct is not None and percent is not None:
        used = f"{percent[0]}={pct} is used"
    else:
        used = (f"the default of {config.default_memory} MiB" if config.default_memory
                else "the whole device's memory")
    for given in (memory, percent):
        if given is not None and given[1] == 0:
            notes.append(f"container {container!r}: {given[0]}=0 is read as not given, as HAMi reads it: {used}")
    if mib is not None and pct is not None:
        assert memory is not None and percent is not None
        notes.append(f"container {container!r}: {memory[0]}={mib} and {percent[0]}={pct} both given: the MiB are "
                     "used, as in HAMi")
    sizing = memory is not None or percent is not None or cores is not None
    if count is None:
        # The webhook adds defaultGPUNum when only memory/cores are given; priority alone asks nothing.
        if not sizing or config.default_gpu_num == 0:
            return None
        number = config.default_gpu_num
    elif count[1] == 0:
        if sizing:
            raise InvalidRequest(count[0], "0 devices asked, but device memory or cores given")
        return None
    else:
        number = count[1]
    fields: dict[str, object] = {"vendor": vendor.type_word, "count": number}
    whole_memory = False
    if mib is not None:
        fields["memory_mib"] = mib * config.memory_factor
    elif pct is not None:
        whole_memory = pct == 100
        if not whole_memory:  # 100 % and "nothing" are the same request: the whole device
            fields["memory_percent"] = float(pct)
    elif config.default_memory:
        fields["memory_mib"] = config.default_memory  # not scaled by memoryFactor, as HAMi
    else:
        whole_memory = True
    if memory is not None or percent is not None:
        whole_memory = exclusive
    if cores is not None:
        fields["cores"] = cores[1]
    elif vendor.exclusive_core_default and count is not None and whole_memory:
        fields["cores"] = 100  # defaultExclusiveCoreIfNeeded: whole memory → whole compute
    else:
        fields["cores"] = config.default_cores
    if priority is not None:
        fields["task_priority"] = priority[1]
    return fields


def _host_resources(limits: Mapping[str, object], requests: Mapping[str, object]) -> dict[str, int]:
    """cpu/memory as the kube-scheduler counts them: requests, which default to limits."""
    out: dict[str, int] = {}
    for name, key, unit in (("cpu", "cpu_milli", Fraction(1, 1000)), ("memory", "host_memory_mib", Fraction(_MIB))):
        raw = requests[name] if name in requests else limits.get(name)
        if raw is not None:
            out[key] = math.ceil(parse_quantity(raw, name) / unit)
    return out


def _container(raw: object, path: str, init: bool, ctx: _PodContext) -> ContainerRequest:
    container = _mapping(raw, path)
    raw_name = container.get("name")
    name = raw_name if isinstance(raw_name, str) else ""
    resources = _mapping(container.get("resources"), f"{path}.resources")
    limits = _mapping(resources.get("limits"), f"{path}.resources.limits")
    requests = _mapping(resources.get("requests"), f"{path}.resources.requests")
    found = _device_values(limits, requests, ctx, name)
    notes: list[str] = []
    fields = None if found is None else _slice_fields(found[0], found[1], ctx.config, notes, name)
    if found is None or fields is None:
        return ContainerRequest(name, init, None)
    fields.update(ctx.selectors(found[0]))
    fields.update(_host_resources(limits, requests))
    fields.update(ctx.policies())  # read only for device containers: HAMi ignores other pods
    try:
        request = SliceRequest.model_validate(fields)
    except ValidationError as exc:  # every bound is checked above; keep the promise of one error type
        raise InvalidRequest(path, str(exc)) from None
    return ContainerRequest(name, init, request, tuple(notes))


def pod_requests(pod: Mapping[str, object], config: HamiConfig = HamiConfig()) -> list[ContainerRequest]:
    """Turn a pod into one request per container, init containers first, as HAMi would.

    Resolution (hami.md §2.2-2.3): the count comes from the vendor's count resource (limits, else
    requests); memory from ``gpumem`` (MiB x ``memory_factor``) or ``gpumem-percentage``, else
    ``default_memory``, else the whole device; cores from ``gpucores``, else ``default_cores``, or
    100 when an explicit count asks for whole memory without cores (NVIDIA's webhook). Memory or
    cores without a count ask for ``default_gpu_num`` devices. Pod annotations add type/UUID
    selectors, NUMA binding and the node/device policies (``config``'s when absent).

    Args:
        pod: the pod as Kubernetes API JSON (``metadata.annotations``, ``spec.initContainers``,
            ``spec.containers[].resources.limits/requests``).
        config: HAMi's defaults and vendor table.

    Returns:
        One :class:`ContainerRequest` per container; ``request`` is ``None`` for one without devices.

    Raises:
        InvalidRequest: a malformed resource, annotation or pod shape; ``field`` names the resource
            name or annotation key (:class:`UnknownPolicy` for an unknown policy).

    Example:
        >>> pod = {"spec": {"containers": [{"name": "c", "resources": {"limits": {
        ...     "nvidia.com/gpu": "1", "nvidia.com/gpumem": "3000"}}}]}}
        >>> pod_requests(pod)[0].request.memory_mib
        3000
    """
    if not isinstance(pod, Mapping):
        raise InvalidRequest("pod", f"expected a pod object, got {type(pod).__name__}")
    ctx = _pod_context(pod, config)
    spec = _mapping(pod.get("spec"), "spec")
    out: list[ContainerRequest] = []
    for key, init in (("initContainers", True), ("containers", False)):
        for i, raw in enumerate(_items(spec.get(key), f"spec.{key}")):
            out.append(_container(raw, f"spec.{key}[{i}]", init, ctx))
    return out
