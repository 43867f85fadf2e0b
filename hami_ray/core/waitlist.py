"""Waiting work and who is served next (issue 14): one discipline for the placement actor, the Kubernetes
bridge and the simulator, so that what the trace replay shows is what the cluster does.

Called by :class:`~hami_ray.runtime.service.PlacementService` (the Ray placement actor's queue), the
Kubernetes bridge's pending pods, and :mod:`hami_ray.sim.timeline`. Pure: times come from the caller.

Disciplines:

- ``fifo``: one line in submission order; its head blocks everyone behind it (no backfill), so a large
  request is never starved by small ones.
- ``priority``: one line, higher priority first, then submission; the head blocks.
- ``queues`` (the runtime's): a line per team queue, each in priority-then-submission order. The heads
  of the lines are served in the order of :meth:`QueueBook.order_key` (weighted dominant share against
  the guarantee first, as KAI scheduler and Kueue's fair sharing do). A head that does not fit blocks only
  its own line; a head its queue's limit holds back is skipped with that reason and blocks nothing else.
  With no queues defined every request is in ``default``: one line in priority order, as before.

A gang waits as one entry (its ``requests`` are its bundles, ``strategy`` its gang strategy).

:func:`serve` runs one synchronous scheduling cycle over a wait list (the simulator's and the bridge's
loop); the async placement actor asks :meth:`WaitList.heads` itself, since each of its waiters is a
coroutine that places its own request.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from hami_ray.core.errors import InvalidRequest
from hami_ray.core.model import DEFAULT_QUEUE, SliceRequest
from hami_ray.core.queues import Preemption, QueueBook

__all__ = ["DISCIPLINES", "Discipline", "Pending", "WaitList", "Served", "serve"]

Discipline = Literal["fifo", "priority", "queues"]
DISCIPLINES: tuple[Discipline, ...] = ("fifo", "priority", "queues")
_ONE_LINE = ""  # the line of every request under fifo and priority


@dataclass(frozen=True, slots=True)
class Pending:
    """One waiting request: a task, an actor, a pod's containers (one node), or a gang (``strategy``).

    ``key`` is the caller's id for it (a lease id, a pod uid, a waiter number as text).
    """

    key: str
    requests: tuple[SliceRequest, ...]
    queue: str = DEFAULT_QUEUE
    priority: int = 0
    submitted: float = 0.0
    seq: int = 0
    strategy: str = ""

    def describe(self) -> str:
        """``"4.0 GiB x1 (queue org/a, priority 5)"``; a gang: ``"gang of 4 (PACK): ..."``."""
        first = self.requests[0].describe() if self.requests else "nothing"
        what = f"gang of {len(self.requests)} ({self.strategy}): {first}, ..." if self.strategy else first
        return f"{what} (queue {self.queue}, priority {self.priority})"


class WaitList:
    """Waiting requests in lines (see the module). Not thread-safe: callers serialise, as for the ledger.

    Example::

        wl = WaitList()
        wl.add("t1", [req], queue="org/a", priority=0, submitted=0.0)
        [(p.key, why) for p, why in wl.heads(book)] == [("t1", None)]
    """

    def __init__(self, discipline: Discipline = "queues") -> None:
        if discipline not in DISCIPLINES:
            raise InvalidRequest("discipline", f"unknown discipline {discipline!r} (known: {', '.join(DISCIPLINES)})")
        self.discipline: Discipline = discipline
        self._lines: dict[str, list[tuple[tuple[float, ...], str]]] = {}  # line -> heap of (key, pending key)
        self._items: dict[str, Pending] = {}
        self._seq = itertools.count()

    # --- membership --------------------------------------------------------------------------
    def add(self, key: str, requests: Sequence[SliceRequest], *, queue: str = DEFAULT_QUEUE, priority: int = 0,
            submitted: float = 0.0, strategy: str = "") -> Pending:
        """Queue a request under ``key`` (unique among those waiting).

        Raises:
            InvalidRequest: ``key`` already waits, or ``requests`` is empty.
        """
        if key in self._items:
            raise InvalidRequest("key", f"{key!r} already waits")
        if not requests:
            raise InvalidRequest("requests", "a waiting entry needs at least one request")
        pending = Pending(key, tuple(requests), queue or DEFAULT_QUEUE, priority, submitted, next(self._seq), strategy)
        self._items[key] = pending
        heapq.heappush(self._lines.setdefault(self.line_of(pending), []), (self._line_key(pending), key))
        return pending

    def remove(self, key: str) -> Pending | None:
        """``key`` leaves (served, cancelled, failed), wherever it stands; idempotent."""
        return self._items.pop(key, None)  # its heap entry is dropped lazily (see _top)

    def get(self, key: str) -> Pending | None:
        return self._items.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Pending]:
        return iter(list(self._items.values()))

    def line_of(self, pending: Pending) -> str:
        """The line ``pending`` waits in: its queue under ``queues``, else the one line."""
        return pending.queue if self.discipline == "queues" else _ONE_LINE

    def _line_key(self, p: Pending) -> tuple[float, ...]:
        return (p.submitted, p.seq) if self.discipline == "fifo" else (-p.priority, p.submitted, p.seq)

    def _top(self, line: str) -> Pending | None:
        heap = self._lines.get(line)
        while heap:
            key = heap[0][1]
            pending = self._items.get(key)
            if pending is not None and pending.seq == self._seq_of(heap[0]):
                return pending
            heapq.heappop(heap)
        self._lines.pop(line, None)
        return None

    @staticmethod
    def _seq_of(entry: tuple[tuple[float, ...], str]) -> int:
        return int(entry[0][-1])

    # --- order -------------------------------------------------------------------------------
    def heads(self, book: QueueBook | None = None) -> list[tuple[Pending, str | None]]:
        """The head of each line in serving order, each with the reason its queue holds it back (its limit
        with what it holds now), or None when it may be tried. ``book`` is needed under ``queues`` (None
        there: heads by priority, then submission; no limits).

        Raises:
            InvalidRequest: a waiting request names a queue ``book`` does not know (the caller refused it
                at submission, so this means the definitions changed under it).
        """
        tops = [p for line in list(self._lines) if (p := self._top(line)) is not None]
        if self.discipline != "queues" or book is None:
            return [(p, None) for p in sorted(tops, key=self._line_key)]
        keyed = sorted(((book.order_key(p.queue, p.priority, p.submitted, p.seq), p) for p in tops),
                       key=lambda kp: kp[0])
        return [(p, book.limit_reason(p.queue, p.requests)) for _, p in keyed]

    def ordered(self, book: QueueBook | None = None, limit: int | None = None) -> list[Pending]:
        """Every waiting request in the order it would be served if nothing changed: line heads by
        :meth:`heads`, then the rest of each line (for status views). ``limit``: only the first ones."""
        lines: dict[str, list[Pending]] = {}
        for p in self._items.values():
            lines.setdefault(self.line_of(p), []).append(p)
        for members in lines.values():
            members.sort(key=self._line_key)
        rank = {self.line_of(p): i for i, (p, _) in enumerate(self.heads(book))}
        out = [p for line in sorted(lines, key=lambda ln: rank.get(ln, len(rank))) for p in lines[line]]
        return out if limit is None else out[:limit]


T = TypeVar("T")


@dataclass
class Served(Generic[T]):
    """What one :func:`serve` cycle did: ``placed`` (each entry with what ``place`` returned, in order),
    ``preemptions`` started (each for the entry it makes room for), and ``held`` (key -> why an entry
    stays waiting: its queue's limit, or that it does not fit now)."""

    placed: list[tuple[Pending, T]] = field(default_factory=list)
    preemptions: list[tuple[Pending, Preemption]] = field(default_factory=list)
    held: dict[str, str] = field(default_factory=dict)


def serve(waitlist: WaitList, book: QueueBook | None, place: Callable[[Pending], T | None],
          preempt: Callable[[Pending], Preemption | None] | None = None) -> Served[T]:
    """One scheduling cycle: serve heads in order until none can be placed.

    ``place(p)`` places and holds ``p`` (returns what it made, or None when it does not fit now);
    ``preempt(p)`` is asked for a head that does not fit or that its queue's limit holds back, and starts
    a preemption for it (None: none possible, or one is already under way for ``p``). The victims stay in
    the ledger until the caller frees them, so nothing is double-booked; ``p`` keeps its place and is tried
    again next cycle. After each placement the order is recomputed (shares moved). Under ``fifo`` and
    ``priority`` a head that does not fit ends the cycle; under ``queues`` it blocks its own line only. A
    blocked head refused a plan is asked again once the cycle ends if something was placed after it was
    asked: a placement can lift another queue above its guarantee and so make its slices reclaimable (the
    cycle ends with every head asked against the cluster as it is left).
    """
    out: Served[T] = Served()
    blocked: set[str] = set()
    refused: dict[str, tuple[Pending, int]] = {}  # key -> (head refused a plan, placements made before it)
    progressed = True
    while progressed:
        progressed = False
        for pending, reason in waitlist.heads(book):
            line = waitlist.line_of(pending)
            if line in blocked:
                continue
            if reason is None:
                made = place(pending)
                if made is not None:
                    waitlist.remove(pending.key)
                    out.held.pop(pending.key, None)
                    out.placed.append((pending, made))
                    progressed = True
                    break  # shares moved: order again
            blocked.add(line)
            out.held[pending.key] = reason or "does not fit now"
            # a head its limit holds back is asked too: the limit may be an ancestor's that a borrowing
            # sibling fills (a reclaim frees it), or its own queue's, full of lower priorities
            if preempt is not None:
                plan = preempt(pending)
                if plan is not None:
                    out.preemptions.append((pending, plan))
                    out.held[pending.key] = f"{reason + '; ' if reason else ''}{plan.describe()} in progress"
                else:
                    refused[pending.key] = (pending, len(out.placed))
            if waitlist.discipline != "queues":
                break
    # placements only take capacity, so a blocked head still does not fit; but one placed after a head was
    # refused may have lifted a queue (or a level of it) above its guarantee, making its slices reclaimable
    for pending, before in refused.values():
        if preempt is None or before == len(out.placed) or pending.key not in waitlist:
            continue
        plan = preempt(pending)
        if plan is not None:
            reason = book.limit_reason(pending.queue, pending.requests) if book is not None else None
            out.preemptions.append((pending, plan))
            out.held[pending.key] = f"{reason + '; ' if reason else ''}{plan.describe()} in progress"
    return out
