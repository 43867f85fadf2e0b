"""Building a :class:`SliceRequest` from the Python keywords of ``@hami_ray.remote(...)``.

Called by the Ray user API at ``.remote()``/``.options()`` time, so that bad input fails there with an
:class:`InvalidRequest` naming the keyword, never later in the scheduler.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from hami_ray.core.errors import InvalidRequest
from hami_ray.core.grades import isolation
from hami_ray.core.model import SliceRequest
from hami_ray.core.names import device_policy_name, node_policy_name
from hami_ray.core.units import parse_cores, parse_count, parse_memory

KEYWORDS = frozenset({
    "gpus", "gpu_memory", "gpu_cores", "gpu_type", "exclude_gpu_type", "gpu_uuid", "exclude_gpu_uuid",
    "numa_bind", "priority", "node_policy", "device_policy", "vendor", "isolation", "num_gpus", "queue",
    "preemptible",
})
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}(/[A-Za-z0-9][A-Za-z0-9._-]{0,62})*$")


def _num_gpus(value: object) -> dict[str, object]:
    """Ray's ``num_gpus`` as a slice, so code moving from Ray's fractions reads the same: a fraction ``f`` of
    one device is ``f`` of its memory and cores; a whole number ``n`` is ``n`` whole devices.

    Example: ``0.25`` gives one device, 25 % of its memory and 25 % of its cores.

    Raises:
        InvalidRequest: not a number, not positive, or a fraction above 1 (Ray's own rule).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest("num_gpus", f"expected a number such as 0.25 or 2, got {value!r}")
    if not 0 < value < 1 and not float(value).is_integer() or value <= 0:
        raise InvalidRequest("num_gpus", f"a fraction of one device (0 < f < 1) or a whole number, got {value!r}")
    if value < 1:
        percent = float(value) * 100
        return {"count": 1, "memory_percent": percent, "cores": max(1, int(percent))}
    return {"count": int(value), "cores": 100}



def _names(value: object, field: str) -> tuple[str, ...]:
    """A name or a list of names (``"A100"``, ``"A100,H100"``, ``["A100", "H100"]``)."""
    if value is None:
        return ()
    items: Iterable[object]
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
    else:
        raise InvalidRequest(field, f"expected a name or a list of names, got {type(value).__name__}")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidRequest(field, f"expected names, got {item!r}")
        if item.strip():
            out.append(item.strip())
    return tuple(out)


def slice_request(options: Mapping[str, object], default_queue: str | None = None) -> SliceRequest:
    """Validate ``@hami_ray.remote`` keywords and build the request.

    Example: ``slice_request({"gpus": 1, "gpu_memory": "8GiB", "gpu_cores": 30, "queue": "org/team-a"})``.
    ``default_queue``: the queue when ``queue`` is not given (the job's ``$HAMI_RAY_QUEUE``, which the Ray
    API reads); None: ``default``. Whether the queue exists is the placement actor's to say.

    Raises:
        InvalidRequest: an unknown keyword or any malformed value (the field is named).
    """
    unknown = sorted(set(options) - KEYWORDS)
    if unknown:
        raise InvalidRequest(unknown[0], f"unknown option (known: {', '.join(sorted(KEYWORDS))})")
    fields: dict[str, object] = {}
    if options.get("num_gpus") is not None:
        if any(options.get(k) is not None for k in ("gpus", "gpu_memory", "gpu_cores")):
            raise InvalidRequest("num_gpus", "give num_gpus (Ray's fraction) or gpus/gpu_memory/gpu_cores, not both")
        fields.update(_num_gpus(options["num_gpus"]))
    if options.get("gpus") is not None:
        fields["count"] = parse_count(options["gpus"], "gpus")
    if options.get("gpu_memory") is not None:
        memory = parse_memory(options["gpu_memory"], "gpu_memory")
        if memory.mib is not None:
            fields["memory_mib"] = memory.mib
        else:
            fields["memory_percent"] = memory.percent
    if options.get("gpu_cores") is not None:
        fields["cores"] = parse_cores(options["gpu_cores"], "gpu_cores")
    fields["include_types"] = _names(options.get("gpu_type"), "gpu_type")
    fields["exclude_types"] = _names(options.get("exclude_gpu_type"), "exclude_gpu_type")
    fields["include_uuids"] = _names(options.get("gpu_uuid"), "gpu_uuid")
    fields["exclude_uuids"] = _names(options.get("exclude_gpu_uuid"), "exclude_gpu_uuid")
    numa = options.get("numa_bind", False)
    if not isinstance(numa, bool):
        raise InvalidRequest("numa_bind", f"expected True or False, got {numa!r}")
    fields["numa_bind"] = numa
    priority = options.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidRequest("priority", f"expected an integer, got {priority!r}")
    fields["priority"] = priority
    if options.get("node_policy") is not None:
        fields["node_policy"] = node_policy_name(options["node_policy"])
    if options.get("device_policy") is not None:
        fields["device_policy"] = device_policy_name(options["device_policy"])
    if options.get("vendor") is not None:
        vendor = options["vendor"]
        if not isinstance(vendor, str) or not vendor.strip():
            raise InvalidRequest("vendor", f"expected a vendor name such as 'NVIDIA', got {vendor!r}")
        fields["vendor"] = vendor.strip()
    if options.get("isolation") is not None:
        fields["isolation"] = isolation(options["isolation"])
    queue = options.get("queue") if options.get("queue") is not None else default_queue
    if queue is not None and queue != "":
        if not isinstance(queue, str) or len(queue) > 253 or not _QUEUE_NAME.match(queue):
            raise InvalidRequest("queue", f"expected a queue name such as 'org/team-a', got {queue!r}")
        fields["queue"] = queue
    preemptible = options.get("preemptible", True)
    if not isinstance(preemptible, bool):
        raise InvalidRequest("preemptible", f"expected True or False, got {preemptible!r}")
    fields["preemptible"] = preemptible
    return SliceRequest.model_validate(fields)
