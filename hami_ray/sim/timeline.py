"""The time-driven replay (issue 14): the openb trace with its creation and deletion times, pods that wait,
run, leave and are preempted, on the engine the runtime uses.

Called by :mod:`hami_ray.sim.timeline_report` (seeds x modes, metrics, JSON) and so by
``hami-ray simulate --timeline``. One :class:`Replay` drives a :class:`Ledger`, a :class:`Scheduler` with the
default policies, a :class:`QueueBook` and a :class:`WaitList`, and runs one :func:`serve` cycle per event,
as the placement actor and the Kubernetes bridge do. docs/timeline.md states the semantics; in short:

- Modes (the same pods, nodes and seed for each): ``fifo`` (one line in submission order, no preemption),
  ``priority`` (one line by priority, then submission; the ``default`` queue with priority preemption) and
  ``queues`` (:data:`TEAMS` team queues with equal guarantees summing to the cluster; fair share, reclaim,
  priority preemption within a team).
- A pod's team: ``team-<crc32(f"{seed}:{name}") % 4>`` (:func:`team_of`), in every mode (fifo and priority
  ignore it for placement but report by it). Its priority comes from its qos (:data:`PRIORITY_OF_QOS`).
- Events on simulated time: a pod arrives at its ``creation_s``; once placed it runs ``duration_s`` and frees
  its lease. A preemption interrupts its victims at once (their work so far is lost) and frees their slices
  after ``grace_s``; only then do they go back to their queue, to run again from the start. The pod that
  asked waits until the slices are free: nothing is double-booked.
- The room a preemption frees is nominated for the pod that asked (:mod:`hami_ray.core.nomination`, the
  code the placement actor uses): from the moment the victims are gone until the pod is placed or
  ``nomination_s`` (:data:`NOMINATION_S`) more simulated seconds pass, it is held while a pod of another
  line is placed or plans a preemption. A pod of the same line (it heads the line, so the nominee is behind
  it) is not kept from it: held, the room would idle while that head blocks the line.
- The replay ends at the trace's end (its last deletion); pods still waiting then count that wait.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import zlib
from collections.abc import Sequence
import time
from dataclasses import dataclass, field

import numpy as np

from hami_ray.core.errors import InvalidRequest, Unschedulable
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import DEFAULT_QUEUE, Lease, LeaseState, Node
from hami_ray.core.nomination import NOMINATION_S, Nominations
from hami_ray.core.queues import Preemption, QueueBook, QueueSpec, QueueTree, Quota
from hami_ray.core.scheduler import Scheduler
from hami_ray.core.waitlist import DISCIPLINES, Discipline, Pending, WaitList, serve
from hami_ray.sim.trace import TimedPod

__all__ = ["DEFAULT_GRACE_S", "DEFAULT_NODE_FRACTION", "MODES", "NOMINATION_S", "PRIORITY_OF_QOS", "TEAMS",
           "PodRecord", "Replay", "ReplayResult", "select_nodes", "team_of", "team_tree"]

Mode = Discipline
MODES: tuple[Mode, ...] = DISCIPLINES  # fifo, priority, queues: a mode is the wait list's discipline
TEAMS = 4
DEFAULT_GRACE_S = 30.0  # simulated seconds between a preemption notice and the slice being free
# The trace holds at most ~65 GPUs at once on a 6,212-GPU cluster: on the whole cluster nothing ever waits.
# The replay runs on a seeded subset with this share of the GPUs (56-62 GPUs for seeds 42-46): the largest
# fraction, in steps of 0.001, at which FIFO makes pods wait on each of the 5 seeds (docs/timeline.md).
DEFAULT_NODE_FRACTION = 0.009
# qos -> priority: LS high, BE low, as the issue says; the Kubernetes QoS classes in their eviction order
# (Guaranteed is evicted last, BestEffort first), so Guaranteed sits with LS and Burstable between.
PRIORITY_OF_QOS: dict[str, int] = {"LS": 2, "Guaranteed": 2, "Burstable": 1, "BE": 0}
PRIORITY_NAMES: dict[int, str] = {2: "high", 1: "mid", 0: "low"}

HEAD_WAITS_KEPT = 5  # the longest waits at the head of a line a result keeps
# at equal times: ends first (free capacity), then slices leaving, then nominations expiring, then arrivals
_FINISH, _LEAVE, _EXPIRE, _ARRIVE = 0, 1, 2, 3


def team_of(name: str, seed: int, teams: int = TEAMS) -> str:
    """A pod's team: a stable hash of its name salted with the seed (never Python's ``hash()``, which
    changes per process).

    Example: ``team_of("openb-pod-0000", 42)`` is the same on every machine and every run.
    """
    return f"team-{zlib.crc32(f'{seed}:{name}'.encode()) % teams}"


def select_nodes(nodes: Sequence[Node], fraction: float, seed: int) -> list[Node]:
    """GPU nodes in a seeded random order, taken until they hold ``fraction`` of the cluster's GPUs.

    ``fraction >= 1`` keeps every GPU node, in the file's order.

    Example: ``select_nodes(nodes, 0.009, 42)`` holds 57 of openb's 6,212 GPUs (10 nodes).

    Raises:
        InvalidRequest: ``fraction`` is not in (0, 1], or there are no GPU nodes.
    """
    if not 0 < fraction <= 1:
        raise InvalidRequest("node_fraction", f"must be in (0, 1], got {fraction}")
    gpu_nodes = [n for n in nodes if n.devices]
    if not gpu_nodes:
        raise InvalidRequest("nodes", "no node has a GPU")
    if fraction >= 1:
        return gpu_nodes
    target = fraction * sum(len(n.devices) for n in gpu_nodes)
    order = np.random.default_rng(seed).permutation(len(gpu_nodes))
    out: list[Node] = []
    gpus = 0
    for i in order:
        if gpus >= target:
            break
        out.append(gpu_nodes[int(i)])
        gpus += len(gpu_nodes[int(i)].devices)
    return out


def team_tree(ledger: Ledger, teams: int = TEAMS) -> QueueTree:
    """``teams`` queues ``team-0``.. with equal guarantees (floored) summing to the cluster's memory, cores
    and devices, no limit, weight 1."""
    capacity = QueueBook(QueueTree(), ledger).capacity()
    each = Quota(memory_mib=capacity.memory_mib // teams, cores=capacity.cores // teams,
                 devices=capacity.devices // teams)
    return QueueTree.from_specs(QueueSpec(name=f"team-{i}", guaranteed=each) for i in range(teams))


@dataclass
class PodRecord:
    """One pod's life in a replay. ``waited_s`` sums every wait: from its arrival to its first start, and
    from each preemption notice to its next start (or to the replay's end)."""

    name: str
    team: str
    qos: str
    priority: int
    gpu_milli: int  # GPUs x 1000 (the trace's size; 0 for a CPU-only pod)
    arrived_s: float
    waited_s: float = 0.0
    waiting_since: float | None = None  # None while running, finished or not yet arrived
    started_s: float | None = None  # the running attempt's start
    attempt: int = 0
    lease_id: str = ""
    runs: int = 0  # starts
    preempted: int = 0
    lost_s: float = 0.0  # run time thrown away by preemptions
    done: bool = False
    refused: str = ""  # why it can never run on these nodes (counted apart from the waits)


@dataclass
class ReplayResult:
    """What one replay measured: the pods and the state after every event (for time-weighted figures).

    ``series`` columns: ``t`` (seconds), ``alloc`` (GPU milli held by leases, victims in their grace
    included), and per team ``held``/``want`` (GPU milli held; held plus waiting). A row holds from its
    ``t`` until the next row's.
    """

    mode: str
    seed: int
    gpus: int
    nodes: int
    end_s: float
    teams: list[str]
    guarantee_milli: float  # each team's guarantee in GPUs x 1000 (capacity / teams)
    pods: list[PodRecord]
    t: list[float] = field(default_factory=list)
    alloc: list[int] = field(default_factory=list)
    held: list[list[int]] = field(default_factory=list)  # per row: per team
    want: list[list[int]] = field(default_factory=list)
    preemptions: dict[str, int] = field(default_factory=dict)  # reason -> victims
    # for each preemption, the pod it was for: "placed" the moment its victims were gone, "placed_before"
    # (room came elsewhere first), "placed_later" (after they were gone, within its nomination: it waited
    # for its turn), or "lost_room" (not placed within its nomination: others took the room, or it planned
    # another preemption, or the replay ended first)
    outcomes: dict[str, int] = field(default_factory=dict)
    head_waits: list[tuple[float, str, str, float]] = field(default_factory=list)  # longest: (s, line, pod, from)
    runtime_s: float = 0.0


class Replay:
    """One mode on one node set and seed. Not reusable: build one per run.

    Example::

        result = Replay(nodes, pods, "queues", seed=42).run()
        result.preemptions  # {"reclaim": ..., "priority": ...}
    """

    def __init__(self, nodes: Sequence[Node], pods: Sequence[TimedPod], mode: Mode, *, seed: int,
                 grace_s: float = DEFAULT_GRACE_S, teams: int = TEAMS, end_s: float | None = None,
                 check: bool = False, nomination_s: float | None = NOMINATION_S) -> None:
        """``check``: verify the ledger's invariants after every event (tests; slow on big traces).
        ``nomination_s``: how long freed room stays nominated after the grace; None: no nomination (room
        freed by a preemption goes to whoever asks first, as before the engine nominated it)."""
        if mode not in MODES:
            raise InvalidRequest("mode", f"unknown mode {mode!r} (known: {', '.join(MODES)})")
        if grace_s < 0:
            raise InvalidRequest("grace_s", f"must be >= 0, got {grace_s}")
        if nomination_s is not None and nomination_s < 0:
            raise InvalidRequest("nomination_s", f"must be >= 0 or None, got {nomination_s}")
        self.nomination_s = nomination_s
        self.nominations = Nominations()
        self.mode: Mode = mode
        self.seed = seed
        self.grace_s = float(grace_s)
        self.ledger = Ledger(nodes)
        self.scheduler = Scheduler(self.ledger)  # the default node and device policies
        tree = team_tree(self.ledger, teams) if mode == "queues" else QueueTree()
        self.book = QueueBook(tree, self.ledger)
        self.waitlist = WaitList(mode)
        self.teams = [f"team-{i}" for i in range(teams)]
        self._team_index = {t: i for i, t in enumerate(self.teams)}
        self._pods = {p.name: p for p in pods}
        if len(self._pods) != len(pods):
            raise InvalidRequest("pods", "pod names must be unique")
        self.records = {p.name: PodRecord(p.name, team_of(p.name, seed, teams), p.qos, PRIORITY_OF_QOS[p.qos],
                                          p.pod.total_milli, float(p.creation_s)) for p in pods}
        self.end_s = float(end_s if end_s is not None else max((p.creation_s + p.duration_s for p in pods), default=0))
        self.now = 0.0
        # (time, kind, seq, pod name or, for _LEAVE, the preemption's number, attempt of the run it ends)
        self._events: list[tuple[float, int, int, str, int]] = []
        self._seq = itertools.count()
        self._version = 0  # moves with every change to the ledger or the book (see _place)
        self._no_fit: dict[str, int] = {}  # pod -> version when it last did not fit
        self._no_plan: dict[str, int] = {}  # pod -> version when no preemption could make room for it
        self._making_room: dict[str, int] = {}  # waiting pod -> the preemption under way for it
        self._after_leave: set[str] = set()  # pods whose victims are gone, not placed yet, nomination on
        self._plans: dict[int, tuple[str, list[str]]] = {}  # preemption -> (pod it is for, victims' pods)
        self._leaving: set[str] = set()  # lease ids of the victims in their grace
        self._plan_ids = itertools.count()
        self._alloc = 0
        self._held = [0] * teams
        self._want = [0] * teams
        self.preemptions = {"reclaim": 0, "priority": 0}
        self.outcomes = {"placed": 0, "placed_before": 0, "placed_later": 0, "lost_room": 0}
        self._left: list[tuple[str, bool]] = []  # (pod a preemption was for, whether it still waited)
        self.check = check
        self._heads: dict[str, tuple[str, float]] = {}  # line -> (its head, since when it is the head)
        self._head_waits: list[tuple[float, str, str, float]] = []
        self.result = ReplayResult(mode, seed, sum(len(n.devices) for n in nodes), len(nodes), self.end_s,
                                   self.teams, 1000.0 * sum(len(n.devices) for n in nodes) / teams, [])
        for p in pods:
            self._push(float(p.creation_s), _ARRIVE, p.name)

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> ReplayResult:
        """Replay every event up to the end; returns :attr:`result` with the pods' records."""
        started = time.perf_counter()
        while self._events and self._events[0][0] <= self.end_s:
            t, kind, _, name, attempt = heapq.heappop(self._events)
            self.now = t
            if kind == _ARRIVE:
                self._arrive(name)
            elif kind == _FINISH:
                if self.records[name].attempt != attempt or self.records[name].started_s is None:
                    continue  # a run that was preempted: its end is void
                self._finish(name)
            elif kind == _EXPIRE:
                if not self._expire(name):
                    continue  # a nomination dropped or replaced since: nothing changed
            else:
                self._leave(name)
            self._cycle()
            for beneficiary, waited in self._left:
                if not waited:
                    self.outcomes["placed_before"] += 1
                elif self.records[beneficiary].started_s == self.now:
                    self.outcomes["placed"] += 1
                elif beneficiary in self.nominations:
                    self._after_leave.add(beneficiary)  # its room is kept: placed later, or lost on expiry
                else:
                    self.outcomes["lost_room"] += 1
            self._left.clear()
            self._record()
            if self.check:
                self.ledger.check_invariants()
        self.now = self.end_s
        self.outcomes["lost_room"] += len(self._after_leave)  # the replay ended before they were placed
        self._after_leave.clear()
        for line, (key, since) in self._heads.items():
            self._head_waits.append((self.end_s - since, line, key, since))
        for rec in self.records.values():
            if rec.waiting_since is not None:
                rec.waited_s += max(0.0, self.end_s - rec.waiting_since)
                rec.waiting_since = None
        self.result.pods = list(self.records.values())
        self.result.preemptions = dict(self.preemptions)
        self.result.outcomes = dict(self.outcomes)
        self.result.head_waits = sorted(self._head_waits, reverse=True)[:HEAD_WAITS_KEPT]
        self.result.runtime_s = time.perf_counter() - started
        return self.result

    def _push(self, t: float, kind: int, name: str, attempt: int = 0) -> None:
        heapq.heappush(self._events, (t, kind, next(self._seq), name, attempt))

    def _cycle(self) -> None:
        preempt = None if self.mode == "fifo" else self._preempt
        serve(self.waitlist, self.book, self._place, preempt)
        # how long each line's head stays at its head: what blocks a line (fifo and priority: one line)
        heads = {self.waitlist.line_of(p): p.key for p, _ in self.waitlist.heads(self.book)}
        for line, (key, since) in list(self._heads.items()):
            if heads.get(line) != key:
                self._head_waits.append((self.now - since, line, key, since))
                del self._heads[line]
        for line, key in heads.items():
            if line not in self._heads:
                self._heads[line] = (key, self.now)
        if len(self._head_waits) > 4 * HEAD_WAITS_KEPT:
            self._head_waits = sorted(self._head_waits, reverse=True)[:HEAD_WAITS_KEPT]

    def _record(self) -> None:
        r = self.result
        if r.t and r.t[-1] == self.now:  # several events at one time: the last state holds
            r.alloc[-1], r.held[-1], r.want[-1] = self._alloc, list(self._held), list(self._want)
            return
        r.t.append(self.now)
        r.alloc.append(self._alloc)
        r.held.append(list(self._held))
        r.want.append(list(self._want))

    # --- events ------------------------------------------------------------------------------
    def _arrive(self, name: str) -> None:
        rec, pod = self.records[name], self._pods[name]
        try:
            self.scheduler.place(pod.pod.request)  # holds nothing: asks whether it could ever fit here
        except InvalidRequest as exc:
            rec.refused = str(exc)
        except Unschedulable as exc:
            rec.refused = str(exc) if exc.never else ""
        if rec.refused:  # no node of this set could hold it even empty: the runtime refuses it at once
            return
        self._want[self._team_index[rec.team]] += rec.gpu_milli
        self._enqueue(rec)

    def _enqueue(self, rec: PodRecord) -> None:
        if rec.waiting_since is None:
            rec.waiting_since = self.now
        queue = rec.team if self.mode == "queues" else DEFAULT_QUEUE
        request = self._pods[rec.name].pod.request.model_copy(update={"priority": rec.priority, "queue": queue})
        # submitted = now: a preempted pod goes behind those already waiting, as Kueue requeues by eviction time
        self.waitlist.add(rec.name, [request], queue=queue, priority=rec.priority, submitted=self.now)

    def _finish(self, name: str) -> None:
        rec = self.records[name]
        self._free(rec)
        rec.started_s = None
        rec.done = True
        self._want[self._team_index[rec.team]] -= rec.gpu_milli

    def _leave(self, plan: str) -> None:
        """A preemption's grace is over: its victims' slices are free (together: they were noticed together),
        and the victims wait in their queues again. The pod it was for may ask for another one from now on."""
        beneficiary, victims = self._plans.pop(int(plan))
        if self._making_room.get(beneficiary) == int(plan):
            del self._making_room[beneficiary]
        self._left.append((beneficiary, self.records[beneficiary].waiting_since is not None))
        for name in victims:
            rec = self.records[name]
            self._leaving.discard(rec.lease_id)
            self._free(rec)
        for name in victims:
            self._enqueue(self.records[name])

    def _expire(self, name: str) -> bool:
        """``name``'s nomination ends now, if it is still the one that ends now (not dropped, not replaced
        by a later preemption's). Returns whether it ended."""
        nomination = self.nominations.get(name)
        if nomination is None or nomination.until != self.now:
            return False
        self.nominations.drop(name)
        self._version += 1  # room held for it is anyone's again: pods that did not fit may now
        if name in self._after_leave:
            self._after_leave.discard(name)
            self.outcomes["lost_room"] += 1
        return True

    def _holding_others(self, name: str) -> contextlib.AbstractContextManager[tuple[str, ...]]:
        """While ``name`` (the head of its line: :func:`serve` tries no other) is placed or plans a
        preemption, the room nominated for waiting pods of other lines is held. Not held: that of pods whose
        victims are still leaving (the victims hold it), and that of pods behind ``name`` in its own line
        (they could not take it before ``name``; held, it would idle while ``name`` blocks the line)."""
        line = self._line(name)
        behind = {key for key, _ in self.nominations.items() if self._line(key) == line}
        return self.nominations.holding_others(self.ledger, self.scheduler, name, self.now, set(self._making_room),
                                               behind)

    def _line(self, name: str) -> str:
        """The wait-list line ``name`` waits in: its team's under ``queues``; the one line otherwise."""
        return self.records[name].team if self.mode == "queues" else DEFAULT_QUEUE

    def _free(self, rec: PodRecord) -> None:
        self.ledger.release(rec.lease_id)
        self.book.drop(rec.lease_id)
        self._alloc -= rec.gpu_milli
        self._held[self._team_index[rec.team]] -= rec.gpu_milli
        rec.lease_id = ""
        self._version += 1

    # --- serve()'s callbacks -----------------------------------------------------------------
    def _place(self, pending: Pending) -> Lease | None:
        """Place and hold a waiting pod, or None. A pod that did not fit at this version of the ledger and
        book does not fit now either (placement depends on nothing else), so it is not tried again."""
        name = pending.key
        if self._no_fit.get(name) == self._version:
            return None
        try:
            with self._holding_others(name):
                allocation = self.scheduler.place(list(pending.requests))
        except Unschedulable:
            self._no_fit[name] = self._version
            return None
        if self.book.over_limit(pending.queue, allocation) is not None:  # the teams have no limit; kept honest
            self._no_fit[name] = self._version
            return None
        rec = self.records[name]
        rec.attempt += 1
        lease = Lease(lease_id=f"{name}#{rec.attempt}", owner=name, allocation=allocation, token="",
                      state=LeaseState.ACTIVE, priority=pending.priority, created_at=self.now, holder="pod",
                      queue=pending.queue)
        self.ledger.allocate(lease)
        self.book.hold(lease)
        self._version += 1
        self._alloc += rec.gpu_milli
        self._held[self._team_index[rec.team]] += rec.gpu_milli
        rec.lease_id = lease.lease_id
        rec.started_s = self.now
        rec.runs += 1
        if rec.waiting_since is not None:
            rec.waited_s += self.now - rec.waiting_since
            rec.waiting_since = None
        self._making_room.pop(name, None)  # its victims still leave; it no longer waits for them
        self.nominations.drop(name)  # nor keeps their room
        if name in self._after_leave:
            self._after_leave.discard(name)
            self.outcomes["placed_later"] += 1
        self._push(self.now + self._pods[name].duration_s, _FINISH, name, rec.attempt)
        return lease

    def _preempt(self, pending: Pending) -> Preemption | None:
        """Start the preemption that makes room for ``pending``: victims are interrupted now and their
        slices freed after the grace. None while one is under way for it, or when none is possible."""
        name = pending.key
        if name in self._making_room or self._no_plan.get(name) == self._version:
            return None
        # spare: a slice under notice is already going; no later plan may count on it again. Room nominated
        # for others is held too: a plan counting on it would free slices the pod could then not take
        with self._holding_others(name):
            plan = self.book.plan_preemption(self.scheduler, pending.requests, pending.queue, pending.priority,
                                             spare=self._leaving)
        if plan is None:
            self._no_plan[name] = self._version
            return None
        for victim in plan.victims:
            self._interrupt(victim)
        plan_id = next(self._plan_ids)
        self._plans[plan_id] = (name, [v.owner for v in plan.victims])
        self._making_room[name] = plan_id
        self._push(self.now + self.grace_s, _LEAVE, str(plan_id))
        self.preemptions[plan.reason] += len(plan.victims)
        if name in self._after_leave:  # its earlier preemption's room did not serve it
            self._after_leave.discard(name)
            self.outcomes["lost_room"] += 1
        if self.nomination_s is not None:
            until = self.now + self.grace_s + self.nomination_s
            self.nominations.nominate(name, plan.node, pending.requests, until)
            self._push(until, _EXPIRE, name)
        return plan

    def _interrupt(self, victim: Lease) -> None:
        rec = self.records[victim.owner]
        assert rec.started_s is not None and rec.lease_id == victim.lease_id
        rec.lost_s += self.now - rec.started_s
        rec.preempted += 1
        rec.started_s = None  # its FINISH event is void from now on
        rec.waiting_since = self.now  # interrupted: it waits from the notice on; the ledger and the book
        self._version += 1  # keep its slice until the grace ends (spared by later plans: see _preempt)
        self._leaving.add(victim.lease_id)
