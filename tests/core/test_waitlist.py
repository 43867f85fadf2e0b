"""Waiting work and who is served next (hami_ray.core.waitlist, issue 14): the three disciplines, the
order of the lines' heads by weighted dominant share, limits that hold a head back without blocking others,
and :func:`serve`'s cycles with placements and preemptions, on a real ledger, scheduler and queue book."""

from __future__ import annotations

import itertools

import pytest

from hami_ray.core.errors import InvalidRequest, Unschedulable
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import Lease, SliceRequest
from hami_ray.core.queues import Preemption, QueueBook, QueueTree
from hami_ray.core.scheduler import Scheduler
from hami_ray.core.waitlist import Pending, WaitList, serve
from tests.core.builders import lease_of, make_node

GIB = 1024
WHOLE = SliceRequest(cores=100)  # a whole device
OWED = "{guaranteed: {memory: 80GiB, cores: 200, devices: 2}}"  # two whole 40 GiB devices, guaranteed


def _tree(*entries: str) -> QueueTree:
    return QueueTree.parse("queues:\n" + "".join(f"  - {e}\n" for e in entries))


class Cluster:
    """A ledger, scheduler and queue book, with the place/preempt callbacks a runtime gives :func:`serve`:
    ``place`` holds what fits within the queue's limit; ``preempt`` plans, and the victims stay in the
    ledger until :meth:`victims_leave` (a preemption already under way for an entry is not planned again)."""

    def __init__(self, tree: QueueTree, gpus: int = 2, nodes: int = 1, mem: str = "40GiB") -> None:
        self.ledger = Ledger([make_node(f"n{i + 1}").gpus(gpus, mem=mem).build() for i in range(nodes)])
        self.scheduler = Scheduler(self.ledger)
        self.book = QueueBook(tree, self.ledger)
        self.plans: dict[str, Preemption] = {}
        self.clock = itertools.count(1)

    def hold(self, queue: str, request: SliceRequest = WHOLE, priority: int = 0, node: str | None = None) -> Lease:
        alloc = self.scheduler.place(request, nodes=None if node is None else [node])
        lease = lease_of(alloc, created_at=float(next(self.clock))).model_copy(
            update={"queue": queue, "priority": priority, "preemptible": request.preemptible})
        self.book.hold(self.ledger.allocate(lease))
        return lease

    def free(self, lease_id: str) -> None:
        self.ledger.release(lease_id)
        self.book.drop(lease_id)

    def place(self, p: Pending) -> Lease | None:
        try:
            alloc = self.scheduler.place(list(p.requests))
        except Unschedulable:
            return None
        if self.book.over_limit(p.queue, alloc) is not None:
            return None
        lease = lease_of(alloc, lease_id=f"L-{p.key}", created_at=float(next(self.clock))).model_copy(
            update={"queue": p.queue, "priority": p.priority})
        self.book.hold(self.ledger.allocate(lease))
        return lease

    def preempt(self, p: Pending) -> Preemption | None:
        if p.key in self.plans:
            return None
        plan = self.book.plan_preemption(self.scheduler, list(p.requests), p.queue, p.priority)
        if plan is not None:
            self.plans[p.key] = plan
        return plan

    def victims_leave(self) -> None:
        for plan in self.plans.values():
            for victim in plan.victims:
                if victim.lease_id in self.ledger.leases:
                    self.free(victim.lease_id)
        self.plans.clear()


def _keys(placed: list[tuple[Pending, Lease]]) -> list[str]:
    return [p.key for p, _ in placed]


# --- membership -------------------------------------------------------------------------------------


def test_membership_errors_and_lazy_removal() -> None:
    with pytest.raises(InvalidRequest, match="unknown discipline 'lifo'"):
        WaitList("lifo")  # type: ignore[arg-type]
    wl = WaitList()
    wl.add("a", [WHOLE], queue="")  # no queue: default
    with pytest.raises(InvalidRequest, match="'a' already waits"):
        wl.add("a", [WHOLE])
    with pytest.raises(InvalidRequest, match="at least one request"):
        wl.add("b", [])
    first = wl.get("a")
    assert first is not None and first.queue == "default" and "a" in wl and len(wl) == 1
    assert wl.remove("a") is not None and wl.remove("a") is None and "a" not in wl
    assert wl.heads() == [] and list(wl) == []
    wl.add("a", [WHOLE], priority=3)  # the same key again after it left: the new entry, not the stale one
    assert [(p.key, p.priority) for p, _ in wl.heads()] == [("a", 3)]
    assert "queue default, priority 3" in wl.heads()[0][0].describe()
    gang = wl.add("g", [WHOLE, WHOLE], strategy="PACK")
    assert gang.describe().startswith("gang of 2 (PACK)")


def test_a_waiting_request_of_a_queue_the_book_does_not_know_is_an_error() -> None:
    cluster = Cluster(_tree("{name: a}"))
    wl = WaitList()
    wl.add("x", [WHOLE], queue="gone")
    with pytest.raises(InvalidRequest, match="unknown queue 'gone'"):
        wl.heads(cluster.book)


# --- fifo and priority: one line whose head blocks ------------------------------------------------------


def test_fifo_serves_in_submission_order_and_its_head_blocks() -> None:
    cluster = Cluster(_tree("{name: a}"), gpus=2)
    cluster.hold("a", SliceRequest(memory_mib=30 * GIB))  # 10 GiB free on one device, 40 on the other
    wl = WaitList("fifo")
    wl.add("big", [SliceRequest(memory_mib=40 * GIB, count=2)], submitted=1.0)  # needs both devices
    wl.add("small", [SliceRequest(memory_mib=5 * GIB)], submitted=2.0, priority=9)
    served = serve(wl, cluster.book, cluster.place)
    # small would fit, but fifo has no backfill: the head blocks everyone behind it
    assert served.placed == [] and served.held == {"big": "does not fit now"} and len(wl) == 2
    wl.remove("big")
    assert _keys(serve(wl, cluster.book, cluster.place).placed) == ["small"]


def test_priority_serves_higher_priority_first_then_submission_and_its_head_blocks() -> None:
    cluster = Cluster(_tree("{name: a}", "{name: b}"), gpus=2)
    wl = WaitList("priority")
    wl.add("low", [WHOLE], queue="a", priority=0, submitted=0.0)
    wl.add("high-late", [WHOLE], queue="b", priority=5, submitted=2.0)
    wl.add("high-early", [WHOLE], queue="a", priority=5, submitted=1.0)
    wl.add("tiny", [SliceRequest(memory_mib=GIB)], queue="b", priority=1, submitted=3.0)
    assert [p.key for p, _ in wl.heads(cluster.book)] == ["high-early"]  # one line: one head
    served = serve(wl, cluster.book, cluster.place)
    # two devices: high-early, high-late; then tiny (priority 1) does not fit and ends the cycle
    assert _keys(served.placed) == ["high-early", "high-late"] and served.held == {"tiny": "does not fit now"}
    assert [p.key for p in wl.ordered()] == ["tiny", "low"]


# --- queues: a line per queue, heads by weighted dominant share -------------------------------------


def test_heads_are_served_by_share_and_a_head_that_does_not_fit_blocks_only_its_line() -> None:
    tree = _tree(f"{{name: a, {OWED[1:-1]}}}", f"{{name: b, {OWED[1:-1]}}}", "{name: c}")
    cluster = Cluster(tree, gpus=4)
    cluster.hold("a", WHOLE)  # a at share 0.5 (one of two devices), b at 0, c (no guarantee) at 1
    wl = WaitList()
    wl.add("c1", [WHOLE], queue="c", submitted=0.0)
    wl.add("a1", [WHOLE], queue="a", submitted=1.0)
    wl.add("b1", [SliceRequest(cores=100, count=4)], queue="b", submitted=2.0)  # never fits beside a's
    wl.add("b2", [WHOLE], queue="b", submitted=3.0)
    assert [p.key for p, _ in wl.heads(cluster.book)] == ["b1", "a1", "c1"]
    served = serve(wl, cluster.book, cluster.place)
    # b1 blocks b's line (b2 waits behind it) but not a's or c's
    assert _keys(served.placed) == ["a1", "c1"] and served.held == {"b1": "does not fit now"}
    assert [p.key for p in wl.ordered(cluster.book)] == ["b1", "b2"]


def test_the_order_is_recomputed_after_every_placement() -> None:
    cluster = Cluster(_tree("{name: a}", "{name: b}"), gpus=4)
    wl = WaitList()
    for i in range(3):
        wl.add(f"a{i}", [WHOLE], queue="a", submitted=float(i))
        wl.add(f"b{i}", [WHOLE], queue="b", submitted=float(i) + 0.5)
    served = serve(wl, cluster.book, cluster.place)
    # equal weights, nothing guaranteed: each placement raises its queue's share, so the queues alternate
    assert _keys(served.placed) == ["a0", "b0", "a1", "b1"]
    assert served.held == {"a2": "does not fit now", "b2": "does not fit now"}


def test_a_heavier_queue_gets_more_of_the_idle_capacity() -> None:
    cluster = Cluster(_tree("{name: light}", "{name: heavy, weight: 2}"), gpus=3)
    wl = WaitList()
    for i in range(3):
        wl.add(f"l{i}", [WHOLE], queue="light", submitted=float(i))
        wl.add(f"h{i}", [WHOLE], queue="heavy", submitted=float(i))
    placed = _keys(serve(wl, cluster.book, cluster.place).placed)
    assert sorted(placed) == ["h0", "h1", "l0"]  # weight 2: twice the share before light's turn


def test_a_head_held_back_by_its_limit_is_skipped_with_the_reason_and_blocks_no_other_queue() -> None:
    cluster = Cluster(_tree("{name: capped, limit: {devices: 1}}", "{name: free}"), gpus=3)
    cluster.hold("capped", WHOLE)
    wl = WaitList()
    wl.add("c1", [WHOLE], queue="capped", submitted=0.0, priority=9)
    wl.add("f1", [WHOLE], queue="free", submitted=1.0)
    heads = dict((p.key, why) for p, why in wl.heads(cluster.book))
    assert heads["f1"] is None and heads["c1"] == "queue capped at its limit: devices 1 held + 1 asked > limit 1"
    served = serve(wl, cluster.book, cluster.place)
    assert _keys(served.placed) == ["f1"] and served.held == {"c1": heads["c1"]}


def test_within_a_queue_priority_then_submission() -> None:
    cluster = Cluster(_tree("{name: a}"), gpus=3)
    wl = WaitList()
    wl.add("late-low", [WHOLE], queue="a", priority=0, submitted=0.0)
    wl.add("high", [WHOLE], queue="a", priority=2, submitted=5.0)
    wl.add("early-low", [WHOLE], queue="a", priority=0, submitted=-1.0)
    assert _keys(serve(wl, cluster.book, cluster.place).placed) == ["high", "early-low", "late-low"]


# --- serve with preemption: victims leave before the waiter is placed --------------------------------


def test_reclaim_is_planned_and_the_waiter_placed_only_after_the_victims_leave() -> None:
    cluster = Cluster(_tree(f"{{name: owed, {OWED[1:-1]}}}", "{name: borrower}"), gpus=2)
    taken = [cluster.hold("borrower") for _ in range(2)]
    wl = WaitList()
    wl.add("w", [WHOLE], queue="owed")
    first = serve(wl, cluster.book, cluster.place, cluster.preempt)
    assert first.placed == [] and [(p.key, plan.reason) for p, plan in first.preemptions] == [("w", "reclaim")]
    victim = first.preemptions[0][1].victims[0]
    assert victim.lease_id == taken[1].lease_id  # the youngest
    assert first.held["w"].startswith("reclaim for owed: 1 slice(s) on n1") and first.held["w"].endswith("in progress")
    # the victims are still in the ledger: the next cycle neither places w nor plans again
    again = serve(wl, cluster.book, cluster.place, cluster.preempt)
    assert again.placed == [] and again.preemptions == [] and victim.lease_id in cluster.ledger.leases
    cluster.victims_leave()
    done = serve(wl, cluster.book, cluster.place, cluster.preempt)
    assert _keys(done.placed) == ["w"] and len(wl) == 0
    assert cluster.book.usage("owed").devices == 1 and cluster.book.usage("borrower").devices == 1
    cluster.ledger.check_invariants()


def test_a_higher_priority_waiter_preempts_within_its_own_queue() -> None:
    cluster = Cluster(_tree("{name: a}", "{name: b}"), gpus=2)
    low = cluster.hold("a", priority=0)
    other = cluster.hold("b", priority=-5)  # lower still, but another queue's
    wl = WaitList()
    wl.add("urgent", [WHOLE], queue="a", priority=10)
    served = serve(wl, cluster.book, cluster.place, cluster.preempt)
    assert [(plan.reason, [v.lease_id for v in plan.victims]) for _, plan in served.preemptions] == \
        [("priority", [low.lease_id])]
    assert other.lease_id in cluster.ledger.leases
    cluster.victims_leave()
    assert _keys(serve(wl, cluster.book, cluster.place, cluster.preempt).placed) == ["urgent"]


def test_an_owed_queue_held_back_by_its_parents_limit_reclaims_from_its_borrowing_sibling() -> None:
    """org's limit is full because org/b borrows; org/a is owed a device. The head of org/a is held back by
    org's limit, and only a reclaim from org/b can ever serve it (idle devices elsewhere do not help)."""
    tree = _tree("{name: org, limit: {devices: 2}}", "{name: org/a, guaranteed: {memory: 40GiB, cores: 100, "
                 "devices: 1}}", "{name: org/b}")
    cluster = Cluster(tree, gpus=2, nodes=2)
    young = [cluster.hold("org/b", node="n1") for _ in range(2)][1]
    wl = WaitList()
    wl.add("w", [WHOLE], queue="org/a")
    served = serve(wl, cluster.book, cluster.place, cluster.preempt)
    assert served.placed == []
    assert [(plan.reason, [v.lease_id for v in plan.victims]) for _, plan in served.preemptions] == \
        [("reclaim", [young.lease_id])]
    assert "queue org (an ancestor of org/a) at its limit" in served.held["w"] and "in progress" in served.held["w"]
    cluster.victims_leave()
    assert _keys(serve(wl, cluster.book, cluster.place, cluster.preempt).placed) == ["w"]


def test_an_owed_head_refused_a_reclaim_is_asked_again_once_a_later_placement_makes_one_valid() -> None:
    """a is owed 2 devices, b (guaranteed 1) holds a 2-device slice on n1; n2 has one free device. a's
    head (2 devices) does not fit, and taking b's slice would leave b below its guarantee: no plan. b's own
    head is then placed on n2 in the same cycle, so b holds 3 and its 2-device slice is now beyond its
    guarantee. The cycle must ask a's head again and start that reclaim, not leave a owed and idle until
    the next cycle (the property test's minimal case)."""
    tree = _tree(f"{{name: a, {OWED[1:-1]}}}", "{name: b, guaranteed: {memory: 40GiB, cores: 100, devices: 1}}")
    cluster = Cluster(tree, gpus=2, nodes=2)
    taken = cluster.hold("b", SliceRequest(count=2, cores=100), node="n1")
    cluster.hold("default", SliceRequest(cores=100, preemptible=False), node="n2")  # n2: one device left
    wl = WaitList()
    wl.add("w", [SliceRequest(count=2, cores=100)], queue="a", submitted=1.0)
    wl.add("v", [WHOLE], queue="b", submitted=2.0)
    assert [p.key for p, _ in wl.heads(cluster.book)] == ["w", "v"]  # a (owed) first: asked before v places
    served = serve(wl, cluster.book, cluster.place, cluster.preempt)
    assert _keys(served.placed) == ["v"]
    assert [(p.key, plan.reason, [x.lease_id for x in plan.victims]) for p, plan in served.preemptions] == \
        [("w", "reclaim", [taken.lease_id])]
    assert served.held["w"].startswith("reclaim for a: 1 slice(s) on n1")
    assert cluster.book.usage("b").devices == 3  # the victim stays until it leaves: nothing double-booked
    cluster.victims_leave()
    assert _keys(serve(wl, cluster.book, cluster.place, cluster.preempt).placed) == ["w"]
    assert cluster.book.usage("a").devices == 2 and cluster.book.usage("b").devices == 1
    cluster.ledger.check_invariants()


def test_a_queue_at_its_own_limit_preempts_its_lower_priority_slice() -> None:
    cluster = Cluster(_tree("{name: a, limit: {devices: 1}}"), gpus=2)
    low = cluster.hold("a", priority=0)
    wl = WaitList()
    wl.add("urgent", [WHOLE], queue="a", priority=10)
    served = serve(wl, cluster.book, cluster.place, cluster.preempt)
    assert [(plan.reason, [v.lease_id for v in plan.victims]) for _, plan in served.preemptions] == \
        [("priority", [low.lease_id])]
    assert served.held["urgent"].startswith("queue a at its limit") and "in progress" in served.held["urgent"]
    cluster.victims_leave()
    assert _keys(serve(wl, cluster.book, cluster.place, cluster.preempt).placed) == ["urgent"]


def test_ordered_lists_every_waiter_by_line_rank() -> None:
    cluster = Cluster(_tree(f"{{name: a, {OWED[1:-1]}}}", "{name: b}"), gpus=1)
    wl = WaitList()
    wl.add("b1", [WHOLE], queue="b", submitted=0.0)
    wl.add("a2", [WHOLE], queue="a", submitted=2.0)
    wl.add("a1", [WHOLE], queue="a", submitted=1.0)
    assert [p.key for p in wl.ordered(cluster.book)] == ["a1", "a2", "b1"]
    assert [p.key for p in wl.ordered(cluster.book, limit=2)] == ["a1", "a2"]
    assert [p.key for p in wl.ordered()] == ["b1", "a1", "a2"]  # no book: heads by submission
