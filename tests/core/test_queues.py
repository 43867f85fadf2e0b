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
