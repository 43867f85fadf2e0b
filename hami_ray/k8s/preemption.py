"""Preemptions the Kubernetes bridge has under way (issue 14): the victims of each plan, which were
evicted and are leaving, which evictions were refused, and the messages the waiting pod and the victims get.

Called by :mod:`hami_ray.k8s.podqueue`. A plan (:class:`~hami_ray.core.queues.Preemption`) evicts its pod
victims through the Eviction API (``policy/v1``, ``pods/<name>/eviction``) so that PodDisruptionBudgets are
honoured: a 429 is a budget refusing; that victim stays and is spared for :data:`EVICTION_RETRY_S`, while
other plans are tried, then asked again. A victim's lease stays held until its pod is gone, so the waiting
pod never gets room that is not free yet.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from hami_ray.core.model import Lease
from hami_ray.core.queues import Preemption

EVICTION_RETRY_S = 5.0  # a victim whose eviction was refused (a PodDisruptionBudget) is asked again after this


@dataclass
class Reclaim:
    """A preemption started for one waiting pod: its victims (lease id -> ``namespace/name``), which were
    evicted and are leaving, which evictions are not answered yet, and which were refused (and why)."""

    waiter: str
    plan: Preemption
    victims: dict[str, str]
    pending: set[str] = field(default_factory=set)
    leaving: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "reclaim" if self.plan.reason == "reclaim" else "priority preemption"

    def describe(self) -> str | None:
        """The waiting pod's reason (stable while nothing changes: events are not repeated); None once
        every victim is gone.

        Example: ``"reclaim for queue org/a in progress: evicting ns/b on node n1; bound once it is gone"``.
        """
        q = self.plan.for_queue
        going = sorted(self.victims[v] for v in self.leaving | (self.pending - set(self.refused)))
        if self.refused and not going:
            why = "; ".join(f"{self.victims[v]}: {r}" for v, r in sorted(self.refused.items()))
            return (f"{self.kind} for queue {q} held back: eviction refused ({why}); asked again in "
                    f"{EVICTION_RETRY_S:g} s")
        if not going:
            return None
        them = "it is" if len(going) == 1 else "they are"
        return (f"{self.kind} for queue {q} in progress: evicting {', '.join(going)} on node {self.plan.node}; "
                f"bound once {them} gone")


class Preemptions:
    """The reclaims under way, by waiting pod, and the victims spared for a while after an eviction was
    refused. Not thread-safe: the scheduler holds its lock."""

    def __init__(self) -> None:
        self.by_waiter: dict[str, Reclaim] = {}
        self._spared: dict[str, float] = {}  # lease id -> until (monotonic)

    def start(self, waiter: str, plan: Preemption, evicting: set[str]) -> Reclaim:
        """``plan`` starts for ``waiter``: ``evicting`` (lease ids) are the pod victims the bridge evicts; the
        others were told by the inventory and are leaving. A victim asked again after a refusal keeps that
        refusal as the reason until the new answer comes."""
        victims = {v.lease_id: v.owner for v in plan.victims}
        reclaim = Reclaim(waiter, plan, victims, pending=evicting & set(victims), leaving=set(victims) - evicting)
        old = self.by_waiter.get(waiter)
        if old is not None:
            reclaim.refused = {v: why for v, why in old.refused.items() if v in reclaim.pending}
        self.by_waiter[waiter] = reclaim
        return reclaim

    def active(self, waiter: str, holds: Callable[[str], bool]) -> bool:
        """Whether ``waiter``'s victims are still being evicted or leaving (``holds(lease_id)``: still held)."""
        reclaim = self.by_waiter.get(waiter)
        if reclaim is None:
            return False
        reclaim.leaving = {v for v in reclaim.leaving if holds(v)}
        reclaim.pending = {v for v in reclaim.pending if holds(v)}
        return bool(reclaim.leaving or reclaim.pending)

    def answered(self, reclaim: Reclaim, lease_id: str, refused: str | None, now: float) -> None:
        """The eviction of ``lease_id`` was accepted (``refused=None``) or refused (why)."""
        reclaim.pending.discard(lease_id)
        if refused is None:
            reclaim.refused.pop(lease_id, None)
            reclaim.leaving.add(lease_id)
            return
        reclaim.refused[lease_id] = refused
        self._spared[lease_id] = now + EVICTION_RETRY_S

    def spare(self, now: float) -> set[str]:
        """Lease ids no new plan may take: victims leaving for a plan, and those refused lately."""
        self.expire(now)
        out = set(self._spared)
        for reclaim in self.by_waiter.values():
            out |= reclaim.pending | reclaim.leaving
        return out

    def expire(self, now: float) -> bool:
        """Forget the spared victims whose time is over; True if there were any (waiters may plan again)."""
        over = [i for i, until in self._spared.items() if until <= now]
        for lease_id in over:
            del self._spared[lease_id]
        return bool(over)

    def describe(self, waiter: str) -> str | None:
        reclaim = self.by_waiter.get(waiter)
        return reclaim.describe() if reclaim is not None else None

    def done(self, waiter: str) -> None:
        """``waiter`` was placed or left: its reclaim is over (victims still leaving go on leaving)."""
        self.by_waiter.pop(waiter, None)


def eviction(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The ``policy/v1`` Eviction of ``pod`` (only this pod: its uid is a precondition)."""
    meta = pod["metadata"]
    return {"apiVersion": "policy/v1", "kind": "Eviction",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "deleteOptions": {"preconditions": {"uid": meta["uid"]}}}


def refusal(exc: ApiException) -> str:
    """Why the API server refused an eviction, from its Status: a 429 is a PodDisruptionBudget, with the
    disruption controller's numbers where it gives them.

    Example: ``"a PodDisruptionBudget forbids it now (The disruption budget web needs 1 healthy pods and has
    1 currently)"``.
    """
    message, causes = "", []
    try:
        status = json.loads(exc.body or "{}")
        message = str(status.get("message") or "")
        causes = [str(c.get("message")) for c in (status.get("details") or {}).get("causes") or [] if c.get("message")]
    except (TypeError, ValueError):
        pass
    detail = "; ".join(causes) or message or str(exc.reason)
    if exc.status == 429:
        return f"a PodDisruptionBudget forbids it now ({detail})"
    return f"{exc.status} {exc.reason}: {detail}"


def preempted_note(plan: Preemption, victim: Lease, waiter: str, waiter_priority: int) -> str:
    """The ``Preempted`` event on a victim pod: the queue that took its slice back, and why.

    Example: ``"Preempted by queue org/team-a (reclaim): it is under its guarantee and this pod's queue
    org/team-b is over its own; room made for ns/w on node n1"``.
    """
    if plan.reason == "reclaim":
        return (f"Preempted by queue {plan.for_queue} (reclaim): it is under its guarantee and this pod's "
                f"queue {victim.queue} is over its own; room made for {waiter} on node {plan.node}")
    return (f"Preempted in queue {plan.for_queue} (priority): {waiter} of priority {waiter_priority} needed the "
            f"room (this pod's priority: {victim.priority}) on node {plan.node}")
