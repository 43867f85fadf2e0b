"""The bridge's pending pods (issue 14): in their team queues' lines, set aside with a reason, told why they
wait; the scheduling cycle that serves them, and the preemptions it starts.

Owned by a :class:`~hami_ray.k8s.scheduler.PodScheduler`, which follows the cluster and calls in under its
lock. A pending pod with devices waits in the :class:`~hami_ray.core.waitlist.WaitList` line of its
namespace's queue (discipline ``queues``: lines served by weighted dominant share against the guarantees,
each by ``spec.priority``, then creation); one without devices, or placed before and never bound, is bound
directly. :meth:`PodQueue.cycle` runs one :func:`hami_ray.core.waitlist.serve` cycle: heads are placed
through the inventory; a head that does not fit gets a preemption plan from the inventory, whose pod
victims are evicted (:mod:`hami_ray.k8s.preemption`); a head its queue's limit holds back waits with that
limit as its reason. The waiter is bound only when the victims' leases are gone (the scheduler frees a
lease when its pod is deleted or finishes). What is left to do outside the lock (bindings, evictions)
comes back as calls.

Within a line, pods are served best-effort FIFO, as kube-scheduler and Kueue's ``BestEffortFIFO`` do: a
head that does not fit now (its node selector, taints, or its size) does not block the pods behind it
that fit, within their queue's limit. Only heads get preemptions, and a head is always tried before the
pods behind it, so room freed for a reclaim goes to the pod it was made for. (The waiting list's own
discipline blocks the line behind its head; for pods, whose node constraints differ one from another,
that would let one unplaceable pod hold its whole team back.) Pods behind a head are tried again after a
back-off once something changed, heads as soon as something changed.

A pod that cannot be served now (bad input, an unknown queue, a request over its queue's limit, a binding
refused) is set aside with the reason (kube-scheduler's ``FailedScheduling`` event and ``PodScheduled=False``
condition, once per message) and served again after a back-off (1 s doubling to 10 s) once something
changed, when it changes, when its queue or the queue definitions change, and every minute anyway.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubernetes.client.exceptions import ApiException

from hami_ray.core.errors import HamiRayError, TemporaryError, Unschedulable
from hami_ray.core.hami import ContainerRequest, pod_requests
from hami_ray.core.model import DEFAULT_QUEUE, Lease
from hami_ray.core.queues import Preemption, QueueBook, QueueConfigError, QueueTree
from hami_ray.core.waitlist import Pending, WaitList, serve
from hami_ray.k8s.annotations import NODE_ANNOTATION, binding_annotations
from hami_ray.k8s.kubeapi import pod_path, since
from hami_ray.k8s.nodefit import allowed
from hami_ray.k8s.preemption import Preemptions, Reclaim, eviction, preempted_note, refusal
from hami_ray.k8s.queueing import QUEUES_POLL_S, QueueFile, namespace_queue, pod_terms, unknown_queue, with_terms

if TYPE_CHECKING:
    from hami_ray.k8s.scheduler import PodScheduler

log = logging.getLogger(__name__)
BACKOFF_S = (1.0, 10.0)  # kube-scheduler's pod back-off: initial, most
RESYNC_WAITING_S = 60.0  # a waiting pod is tried again at least this often, cluster change or not
# a pod that fits only nodes with a bind in flight (HAMi's node lock, held until its plugin's Allocate) is not
# unschedulable: it is told so (FailedScheduling, PodScheduled=False) only once it has waited this long
LOCK_WAIT_QUIET_S = 10.0
Call = Callable[[], object]  # an API call a cycle leaves to be made outside the lock
Placed = tuple[dict[str, Any], str, dict[str, str]]  # pod, node, the Binding's annotations


@dataclass
class _Entry:
    """A pending pod being served: what placement read of it (a change serves it again), its containers,
    and (``node``) where it was placed before, never bound."""

    signature: str
    containers: list[ContainerRequest]
    node: str | None = None


@dataclass
class _Tried:
    """A waiting pod that did not fit: the change count then, why, and when it may be tried again behind
    its line's head (heads: as soon as the count moves)."""

    changes: int
    why: str
    retry_at: float
    backoff: float


@dataclass
class _Aside:
    """A pod set aside: when it may be served again."""

    signature: str
    backoff: float = BACKOFF_S[0]
    retry_at: float = 0.0
    last: float = 0.0
    changes: int = 0  # the scheduler's change count when it was set aside


class PodQueue:
    """Pending pods by queue, and the cycle that serves them. Not thread-safe: the scheduler's lock."""

    def __init__(self, sched: PodScheduler, queues: QueueFile | None = None) -> None:
        self.sched = sched
        self.file = queues
        self.waitlist = WaitList("queues")  # keyed by pod uid
        self.preemptions = Preemptions()
        self.namespaces: dict[str, str] = {}  # namespace -> its pods' queue (those not in `default`)
        self._seen_namespaces: set[str] = set()  # every namespace the watch (or a read) has shown
        self.entries: dict[str, _Entry] = {}  # uid -> a pending pod being served
        self._direct: set[str] = set()  # the entries bound without the wait list (a cycle need not scan them all)
        self.aside: dict[str, _Aside] = {}  # uid -> a pod set aside until its back-off is over
        self.told: dict[str, str] = {}  # uid -> the last FailedScheduling message (never repeated)
        self._tried: dict[str, _Tried] = {}  # uid -> when it last did not fit, and why
        self._planned: dict[str, int] = {}  # uid -> changes when no preemption could be planned for it
        self._lock_wait: dict[str, float] = {}  # uid -> since when it fits only nodes with a bind in flight
        self._lock_waited: set[str] = set()  # those whose quiet time ran out (a cycle tells them)
        self._resynced_at = time.monotonic()
        self._can_preempt = True
        self._again = False  # a cycle set a head aside: serve once more

    def queue_of(self, namespace: str | None) -> str:
        """The queue of ``namespace``'s pods (``default`` for a namespace not seen)."""
        return self.namespaces.get(namespace or "", DEFAULT_QUEUE)

    def queue_for(self, namespace: str | None) -> str:
        """:meth:`queue_of`, after reading from the API server a namespace the namespace watch has not shown
        yet: a namespace and its pods created together reach this process by two watches, and the pods'
        can come first (a CPU hog showed it: a labelled namespace's pods were held in ``default``, and
        its queue's priority preemption found none of them)."""
        name = namespace or ""
        sched = self.sched
        if name and name not in self._seen_namespaces and sched.namespace_informer.synced.is_set():
            try:
                if self.on_namespace("ADDED", sched.kube.get(f"/api/v1/namespaces/{name}")):
                    sched.changed()
            except Exception as exc:  # noqa: BLE001 - not readable now: `default` until the watch shows it
                log.info("namespace %s not read (%s): its pods are in queue %s until the watch shows it",
                         name, exc, self.queue_of(name))
        return self.queue_of(namespace)

    # --- membership ------------------------------------------------------------------------------
    def seen(self, pod: dict[str, Any]) -> None:
        """A pending pod of this scheduler was added or changed: served, unless nothing placement reads
        changed (our own condition, a label)."""
        uid = pod["metadata"]["uid"]
        signature = _signature(pod)
        entry = self.entries.get(uid)
        if entry is not None:
            if entry.signature == signature:
                return
            self.remove(uid)
        aside = self.aside.get(uid)
        if aside is not None:
            if aside.signature == signature:
                return
            del self.aside[uid]
        self.enqueue(pod)

    def enqueue(self, pod: dict[str, Any]) -> None:
        """Serve a pending pod: in its queue's line, or (no devices; placed before) bound directly. Bad
        input, an unknown queue or a request over its queue's limit set it aside with the reason."""
        sched, meta = self.sched, pod["metadata"]
        uid = meta["uid"]
        signature = _signature(pod)
        sched.wake()
        if sched.inventory.holds(uid):  # placed before (annotations), not bound: bind it there
            placed_on = (meta.get("annotations") or {}).get(NODE_ANNOTATION)
            if placed_on:
                self.entries[uid] = _Entry(signature, [], node=placed_on)
                self._direct.add(uid)
                return
            sched.free(uid)
        try:
            containers = pod_requests(pod, sched.config)
            sched.reinterpreted(pod, containers)
            priority, preemptible = pod_terms(pod)
            requests = [c.request for c in containers if c.request is not None]
            sched.inventory.validate(requests)  # never fits any device: told now, not when it is a head
        except HamiRayError as exc:
            self.park(pod, "InvalidRequest", str(exc), invalid=True)
            return
        if not requests:
            self.entries[uid] = _Entry(signature, containers)
            self._direct.add(uid)
            return
        namespace = meta.get("namespace")
        queue = self.queue_for(namespace)
        book = sched.inventory.queue_book()
        why = None if book is None else (unknown_queue(str(namespace), queue, book.tree)
                                         or book.never_fits(queue, requests))
        if why is not None:  # until the queue definitions or the namespace change
            self.park(pod, "Unschedulable", why, invalid=True)
            return
        self.waitlist.add(uid, with_terms(requests, queue, priority, preemptible), queue=queue,
                          priority=priority, submitted=since(meta.get("creationTimestamp")))
        self.entries[uid] = _Entry(signature, containers)

    def remove(self, uid: str) -> None:
        """The pod is no longer served (its reclaim, if any, goes on until :meth:`forget`)."""
        self.waitlist.remove(uid)
        self.entries.pop(uid, None)
        self._direct.discard(uid)
        self._tried.pop(uid, None)
        self._planned.pop(uid, None)
        self._lock_wait.pop(uid, None)
        self._lock_waited.discard(uid)

    def forget(self, uid: str) -> None:
        """The pod was bound or left: nothing of it is kept."""
        self.remove(uid)
        self.aside.pop(uid, None)
        self.told.pop(uid, None)
        self.preemptions.done(uid)

    def requeue(self, which: Callable[[dict[str, Any]], bool]) -> None:
        """The pending pods ``which`` selects are served again from scratch (their queue or its definition
        changed), those set aside too."""
        for uid in [u for u in [*self.entries, *self.aside] if u in self.sched.pods]:
            pod = self.sched.pods[uid]
            if which(pod):
                self.remove(uid)
                self.aside.pop(uid, None)
                self.enqueue(pod)

    def on_namespace(self, kind: str, namespace: dict[str, Any]) -> bool:
        """A namespace was added, changed or deleted; True when its pods' queue changed (its waiting pods
        move to the new queue's line; bound pods keep the queue they hold slices in)."""
        name = namespace["metadata"]["name"]
        queue = DEFAULT_QUEUE if kind == "DELETED" else namespace_queue(namespace)
        if kind == "DELETED":
            self._seen_namespaces.discard(name)
        else:
            self._seen_namespaces.add(name)
        if self.queue_of(name) == queue:
            return False
        if queue == DEFAULT_QUEUE:
            self.namespaces.pop(name, None)
        else:
            self.namespaces[name] = queue
        self.requeue(lambda pod: pod["metadata"].get("namespace") == name)
        return True

    def apply(self, tree: QueueTree) -> bool:
        """Use ``tree`` from now on, every waiting pod served again by it; False (logged) when the inventory
        refuses it: a queue that still holds leases is missing (the old definitions stay)."""
        try:
            self.sched.inventory.set_queues(tree)
        except QueueConfigError as exc:
            if self.file is not None:
                self.file.refused(exc)
            else:
                log.error("queue definitions not applied, the previous ones stay: %s", exc)
            return False
        self.requeue(lambda pod: True)
        return True

    # --- time ------------------------------------------------------------------------------------
    def sweep(self, now: float, everyone: bool = False) -> None:
        """Pods set aside whose back-off is over and that saw a change (or waited a minute) are served
        again; ``everyone``: all of them, and every waiting pod is tried again whatever changed."""
        for uid, aside in list(self.aside.items()):
            due = (aside.changes != self.sched.changes and now >= aside.retry_at) or now - aside.last >= RESYNC_WAITING_S
            if everyone or due:
                del self.aside[uid]
                pod = self.sched.pods.get(uid)
                if pod is not None:
                    self.enqueue(pod)
        if everyone or now - self._resynced_at >= RESYNC_WAITING_S:
            self._resynced_at = now
            self._tried.clear()
            self._planned.clear()
            if self.waitlist:
                self.sched.wake()

    def tick(self, now: float) -> bool:
        """What time alone brings: a changed queue file applied, spared victims askable again; True when
        waiting pods may be served differently now."""
        tree = self.file.poll(now, QUEUES_POLL_S) if self.file is not None else None
        applied = tree is not None and self.apply(tree)
        told = [uid for uid, since in self._lock_wait.items()
                if now - since >= LOCK_WAIT_QUIET_S and uid not in self._lock_waited]
        self._lock_waited.update(told)  # a cycle now tells them why they wait
        return self.preemptions.expire(now) or applied or bool(told)

    # --- telling why -------------------------------------------------------------------------------
    def park(self, pod: dict[str, Any], reason: str, message: str, invalid: bool = False) -> None:
        """Set a pod aside with the reason (see the module)."""
        uid = pod["metadata"]["uid"]
        self.remove(uid)
        now = time.monotonic()
        aside = self.aside.get(uid)
        if aside is None:
            aside = self.aside[uid] = _Aside(_signature(pod))
        else:
            aside.backoff = min(aside.backoff * 2, BACKOFF_S[1])
        aside.retry_at, aside.last, aside.changes = now + aside.backoff, now, self.sched.changes
        self.explain(pod, reason, message, invalid)

    def explain(self, pod: dict[str, Any], reason: str, message: str, invalid: bool = False) -> None:
        """kube-scheduler's FailedScheduling event and PodScheduled=False condition, once per message."""
        uid = pod["metadata"]["uid"]
        stats = self.sched.stats
        if invalid:
            stats.invalid += 1
        else:
            stats.unschedulable += 1
        if self.told.get(uid) == message:
            return
        self.told[uid] = message
        self.sched.note(self.sched.event, pod, "Warning", "FailedScheduling", message)
        self.sched.note(self.sched.condition, pod, reason, message)

    # --- the cycle -------------------------------------------------------------------------------
    def cycle(self) -> list[Call]:
        """One scheduling cycle: pods without devices bound, the queues' lines served
        (:func:`~hami_ray.core.waitlist.serve`), preemptions started, waiting heads told why (their queue's
        limit, the reclaim under way, or why they do not fit now). Returns the bindings and evictions to
        make outside the lock."""
        calls: list[Call] = []
        for uid in list(self._direct):
            calls.extend(self._bind_direct(uid, self.entries[uid]))
        why: dict[str, str] = {}
        held: dict[str, str] = {}
        book = self.sched.inventory.queue_book()
        self._again = True
        while self._again:
            self._again = False
            served = serve(self.waitlist, book, functools.partial(self._place, why=why),
                           self._preempt if self._can_preempt else None)
            for pending, (pod, node, annotations) in served.placed:
                held.pop(pending.key, None)
                calls.append(functools.partial(self.sched.bind, pod, node, annotations))
            for pending, plan in served.preemptions:
                calls.extend(self._start(pending, plan))
            held.update(served.held)
        calls.extend(self._backfill(book, why, held))
        for uid, reason in held.items():
            if uid in self.waitlist:  # (one set aside meanwhile was told its own reason)
                if uid in why:  # it was tried: the reclaim under way for it, or why it did not fit
                    reason = self.preemptions.describe(uid) or why[uid]
                if self._waits_quietly(uid):
                    continue
                self.explain(self.sched.pods[uid], "Unschedulable", reason)
        return calls

    def _waits_quietly(self, uid: str) -> bool:
        """Whether the pod waits only for binds in flight, for less than :data:`LOCK_WAIT_QUIET_S` so far:
        no FailedScheduling for it yet (each would be two more writes while the locks turn over)."""
        if not self.sched.waits_for_lock(uid):
            self._lock_wait.pop(uid, None)
            self._lock_waited.discard(uid)
            return False
        now = time.monotonic()
        return now - self._lock_wait.setdefault(uid, now) < LOCK_WAIT_QUIET_S

    def _bind_direct(self, uid: str, entry: _Entry) -> list[Call]:
        """A pod without devices (to the node with the fewest pods) or one placed before (to its node)."""
        sched, pod = self.sched, self.sched.pods[uid]
        if entry.node is not None and sched.inventory.holds(uid):
            sched.placed(uid)
            self.remove(uid)
            return [functools.partial(sched.bind, pod, entry.node, None)]
        self.remove(uid)
        nodes, refused = allowed(pod, sched.nodes, sched.open_nodes())
        try:
            node, annotations = sched.reserve(pod, nodes)
        except Unschedulable as exc:
            total = exc.total_nodes + sum(refused.values())
            self.park(pod, "Unschedulable", str(Unschedulable(total, {**exc.reasons, **refused})))
            return []
        except HamiRayError as exc:
            self.park(pod, "InvalidRequest", str(exc), invalid=True)
            return []
        return [functools.partial(sched.bind, pod, node, annotations)]

    def _backfill(self, book: QueueBook | None, why: dict[str, str], held: dict[str, str]) -> list[Call]:
        """The pods behind heads that wait (they did not fit, or their queue's limit held them back), in
        order, each placed if it fits now within its queue's limit (best-effort FIFO; see the module)."""
        blocked = {self.waitlist.line_of(p) for uid in [*why, *held] if (p := self.waitlist.get(uid)) is not None}
        calls: list[Call] = []
        now = time.monotonic()
        for pending in self.waitlist.ordered(book) if blocked else []:
            uid = pending.key
            if uid in why or uid in held or self.waitlist.line_of(pending) not in blocked:
                continue  # a head (tried, or held by its limit), or a line that is not blocked
            if book is not None and (reason := book.limit_reason(pending.queue, pending.requests)) is not None:
                held[uid] = reason
                continue
            made = self._place(pending, why, now)
            if made is not None:
                self.waitlist.remove(uid)
                calls.append(functools.partial(self.sched.bind, *made))
            elif uid in why and uid in self.waitlist:
                held[uid] = why[uid]
        return calls

    def _place(self, pending: Pending, why: dict[str, str], behind: float | None = None) -> Placed | None:
        """serve()'s ``place``: hold the pod's slices on an allowed node, or None (``why[uid]`` says why).
        A pod that did not fit is not tried again until the cluster changed (nothing else moves its fit),
        and (``behind``: now, a pod behind its line's head) its back-off is over."""
        sched, uid = self.sched, pending.key
        pod, entry = sched.pods.get(uid), self.entries.get(uid)
        if pod is None or entry is None:  # gone meanwhile
            self.remove(uid)
            self._again = True
            return None
        tried = self._tried.get(uid)
        if tried is not None and (tried.changes == sched.changes or (behind is not None and behind < tried.retry_at)):
            if behind is None:
                why[uid] = tried.why
            return None
        nodes, refused = allowed(pod, sched.nodes, sched.open_nodes())
        try:
            allocation = sched.place(uid, sched.owner(pod), pending.requests, nodes)
        except Unschedulable as exc:  # counted with the nodes its selector, taints or cordons left out
            message = str(Unschedulable(exc.total_nodes + sum(refused.values()), {**exc.reasons, **refused}))
        except TemporaryError as exc:  # its queue's limit on what it would really take; a refusal (Ray)
            message = str(exc)
        except HamiRayError as exc:  # a request no device can ever hold
            self.park(pod, "InvalidRequest", str(exc), invalid=True)
            self._again = True
            return None
        except Exception as exc:  # noqa: BLE001 - a long-running loop never dies on one bad object
            log.exception("pod %s not placed", sched.owner(pod))
            self.park(pod, "SchedulerError", f"{type(exc).__name__}: {exc}")
            self._again = True
            return None
        else:
            sched.placed(uid)
            self.forget(uid)
            return pod, allocation.node, binding_annotations(allocation.node, entry.containers, allocation)
        backoff = BACKOFF_S[0] if tried is None else min(tried.backoff * 2, BACKOFF_S[1])
        self._tried[uid] = _Tried(sched.changes, message, time.monotonic() + backoff, backoff)
        why[uid] = message
        return None

    # --- preemption ------------------------------------------------------------------------------
    def _preempt(self, pending: Pending) -> Preemption | None:
        """serve()'s ``preempt``: a plan for a head that does not fit, unless one is under way for it or
        none was found since the cluster last changed."""
        sched, uid = self.sched, pending.key
        pod = sched.pods.get(uid)
        if pod is None or uid not in self.waitlist:
            return None
        if self.preemptions.active(uid, self._holds) or self._planned.get(uid) == sched.changes:
            return None
        if sched.waits_for_lock(uid):  # it fits a node with a bind in flight: it waits for that lock
            return None
        nodes, _ = allowed(pod, sched.nodes, sched.open_nodes())
        try:
            plan = sched.inventory.plan_preemption(uid, pending.requests, nodes,
                                                   self.preemptions.spare(time.monotonic()))
        except NotImplementedError as exc:
            log.info("no preemption for pods: %s", exc)
            self._can_preempt = False
            return None
        except HamiRayError as exc:
            log.warning("pod %s: no preemption planned: %s", sched.owner(pod), exc)
            plan = None
        if plan is None:
            self._planned[uid] = sched.changes
        return plan

    def _holds(self, lease_id: str) -> bool:
        """Whether a victim's lease is still held (a pod's: until the scheduler saw the pod go)."""
        return lease_id.startswith("pod-") and self.sched.inventory.holds(lease_id.removeprefix("pod-"))

    def _start(self, pending: Pending, plan: Preemption) -> list[Call]:
        """Start ``plan`` for ``pending``: the inventory tells the victims it stops itself; the pod victims
        are evicted (outside the lock), their leases held until they are gone."""
        sched = self.sched
        waiter = sched.pods[pending.key]
        try:
            pods = sched.inventory.preempt(plan)
        except (NotImplementedError, HamiRayError) as exc:
            log.warning("preemption for %s not started: %s", sched.owner(waiter), exc)
            return []
        evicting = {f"pod-{uid}": uid for uid in pods}
        reclaim = self.preemptions.start(pending.key, plan, set(evicting))
        log.info("%s for pod %s: evicting %s", plan.reason, sched.owner(waiter), ", ".join(reclaim.victims.values()))
        calls: list[Call] = []
        for lease in plan.victims:
            victim = sched.pods.get(evicting.get(lease.lease_id, ""))
            if victim is None:  # gone already, or not a pod (told by the inventory)
                reclaim.pending.discard(lease.lease_id)
                continue
            calls.append(functools.partial(self._evict, reclaim, victim, lease, sched.owner(waiter), pending.priority))
        return calls

    def _evict(self, reclaim: Reclaim, victim: dict[str, Any], lease: Lease, waiter: str, priority: int) -> None:
        """One ``pods/eviction`` call (outside the lock). Accepted: a ``Preempted`` event on the victim. A 429
        is its PodDisruptionBudget refusing: it stays, spared for a while (other plans are tried)."""
        sched = self.sched
        refused: str | None = None
        try:
            sched.kube.post(pod_path(victim, "/eviction"), eviction(victim))
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone already, or another pod of that name: nothing to evict
                refused = refusal(exc)
        except Exception as exc:  # noqa: BLE001 - the API server went away: ask again later
            refused = f"eviction failed: {exc}"
        if refused is None:
            log.info("evicted %s (%s for queue %s)", sched.owner(victim), reclaim.plan.reason, reclaim.plan.for_queue)
            sched.note(sched.event, victim, "Normal", "Preempted",
                       preempted_note(reclaim.plan, lease, waiter, priority), "Pod", "Preempting")
        else:
            log.info("eviction of %s refused: %s", sched.owner(victim), refused)
        with sched.lock:
            self.preemptions.answered(reclaim, lease.lease_id, refused, time.monotonic())
            sched.changed()


def _signature(pod: dict[str, Any]) -> str:
    """What placement reads of a pod: its annotations and containers' resources."""
    spec = pod.get("spec") or {}
    return json.dumps([pod["metadata"].get("annotations"),
                       [c.get("resources") for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])]],
                      sort_keys=True)
