"""The mutating admission webhook (``hami-ray k8s webhook``): what HAMi's does to pods at creation.

An AdmissionReview v1 for a pod comes in (HTTPS, ``POST /mutate``; HAMi's path ``/webhook`` too); the
answer allows it with a JSONPatch, or denies it with a reason (hami.md §2.2):

- a pod that asks for devices of any vendor HAMi knows gets ``spec.schedulerName`` (unless it names
  another scheduler than ``default-scheduler``);
- NVIDIA, per container (init containers too): ``nvidia.com/gpu: 1`` added when only memory or cores
  are given; ``nvidia.com/gpucores: 100`` when whole GPUs are asked without cores (a percentage of 100,
  or, without a percentage, no ``gpumem``); ``CUDA_TASK_PRIORITY`` from ``nvidia.com/priority``. A
  ``gpumem`` or percentage of ``0`` is allowed: the scheduler reads it as HAMi does (no memory asked: the
  whole device) and tells the pod so in an event;
- denied: a ``gpumem-percentage`` outside 0-100, a privileged container in a pod that asks for
  devices, a pod that already names its node, a resource value that is not a number;
- with team queues (``--queues FILE``, a :class:`~hami_ray.k8s.quota.QueueQuota`), a pod with devices for
  this scheduler is also denied when its namespace names a queue that is not defined, or when its queue
  would go over its limit with it (the message names the queue and the limit). That is a point-in-time
  check, as ResourceQuota's: usage is counted from the bound pods the webhook has seen, and the scheduler
  still enforces the limit.

Bad input never stops the server: a body that is not JSON or not an AdmissionReview gets a 400 with
the reason; anything else that cannot be read is denied with the reason. Without queues the webhook
calls nothing; with them it follows nodes, namespaces and pods.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import ssl
import threading
from collections.abc import Mapping
from fractions import Fraction
from http.server import ThreadingHTTPServer
from typing import Any

from hami_ray.core.errors import HamiRayError
from hami_ray.core.hami import parse_quantity
from hami_ray.core.vendors import NVIDIA_VENDOR, RESOURCE_INDEX
from hami_ray.k8s.jsonhttp import NO_BODY, JsonHandler, serve_tls
from hami_ray.k8s.quota import QueueQuota

log = logging.getLogger(__name__)
PATHS = ("/mutate", "/webhook")


class Denied(Exception):
    """The pod is refused; the message is what ``kubectl`` shows."""


def mutate(review: Mapping[str, Any], scheduler_name: str = "hami-scheduler",
           force_overwrite_default: bool = True, quota: QueueQuota | None = None) -> dict[str, Any]:
    """The AdmissionReview response for ``review`` (a dict parsed from the request body); ``quota``: the
    team queues' check (see the module).

    Raises:
        ValueError: ``review`` is not an AdmissionReview with a request and its uid.
    """
    if not isinstance(review, Mapping) or not isinstance(review.get("request"), Mapping):
        raise ValueError("expected an AdmissionReview with a request")
    request = review["request"]
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ValueError("the AdmissionReview request has no uid")
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    out = {"apiVersion": review.get("apiVersion", "admission.k8s.io/v1"), "kind": "AdmissionReview",
           "response": response}
    kind = (request.get("kind") or {}).get("kind")
    pod = request.get("object")
    if kind != "Pod" or request.get("operation", "CREATE") != "CREATE":
        return out  # not ours to change
    try:
        if not isinstance(pod, Mapping):
            raise Denied("the request carries no pod object")
        patch = pod_patch(pod, scheduler_name, force_overwrite_default)
        if quota is not None:
            created = _patched(pod, patch)  # as it will be: with the defaults added above
            if (created.get("spec") or {}).get("schedulerName") == scheduler_name:
                namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "default"
                why = quota.check(str(namespace), created)
                if why is not None:
                    raise Denied(why)
    except Denied as exc:
        response["allowed"] = False
        response["status"] = {"code": 403, "reason": "Forbidden", "message": f"hami-ray: {exc}"}
        return out
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return out


def pod_patch(pod: Mapping[str, Any], scheduler_name: str, force_overwrite_default: bool = True) -> list[dict[str, Any]]:
    """The JSONPatch that makes ``pod`` what HAMi's webhook makes it (empty: leave it).

    Raises:
        Denied: why the pod is refused.
    """
    spec = pod.get("spec")
    if not isinstance(spec, Mapping):
        raise Denied("the pod has no spec")
    ops: list[dict[str, Any]] = []
    asks = False
    privileged = False
    for key in ("initContainers", "containers"):
        containers = spec.get(key) or []
        if not isinstance(containers, list):
            raise Denied(f"spec.{key} is not a list")
        for i, container in enumerate(containers):
            if not isinstance(container, Mapping):
                raise Denied(f"spec.{key}[{i}] is not an object")
            ops.extend(_container_patch(container, f"/spec/{key}/{i}"))
            managed = _managed(container)
            asks |= bool(managed)
            privileged |= bool(managed) and bool((container.get("securityContext") or {}).get("privileged"))
    if not asks:
        return []
    if privileged:
        raise Denied("a privileged container cannot have a device slice: it would see every device whole")
    if spec.get("nodeName"):
        raise Denied(f"the pod names its node ({spec['nodeName']}): slices are placed by {scheduler_name}")
    current = spec.get("schedulerName")
    if not current or (current == "default-scheduler" and force_overwrite_default):
        ops.append({"op": "add", "path": "/spec/schedulerName", "value": scheduler_name})
    return ops


def _managed(container: Mapping[str, Any]) -> dict[str, Any]:
    """The container's resources (limits, else requests) that a HAMi vendor manages."""
    resources = container.get("resources") or {}
    out: dict[str, Any] = {}
    for part in ("requests", "limits"):  # limits win
        values = resources.get(part) or {}
        if not isinstance(values, Mapping):
            raise Denied(f"resources.{part} of container {container.get('name')!r} is not an object")
        out.update({k: v for k, v in values.items() if k in RESOURCE_INDEX})
    return out


def _number(value: Any, name: str, container: str) -> Fraction:
    try:
        return parse_quantity(value, name)
    except HamiRayError as exc:
        raise Denied(f"container {container!r}: {name}={value!r} is not a number ({exc})") from None


def _container_patch(container: Mapping[str, Any], path: str) -> list[dict[str, Any]]:
    managed = _managed(container)
    name = str(container.get("name"))
    for resource, value in managed.items():
        _number(value, resource, name)
    nv = NVIDIA_VENDOR
    assert nv.memory_percentage and nv.memory and nv.cores and nv.priority
    if nv.memory_percentage in managed:
        pct = _number(managed[nv.memory_percentage], nv.memory_percentage, name)
        if not 0 <= pct <= 100:
            raise Denied(f"container {name!r}: {nv.memory_percentage}={managed[nv.memory_percentage]} "
                         "is outside 0-100")
    add: dict[str, str] = {}
    if nv.count not in managed and any(k in managed for k in (nv.memory, nv.cores, nv.memory_percentage)):
        add[nv.count] = "1"  # HAMi's defaultGPUNum
    asks_gpu = nv.count in managed or nv.count in add
    # defaultExclusiveCoreIfNeeded: a percentage, when given, says whether the memory is exclusive (100);
    # else the memory is exclusive when no gpumem is given (gpumem: 0 is given: not exclusive)
    if nv.memory_percentage in managed:
        whole = _number(managed[nv.memory_percentage], nv.memory_percentage, name) == 100
    else:
        whole = nv.memory not in managed
    if asks_gpu and nv.cores not in managed and whole:
        add[nv.cores] = "100"  # defaultExclusiveCoreIfNeeded
    ops: list[dict[str, Any]] = []
    resources = container.get("resources")
    if add:
        if not resources:
            ops.append({"op": "add", "path": f"{path}/resources", "value": {}})
            resources = {}
        for part in ("limits", "requests"):
            values = resources.get(part)
            if part == "requests" and not any(k in (values or {}) for k in RESOURCE_INDEX):
                continue  # requests of extended resources must equal limits; only mirror where they are used
            if values is None:
                ops.append({"op": "add", "path": f"{path}/resources/{part}", "value": {}})
            for key, value in add.items():
                ops.append({"op": "add", "path": f"{path}/resources/{part}/{_escape(key)}", "value": value})
    if nv.priority in managed:
        env = {"name": "CUDA_TASK_PRIORITY", "value": str(managed[nv.priority])}
        if container.get("env") is None:
            ops.append({"op": "add", "path": f"{path}/env", "value": [env]})
        else:
            ops.append({"op": "add", "path": f"{path}/env/-", "value": env})
    return ops


def _patched(pod: Mapping[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """A copy of ``pod`` with :func:`pod_patch`'s ``add`` operations applied (RFC 6902 ``add``)."""
    doc: dict[str, Any] = copy.deepcopy(dict(pod))
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        target: Any = doc
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        last = parts[-1]
        if isinstance(target, list):
            target.insert(len(target) if last == "-" else int(last), op["value"])
        else:
            target[last] = op["value"]
    return doc


def _escape(key: str) -> str:
    """A JSON Pointer token (RFC 6901): ``~`` and ``/`` escaped."""
    return key.replace("~", "~0").replace("/", "~1")


class _Handler(JsonHandler):
    server: WebhookServer
    timeout = 10  # the API server's own limit for a webhook is 10 s by default
    require_length = False

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        if self.path.split("?")[0] not in PATHS:
            self.send_json(404, {"error": f"no such path {self.path}; POST {PATHS[0]}"})
            return
        review = self.read_json()
        if review is NO_BODY:
            return
        try:
            answer = mutate(review, self.server.scheduler_name, self.server.force_overwrite_default,
                            self.server.quota)
        except (ValueError, TypeError) as exc:  # not an AdmissionReview
            self.send_json(400, {"error": str(exc)})
            return
        except Exception as exc:  # noqa: BLE001 - one bad request never stops the server
            log.exception("admission review failed")
            self.send_json(500, {"error": f"{type(exc).__name__}: {exc}"})
            return
        self.send_json(200, answer)

    def do_GET(self) -> None:  # noqa: N802
        if self.path in ("/healthz", "/readyz"):
            self.send_json(200, {"ok": True})
        else:
            self.send_json(404, {"error": "not found"})


class WebhookServer(ThreadingHTTPServer):
    """The webhook over HTTPS (``cert``/``key``: PEM files); ``address`` once it listens. ``quota``: the team
    queues' check (following the cluster already: :meth:`QueueQuota.follow`)."""

    daemon_threads = True

    def __init__(self, host: str, port: int, cert: str, key: str, scheduler_name: str = "hami-scheduler",
                 force_overwrite_default: bool = True, quota: QueueQuota | None = None) -> None:
        super().__init__((host, port), _Handler)
        self.scheduler_name = scheduler_name
        self.force_overwrite_default = force_overwrite_default
        self.quota = quota
        try:
            serve_tls(self, cert, key)
        except (OSError, ssl.SSLError):
            self.server_close()
            raise

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server_address[:2]
        return str(host), int(port)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="hami-ray-webhook", daemon=True)
        thread.start()
        return thread
