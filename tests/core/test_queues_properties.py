"""Property tests of the queue engine (issue 14): random queue trees, random clusters and random runs of
submit / finish / serve / victims-leave steps, driven through :func:`hami_ray.core.waitlist.serve` the way
the runtime drives it. After every step:

- (a) no queue, at any level, holds more than its limit (:func:`check_limits_and_books`);
- (b) nothing is double-booked: the ledger's counters agree with its leases and stay within capacity, the
  book's usage agrees with a recount of the leases, planning a preemption books and frees nothing, every
  plan makes room and is minimal (:func:`check_plan`), and a waiter is placed only once no victim planned
  for it is still in the ledger;
- (c) after a serve cycle, a queue owed its guarantee is served or reclaims (the precise statement is
  :func:`check_owed_queues_progress`'s).

The driver (:class:`Run`):

- ``submit``: a request for a leaf queue joins the wait list (one the queue's limit could never hold, or
  that no node could ever hold, is refused at once, as the runtime refuses it);
- ``finish``: a live slice ends (a victim may end on its own before its preemption completes);
- ``serve``: one :func:`serve` cycle. ``place`` holds what the scheduler places within the queue's limit,
  but never an entry whose preemption is under way (its victims are still in the ledger); ``preempt`` plans
  with :meth:`QueueBook.plan_preemption` and frees nothing;
- ``leave``: every victim of every preemption under way leaves the ledger (the grace has passed).

Devices are all 40 GiB, and requests are whole devices or 10-30 GiB slices, so the least a request counts
against its queue (:func:`request_usage`) is what its placement counts (:func:`allocation_usage`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hami_ray.core.errors import InvalidRequest, Unschedulable
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import Lease, SliceRequest
from hami_ray.core.queues import (
    RESOURCES,
    Preemption,
    QueueBook,
    QueueTree,
    Usage,
    allocation_usage,
    request_usage,
)
from hami_ray.core.scheduler import Scheduler
from hami_ray.core.waitlist import Pending, WaitList, serve
from tests.core.builders import lease_of, make_node

GIB = 1024
DEVICE_GIB = 40


# --- random trees ----------------------------------------------------------------------------------


def _quota(devices: int, memory_only: bool) -> str:
    """A guarantee of ``devices`` whole devices on every resource (what whole-device work needs), or of
    their memory alone (a team that runs fractional slices without cores)."""
    if memory_only:
        return f"{{memory: {devices * DEVICE_GIB}GiB}}"
    return f"{{memory: {devices * DEVICE_GIB}GiB, cores: {devices * 100}, devices: {devices}}}"


def _guaranteed(draw: st.DrawFn, devices: int) -> str:
    return f", guaranteed: {_quota(devices, draw(st.integers(0, 3)) == 0)}" if devices else ""


@st.composite
def trees(draw: st.DrawFn) -> QueueTree:
    """2-6 queues: top-level leaves and parents with 1-3 children; guarantees of 0-2 devices (a quarter of
    them of their memory only), optional limits
    (devices, or memory in device units) at or above the guarantee and within the parent's, weights 1-3,
    sometimes a queue that is not preemptible."""
    total = draw(st.integers(2, 6))
    entries: list[str] = []
    made = 0
    group = 0
    while made < total:
        kids = draw(st.integers(0, min(3, total - made - 1))) if total - made >= 2 else 0
        name = f"q{group}"
        group += 1
        flags = ", preemptible: false" if draw(st.integers(0, 9)) == 0 else ""
        weight = draw(st.integers(1, 3))
        if kids == 0:
            guarantee = draw(st.sampled_from([0, 1, 1, 2]))
            entries.append(f"{{name: {name}, weight: {weight}{flags}"
                           f"{_guaranteed(draw, guarantee)}"
                           f"{_limit(draw, guarantee, None)}}}")
            made += 1
            continue
        guarantees = [draw(st.sampled_from([0, 1, 1, 2])) for _ in range(kids)]
        cap = draw(st.one_of(st.none(), st.integers(max(1, sum(guarantees)), max(1, sum(guarantees)) + 2)))
        kind = draw(st.sampled_from(["devices", "memory"]))
        entries.append(f"{{name: {name}{flags}"
                       + ("" if cap is None else f", limit: {{{kind}: {_amount(kind, cap)}}}") + "}")
        for i, g in enumerate(guarantees):
            child_cap = None if cap is None else (kind, cap)
            entries.append(f"{{name: {name}/t{i}, weight: {draw(st.integers(1, 3))}"
                           f"{_guaranteed(draw, g)}{_limit(draw, g, child_cap)}}}")
        made += kids + 1
    return QueueTree.parse("queues:\n" + "".join(f"  - {e}\n" for e in entries))


@st.composite
def capped_trees(draw: st.DrawFn) -> QueueTree:
    """A parent whose limit is at most one device above its 2-3 children's guarantees (one child owed at
    least a device), beside a top-level queue: siblings borrow up to the parent's limit, where an owed
    child's head is held back by its parent's limit and only a reclaim from a sibling can serve it."""
    guarantees = [draw(st.integers(1, 2))] + [draw(st.integers(0, 1)) for _ in range(draw(st.integers(1, 2)))]
    kind = draw(st.sampled_from(["devices", "memory"]))
    cap = sum(guarantees) + draw(st.integers(0, 1))
    entries = [f"{{name: org, limit: {{{kind}: {_amount(kind, cap)}}}}}"]
    entries += [f"{{name: org/t{i}{_guaranteed(draw, g)}}}" for i, g in enumerate(guarantees)]
    entries.append(f"{{name: other{_guaranteed(draw, draw(st.integers(0, 1)))}}}")
    return QueueTree.parse("queues:\n" + "".join(f"  - {e}\n" for e in entries))


def _amount(kind: str, devices: int) -> str:
    return f"{devices * DEVICE_GIB}GiB" if kind == "memory" else str(devices)


def _limit(draw: st.DrawFn, guarantee: int, parent: tuple[str, int] | None) -> str:
    if draw(st.booleans()):
        return ""
    kind = draw(st.sampled_from(["devices", "memory"]))
    top = 6 if parent is None or parent[0] != kind else parent[1]
    if top < max(guarantee, 1):
        return ""
    return f", limit: {{{kind}: {_amount(kind, draw(st.integers(max(guarantee, 1), top)))}}}"


REQUESTS = st.one_of(
    st.builds(lambda n: SliceRequest(count=n, cores=100), st.integers(1, 2)),
    st.builds(lambda gib, cores: SliceRequest(memory_mib=gib * GIB, cores=cores),
              st.sampled_from([10, 20, 30]), st.sampled_from([0, 25, 50])),
)
SUBMIT = st.tuples(st.just("submit"), st.integers(0, 9), REQUESTS, st.integers(0, 2), st.integers(0, 5))
STEPS = st.lists(st.one_of(  # submits and serve cycles twice as often as finishes and leaves
    SUBMIT, SUBMIT, st.tuples(st.just("serve")), st.tuples(st.just("serve")),
    st.tuples(st.just("finish"), st.integers(0, 99)), st.tuples(st.just("leave")),
), min_size=20, max_size=60)
CLUSTERS = st.lists(st.integers(1, 4), min_size=1, max_size=4)  # GPUs per node


# --- the driver --------------------------------------------------------------------------------------


@dataclass
class Run:
    tree: QueueTree
    gpus: list[int]
    ledger: Ledger = field(init=False)
    scheduler: Scheduler = field(init=False)
    book: QueueBook = field(init=False)
    waitlist: WaitList = field(default_factory=WaitList)
    plans: dict[str, Preemption] = field(default_factory=dict)  # waiting key -> the preemption under way
    promised: dict[str, set[str]] = field(default_factory=dict)  # waiting key -> every victim planned for it
    clock: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.ledger = Ledger([make_node(f"n{i}").gpus(n, mem=f"{DEVICE_GIB}GiB").build()
                              for i, n in enumerate(self.gpus)])
        self.scheduler = Scheduler(self.ledger)
        self.book = QueueBook(self.tree, self.ledger)

    # steps
    def submit(self, leaf: int, request: SliceRequest, priority: int, opt_out: int) -> None:
        leaves = self.tree.leaves()
        queue = leaves[leaf % len(leaves)]
        request = request.model_copy(update={"queue": queue, "priority": priority, "preemptible": opt_out != 0})
        try:
            self.scheduler.validate(request)
        except InvalidRequest:
            return  # more devices than any node has: refused at once
        if self.book.never_fits(queue, [request]) is not None:
            return  # over its queue's limit on its own: refused at once
        now = next(self.clock)
        self.waitlist.add(f"w{now}", [request], queue=queue, priority=priority, submitted=float(now))

    def finish(self, pick: int) -> None:
        live = sorted(self.ledger.leases)
        if live:
            self._free(live[pick % len(live)])

    def leave(self) -> None:
        for plan in self.plans.values():
            for victim in plan.victims:
                if victim.lease_id in self.ledger.leases:
                    self._free(victim.lease_id)
        self.plans.clear()

    def _free(self, lease_id: str) -> None:
        self.ledger.release(lease_id)
        self.book.drop(lease_id)

    def under_way(self, key: str) -> Preemption | None:
        """The preemption for ``key`` while a victim of it is still in the ledger."""
        plan = self.plans.get(key)
        if plan is not None and not any(v.lease_id in self.ledger.leases for v in plan.victims):
            del self.plans[key]  # every victim has gone (left, or finished on its own): done
            plan = None
        return plan

    # serve's callbacks
    def place(self, p: Pending) -> Lease | None:
        if self.under_way(p.key) is not None:
            return None  # the room is the victims': wait until they are gone
        try:
            alloc = self.scheduler.place(list(p.requests))
        except Unschedulable:
            return None
        if self.book.over_limit(p.queue, alloc) is not None:
            return None
        (request,) = p.requests
        lease = lease_of(alloc, lease_id=f"L-{p.key}", created_at=float(next(self.clock))).model_copy(
            update={"queue": p.queue, "priority": p.priority, "preemptible": request.preemptible})
        self.book.hold(self.ledger.allocate(lease))
        self.plans.pop(p.key, None)
        return lease

    def preempt(self, p: Pending) -> Preemption | None:
        if self.under_way(p.key) is not None:
            return None
        before = (dict(self.ledger.leases), {q: self.book.usage(q) for q in self.tree.specs})
        plan = self.book.plan_preemption(self.scheduler, list(p.requests), p.queue, p.priority)
        # (b) planning frees and books nothing
        assert before == (dict(self.ledger.leases), {q: self.book.usage(q) for q in self.tree.specs})
        self.ledger.check_invariants()
        if plan is not None:
            check_plan(self, p, plan)
            self.plans[p.key] = plan
            self.promised.setdefault(p.key, set()).update(v.lease_id for v in plan.victims)
        return plan


def copy_without(run: Run, gone: set[str]) -> tuple[Ledger, Scheduler, QueueBook]:
    """The cluster as it would be once the leases ``gone`` have left (the run itself is untouched)."""
    ledger = Ledger(run.ledger.nodes.values())
    book = QueueBook(run.tree, ledger)
    for lease in run.ledger.leases.values():
        if lease.lease_id not in gone:
            book.hold(ledger.allocate(lease))
    return ledger, Scheduler(ledger), book


def fits(run: Run, p: Pending, gone: set[str], node: str) -> bool:
    """``p`` fits on ``node`` within its queue's limits once ``gone`` have left."""
    _, scheduler, book = copy_without(run, gone)
    try:
        alloc = scheduler.place(list(p.requests), nodes=[node])
    except Unschedulable:
        return False
    return book.over_limit(p.queue, alloc) is None


def check_plan(run: Run, p: Pending, plan: Preemption) -> None:
    """A plan may take only slices that may go, and it makes room: with its victims gone, ``p`` fits on
    its node within the limits; with any one of them given back, it does not (a minimal set)."""
    tree, ids = run.tree, {v.lease_id for v in plan.victims}
    assert plan.victims and plan.for_queue == p.queue
    for victim in plan.victims:
        live = run.ledger.leases[victim.lease_id]
        assert live.allocation.node == plan.node and live.preemptible and not tree.protected(live.queue)
        if plan.reason == "priority":
            assert live.queue == p.queue and live.priority < p.priority
        else:
            assert live.queue not in tree.ancestors(p.queue) and p.queue not in tree.ancestors(live.queue)
    assert fits(run, p, ids, plan.node), f"{plan.describe()} does not make room for {p.describe()}"
    for victim in plan.victims:
        assert not fits(run, p, ids - {victim.lease_id}, plan.node), \
            f"{plan.describe()}: {victim.lease_id} is not needed for {p.describe()}"


# --- the checks after every step ---------------------------------------------------------------------


def check_limits_and_books(run: Run) -> None:
    """(a) no queue, at any level, over its limit; (b) the ledger's counters agree with its leases, and the
    book's usage with a recount of the ledger's leases by queue."""
    run.ledger.check_invariants()
    recount: dict[str, Usage] = {}
    for lease in run.ledger.leases.values():
        for q in run.tree.ancestors(lease.queue):
            recount[q] = recount.get(q, Usage()) + allocation_usage(lease.allocation, run.ledger)
    for q in run.tree.specs:
        used = run.book.usage(q)
        assert used == recount.get(q, Usage()), f"queue {q}: book {used} != leases {recount.get(q)}"
        assert used.within(run.tree.limit(q)), f"queue {q} holds {used.describe()} over its limit"


def reclaimable(run: Run, queue: str, asked: Usage) -> dict[str, list[tuple[Lease, tuple[str, ...], int]]]:
    """Per node, the slices a reclaim for ``queue`` may consider: preemptible slices of unprotected queues
    outside ``queue``'s line, each with its queue's levels below the common ancestor and that ancestor's
    index in ``queue``'s line, kept only when ``queue``'s levels below it stay within their guarantees."""
    tree, mine = run.tree, run.tree.ancestors(queue)
    depth = 0
    for q in mine:
        if not (run.book.usage(q) + asked).within(tree.guarantee(q)):
            break
        depth += 1
    out: dict[str, list[tuple[Lease, tuple[str, ...], int]]] = {}
    for lease in run.ledger.leases.values():
        theirs = tree.ancestors(lease.queue)
        if not lease.preemptible or tree.protected(lease.queue) or queue in theirs or lease.queue in mine:
            continue
        common = next((i for i, q in enumerate(mine) if q in theirs), len(mine))
        if common > depth:
            continue
        levels = tuple(theirs[:theirs.index(mine[common])] if common < len(mine) else theirs)
        out.setdefault(lease.allocation.node, []).append((lease, levels, common))
    return out


def beyond_guarantees(run: Run, victims: tuple[tuple[Lease, tuple[str, ...], int], ...]) -> bool:
    """Every queue that loses ``victims`` keeps, on each resource they free, at least its guarantee."""
    freed: dict[str, Usage] = {}
    for lease, levels, _ in victims:
        for q in levels:
            freed[q] = freed.get(q, Usage()) + allocation_usage(lease.allocation, run.ledger)
    for q, lost in freed.items():
        left, guarantee = run.book.usage(q) - lost, run.tree.guarantee(q)
        if any(lost.get(r) > 0 and left.get(r) < guarantee.get(r) for r in RESOURCES):
            return False
    return True


def could_fit_by_reclaim(run: Run, p: Pending) -> bool:
    """Whether some node could hold ``p`` (within the limits) once some set of slices held beyond their
    queues' guarantees (:func:`reclaimable`, jointly :func:`beyond_guarantees`) had left it. Exhaustive over
    the maximal such sets per node: freeing more never makes a fit impossible."""
    asked = request_usage(p.requests, run.ledger)
    for node in run.ledger.nodes:
        candidates = reclaimable(run, p.queue, asked).get(node, [])
        if not fits(run, p, {c[0].lease_id for c in candidates}, node):
            continue  # not even with every candidate gone
        maximal: list[frozenset[int]] = []
        for size in range(len(candidates), -1, -1):
            for chosen in itertools.combinations(range(len(candidates)), size):
                picked = frozenset(chosen)
                if any(picked <= m for m in maximal):
                    continue
                if not beyond_guarantees(run, tuple(candidates[i] for i in chosen)):
                    continue
                maximal.append(picked)
                if fits(run, p, {candidates[i][0].lease_id for i in chosen}, node):
                    return True
    return False


def check_owed_queues_progress(run: Run) -> None:
    """(c) After a serve cycle, let Q be any leaf queue with waiting work, H the head of its line (priority,
    then submission), and suppose Q would stay within its guarantee holding H too (Q's usage plus the least
    H counts, on every resource). Then a preemption is under way for an entry of Q (a plan whose victims
    are still in the ledger), or H could not be placed on any node within the limits even after any set of
    preemptible slices of unprotected queues outside Q's line left it, where each such queue (and each of
    its ancestors below the one it shares with Q) keeps at least its guarantee on every resource the set
    frees, and Q's levels below that shared ancestor stay within their guarantees with H (the rules of
    reclaim; the set may be empty: H fits now)."""
    heads: dict[str, Pending] = {}
    for pending in run.waitlist.ordered(run.book):
        heads.setdefault(pending.queue, pending)
    for queue, head in heads.items():
        asked = request_usage(head.requests, run.ledger)
        if not (run.book.usage(queue) + asked).within(run.tree.guarantee(queue)):
            continue
        if any(run.under_way(p.key) is not None for p in run.waitlist if p.queue == queue):
            continue
        assert not could_fit_by_reclaim(run, head), (
            f"queue {queue} is owed {head.describe()} (holds {run.book.usage(queue).describe()}, guaranteed "
            f"{run.tree.guarantee(queue).describe()}); it was neither served nor given a preemption")


def step(run: Run, action: tuple[object, ...]) -> None:
    """Apply one step, then check (a) and (b); after a serve cycle, (c) too."""
    kind = action[0]
    if kind == "submit":
        _, leaf, request, priority, opt_out = action
        run.submit(leaf, request, priority, opt_out)  # type: ignore[arg-type]
    elif kind == "finish":
        run.finish(action[1])  # type: ignore[arg-type]
    elif kind == "leave":
        run.leave()
    else:
        served = serve(run.waitlist, run.book, run.place, run.preempt)
        for pending, lease in served.placed:
            # (b) placed with no victim of any preemption planned for it still in the ledger
            still = run.promised.pop(pending.key, set()) & set(run.ledger.leases)
            assert not still and lease.lease_id in run.ledger.leases, f"{pending.key} placed beside {still}"
        check_owed_queues_progress(run)
    check_limits_and_books(run)


SETTINGS = settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(trees(), CLUSTERS, STEPS)
def test_no_queue_over_its_limit_no_double_booking_and_owed_queues_progress(
        tree: QueueTree, gpus: list[int], steps: list[tuple[object, ...]]) -> None:
    """(a), (b) and (c) (see the module) after every step of a random run."""
    run = Run(tree, gpus)
    for action in steps:
        step(run, action)


@SETTINGS
@given(capped_trees(), CLUSTERS, STEPS)
def test_owed_queues_under_a_capped_parent_progress(
        tree: QueueTree, gpus: list[int], steps: list[tuple[object, ...]]) -> None:
    """(a), (b) and (c) where a parent's limit binds: an owed child held back by it reclaims from a
    borrowing sibling."""
    run = Run(tree, gpus)
    for action in steps:
        step(run, action)


@SETTINGS
@given(trees(), CLUSTERS, st.lists(st.tuples(st.integers(0, 9), REQUESTS, st.integers(0, 2), st.integers(0, 5)),
                                   min_size=1, max_size=25))
def test_every_admitted_request_is_served_once_the_cluster_empties(
        tree: QueueTree, gpus: list[int], submits: list[tuple[int, SliceRequest, int, int]]) -> None:
    """Submit everything, then rounds of: every slice finishes, victims leave, a serve cycle. Each round
    places at least one waiting request (an admitted request fits an empty cluster within its limits), so
    the wait list drains in at most one round per request; the checks hold throughout."""
    run = Run(tree, gpus)
    for s in submits:
        step(run, ("submit", *s))
    step(run, ("serve",))
    for _ in range(len(submits)):
        if not run.waitlist:
            break
        waiting = len(run.waitlist)
        while run.ledger.leases:
            step(run, ("finish", 0))
        step(run, ("leave",))
        step(run, ("serve",))
        assert len(run.waitlist) < waiting, f"nothing of {waiting} waiting was placed on an empty cluster"
    assert not run.waitlist
