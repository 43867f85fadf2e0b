"""HAMi's node lock (``hami.io/mutex.lock``) and the bind modes that use it (issue 16).

HAMi's device plugin is handed device ids, not a pod, in Allocate; it finds the pod to serve through this
lock (hami.md, "How HAMi's device plugin finds the pod"): the scheduler writes
``<RFC3339>,<namespace>,<pod>`` on the Node before it binds, the plugin serves the pod the lock names and
removes the lock when Allocate is done. With two pods between Bind and Allocate on one node and no lock,
the plugin falls back to the first Pending pod of a list and can hand a container another pod's devices.

Bind modes (``hami-ray k8s scheduler --bind-mode``), decided per node:

- ``hami-lock``: take the lock before binding, as HAMi's scheduler does; its device plugin releases it;
- ``direct``: no lock, one ``pods/binding`` call (hami-ray's own device plugin, or no device plugin);
- ``auto`` (the default): follow the node's device plugin, read from its annotations
  (:func:`lock_needed`): a node hami-ray's device plugin registered carries :data:`PLUGIN_ANNOTATION` and
  is ``direct``; a node with a HAMi register annotation (``hami.io/node-nvidia-register`` and the other
  vendors' keys) and no such mark was registered by HAMi's device plugin and is ``hami-lock``; any other
  node (no device plugin seen: Ray-inventory nodes, nodes without devices) is ``direct``.

The lock is taken as HAMi's ``nodelock.LockNode`` does, with one difference that closes a race HAMi's
retry loop leaves open: every write is a merge patch conditional on the ``resourceVersion`` of a Node
read that showed the lock free, and a 409 reads the Node and checks the lock again. So two binders never
both hold it. A lock is free when absent, older than :data:`LOCK_TIMEOUT_S` (HAMi's ``NodeLockTimeout``,
5 minutes), or naming a pod that no longer exists (HAMi's dangling-lock check); one naming the pod being
bound is that pod's own (a bind that was cut short) and is taken again. A lock that does not parse is
left alone, as HAMi leaves it (its ``ParseNodeLock`` fails too): an administrator removes it.

Called by :mod:`hami_ray.k8s.scheduler` (bind) and :mod:`hami_ray.k8s.deviceplugin` (release).
"""

from __future__ import annotations

import datetime
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kubernetes.client.exceptions import ApiException

from hami_ray.core.errors import TemporaryError
from hami_ray.core.vendors import VENDORS
from hami_ray.k8s.kubeapi import KubeApi

log = logging.getLogger(__name__)

LOCK_ANNOTATION = "hami.io/mutex.lock"  # HAMi's nodelock.NodeLockKey
LOCK_TIMEOUT_S = 300.0  # HAMi's NodeLockTimeout (--node-lock-timeout, HAMI_NODELOCK_EXPIRE): 5 minutes
PLUGIN_ANNOTATION = "hami-ray.io/device-plugin"  # written by `hami-ray k8s device-plugin` on its node
REGISTER_KEYS = tuple(v.register for v in VENDORS if v.register)  # HAMi's device plugins' register annotations
WRITE_TRIES = 5  # HAMi's DefaultStrategy.Steps
CLAIM_TTL_S = 30.0  # a lock this process wrote counts as held at most this long before the watch shows it
LOCKED = f"node(s) had a bind in flight ({LOCK_ANNOTATION})"  # a reason in "0/N nodes are available: ..."


class BindMode(StrEnum):
    """How the bridge binds a pod with devices (see the module)."""

    AUTO = "auto"
    HAMI_LOCK = "hami-lock"
    DIRECT = "direct"


class NodeLocked(TemporaryError):
    """Another pod's bind holds the node's lock: the pod goes to another node, or waits for this one.

    Example message: ``node gpu-3 is locked by ns/train-7 since 2026-11-29T02:00:00Z (hami.io/mutex.lock)``.
    ``value``: the lock annotation as read (None when the node kept changing).
    """

    def __init__(self, message: str, value: str | None = None) -> None:
        super().__init__(message)
        self.value = value


@dataclass(frozen=True)
class NodeLock:
    """A parsed ``hami.io/mutex.lock``: when it was taken and (empty in HAMi's legacy bare form) by which pod."""

    at: datetime.datetime
    namespace: str = ""
    name: str = ""

    @classmethod
    def parse(cls, value: str) -> NodeLock:
        """HAMi's ``ParseNodeLock``: ``<RFC3339>`` or ``<RFC3339>,<namespace>,<pod>``.

        Raises:
            ValueError: neither form (three comma parts and a time HAMi can read).

        Example: ``NodeLock.parse("2026-11-29T02:00:00Z,ns,p").name == "p"``.
        """
        parts = value.split(",")
        if len(parts) not in (1, 3):
            raise ValueError(f"malformed lock annotation: expected 3 parts, got {len(parts)} from {value!r}")
        text = parts[0].strip()
        if "T" not in text:
            raise ValueError(f"not an RFC 3339 time: {parts[0]!r}")
        at = datetime.datetime.fromisoformat(text)
        if at.tzinfo is None:
            raise ValueError(f"not an RFC 3339 time (no zone): {parts[0]!r}")
        return cls(at, *parts[1:]) if len(parts) == 3 else cls(at)

    def value(self) -> str:
        """The annotation as HAMi's ``GenerateNodeLockKeyByPod`` writes it (Go's ``time.RFC3339``)."""
        stamp = self.at.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"{stamp},{self.namespace},{self.name}" if self.name else stamp

    def age_s(self, now: datetime.datetime) -> float:
        return (now - self.at).total_seconds()

    def owner(self) -> str:
        return f"{self.namespace}/{self.name}" if self.name else "a pod (legacy lock without a name)"


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def lock_needed(annotations: Mapping[str, str], mode: BindMode) -> bool:
    """Whether binds to a node with these annotations take HAMi's lock under ``mode`` (the rule of the module).

    Example: ``lock_needed({"hami.io/node-nvidia-register": "[...]"}, BindMode.AUTO) is True``.
    """
    if mode is not BindMode.AUTO:
        return mode is BindMode.HAMI_LOCK
    if PLUGIN_ANNOTATION in annotations:
        return False
    return any(key in annotations for key in REGISTER_KEYS)


def holder(value: str | None, *, now: datetime.datetime, exists: Callable[[str, str], bool],
           timeout_s: float = LOCK_TIMEOUT_S, pod: tuple[str, str] | None = None) -> str | None:
    """Who holds a lock annotation ``value`` now (``namespace/name``, or why it cannot be taken), or None
    when it is free for ``pod`` (``(namespace, name)``): absent, expired, its pod gone, or ``pod``'s own.
    ``exists(namespace, name)`` says whether a pod exists."""
    if value is None:
        return None
    try:
        lock = NodeLock.parse(value)
    except ValueError as exc:
        return f"nobody it can name ({exc})"
    if lock.age_s(now) > timeout_s:
        return None
    if not lock.name:
        return lock.owner()
    if pod is not None and (lock.namespace, lock.name) == pod:
        return None
    if not exists(lock.namespace, lock.name):
        return None
    return lock.owner()


def acquire(kube: KubeApi, node: str, pod: tuple[str, str], *, exists: Callable[[str, str], bool],
            known: Mapping[str, Any] | None = None, timeout_s: float = LOCK_TIMEOUT_S) -> str:
    """Take the lock of ``node`` for ``pod`` (``(namespace, name)``); returns the value written.

    ``known``: the Node as last seen (its ``resourceVersion`` and annotations; e.g. from a watch), saving a
    read when it is current; otherwise, and after every 409, the Node is read.

    Raises:
        NodeLocked: another pod's bind holds it (or the Node kept changing under us).
        ApiException: the API server refused otherwise (404: no such node).
    """
    fresh = known is None or not (known.get("metadata") or {}).get("resourceVersion")
    current = kube.get(f"/api/v1/nodes/{node}") if fresh else dict(known or {})
    for _ in range(WRITE_TRIES):
        meta = current.get("metadata") or {}
        value = (meta.get("annotations") or {}).get(LOCK_ANNOTATION)
        now = now_utc()
        held_by = holder(value, now=now, exists=exists, timeout_s=timeout_s, pod=pod)
        if held_by is not None:
            since = f" since {value.split(',')[0]}" if value else ""
            raise NodeLocked(f"node {node} is locked by {held_by}{since} ({LOCK_ANNOTATION})", value)
        mine = NodeLock(now, *pod).value()
        body = {"metadata": {"resourceVersion": meta.get("resourceVersion"), "annotations": {LOCK_ANNOTATION: mine}}}
        try:
            kube.patch(f"/api/v1/nodes/{node}", body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = kube.get(f"/api/v1/nodes/{node}")
            continue
        if value is not None:
            log.info("node %s: lock %r taken over (expired, or its pod is gone)", node, value)
        return mine
    raise NodeLocked(f"node {node} kept changing while its lock was taken ({LOCK_ANNOTATION}); tried {WRITE_TRIES} times")


def release(kube: KubeApi, node: str, pod: tuple[str, str]) -> bool:
    """Remove the lock of ``node`` if it names ``pod`` (HAMi's ``ReleaseNodeLock`` with its owner check),
    conditional on the Node read, so a lock another binder took meanwhile stays. True if removed.

    Raises:
        ApiException: the API server refused (404: no such node).
    """
    for _ in range(WRITE_TRIES):
        current = kube.get(f"/api/v1/nodes/{node}")
        meta = current.get("metadata") or {}
        value = (meta.get("annotations") or {}).get(LOCK_ANNOTATION)
        if value is None or not value.endswith(f",{pod[0]},{pod[1]}"):
            return False
        body = {"metadata": {"resourceVersion": meta.get("resourceVersion"), "annotations": {LOCK_ANNOTATION: None}}}
        try:
            kube.patch(f"/api/v1/nodes/{node}", body)
            return True
        except ApiException as exc:
            if exc.status != 409:
                raise
    return False


@dataclass
class _Claim:
    """A bind of this process to a node: placed (``written`` None), then its lock written (at ``at``)."""

    uid: str
    written: str | None = None
    at: float = 0.0


@dataclass
class NodeLocks:
    """What placement needs to know of the locks, kept from the node watch and this process's binds: which
    nodes take the lock (:func:`lock_needed`), each one's lock as last seen, and this process's binds in
    flight (a node is claimed from the moment a pod is placed on it until the watch shows the lock that
    bind wrote, so two pods of one cycle never go to one node). Not thread-safe: the scheduler's lock."""

    mode: BindMode = BindMode.DIRECT
    timeout_s: float = LOCK_TIMEOUT_S
    _locked: set[str] = field(default_factory=set)  # nodes whose binds take the lock
    _nodes: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # node -> (resourceVersion, lock)
    _recent: dict[str, deque[str | None]] = field(default_factory=dict)  # node -> the last lock values seen
    _parsed: dict[str, NodeLock | None] = field(default_factory=dict)  # node -> its lock (None: malformed)
    _claims: dict[str, _Claim] = field(default_factory=dict)
    _expiry_checked: datetime.datetime | None = None

    def observe(self, node: str, meta: Mapping[str, Any]) -> bool:
        """A node was added or changed (``metadata``); True when its lock came, went or changed."""
        annotations = meta.get("annotations") or {}
        if lock_needed(annotations, self.mode):
            self._locked.add(node)
        else:
            self._locked.discard(node)
        return self._seen(node, str(meta.get("resourceVersion") or ""), annotations.get(LOCK_ANNOTATION))

    def _seen(self, node: str, version: str, value: str | None) -> bool:
        before = self._nodes.get(node, ("", None))[1]
        self._nodes[node] = (version, value)
        self._recent.setdefault(node, deque(maxlen=4)).append(value)
        claim = self._claims.get(node)
        if claim is not None and claim.written is not None and claim.written == value:
            del self._claims[node]  # the watch has our lock now: it speaks for it
        if value is None:
            self._parsed.pop(node, None)
        elif value != before or node not in self._parsed:
            try:
                self._parsed[node] = NodeLock.parse(value)
            except ValueError as exc:
                log.warning("node %s: %s=%r cannot be read (%s): no pod is bound there until it is removed",
                            node, LOCK_ANNOTATION, value, exc)
                self._parsed[node] = None
        return value != before

    def forget(self, node: str) -> None:
        """The node is gone."""
        for table in (self._nodes, self._recent, self._parsed, self._claims):
            table.pop(node, None)
        self._locked.discard(node)

    def needs_lock(self, node: str) -> bool:
        return node in self._locked

    def known(self, node: str) -> dict[str, Any] | None:
        """The node as last seen, as much of it as :func:`acquire` reads (None: never seen)."""
        seen = self._nodes.get(node)
        if seen is None or not seen[0]:
            return None
        annotations = {LOCK_ANNOTATION: seen[1]} if seen[1] is not None else {}
        return {"metadata": {"resourceVersion": seen[0], "annotations": annotations}}

    def saw(self, node: str, value: str | None) -> None:
        """A lock read outside the watch (a refused bind): counted until the watch says otherwise."""
        self._seen(node, self._nodes.get(node, ("", None))[0], value)

    def claim(self, node: str, uid: str) -> None:
        """A pod was placed on ``node`` and its bind will take the lock."""
        self._claims[node] = _Claim(uid)

    def mine(self, node: str, uid: str, value: str) -> None:
        """The bind of ``uid`` wrote ``value``; the claim lasts until the watch shows it (or already did)."""
        claim = self._claims.get(node)
        if claim is None or claim.uid != uid:
            return
        if value in self._recent.get(node, ()):
            del self._claims[node]
        else:
            claim.written, claim.at = value, time.monotonic()

    def unclaim(self, node: str, uid: str) -> None:
        """The bind of ``uid`` to ``node`` ended without a lock left (refused, failed, released)."""
        claim = self._claims.get(node)
        if claim is not None and claim.uid == uid:
            del self._claims[node]

    def busy(self, exists: Callable[[str, str], bool], now: datetime.datetime | None = None,
             pod: tuple[str, str] | None = None) -> set[str]:
        """The nodes a pod should not be placed on now: a bind of ours in flight, or a lock held there
        (fresh, by a pod ``exists`` says is there, or not readable), unless it names ``pod`` itself (a bind
        of it cut short: its own lock, taken again)."""
        now = now or now_utc()
        out = {n for n, c in self._claims.items() if self._in_flight(c)}
        out.update(node for node, lock in self._parsed.items()
                   if node in self._locked and node not in out and self._held(lock, exists, now, pod))
        return out

    def free_for(self, node: str, uid: str, exists: Callable[[str, str], bool], pod: tuple[str, str]) -> bool:
        """Whether ``node`` has no bind in flight but ``uid``'s own (``pod`` is its namespace and name): no
        other bind of ours placed there, no lock held there by another pod (see :meth:`busy`)."""
        claim = self._claims.get(node)
        if claim is not None:
            if claim.uid == uid:
                return True
            if self._in_flight(claim):
                return False
        if node not in self._locked or node not in self._parsed:
            return True
        return not self._held(self._parsed[node], exists, now_utc(), pod)

    @staticmethod
    def _in_flight(claim: _Claim) -> bool:
        """A bind of ours placed there and not yet shown by the watch (for at most :data:`CLAIM_TTL_S`)."""
        return claim.written is None or time.monotonic() - claim.at < CLAIM_TTL_S

    def _held(self, lock: NodeLock | None, exists: Callable[[str, str], bool], now: datetime.datetime,
              pod: tuple[str, str] | None) -> bool:
        """Whether a lock keeps pods other than ``pod`` off its node: unreadable, or fresh and held by a
        pod that is there (an anonymous lock counts until it expires)."""
        if lock is None:
            return True
        return (lock.age_s(now) <= self.timeout_s and (lock.namespace, lock.name) != pod
                and (not lock.name or exists(lock.namespace, lock.name)))

    def names(self, namespace: str, name: str) -> bool:
        """Whether some node's lock names this pod (its deletion frees that node)."""
        return any(lock is not None and (lock.namespace, lock.name) == (namespace, name) for lock in self._parsed.values())

    def expired(self, now: datetime.datetime | None = None) -> bool:
        """Whether a lock crossed its timeout since the last call (waiting pods may go there now)."""
        now = now or now_utc()
        last, self._expiry_checked = self._expiry_checked, now
        if last is None:
            return False
        return any(lock is not None and lock.age_s(last) <= self.timeout_s < lock.age_s(now)
                   for lock in self._parsed.values())

    def split(self, nodes: Collection[str], exists: Callable[[str, str], bool],
              pod: tuple[str, str] | None = None) -> tuple[list[str], list[str]]:
        """``nodes`` without a bind in flight for ``pod``, and those with one (see :meth:`busy`)."""
        if not self._claims and not self._parsed:
            return list(nodes), []
        busy = self.busy(exists, pod=pod)
        if not busy:
            return list(nodes), []
        return [n for n in nodes if n not in busy], [n for n in nodes if n in busy]
