"""Team queues (hami_ray.core.queues, issue 14): definitions, accounting, order and preemption plans."""

from __future__ import annotations

import pytest

from hami_ray.core.ledger import Ledger
from hami_ray.core.model import Lease, SliceRequest
from hami_ray.core.queues import QueueBook, QueueConfigError, QueueTree, Usage
from hami_ray.core.scheduler import Scheduler
from tests.core.builders import lease_of, make_node

GIB = 1024

EXAMPLE = """
queues:
  - name: org
    limit: {memory: 640GiB, devices: 8}
  - name: org/team-a
    guaranteed: {memory: 160GiB, cores: 200}
    limit: {memory: 320GiB}
    weight: 2
  - name: org/team-b
    guaranteed: {memory: 160GiB}
    preemptible: false
  - name: research
    parent: org
"""


def test_the_documented_example_parses_with_its_defaults() -> None:
    tree = QueueTree.parse(EXAMPLE)
    assert tree.leaves() == ["default", "org/team-a", "org/team-b", "research"]
    assert tree.guarantee("org") == Usage(320 * GIB, 200, 0)  # a parent's unnamed guarantee: its children's sum
    assert tree.limit("org/team-a").memory_mib == 320 * GIB and tree.limit("org/team-a").cores is None
    assert tree.weight("org/team-a") == 2.0
    assert tree.protected("org/team-b") and not tree.protected("org/team-a")
    assert tree.resolve(None) == "default"
    assert QueueTree.parse(EXAMPLE) == tree


@pytest.mark.parametrize(("text", "queue", "field", "words"), [
    ("- name: org\n  limit: {memory: 100GiB}\n- name: org/a\n  limit: {memory: 200GiB}\n",
     "org/a", "limit.memory", "over its ancestor org's limit.memory 100 GiB"),
    ("- name: a\n  guaranteed: {memory: 320GiB}\n  limit: {memory: 160GiB}\n",
     "a", "guaranteed.memory", "is over limit.memory 160 GiB"),
    ("- name: a\n  limit: {memory: 10GB}\n", "a", "limit.memory", "unknown unit 'GB'"),
    ("- name: a\n  parent: b\n- name: b\n  parent: a\n", "a", "parent", "cycle: a -> b -> a"),
    ("- name: org/a\n", "org/a", "parent", "parent org is not defined"),
    ("- name: a\n  limt: {memory: 1GiB}\n", "a", "limt", "unknown key 'limt'"),
    ("- name: a\n  weight: -1\n", "a", "weight", "weight must be a number > 0"),
])
def test_a_bad_definition_names_the_queue_and_the_field(text: str, queue: str, field: str, words: str) -> None:
    with pytest.raises(QueueConfigError) as caught:
        QueueTree.parse("queues:\n" + "\n".join("  " + line for line in text.splitlines()))
    assert (caught.value.queue, caught.value.field) == (queue, field)
    assert words in str(caught.value) and f"queue {queue}" in str(caught.value)


def test_bad_yaml_is_a_queue_config_error() -> None:
    with pytest.raises(QueueConfigError, match="not valid YAML"):
        QueueTree.parse("queues: [")


TWO_QUEUES = """
queues:
  - name: a
    guaranteed: {memory: 40GiB, cores: 100, devices: 1}
  - name: b
    limit: {memory: 80GiB}
"""


@pytest.fixture
def cluster() -> tuple[Ledger, Scheduler, QueueBook]:
    ledger = Ledger([make_node("n1").gpus(2, mem="40GiB").build()])
    return ledger, Scheduler(ledger), QueueBook(QueueTree.parse(TWO_QUEUES), ledger)


def _take(ledger: Ledger, scheduler: Scheduler, book: QueueBook, queue: str, gib: int, cores: int) -> Lease:
    alloc = scheduler.place([SliceRequest(memory_mib=gib * GIB, cores=cores)])
    lease = ledger.allocate(lease_of(alloc).model_copy(update={"queue": queue}))
    book.hold(lease)
    return lease


def test_usage_limits_and_shares_follow_the_leases(cluster: tuple[Ledger, Scheduler, QueueBook]) -> None:
    ledger, scheduler, book = cluster
    first = _take(ledger, scheduler, book, "b", 40, 100)
    assert book.usage("b") == Usage(40 * GIB, 100, 1) and book.borrowed("b") == Usage(40 * GIB, 100, 1)
    assert book.share("a") == 0.0 and book.share("b") == pytest.approx(1.5)  # b guarantees nothing: it borrows
    assert book.over_limit("b", first.allocation) is None
    _take(ledger, scheduler, book, "b", 40, 100)
    reason = book.over_limit("b", first.allocation)
    assert reason == "queue b at its limit: memory 80 GiB held + 40 GiB asked > limit 80 GiB"
    assert "over its limit.memory 80 GiB" in (book.never_fits("b", [SliceRequest(memory_mib=90 * GIB)]) or "")
    book.drop(first.lease_id)
    book.drop(first.lease_id)  # idempotent
    assert book.usage("b") == Usage(40 * GIB, 100, 1)
    assert book.order_key("a", 0, 5.0, 1) < book.order_key("b", 9, 1.0, 0)  # the lower share goes first


def test_reclaim_takes_a_borrowers_slice_and_leaves_the_ledger_as_it_was(
        cluster: tuple[Ledger, Scheduler, QueueBook]) -> None:
    ledger, scheduler, book = cluster
    leases = [_take(ledger, scheduler, book, "b", 40, 100) for _ in range(2)]
    plan = book.plan_preemption(scheduler, [SliceRequest(memory_mib=40 * GIB, cores=100, queue="a")], "a", 0)
    assert plan is not None and plan.reason == "reclaim" and plan.for_queue == "a" and plan.node == "n1"
    assert len(plan.victims) == 1 and plan.victims[0].lease_id in {x.lease_id for x in leases}
    assert sorted(ledger.leases) == sorted(x.lease_id for x in leases)  # planned only


def test_apply_refuses_a_tree_that_drops_a_queue_holding_leases(cluster: tuple[Ledger, Scheduler, QueueBook]) -> None:
    ledger, scheduler, book = cluster
    _take(ledger, scheduler, book, "b", 10, 10)
    old = book.tree
    with pytest.raises(QueueConfigError, match="still holds 1 live lease"):
        book.apply(QueueTree.parse("queues:\n  - name: a\n"))
    assert book.tree is old and book.usage("b").memory_mib == 10 * GIB


# --- definitions: every mistake names the queue and the field, and the caller keeps its old tree ------


def _yaml(*entries: str) -> str:
    return "queues:\n" + "".join(f"  - {entry}\n" for entry in entries)


@pytest.mark.parametrize(("text", "queue", "field", "words"), [
    (_yaml("{name: org, guaranteed: {memory: 100GiB}}", "{name: org/a, guaranteed: {memory: 60GiB}}",
           "{name: org/b, guaranteed: {memory: 60GiB}}"),
     "org", "guaranteed.memory", "below its children's guarantees, 120 GiB (org/a 60 GiB, org/b 60 GiB)"),
    # a parent that leaves its guarantee out takes its children's sum, which must fit its own limit
    (_yaml("{name: org, limit: {devices: 2}}", "{name: org/a, guaranteed: {devices: 1}}",
           "{name: org/b, guaranteed: {devices: 2}}"),
     "org", "guaranteed.devices", "(its children's, summed) 3 is over limit.devices 2"),
    (_yaml("{name: org, limit: {cores: 100}}", "{name: org/a, limit: {cores: 300}}"),
     "org/a", "limit.cores", "limit.cores 300 is over its ancestor org's limit.cores 100"),
    (_yaml("{name: org, limit: {devices: 4}}", "{name: org/a}", "{name: org/a/x, limit: {devices: 5}}"),
     "org/a/x", "limit.devices", "over its ancestor org's limit.devices 4"),  # a grandparent's limit too
    (_yaml("{name: a, guaranteed: {devices: 3}, limit: {devices: 2}}"),
     "a", "guaranteed.devices", "guaranteed.devices 3 is over limit.devices 2"),
    (_yaml("{name: a, limit: {memory: 80GB}}"), "a", "limit.memory", "unknown unit 'GB' in '80GB'"),
    (_yaml("{name: a, guaranteed: {memory: 80 bananas}}"), "a", "guaranteed.memory", "unknown unit 'bananas'"),
    (_yaml("{name: a, limit: {memory: lots}}"), "a", "limit.memory", "not a size: 'lots'"),
    (_yaml("{name: a, limit: {cores: 1.5}}"), "a", "limit.cores", "must be a whole number >= 0"),
    (_yaml("{name: a, parent: a}"), "a", "parent", "parent cycle: a -> a"),
    (_yaml("{name: a, parent: c}", "{name: b, parent: a}", "{name: c, parent: b}"),
     "a", "parent", "parent cycle: a -> c -> b -> a"),
    (_yaml("{name: team, parent: org}"), "team", "parent", "parent org is not defined"),
    (_yaml("{name: org}", "{name: org/a, parent: other}", "{name: other}"),
     "org/a", "parent", "parent other disagrees with the name's path"),
    (_yaml("{name: a, limit: {gpus: 1}}"), "a", "limit.gpus", "unknown key limit.gpus"),
    (_yaml("{name: a, quota: {memory: 1GiB}}"), "a", "quota", "unknown key 'quota'"),
    (_yaml("{name: default/x}"), "default/x", "parent", "parent default cannot have child queues"),
    (_yaml("{name: default}", "{name: x, parent: default}"), "x", "parent", "default cannot have child queues"),
    (_yaml("{name: a}", "{name: a}"), "a", "name", "name a is defined twice"),
    (_yaml("{name: 'a b'}"), "a b", "name", "is not a queue name"),
    (_yaml("{name: a, preemptible: maybe}"), "a", "preemptible", "preemptible must be true or false"),
])
def test_each_definition_mistake_names_its_queue_and_field(text: str, queue: str, field: str, words: str) -> None:
    with pytest.raises(QueueConfigError) as caught:
        QueueTree.parse(text)
    assert (caught.value.queue, caught.value.field) == (queue, field)
    assert words in str(caught.value) and str(caught.value).startswith(f"queue {queue}:")


def test_a_mistake_outside_any_queue_names_the_field() -> None:
    with pytest.raises(QueueConfigError) as caught:
        QueueTree.parse("teams: []\n")
    assert (caught.value.queue, caught.value.field) == ("", "teams")
    with pytest.raises(QueueConfigError, match="queues must be a list"):
        QueueTree.parse("queues: {name: a}\n")


def test_a_refused_definition_leaves_the_callers_tree_and_counts_alone(
        cluster: tuple[Ledger, Scheduler, QueueBook]) -> None:
    ledger, scheduler, book = cluster
    _take(ledger, scheduler, book, "a", 10, 10)
    old = book.tree
    bad = _yaml("{name: a, guaranteed: {devices: 3}, limit: {devices: 2}}")
    with pytest.raises(QueueConfigError):
        book.apply(QueueTree.parse(bad))  # refused while parsing: apply never runs
    assert book.tree is old and book.usage("a") == Usage(10 * GIB, 10, 0)
    # a valid tree that regroups the queues re-counts the live leases under their new ancestors
    book.apply(QueueTree.parse(_yaml("{name: org}", "{name: a, parent: org}", "{name: b}")))
    assert book.usage("org") == Usage(10 * GIB, 10, 0) and book.tree.parent("a") == "org"


# --- admission ---------------------------------------------------------------------------------------

NESTED = _yaml(
    "{name: org, limit: {memory: 120GiB, devices: 3}}",
    "{name: org/a, guaranteed: {memory: 80GiB, cores: 100, devices: 1}, limit: {memory: 100GiB}}",
    "{name: org/b}",
    "{name: solo, guaranteed: {memory: 80GiB, cores: 100, devices: 1}, preemptible: false}",
)


@pytest.fixture
def four() -> tuple[Ledger, Scheduler, QueueBook]:
    """Two nodes of two 40 GiB GPUs; org caps its two teams at 120 GiB and 3 whole devices."""
    ledger = Ledger([make_node(n).gpus(2, mem="40GiB").build() for n in ("n1", "n2")])
    return ledger, Scheduler(ledger), QueueBook(QueueTree.parse(NESTED), ledger)


def _hold(ledger: Ledger, scheduler: Scheduler, book: QueueBook, queue: str, request: SliceRequest, *,
          priority: int = 0, created_at: float = 0.0, preemptible: bool = True, node: str | None = None) -> Lease:
    alloc = scheduler.place(request, nodes=None if node is None else [node])
    lease = lease_of(alloc, created_at=created_at).model_copy(
        update={"queue": queue, "priority": priority, "preemptible": preemptible})
    book.hold(ledger.allocate(lease))
    return lease


WHOLE = SliceRequest(cores=100)  # a whole 40 GiB device: counts 40 GiB, 100 cores and 1 device


def test_never_fits_names_the_queue_or_ancestor_whose_limit_the_request_alone_exceeds(
        four: tuple[Ledger, Scheduler, QueueBook]) -> None:
    _, _, book = four
    assert book.never_fits("org/a", [SliceRequest(memory_mib=30 * GIB, count=2)]) is None  # 60 GiB <= 100 GiB
    own = book.never_fits("org/a", [SliceRequest(memory_mib=30 * GIB, count=4)])
    assert own == "queue org/a: the request alone needs memory 120 GiB, over its limit.memory 100 GiB"
    # org/b has no limit of its own: org's caps it (4 whole devices > 3)
    up = book.never_fits("org/b", [SliceRequest(cores=100, count=4)])
    assert up is not None and up.startswith("queue org (an ancestor of org/b): the request alone needs")
    assert "devices 4, over its limit.devices 3" in up
    assert book.never_fits("default", [SliceRequest(cores=100, count=4)]) is None  # default is unbounded


def test_limit_reason_and_over_limit_count_what_the_queue_holds(four: tuple[Ledger, Scheduler, QueueBook]) -> None:
    ledger, scheduler, book = four
    first = _hold(ledger, scheduler, book, "org/b", WHOLE)
    _hold(ledger, scheduler, book, "org/b", WHOLE)
    assert book.limit_reason("org/b", [WHOLE]) is None  # 3 devices, 120 GiB: at org's limit, not over
    third = _hold(ledger, scheduler, book, "org/b", WHOLE)
    reason = book.limit_reason("org/a", [SliceRequest(memory_mib=GIB)])
    assert reason == ("queue org (an ancestor of org/a) at its limit: memory 120 GiB held + 1 GiB asked > "
                      "limit 120 GiB")
    # over_limit judges a real allocation: a whole device counts as a device too
    assert "devices 3 held + 1 asked > limit 3" in (book.over_limit("org/b", first.allocation) or "")
    book.drop(third.lease_id)
    ledger.release(third.lease_id)
    assert book.limit_reason("org/a", [SliceRequest(memory_mib=GIB)]) is None
    assert book.over_limit("org/b", first.allocation) is None


def test_a_queue_borrows_idle_capacity_beyond_its_guarantee_up_to_its_limit(
        four: tuple[Ledger, Scheduler, QueueBook]) -> None:
    ledger, scheduler, book = four
    _hold(ledger, scheduler, book, "org/a", SliceRequest(memory_mib=20 * GIB))
    assert book.borrowed("org/a") == Usage() and book.share("org/a") == pytest.approx(0.25)  # 20 of 80 GiB
    for _ in range(3):
        _hold(ledger, scheduler, book, "org/a", SliceRequest(memory_mib=20 * GIB))
    assert book.share("org/a") == pytest.approx(1.0) and book.borrowed("org/a") == Usage()
    _hold(ledger, scheduler, book, "org/a", SliceRequest(memory_mib=10 * GIB))  # beyond: idle capacity
    assert book.borrowed("org/a") == Usage(10 * GIB, 0, 0)
    assert book.share("org/a") == pytest.approx(1 + 10 / 160)  # 1 + 10 GiB of the cluster's 160 / weight 1
    _hold(ledger, scheduler, book, "org/a", SliceRequest(memory_mib=10 * GIB))
    # its limit (100 GiB) stops it while 60 GiB of the cluster stay idle
    assert "memory 100 GiB held + 1 GiB asked > limit 100 GiB" in (
        book.limit_reason("org/a", [SliceRequest(memory_mib=GIB)]) or "")
    assert int(ledger.index.mem_cap.sum() - ledger.index.mem_used.sum()) == 60 * GIB


def test_the_dominant_share_is_weighted_for_borrowers_only() -> None:
    ledger = Ledger([make_node("n1").gpus(4, mem="40GiB").build()])
    tree = QueueTree.parse(_yaml("{name: light}", "{name: heavy, weight: 3}",
                                 "{name: owed, guaranteed: {memory: 40GiB, cores: 100, devices: 1}, weight: 9}"))
    book, scheduler = QueueBook(tree, ledger), Scheduler(ledger)
    for queue in ("light", "heavy"):
        _hold(ledger, scheduler, book, queue, WHOLE)
    _hold(ledger, scheduler, book, "owed", SliceRequest(memory_mib=20 * GIB))
    # a quarter of the cluster borrowed on every resource: 1 + 0.25 / weight
    assert book.share("light") == pytest.approx(1.25) and book.share("heavy") == pytest.approx(1 + 0.25 / 3)
    assert book.share("owed") == pytest.approx(0.5)  # within its guarantee: weight plays no part
    keys = sorted((book.order_key(q, 0, 0.0, i), q) for i, q in enumerate(("light", "heavy", "owed")))
    assert [q for _, q in keys] == ["owed", "heavy", "light"]
    # at equal share, priority (higher first), then submission, then arrival
    assert book.order_key("light", 5, 9.0, 9) < book.order_key("light", 1, 0.0, 0)
    assert book.order_key("light", 1, 0.0, 9) < book.order_key("light", 1, 1.0, 0)
    assert book.share("default") == pytest.approx(1.0)  # guarantees nothing: at 1 even when idle


# --- reclaim and intra-queue preemption ----------------------------------------------------------


def test_reclaim_takes_from_a_borrower_never_from_an_opted_out_slice_or_a_protected_queue() -> None:
    ledger = Ledger([make_node("n1").gpus(2, mem="40GiB").build()])
    tree = QueueTree.parse(_yaml("{name: owed, guaranteed: {memory: 40GiB, cores: 100, devices: 1}}",
                                 "{name: borrower}", "{name: keep, preemptible: false}"))
    book, scheduler = QueueBook(tree, ledger), Scheduler(ledger)
    kept = _hold(ledger, scheduler, book, "borrower", WHOLE, preemptible=False)
    protected = _hold(ledger, scheduler, book, "keep", WHOLE)
    assert book.plan_preemption(scheduler, [WHOLE], "owed", 0) is None  # nothing may go
    book.drop(protected.lease_id)
    ledger.release(protected.lease_id)
    taken = _hold(ledger, scheduler, book, "borrower", WHOLE)
    plan = book.plan_preemption(scheduler, [WHOLE], "owed", 0)
    assert plan is not None and [v.lease_id for v in plan.victims] == [taken.lease_id]
    assert plan.reason == "reclaim" and "reclaim for owed: 1 slice(s) on n1" in plan.describe()
    assert kept.lease_id in ledger.leases and taken.lease_id in ledger.leases  # a plan frees nothing
    ledger.check_invariants()


def test_reclaim_needs_the_requester_to_stay_within_its_guarantee() -> None:
    ledger = Ledger([make_node("n1").gpus(2, mem="40GiB").build()])
    tree = QueueTree.parse(_yaml("{name: owed, guaranteed: {memory: 40GiB, cores: 100, devices: 1}}",
                                 "{name: borrower}"))
    book, scheduler = QueueBook(tree, ledger), Scheduler(ledger)
    _hold(ledger, scheduler, book, "owed", WHOLE)
    _hold(ledger, scheduler, book, "borrower", WHOLE)
    # owed holds its whole guarantee: a second device would be borrowing, so nothing is reclaimed for it
    assert book.plan_preemption(scheduler, [WHOLE], "owed", 0) is None


def test_reclaim_picks_a_minimal_set_lowest_priority_then_youngest() -> None:
    ledger = Ledger([make_node("n1").gpus(1, mem="40GiB").build(), make_node("n2").gpus(1, mem="40GiB").build()])
    tree = QueueTree.parse(_yaml("{name: owed, guaranteed: {memory: 40GiB, cores: 100, devices: 1}}",
                                 "{name: borrower}"))
    book, scheduler = QueueBook(tree, ledger), Scheduler(ledger)
    # n1: four 10 GiB slices (created 0..3); n2: a 20 GiB slice of priority 5 and two 10 GiB ones
    small = [_hold(ledger, scheduler, book, "borrower", SliceRequest(memory_mib=10 * GIB), node="n1",
                   created_at=float(t)) for t in range(4)]
    big = _hold(ledger, scheduler, book, "borrower", SliceRequest(memory_mib=20 * GIB), node="n2", priority=5,
                created_at=10.0)
    old = _hold(ledger, scheduler, book, "borrower", SliceRequest(memory_mib=10 * GIB), node="n2", created_at=11.0)
    young = _hold(ledger, scheduler, book, "borrower", SliceRequest(memory_mib=10 * GIB), node="n2",
                  created_at=12.0)
    # 10 GiB: one victim anywhere; the lowest priority, then the youngest, goes
    plan = book.plan_preemption(scheduler, [SliceRequest(memory_mib=10 * GIB)], "owed", 0)
    assert plan is not None and [v.lease_id for v in plan.victims] == [young.lease_id]
    # 20 GiB: two priority-0 slices on either node (the priority-5 slice is spared, as kube-scheduler's
    # reprieve spares the most important victims, though taking it alone would also make room); n2's
    # pair is younger than n1's youngest pair
    plan = book.plan_preemption(scheduler, [SliceRequest(memory_mib=20 * GIB)], "owed", 0)
    assert plan is not None and plan.node == "n2"
    assert [v.lease_id for v in plan.victims] == [young.lease_id, old.lease_id]
    # a whole device: all four of n1's, or all three of n2's: the fewest wins
    plan = book.plan_preemption(scheduler, [WHOLE], "owed", 0)
    assert plan is not None and plan.node == "n2"
    assert {v.lease_id for v in plan.victims} == {big.lease_id, old.lease_id, young.lease_id}
    # nothing was freed by planning
    assert {s.lease_id for s in small} | {big.lease_id, old.lease_id, young.lease_id} == set(ledger.leases)
    ledger.check_invariants()


def test_reclaim_leaves_the_victims_queue_at_its_guarantee() -> None:
    ledger = Ledger([make_node("n1").gpus(1, mem="80GiB").build()])
    tree = QueueTree.parse(_yaml("{name: owed, guaranteed: {memory: 20GiB}}",
                                 "{name: borrower, guaranteed: {memory: 40GiB}}",
                                 "{name: rest, guaranteed: {memory: 20GiB}}"))
    book, scheduler = QueueBook(tree, ledger), Scheduler(ledger)
    _hold(ledger, scheduler, book, "borrower", SliceRequest(memory_mib=30 * GIB))
    _hold(ledger, scheduler, book, "borrower", SliceRequest(memory_mib=30 * GIB))
    rest = _hold(ledger, scheduler, book, "rest", SliceRequest(memory_mib=20 * GIB))  # within its guarantee
    # borrower holds 60 GiB (20 beyond); losing a 30 GiB slice would leave 30 < 40: none may go
    assert book.plan_preemption(scheduler, [SliceRequest(memory_mib=10 * GIB)], "owed", 0) is None
    book.drop(rest.lease_id)
    ledger.release(rest.lease_id)
    _hold(ledger, scheduler, book, "rest", SliceRequest(memory_mib=10 * GIB))
    young = _hold(ledger, scheduler, book, "borrower", SliceRequest(memory_mib=10 * GIB), created_at=99.0)
    plan = book.plan_preemption(scheduler, [SliceRequest(memory_mib=10 * GIB)], "owed", 0)
    assert plan is not None and [v.lease_id for v in plan.victims] == [young.lease_id]  # 70 -> 60 >= 40


def test_reclaim_between_siblings_under_a_capped_parent(four: tuple[Ledger, Scheduler, QueueBook]) -> None:
    ledger, scheduler, book = four
    held = [_hold(ledger, scheduler, book, "org/b", WHOLE, created_at=float(t)) for t in range(3)]
    _hold(ledger, scheduler, book, "solo", WHOLE, created_at=9.0)  # the cluster is full
    # org is at its limit (3 devices) because org/b borrows; org/a is owed a device: org/b's youngest goes,
    # never solo's (within its guarantee, and protected besides)
    plan = book.plan_preemption(scheduler, [WHOLE], "org/a", 0)
    assert plan is not None and plan.reason == "reclaim" and [v.lease_id for v in plan.victims] == [held[2].lease_id]
    # org/b itself is owed nothing (no guarantee): it cannot reclaim, and its equal priority preempts nothing
    assert book.plan_preemption(scheduler, [WHOLE], "org/b", 0) is None


def test_a_higher_priority_preempts_a_lower_one_in_its_own_queue_only() -> None:
    ledger = Ledger([make_node("n1").gpus(2, mem="40GiB").build()])
    tree = QueueTree.parse(_yaml("{name: a, limit: {devices: 1}}", "{name: b}", "{name: c, preemptible: false}"))
    book, scheduler = QueueBook(tree, ledger), Scheduler(ledger)
    mine = _hold(ledger, scheduler, book, "a", WHOLE, priority=1)
    _hold(ledger, scheduler, book, "b", WHOLE, priority=0)
    # a is at its limit: a priority-5 request of a may take a's priority-1 slice, never b's lower one
    plan = book.plan_preemption(scheduler, [WHOLE], "a", 5)
    assert plan is not None and plan.reason == "priority" and [v.lease_id for v in plan.victims] == [mine.lease_id]
    assert book.plan_preemption(scheduler, [WHOLE], "a", 1) is None  # an equal priority waits
    # b's priority-9 request takes b's own priority-0 slice, never a's (b guarantees nothing: no reclaim)
    plan = book.plan_preemption(scheduler, [WHOLE], "b", 9)
    assert plan is not None and plan.reason == "priority" and [v.queue for v in plan.victims] == ["b"]
    ledger2 = Ledger([make_node("n1").gpus(1, mem="40GiB").build()])
    book2, scheduler2 = QueueBook(tree, ledger2), Scheduler(ledger2)
    _hold(ledger2, scheduler2, book2, "c", WHOLE, priority=0)
    assert book2.plan_preemption(scheduler2, [WHOLE], "c", 9) is None  # a protected queue keeps its slices


def test_reclaim_finds_the_slice_that_makes_room_when_a_useless_one_comes_first() -> None:
    """The victim order (lowest priority first) meets a 10 GiB slice beside another queue's first; taking it
    would spend the borrower's room above its guarantee (50 GiB) on a device that stays busy. The whole
    device beside it, taken alone, makes room and leaves the borrower at exactly its guarantee."""
    ledger = Ledger([make_node("n1").gpus(2, mem="40GiB").build(), make_node("n2").gpus(1, mem="40GiB").build()])
    tree = QueueTree.parse(_yaml("{name: owed, guaranteed: {memory: 40GiB, cores: 100, devices: 1}}",
                                 "{name: borrower, guaranteed: {memory: 50GiB}}",
                                 "{name: other, guaranteed: {memory: 10GiB}}"))
    book, scheduler = QueueBook(tree, ledger), Scheduler(ledger)
    _hold(ledger, scheduler, book, "borrower", WHOLE, node="n2", priority=1, preemptible=False)
    whole = _hold(ledger, scheduler, book, "borrower", WHOLE, node="n1", priority=1, created_at=2.0)
    _hold(ledger, scheduler, book, "borrower", SliceRequest(memory_mib=10 * GIB), node="n1", created_at=3.0)
    _hold(ledger, scheduler, book, "other", SliceRequest(memory_mib=10 * GIB), node="n1", created_at=4.0)
    assert book.usage("borrower") == Usage(90 * GIB, 200, 2)
    plan = book.plan_preemption(scheduler, [WHOLE], "owed", 0)
    assert plan is not None and plan.node == "n1" and [v.lease_id for v in plan.victims] == [whole.lease_id]
    ledger.check_invariants()


def test_the_least_a_percentage_counts_follows_the_smallest_device_as_nodes_come_and_go() -> None:
    ledger = Ledger([make_node("big").gpus(1, mem="80GiB").build()])
    book = QueueBook(QueueTree.parse(_yaml("{name: a, limit: {memory: 30GiB}}")), ledger)
    half = [SliceRequest(memory_percent=50)]
    assert "40 GiB asked > limit 30 GiB" in (book.limit_reason("a", half) or "")  # half of 80 GiB
    ledger.add_node(make_node("small").gpus(1, mem="40GiB").build())
    assert book.limit_reason("a", half) is None  # half of 40 GiB: the cached size moved with the inventory
    ledger.remove_node("small")
    assert book.never_fits("a", half) is not None
