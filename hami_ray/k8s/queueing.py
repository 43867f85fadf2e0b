"""Team queues for pods (issue 14): which queue a pod is in, with what priority, and the queue
definitions file.

Called by :mod:`hami_ray.k8s.podqueue` (the bridge's pending pods in their queues' lines),
:mod:`hami_ray.k8s.scheduler` (the terms of a bound pod's lease) and :mod:`hami_ray.k8s.quota` (the
webhook's check of a pod against its queue's limit).

- A pod's queue is its namespace's: the annotation ``hami.io/queue`` (a full name such as ``org/team-a``;
  a label value cannot hold ``/``), else the label ``hami.io/queue`` (flat names), else ``default``.
- Its priority (for the order within its queue and for preemption) is ``spec.priority``, the value the
  API server copies from its PriorityClass (0 without one). The annotation ``hami.io/preemptible: "false"``
  opts it out of being preempted.
- Queue definitions come from a YAML file (:mod:`hami_ray.core.queues`' format, ``--queues FILE``);
  :class:`QueueFile` reads it again when it changes (a ConfigMap mount swaps it) and keeps the old
  definitions when a new one is invalid.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hami_ray.core.errors import InvalidRequest
from hami_ray.core.model import DEFAULT_QUEUE, SliceRequest
from hami_ray.core.queues import QueueConfigError, QueueTree
from hami_ray.k8s.annotations import BIND_TIME_ANNOTATION
from hami_ray.k8s.kubeapi import since

log = logging.getLogger(__name__)

QUEUE_KEY = "hami.io/queue"  # a namespace's annotation (full names) or label (flat names)
PREEMPTIBLE_ANNOTATION = "hami.io/preemptible"  # a pod's "false": never preempted
QUEUES_POLL_S = 1.0  # how often the queue definitions file is looked at


def namespace_queue(namespace: Mapping[str, Any] | None) -> str:
    """The queue of a namespace object's pods: the annotation ``hami.io/queue``, else the label, else
    ``default``.

    Example: ``namespace_queue({"metadata": {"annotations": {"hami.io/queue": "org/a"}}}) == "org/a"``.
    """
    meta = (namespace or {}).get("metadata") or {}
    for where in ("annotations", "labels"):
        value = (meta.get(where) or {}).get(QUEUE_KEY)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return DEFAULT_QUEUE


def pod_terms(pod: Mapping[str, Any]) -> tuple[int, bool]:
    """A pod's priority (``spec.priority``, 0 when absent) and whether it may be preempted.

    Example: ``pod_terms({"spec": {"priority": 1000}, "metadata": {}}) == (1000, True)``.

    Raises:
        InvalidRequest: ``hami.io/preemptible`` is neither ``"true"`` nor ``"false"``.
    """
    priority = (pod.get("spec") or {}).get("priority")
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(PREEMPTIBLE_ANNOTATION)
    if value is None:
        preemptible = True
    elif str(value).strip().lower() in ("true", "false"):
        preemptible = str(value).strip().lower() == "true"
    else:
        raise InvalidRequest(PREEMPTIBLE_ANNOTATION, f"{PREEMPTIBLE_ANNOTATION} must be \"true\" or \"false\", "
                             f"got {value!r}")
    return (int(priority) if isinstance(priority, int) else 0), preemptible


def with_terms(requests: Sequence[SliceRequest], queue: str, priority: int,
               preemptible: bool) -> list[SliceRequest]:
    """``requests`` (a pod's containers) carrying its queue, priority and preemptibility (into its Lease)."""
    terms = {"queue": queue, "priority": priority, "preemptible": preemptible}
    return [r.model_copy(update=terms) for r in requests]


def held_since(pod: Mapping[str, Any]) -> float:
    """When a bound pod got its slices (``hami.io/bind-time``, else its creation): its Lease's
    ``created_at``, so that the youngest victims go first."""
    meta = pod.get("metadata") or {}
    bound = (meta.get("annotations") or {}).get(BIND_TIME_ANNOTATION)
    if isinstance(bound, str) and bound.isdigit():
        return float(bound)
    return since(meta.get("creationTimestamp"))


class QueueFile:
    """Queue definitions in a YAML file, read again when its content changes.

    Example::

        source = QueueFile(Path("queues.yaml"))   # raises QueueConfigError when the file is invalid
        tree = source.poll()                      # None: unchanged, or changed to something invalid

    An invalid new content is logged with its :class:`QueueConfigError` (queue and field) once, and the
    definitions in use stay. A file that disappears keeps them too (a ConfigMap mount between versions).
    """

    def __init__(self, path: Path) -> None:
        """Read ``path``.

        Raises:
            QueueConfigError: the file cannot be read or its definitions are invalid.
        """
        self.path = path
        self.error: str | None = None  # why the current content was refused, while it is there
        self._digest = ""
        self._checked = 0.0
        text = self._read()
        if text is None:
            raise QueueConfigError("", "file", f"file: cannot read {path}")
        self.tree = QueueTree.parse(text)
        self._digest = _digest(text)

    def _read(self) -> str | None:
        try:
            return self.path.read_text()
        except OSError as exc:
            log.warning("queue definitions %s not read: %s", self.path, exc)
            return None

    def poll(self, now: float | None = None, every: float = 0.0) -> QueueTree | None:
        """The new definitions when the file changed to a valid content, else None. ``every``: look at the
        file at most this often (``now``: a monotonic time)."""
        if now is not None:
            if now - self._checked < every:
                return None
            self._checked = now
        text = self._read()
        if text is None or _digest(text) == self._digest:
            return None
        self._digest = _digest(text)
        try:
            tree = QueueTree.parse(text)
        except QueueConfigError as exc:
            self.error = str(exc)
            log.error("queue definitions in %s refused, the previous ones stay: %s", self.path, exc)
            return None
        self.error = None
        self.tree = tree
        log.info("queue definitions reloaded from %s: %s", self.path, ", ".join(tree.specs))
        return tree

    def refused(self, exc: QueueConfigError) -> None:
        """The definitions just polled could not be applied (a queue that still holds leases is missing):
        log it; they are read again on the next change only."""
        self.error = str(exc)
        log.error("queue definitions in %s not applied, the previous ones stay: %s", self.path, exc)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def unknown_queue(namespace: str, queue: str, tree: QueueTree) -> str | None:
    """Why pods of ``namespace`` (in ``queue``) cannot be served from ``tree``, or None.

    Example: ``"namespace ns names queue 'nope' (hami.io/queue), which is not defined (known: default)"``.
    """
    try:
        tree.resolve(queue)
    except InvalidRequest as exc:
        if queue not in tree:
            return (f"namespace {namespace} names queue {queue!r} ({QUEUE_KEY}), which is not defined "
                    f"(known: {', '.join(tree.leaves())})")
        return f"namespace {namespace}: {exc.reason}"
    return None

