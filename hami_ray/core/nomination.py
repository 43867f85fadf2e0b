"""Room a preemption frees is kept for the request it was made for (kube-scheduler's "nominated node").

A preemption reserves nothing: its victims leave after a grace, and the moment they are gone any request
could take the freed room, so the one that asked would ask again, and preempt again (issue 14). A
:class:`Nominations` remembers, per waiting request, the node its preemption frees and what it asks; while
another request is placed, :meth:`Nominations.holding_others` holds every other waiter's room in the
ledger as a phantom lease, so the scheduler sees it taken, and gives it all back afterwards. kube-scheduler
does the same when it adds nominated pods of equal or higher priority to a node before filtering
(``addNominatedPods``); here every nomination counts, whatever the priorities.

A nomination ends when its waiter is placed or leaves (the caller drops it), or when ``until`` passes
(the caller's clock: core has none). While its victims are still leaving it holds nothing: their slices
still hold the room themselves. A caller that serves each line from its head
(:func:`hami_ray.core.waitlist.serve`) may name the waiters ``behind`` the one it places in the same line:
their room is not held from it, since they cannot be placed before it anyway, and holding it would only
leave the room idle while the head blocks its line (kube-scheduler likewise lets a pod ignore the
nominations of lower-priority pods, which its queue would serve after it).

Called by the placement service (:mod:`hami_ray.runtime.service`, wall-clock time) and the time-driven
replay (:mod:`hami_ray.sim.timeline`, simulated time), so both keep freed room the same way.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence, Set
from contextlib import contextmanager
from dataclasses import dataclass

from hami_ray.core.errors import InvalidRequest, Unschedulable
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import Lease, SliceRequest
from hami_ray.core.scheduler import Scheduler

__all__ = ["NOMINATION_S", "PHANTOM_PREFIX", "Nomination", "Nominations"]

# How long room freed by a preemption stays kept for its waiter once the grace is over (the caller adds it
# to the grace): long enough for the waiter's next try, short enough that room a waiter never takes (it is
# stuck behind others of its line, or wants more than was freed) does not stay idle for long.
NOMINATION_S = 30.0
PHANTOM_PREFIX = "nominated-"  # lease ids of the phantom leases that hold nominated room


@dataclass(frozen=True)
class Nomination:
    """Room a preemption made for a waiter on ``node``, for ``requests`` (one task, a pod's containers):
    other requests may not take it until the waiter is placed, leaves, or ``until`` passes."""

    node: str
    requests: tuple[SliceRequest, ...]
    until: float


class Nominations:
    """The nominations of one cluster, by waiter key (any string the caller uses for a waiting request).

    Example::

        nominations = Nominations()
        nominations.nominate("w1", plan.node, [request], until=now + grace_s + NOMINATION_S)
        with nominations.holding_others(ledger, scheduler, me="w2", now=now, leaving=set()):
            scheduler.place(other_request)  # w1's room is taken while w2 is placed
        nominations.drop("w1")  # w1 was placed, or left
    """

    def __init__(self) -> None:
        self._by_key: dict[str, Nomination] = {}

    def nominate(self, key: str, node: str, requests: Sequence[SliceRequest], until: float) -> Nomination:
        """Keep the room on ``node`` for ``key``'s ``requests`` until ``until`` (replaces an earlier one).

        Example: ``nominate("pod-1", "node-a", [request], until=130.0 + 30.0)``.
        """
        nomination = Nomination(node, tuple(requests), float(until))
        self._by_key[key] = nomination
        return nomination

    def drop(self, key: str | None) -> Nomination | None:
        """``key`` was placed or left: its room is anyone's again. Returns what it held (None: nothing).

        Example: ``nominations.drop("pod-1")``; dropping twice, or ``None``, is a no-op.
        """
        return None if key is None else self._by_key.pop(key, None)

    def get(self, key: str) -> Nomination | None:
        return self._by_key.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __len__(self) -> int:
        return len(self._by_key)

    def items(self) -> list[tuple[str, Nomination]]:
        """Every nomination, expired ones included until :meth:`expire` or :meth:`holding_others` runs."""
        return list(self._by_key.items())

    def expire(self, now: float) -> list[str]:
        """Drop the nominations whose ``until`` is before ``now``; returns their keys.

        Example: a nomination with ``until=160.0`` holds at ``now=160.0`` and is gone at ``160.5``.
        """
        gone = [key for key, nom in self._by_key.items() if nom.until < now]
        for key in gone:
            del self._by_key[key]
        return gone

    @contextmanager
    def holding_others(self, ledger: Ledger, scheduler: Scheduler, me: str | None, now: float,
                       leaving: Set[str] = frozenset(), behind: Collection[str] = ()) -> Iterator[tuple[str, ...]]:
        """While placing for ``me`` (a waiter key; None: a request that is nobody's nominee), hold the room
        nominated for every other waiter as a phantom lease in ``ledger``; yields their lease ids.

        Skipped: expired nominations (dropped here, against ``now``), ``me``'s own, those whose victims are
        still ``leaving`` (waiter keys; the victims' slices hold the room), those of the waiters ``behind``
        ``me`` in its own line (see the module docstring), those on nodes the ledger no longer has, and those
        whose room is no longer there (taken before the nomination, or the node changed). Each phantom is
        placed by ``scheduler`` on its node alone, in nomination order. On exit, even on an exception, every
        phantom is released: the ledger's usage is as it was.

        Example::

            with nominations.holding_others(ledger, scheduler, me=None, now=t, leaving=set()):
                allocation = scheduler.place(request)   # never on room nominated for a waiter
        """
        held: list[str] = []
        try:
            self.expire(now)
            for key, nom in list(self._by_key.items()):
                if key == me or key in leaving or key in behind or nom.node not in ledger.nodes:
                    continue
                try:
                    allocation = scheduler.place(list(nom.requests), nodes=[nom.node])
                except (Unschedulable, InvalidRequest):
                    continue  # the room is gone
                phantom = Lease(lease_id=f"{PHANTOM_PREFIX}{key}", owner=f"nominated:{key}", allocation=allocation,
                                token="-")
                ledger.allocate(phantom)
                held.append(phantom.lease_id)
            yield tuple(held)
        finally:
            for lease_id in held:
                ledger.release(lease_id)
