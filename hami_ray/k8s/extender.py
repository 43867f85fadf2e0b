"""hami-ray as a kube-scheduler extender (``hami-ray k8s extender``), as HAMi's scheduler is deployed.

The stock kube-scheduler runs the scheduling loop; its ``KubeSchedulerConfiguration`` names this server
in ``extenders`` (``filterVerb: filter``, ``prioritizeVerb: prioritize``, ``bindVerb: bind``,
``managedResources`` with ``ignoredByScheduler: true``), so kube-scheduler asks it about every pod that
requests HAMi's resources and never counts those resources itself. The wire shapes are
``k8s.io/kube-scheduler/extender/v1`` (structs without json tags: capitalised keys).

- ``POST <prefix>/filter`` (``ExtenderArgs`` -> ``ExtenderFilterResult``). Two answers (``--filter-answers``):
  - ``best`` (the default, as HAMi's extender answers): the one candidate node the pod's node policy
    ranks first among those where its HAMi requests fit now (:meth:`PodScheduler.reserve`), its slices
    held there for the bind that follows (:class:`Choice`; freed when the pod is filtered again, deleted,
    or not bound within :data:`CHOICE_TTL_S`). kube-scheduler scores nothing when one node is left, so
    binpack and spread mean what they mean in HAMi with HAMi's chart configuration (no prioritize verb),
    and two pods of one cycle never count the same room. Nodes with a bind in flight (HAMi's node lock,
    ``--bind-mode``) are passed over for the best of the others; a pod that fits only those is held on
    the best of them, and its bind waits there for the lock (:data:`LOCK_WAIT_S`) instead of failing
    into kube-scheduler's back-off.
  - ``fitting``: every candidate node where the requests fit now, each tried alone and nothing held, for
    kube-scheduler to weigh with its own scores and ``prioritize``.
  Where nothing fits, every node is in ``FailedNodes`` with its reason (``insufficient device memory``...:
  kube-scheduler counts equal reasons into its ``0/N nodes are available`` message), or in
  ``FailedAndUnresolvableNodes`` when no eviction could help (no device of the vendor or type, a
  request larger than any device, a node without a valid register annotation). Both ways of
  ``nodeCacheCapable``: ``NodeNames`` in, ``NodeNames`` out; full ``Nodes`` in, the chosen items of that
  list out. A pod without HAMi resources passes every node. Bad input (no Pod, garbage resources)
  answers 200 with ``Error``; a body that is not JSON, 400.
- ``POST <prefix>/prioritize`` (``ExtenderArgs`` -> ``HostPriorityList``): 0-10 per node from the node
  policy (binpack: fuller nodes higher; ``hami.io/node-scheduler-policy: spread`` reverses it), weighed
  by kube-scheduler with its own scores. HAMi's extender has no such verb (its filter answers one node).
- ``POST <prefix>/bind`` (``ExtenderBindingArgs`` -> ``ExtenderBindingResult``): the slices the filter
  held on that node (else the pod is placed on exactly that node now), then the ``hami.io/vgpu-node``
  label and one ``pods/binding`` call that carries HAMi's annotations (:meth:`PodScheduler.bind`), after
  HAMi's node lock on nodes whose device plugin needs it (``--bind-mode``, as ``hami-ray k8s scheduler``:
  ``auto`` locks nodes HAMi's plugin registered, not those of hami-ray's). A lock found held answers
  the bind with an error (kube-scheduler tries the pod again) once it has waited :data:`LOCK_WAIT_S` for it.
- ``GET /healthz``; ``GET /readyz`` (200 once nodes and pods are listed).

A pod the filter found no room for is tried again by kube-scheduler on the next cluster event it sees (a pod
an extender refused is requeued on any event), but room this process frees is not always such an event: a
deletion kube-scheduler's watch showed before this one's (kube-scheduler asked again at once and was refused
again), a filter's hold let go, a lock released. Such a pod would wait for kube-scheduler's flush of
unschedulable pods (5 minutes). So when room frees, each refused pod that fits now (at most once per
:data:`RETRY_EVERY_S`) gets the annotation :data:`RETRY_ANNOTATION` (the time): an update of the pod,
which kube-scheduler requeues it on.

The caches and the ledger are a :class:`PodScheduler`'s, following nodes and pods by watch (a bound
pod holds what its allocation annotations say, whoever bound it; a finished one frees it), without its
scheduling loop. Requests are served from a thread per connection (``ThreadingHTTPServer``, HTTP/1.1
keep-alive: kube-scheduler keeps its connections), each answer in one write with Nagle off
(:mod:`hami_ray.k8s.jsonhttp`: two writes cost every verb a 40 ms delayed ACK, issue 16), body limit
1 MiB, HTTPS with ``--tls-cert/--tls-key``.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from http.server import ThreadingHTTPServer
from typing import Any

import numpy as np
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from hami_ray.core.errors import HamiRayError, InvalidRequest, TemporaryError, Unschedulable
from hami_ray.core.hami import pod_requests
from hami_ray.core.model import SliceRequest
from hami_ray.core.policies.framework import CycleState
from hami_ray.core.verdict import Reason
from hami_ray.k8s import jsonhttp
from hami_ray.k8s.inventory import AnnotationInventory
from hami_ray.k8s.jsonhttp import NO_BODY, JsonHandler
from hami_ray.k8s.kubeapi import pod_path, timestamp
from hami_ray.k8s.nodelock import LOCKED, BindMode
from hami_ray.k8s.scheduler import SCHEDULER_NAME, PodScheduler

log = logging.getLogger(__name__)

MAX_PRIORITY = 10  # extenderv1.MaxExtenderPriority
# reasons that evicting pods cannot fix: FailedAndUnresolvableNodes (kube-scheduler does not preempt there)
STATIC_REASONS = frozenset({Reason.VENDOR_MISMATCH.value, Reason.TYPE_MISMATCH.value, Reason.UUID_MISMATCH.value})
NOT_REGISTERED = "no valid HAMi register annotation"
# binds that talk to the API server at once: kube-scheduler sends one bind per pod it has placed, hundreds at
# once under load. Unbounded, they outgrew the client's connection pool (cpu_count() x 5: 10 on 2 cores, 2
# held by the watches) and every request past it opened a TLS connection of its own and dropped it (issue
# 16: 488 handshakes for 3,000 pods, CPU on both sides). Bounded, with a pool that holds them all, 10.
BINDERS = 16
POOL = BINDERS + 4  # the binders, the node and pod watches, a spare
# how long the slices a filter chose wait for their bind: kube-scheduler binds within its httpTimeout (HAMi's
# chart: 30 s) of the filter's answer unless the pod failed a later step of its cycle (then it is filtered
# again, which frees them at once) or was deleted (its watch event frees them)
CHOICE_TTL_S = 60.0
# a refused pod that fits again is marked so (its value: when), at most once per RETRY_EVERY_S; at most
# RETRY_CHECKS refused pods are looked at per round (oldest first), REFUSED_MAX remembered
RETRY_ANNOTATION = "hami.io/extender-retry"
RETRY_EVERY_S = 5.0
RETRY_CHECKS = 64
REFUSED_MAX = 10_000
RETRY_POLL_S = 0.2
# how long a bind waits for another bind's lock on its node (HAMi's node lock, held until that pod's Allocate)
# before it answers kube-scheduler an error: below kube-scheduler's httpTimeout (HAMi's chart: 30 s)
LOCK_WAIT_S = 20.0


class FilterAnswers(StrEnum):
    """What the filter verb answers (see the module)."""

    BEST = "best"
    FITTING = "fitting"


class BadInput(ValueError):
    """The request's JSON is not an ExtenderArgs / ExtenderBindingArgs (answered with ``Error``)."""


@dataclass(frozen=True)
class Choice:
    """The node a filter answered for a pod, and the annotations of the slices held there for its bind."""

    node: str
    annotations: dict[str, str]
    at: float  # time.monotonic() of the filter
    pod: tuple[str, str]  # its namespace and name


@dataclass
class Refused:
    """A pod the filter found no node for: what it asked, and when it was last looked at for a retry."""

    pod: tuple[str, str]  # its namespace and name
    requests: list[SliceRequest]
    checked: float = 0.0  # time.monotonic()


class Extender:
    """The three verbs over a following :class:`PodScheduler` (annotation inventory)."""

    def __init__(self, sched: PodScheduler, binders: int = BINDERS,
                 answers: FilterAnswers | str = FilterAnswers.BEST) -> None:
        if not isinstance(sched.inventory, AnnotationInventory):
            raise TypeError("the extender needs the annotation inventory (HAMi's node register annotations)")
        self.sched = sched
        self.engine = sched.inventory.scheduler
        self.answers = FilterAnswers(answers)
        self.calls: Counter[str] = Counter()  # requests served, per verb
        self._binders = threading.BoundedSemaphore(binders)  # the others wait here, in their request's thread
        self._choices: dict[str, Choice] = {}  # pod uid -> what its last filter held (under sched.lock)
        self._swept = time.monotonic()
        self._refused: dict[str, Refused] = {}  # pod uid -> its last filter found no node (under sched.lock)

    def ready(self) -> bool:
        return self.sched.node_informer.synced.is_set() and self.sched.pod_informer.synced.is_set()

    # --- filter -------------------------------------------------------------------------------------
    def filter(self, args: Any) -> dict[str, Any]:
        """``ExtenderArgs`` -> ``ExtenderFilterResult`` (never raises: errors go into ``Error``)."""
        self.calls["filter"] += 1
        chosen: str | TemporaryError | None = None
        try:
            pod, names, items = _extender_args(args)
            requests = self._requests(pod)
            if requests and self.answers is FilterAnswers.BEST:
                chosen = self._choose(pod, names)
        except (BadInput, HamiRayError) as exc:
            return {"Nodes": None, "NodeNames": None, "FailedNodes": {}, "FailedAndUnresolvableNodes": {},
                    "Error": str(exc)}
        failed: dict[str, str] = {}
        unresolvable: dict[str, str] = {}
        fit: list[str] = []
        if not requests:
            fit = list(names)
        else:
            if isinstance(chosen, str):
                fit = [chosen]
                with self.sched.lock:  # the others that fit are left out; the unknown ones said so (cheap)
                    unresolvable = {n: NOT_REGISTERED for n in names if n not in self.sched.nodes}
            elif isinstance(chosen, TemporaryError):  # its queue holds it back, or HAMi's node locks
                failed = dict.fromkeys(names, str(chosen))
            else:
                for name, (reason, static) in self.verdicts(requests, names).items():
                    if reason is None:
                        fit.append(name)
                    elif static:
                        unresolvable[name] = reason
                    else:
                        failed[name] = reason
        if requests:
            self._refusal(pod, requests, refused=not fit)
        result: dict[str, Any] = {"Nodes": None, "NodeNames": None, "FailedNodes": failed,
                                  "FailedAndUnresolvableNodes": unresolvable, "Error": ""}
        if items is None:
            result["NodeNames"] = fit
        else:
            keep = set(fit)
            result["Nodes"] = {"metadata": {}, "items": [n for n in items if _name(n) in keep]}
        return result

    def _choose(self, pod: dict[str, Any], names: Sequence[str]) -> str | TemporaryError | None:
        """Place the pod on the best of ``names`` and hold its slices there for the bind (:class:`Choice`):
        the node; the error when its queue holds it back; None when no node fits now (the caller asks
        every node why). What an earlier filter of the pod held is freed first.

        Raises:
            InvalidRequest: the pod's requests or annotations.
        """
        uid = str(pod["metadata"].get("uid") or "")
        if not uid:  # nothing to hold it by: the fitting nodes, each tried alone
            return None
        with self.sched.lock:
            self._sweep()
            self._drop(uid)
            known = [n for n in names if n in self.sched.nodes]
        try:
            node, annotations = self.sched.reserve(pod, known, wait_for_locks=True)
        except Unschedulable as exc:
            if self.sched.waits_for_lock(uid):  # it fits only where a bind is in flight: it waits for a lock
                return TemporaryError(LOCKED)
            return None
        except TemporaryError as exc:  # its queue's limit, or a bind of it in flight
            return exc
        meta = pod["metadata"]
        with self.sched.lock:
            self._choices[uid] = Choice(node, annotations, time.monotonic(),
                                        (str(meta.get("namespace")), str(meta.get("name"))))
        return node

    def _drop(self, uid: str) -> None:
        """Free what a filter held for the pod and its bind never took. Under sched.lock."""
        choice = self._choices.pop(uid, None)
        if choice is not None:
            self._free(uid, choice)

    def _free(self, uid: str, choice: Choice) -> None:
        """Free the slices and the node claim a filter held for the pod. Under sched.lock."""
        self.sched.landed(uid)
        self.sched.locks.unclaim(choice.node, uid)
        self.sched.free(uid)

    def _sweep(self) -> None:
        """Free the choices whose bind did not come within :data:`CHOICE_TTL_S`. Under sched.lock."""
        now = time.monotonic()
        if now - self._swept < 1.0:
            return
        self._swept = now
        for uid in [u for u, c in self._choices.items() if now - c.at > CHOICE_TTL_S]:
            log.info("pod %s: not bound within %.0f s of its filter: its slices are freed", uid, CHOICE_TTL_S)
            self._drop(uid)

    # --- retries when room frees ---------------------------------------------------------------------
    def _refusal(self, pod: Mapping[str, Any], requests: list[SliceRequest], refused: bool) -> None:
        meta = pod["metadata"]
        uid = str(meta.get("uid") or "")
        if not uid:
            return
        with self.sched.lock:
            self._refused.pop(uid, None)  # refused again: to the end (oldest first); placed: forgotten
            if refused:
                self._refused[uid] = Refused((str(meta.get("namespace")), str(meta.get("name"))), requests)
                while len(self._refused) > REFUSED_MAX:
                    del self._refused[next(iter(self._refused))]

    def retries_due(self, now: float | None = None) -> list[tuple[str, str]]:
        """The refused pods that fit some node now and were not looked at within :data:`RETRY_EVERY_S` (at
        most :data:`RETRY_CHECKS` looked at); forgets those bound or gone."""
        now = time.monotonic() if now is None else now
        due: list[tuple[str, str]] = []
        with self.sched.lock:
            nodes = list(self.sched.nodes)
            fits: dict[tuple[SliceRequest, ...], bool] = {}
            checks = 0
            for uid, refused in list(self._refused.items()):
                pod = self.sched.pods.get(uid)
                if (pod is None or (pod.get("spec") or {}).get("nodeName")
                        or pod["metadata"].get("deletionTimestamp")):
                    del self._refused[uid]
                    continue
                if now - refused.checked < RETRY_EVERY_S or uid in self._choices:
                    continue
                if checks >= RETRY_CHECKS:
                    break
                checks += 1
                refused.checked = now
                shape = tuple(refused.requests)
                if shape not in fits:  # pods of one shape: one pass over the cluster
                    fits[shape] = self.sched.inventory.fits(refused.requests, nodes)
                if fits[shape]:
                    due.append(refused.pod)
        return due

    def retry(self, pods: Sequence[tuple[str, str]]) -> int:
        """Mark each pod (:data:`RETRY_ANNOTATION`), an update kube-scheduler requeues it on; how many were
        marked (a pod gone meanwhile is skipped)."""
        marked = 0
        for namespace, name in pods:
            path = pod_path({"metadata": {"namespace": namespace, "name": name}})
            try:
                self.sched.kube.patch(path, {"metadata": {"annotations": {RETRY_ANNOTATION: timestamp()}}})
                marked += 1
            except ApiException as exc:
                if exc.status != 404:
                    log.warning("pod %s/%s not marked for a retry: %s", namespace, name, _text(exc))
            except OSError as exc:  # the API server restarting: the next room freed marks it
                log.warning("pod %s/%s not marked for a retry: %s", namespace, name, exc)
        if marked:
            self.calls["retry"] += marked
            log.info("room freed: %d refused pod(s) marked for kube-scheduler to try again", marked)
        return marked

    def follow_room(self, stop: threading.Event) -> None:
        """Until ``stop`` (a thread's body): whenever room frees (the scheduler's change count moves, or a
        lock times out), mark the refused pods that fit now (:meth:`retry`)."""
        seen = -1
        while not stop.wait(RETRY_POLL_S):
            try:
                with self.sched.lock:
                    if self.sched.locks.expired():
                        self.sched.changed()
                    changes = self.sched.changes
                    waiting = bool(self._refused)
                if changes == seen or not waiting:
                    seen = changes
                    continue
                seen = changes
                self.retry(self.retries_due())
            except Exception:  # noqa: BLE001 - one bad round never stops the retries
                log.exception("retrying refused pods")

    def verdicts(self, requests: Sequence[SliceRequest], names: Sequence[str]) -> dict[str, tuple[str | None, bool]]:
        """Per node: None if the requests fit there now, else (the reason, whether it is static). Holds nothing."""
        out: dict[str, tuple[str | None, bool]] = {}
        with self.sched.lock:
            known = [n for n in names if n in self.sched.nodes]
            try:
                verdicts = self.engine.verdicts(requests, known)  # one pass over the cluster, nothing held
            except InvalidRequest as exc:  # larger than any device of the cluster: no node will do
                return {name: (str(exc), True) for name in names}
            for name in names:
                if name not in verdicts:
                    out[name] = (NOT_REGISTERED, True)
                else:
                    reason = verdicts[name]
                    out[name] = (reason, reason in STATIC_REASONS)
        return out

    # --- prioritize ---------------------------------------------------------------------------------
    def prioritize(self, args: Any) -> list[dict[str, Any]]:
        """``ExtenderArgs`` -> ``HostPriorityList``: 0-10 per node from the pod's node policy.

        Raises:
            BadInput, HamiRayError: the arguments or the pod (answered 400: kube-scheduler then goes on
                without this extender's scores).
        """
        self.calls["prioritize"] += 1
        pod, names, _ = _extender_args(args)
        requests = self._requests(pod)
        scores = dict.fromkeys(names, 0)
        if requests:
            first = requests[0]
            with self.sched.lock:
                rows_of = self.engine.ledger.index.rows
                known = [n for n in names if n in rows_of and n in self.sched.nodes]
                if known:
                    policy = self.engine.node_policy_for(first.node_policy or self.engine.node_policy)
                    rows = np.asarray([rows_of[n] for n in known], dtype=np.int64)
                    raw = policy.score(self.engine.view, rows, CycleState(first, self.engine.rng))
                    for name, value in zip(known, raw.tolist()):
                        if np.isfinite(value):  # node policies score 0-100
                            scores[name] = int(min(MAX_PRIORITY, max(0, round(value * MAX_PRIORITY / 100))))
        return [{"Host": name, "Score": score} for name, score in scores.items()]

    # --- bind ---------------------------------------------------------------------------------------
    def bind(self, args: Any) -> dict[str, str]:
        """``ExtenderBindingArgs`` -> ``ExtenderBindingResult``: hold the pod's slices on ``Node`` and bind
        it there with HAMi's annotations (never raises: errors go into ``Error``)."""
        self.calls["bind"] += 1
        uid = args.get("PodUID") if isinstance(args, Mapping) else None
        with self.sched.lock:  # taken before waiting for a binder: the sweep leaves it alone
            choice = self._choices.pop(uid, None) if isinstance(uid, str) and uid else None
        if choice is not None and choice.node == args.get("Node"):
            self._await_node(choice, str(uid))
        with self._binders:
            return self._bind(args, choice)

    def _await_node(self, choice: Choice, uid: str) -> None:
        """Wait (at most :data:`LOCK_WAIT_S`) until no other bind is in flight on the chosen node, and claim
        it: a pod that fitted only nodes with a bind in flight was held on the best of them, and waits here
        instead of in kube-scheduler's back-off (which grows to 10 s a try: HAMi's own binds fail at once on
        a locked node). Past the wait the bind finds the lock and answers why."""
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            with self.sched.lock:
                if self.sched.claim_when_free(choice.node, uid, choice.pod):
                    return
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def _bind(self, args: Any, choice: Choice | None) -> dict[str, str]:
        try:
            if not isinstance(args, Mapping):
                raise BadInput("ExtenderBindingArgs must be a JSON object")
            name, namespace, node = (args.get(k) for k in ("PodName", "PodNamespace", "Node"))
            uid = args.get("PodUID") or ""
            if not all(isinstance(v, str) and v for v in (name, namespace, node)) or not isinstance(uid, str):
                raise BadInput("ExtenderBindingArgs needs PodName, PodNamespace and Node (strings)")
            pod = self._pod(str(namespace), str(name), uid)
            bound_on = (pod.get("spec") or {}).get("nodeName")
            if bound_on:
                if choice is not None:
                    self._forget(uid, choice)
                return {"Error": "" if bound_on == node else f"pod {namespace}/{name} is bound to {bound_on} already"}
            if choice is not None and choice.node == node:
                annotations = choice.annotations  # held since the filter, still in flight
            else:
                if choice is not None:  # kube-scheduler chose another node than the filter's answer
                    self._forget(uid, choice)
                node, annotations = self.sched.reserve(pod, [str(node)])
        except (BadInput, HamiRayError, ApiException) as exc:
            if choice is not None:
                self._forget(str(uid), choice)
            return {"Error": _text(exc)}
        error = self.sched.bind(pod, node, annotations, explain=False)
        if error is None:
            log.info("bound %s/%s to %s", namespace, name, node)
        return {"Error": error or ""}

    def _forget(self, uid: str, choice: Choice) -> None:
        """Free the slices a filter held for a bind that will not use them."""
        with self.sched.lock:
            self._free(uid, choice)

    def _pod(self, namespace: str, name: str, uid: str) -> dict[str, Any]:
        """The pod as the watch has it, else as the API server has it (the watch may lag the scheduler)."""
        with self.sched.lock:
            pod = self.sched.pods.get(uid) if uid else None
        if pod is None or pod["metadata"].get("name") != name or pod["metadata"].get("namespace") != namespace:
            pod = self.sched.kube.get(pod_path({"metadata": {"namespace": namespace, "name": name}}))
        if uid and pod["metadata"].get("uid") != uid:
            raise BadInput(f"pod {namespace}/{name} has uid {pod['metadata'].get('uid')}, not {uid}")
        return pod

    def _requests(self, pod: Mapping[str, Any]) -> list[SliceRequest]:
        return [c.request for c in pod_requests(pod, self.sched.config) if c.request is not None]


def _extender_args(args: Any) -> tuple[dict[str, Any], list[str], list[dict[str, Any]] | None]:
    """The pod, the candidate node names and (without nodeCacheCapable) the node objects."""
    if not isinstance(args, Mapping):
        raise BadInput("ExtenderArgs must be a JSON object")
    pod = args.get("Pod")
    if not isinstance(pod, Mapping) or not isinstance(pod.get("metadata"), Mapping):
        raise BadInput("ExtenderArgs has no Pod")
    names = args.get("NodeNames")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadInput("NodeNames must be a list of node names")
        return dict(pod), names, None
    nodes = args.get("Nodes")
    if not isinstance(nodes, Mapping):
        raise BadInput("ExtenderArgs has neither NodeNames nor Nodes")
    items = nodes.get("items") or []
    if not isinstance(items, list) or not all(isinstance(_name(n), str) for n in items):
        raise BadInput("Nodes.items must be nodes with metadata.name")
    return dict(pod), [str(_name(n)) for n in items], items


def _name(node: Any) -> Any:
    meta = node.get("metadata") if isinstance(node, Mapping) else None
    return meta.get("name") if isinstance(meta, Mapping) else None


def _text(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}"
    return str(exc)


# --- HTTP ------------------------------------------------------------------------------------------
class ExtenderServer(ThreadingHTTPServer):
    extender: Extender


class _Handler(JsonHandler):
    server: ExtenderServer
    error_key = "Error"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0].rstrip("/")
        if path.endswith("/healthz"):
            self.send_bytes(200, b"ok", "text/plain")
        elif path.endswith("/readyz"):
            ready = self.server.extender.ready()
            self.send_bytes(200 if ready else 503, b"ok" if ready else b"listing nodes and pods", "text/plain")
        else:
            self.send_bytes(404, b"not found", "text/plain")

    def do_POST(self) -> None:  # noqa: N802
        verb = self.path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        extender = self.server.extender
        if verb not in ("filter", "prioritize", "bind"):
            self.send_json(404, {"Error": f"no verb {verb!r} (filter, prioritize, bind)"})
            return
        args = self.read_json()
        if args is NO_BODY:
            return
        try:
            if verb == "filter":
                self.send_json(200, extender.filter(args))
            elif verb == "bind":
                self.send_json(200, extender.bind(args))
            else:
                try:
                    self.send_json(200, extender.prioritize(args))
                except (BadInput, HamiRayError) as exc:
                    self.send_json(400, {"Error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - one bad request never stops the server
            log.exception("%s failed", verb)
            self.send_json(500, {"Error": f"{type(exc).__name__}: {exc}"})


def make_server(extender: Extender, bind: str = "127.0.0.1:8888", *, tls_cert: str | None = None,
                tls_key: str | None = None) -> ExtenderServer:
    """An HTTP(S) server for ``extender`` on ``bind`` (``host:port``; port 0: a free one), not started."""
    server: ExtenderServer = jsonhttp.make_server(ExtenderServer, bind, _Handler, tls_cert, tls_key, extender=extender)
    return server


def start(api: client.ApiClient, stop: threading.Event, *, bind: str = "127.0.0.1:8888",
          tls_cert: str | None = None, tls_key: str | None = None,
          scheduler_name: str = SCHEDULER_NAME, bind_mode: BindMode | str = BindMode.AUTO,
          answers: FilterAnswers | str = FilterAnswers.BEST) -> ExtenderServer:
    """List nodes and pods and follow them by watch (the ledger is rebuilt from the pods' annotations
    before the first answer), then serve the verbs on ``bind`` from a thread until ``stop``; the server
    (``server_address`` says the port when ``bind`` asks for port 0). ``bind_mode``: which nodes take
    HAMi's node lock (:class:`~hami_ray.k8s.nodelock.BindMode`); ``answers``: what the filter answers."""
    own = pooled(api, POOL)
    sched = PodScheduler(own, scheduler_name=scheduler_name, queue=False, bind_mode=bind_mode)
    sched.follow(stop)
    server = make_server(Extender(sched, answers=answers), bind, tls_cert=tls_cert, tls_key=tls_key)

    def serve() -> None:
        try:
            server.serve_forever(0.2)
        finally:
            server.server_close()

    def stopper() -> None:
        stop.wait()
        server.shutdown()
        # its idle connections now, the watches' once they end (never left to the garbage collector)
        own.close()  # type: ignore[no-untyped-call]

    threading.Thread(target=serve, name="hami-ray-extender", daemon=True).start()
    threading.Thread(target=server.extender.follow_room, args=(stop,), name="hami-ray-extender-retry",
                     daemon=True).start()
    threading.Thread(target=stopper, name="hami-ray-extender-stop", daemon=True).start()
    log.info("extender on %s://%s:%d", "https" if tls_cert else "http", *server.server_address[:2])
    return server


def pooled(api: client.ApiClient, size: int) -> client.ApiClient:
    """A client like ``api`` (same server, credentials, TLS) that keeps up to ``size`` connections: the
    pool's size is read when a client is made, so a larger one needs a new client."""
    configuration = copy.deepcopy(api.configuration)
    configuration.connection_pool_maxsize = max(size, configuration.connection_pool_maxsize or 0)
    return client.ApiClient(configuration)


def run(api: client.ApiClient, stop: threading.Event, **kwargs: Any) -> None:
    """:func:`start`, then wait for ``stop`` (the command's body)."""
    start(api, stop, **kwargs)
    stop.wait()
