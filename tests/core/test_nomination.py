"""Room a preemption frees is kept for its waiter (hami_ray.core.nomination, issue 14): others cannot take
it, the nominee can; it ends on expiry or when the waiter leaves; nothing is held while the victims are
still leaving, nor for waiters behind the one placed in its line; the ledger is as before afterwards."""

from __future__ import annotations

import pytest

from hami_ray.core.errors import Unschedulable
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import SliceRequest
from hami_ray.core.nomination import PHANTOM_PREFIX, Nominations
from hami_ray.core.scheduler import Scheduler
from tests.core.builders import hold, make_node, uuid_of

WHOLE = SliceRequest(cores=100)  # a whole device
GIB = 1024


def usage(ledger: Ledger) -> dict[str, tuple[int, int, int]]:
    return {u: (x.memory_mib, x.cores, x.slices) for u in
            (d.uuid for n in ledger.nodes.values() for d in n.devices) for x in [ledger.usage(u)]}


class Freed:
    """Node ``n1`` with two 40 GiB GPUs, both held; a victim on GPU 0 has left (its room is free now) and
    ``w1`` is nominated for it. Node ``n2`` (when asked for) has one GPU, held."""

    def __init__(self, with_n2: bool = False) -> None:
        nodes = [make_node("n1").gpus(2, mem="40GiB").build()]
        if with_n2:
            nodes.append(make_node("n2").gpus(1, mem="40GiB").build())
        self.ledger = Ledger(nodes)
        self.scheduler = Scheduler(self.ledger)
        victim = hold(self.ledger, "n1", (uuid_of("n1", 0), 40 * GIB, 100))
        hold(self.ledger, "n1", (uuid_of("n1", 1), 40 * GIB, 100))
        self.on_n2 = hold(self.ledger, "n2", (uuid_of("n2", 0), 40 * GIB, 100)).lease_id if with_n2 else ""
        self.nominations = Nominations()
        self.nominations.nominate("w1", "n1", [WHOLE], until=100.0)
        self.ledger.release(victim.lease_id)  # the grace is over: the victim is gone

    def fits(self, me: str | None, now: float = 50.0, **kw: object) -> bool:
        with self.nominations.holding_others(self.ledger, self.scheduler, me, now, **kw):  # type: ignore[arg-type]
            try:
                self.scheduler.place(WHOLE)
            except Unschedulable:
                return False
            return True


def test_others_cannot_take_the_room_the_nominee_can() -> None:
    c = Freed()
    assert c.fits("w1")  # its own room: free to it
    assert not c.fits("w2") and not c.fits(None)  # a gang, a request nobody nominated: not theirs
    with c.nominations.holding_others(c.ledger, c.scheduler, "w2", 50.0) as held:
        assert held == (f"{PHANTOM_PREFIX}w1",)
        assert c.ledger.usage(uuid_of("n1", 0)).cores == 100  # the phantom sits where the victim was


def test_others_are_placed_on_room_nobody_was_nominated_for() -> None:
    c = Freed(with_n2=True)
    c.ledger.release(c.on_n2)
    with c.nominations.holding_others(c.ledger, c.scheduler, "w2", 50.0):
        assert c.scheduler.place(WHOLE).node == "n2"


def test_two_nominations_on_one_node_each_keep_their_own_room() -> None:
    ledger = Ledger([make_node("n1").gpus(2, mem="40GiB").build()])
    scheduler = Scheduler(ledger)
    nominations = Nominations()
    nominations.nominate("w1", "n1", [WHOLE], until=100.0)
    nominations.nominate("w2", "n1", [WHOLE], until=100.0)
    for me, other in (("w1", "w2"), ("w2", "w1")):
        with nominations.holding_others(ledger, scheduler, me, 0.0) as held:
            assert held == (f"{PHANTOM_PREFIX}{other}",)
            scheduler.place(WHOLE)  # one GPU left for me
    with nominations.holding_others(ledger, scheduler, "w3", 0.0) as held:
        assert len(held) == 2
        with pytest.raises(Unschedulable):
            scheduler.place(WHOLE)


def test_a_nomination_holds_until_its_time_and_then_expires() -> None:
    c = Freed()
    assert not c.fits("w2", now=100.0)  # ``until`` itself still holds
    assert "w1" in c.nominations
    assert c.fits("w2", now=100.5)  # past it: anyone's room
    assert "w1" not in c.nominations and len(c.nominations) == 0  # dropped on the way


def test_expire_drops_only_what_is_past() -> None:
    nominations = Nominations()
    nominations.nominate("a", "n1", [WHOLE], until=10.0)
    nominations.nominate("b", "n1", [WHOLE], until=20.0)
    assert nominations.expire(10.0) == []
    assert nominations.expire(15.0) == ["a"]
    assert [k for k, _ in nominations.items()] == ["b"]
    again = nominations.nominate("b", "n2", [WHOLE, WHOLE], until=30.0)  # a later preemption replaces it
    assert nominations.get("b") == again and again.requests == (WHOLE, WHOLE)


def test_a_waiter_that_leaves_gives_its_room_back() -> None:
    c = Freed()
    dropped = c.nominations.drop("w1")  # cancelled, failed, or placed elsewhere
    assert dropped is not None and dropped.node == "n1"
    assert c.fits("w2") and c.fits(None)
    assert c.nominations.drop("w1") is None and c.nominations.drop(None) is None  # idempotent


def test_nothing_is_held_while_the_victims_are_still_leaving() -> None:
    ledger = Ledger([make_node("n1").gpus(2, mem="40GiB").build()])
    scheduler = Scheduler(ledger)
    victim = hold(ledger, "n1", (uuid_of("n1", 0), 40 * GIB, 100))
    nominations = Nominations()
    nominations.nominate("w1", "n1", [WHOLE], until=100.0)
    # the victim still holds GPU 0; GPU 1 is free and nobody's: another request may take it meanwhile
    with nominations.holding_others(ledger, scheduler, "w2", 0.0, leaving={"w1"}) as held:
        assert held == ()
        assert scheduler.place(WHOLE).slices[0][0].uuid == uuid_of("n1", 1)
    # once it is gone (no longer leaving), its room is kept: GPU 1 is still free, but only one GPU is
    ledger.release(victim.lease_id)
    with nominations.holding_others(ledger, scheduler, "w2", 0.0, leaving=set()) as held:
        assert len(held) == 1
        scheduler.place(WHOLE)  # the other GPU
        hold(ledger, "n1", (uuid_of("n1", 1), 40 * GIB, 100), lease_id="taken")
        with pytest.raises(Unschedulable):
            scheduler.place(WHOLE)
    assert ledger.usage(uuid_of("n1", 0)).cores == 0  # the room is free again, for w1


def test_waiters_behind_the_one_placed_in_its_line_hold_nothing_from_it() -> None:
    c = Freed()
    assert c.fits("w2", behind={"w1"})  # w1 waits behind w2 in w2's line: w2 may take the room
    assert not c.fits("w2", behind={"w3"})


def test_room_that_is_gone_and_nodes_that_left_are_skipped() -> None:
    c = Freed(with_n2=True)
    c.nominations.nominate("w3", "gone", [WHOLE], until=100.0)  # its node left the cluster
    taken = hold(c.ledger, "n1", (uuid_of("n1", 0), 40 * GIB, 100))  # someone took w1's room first
    with c.nominations.holding_others(c.ledger, c.scheduler, "w2", 50.0) as held:
        assert held == ()
    c.ledger.release(taken.lease_id)
    c.ledger.remove_node("n1")
    with c.nominations.holding_others(c.ledger, c.scheduler, "w2", 50.0) as held:
        assert held == ()


def test_the_ledger_is_unchanged_afterwards_even_on_an_error() -> None:
    c = Freed(with_n2=True)
    c.nominations.nominate("w2", "n2", [WHOLE], until=100.0)
    c.ledger.release(c.on_n2)
    before_usage, before_leases = usage(c.ledger), set(c.ledger.leases)
    with c.nominations.holding_others(c.ledger, c.scheduler, None, 50.0) as held:
        assert len(held) == 2 and usage(c.ledger) != before_usage
        c.ledger.check_invariants()
    assert usage(c.ledger) == before_usage and set(c.ledger.leases) == before_leases
    with pytest.raises(RuntimeError, match="boom"):
        with c.nominations.holding_others(c.ledger, c.scheduler, "w9", 50.0):
            raise RuntimeError("boom")
    c.ledger.check_invariants()
    assert usage(c.ledger) == before_usage and set(c.ledger.leases) == before_leases
    assert c.ledger.snapshot() == Ledger.restore(c.ledger.to_json()).snapshot()
