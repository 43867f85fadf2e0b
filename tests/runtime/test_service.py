"""The placement service without Ray: queue order, node loss, fail-fast checks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hami_ray.core.errors import Unschedulable
from hami_ray.core.request import slice_request
from hami_ray.runtime.service import PlacementService
from tests.core.builders import NodeBuilder


def service() -> PlacementService:
    svc = PlacementService()
    svc.register_node(NodeBuilder("n1").gpus(1, "16GiB", "T4").build(), "actor-n1")
    return svc


def test_queue_orders_by_priority_then_submission_not_arrival() -> None:
    svc = service()
    req = slice_request({"gpu_memory": "1GiB"})
    late = svc.enqueue(req, "b", submitted=20.0)  # reached the actor first, asked second
    early = svc.enqueue(req, "a", submitted=10.0)
    urgent = svc.enqueue(slice_request({"gpu_memory": "1GiB", "priority": 5}), "c", submitted=30.0)
    same_time = svc.enqueue(req, "d", submitted=20.0)  # a tie: arrival decides
    order = []
    while (head := svc.head()) is not None:
        order.append(head.owner)
        svc.remove(head)
    assert order == ["c", "a", "b", "d"]
    assert {w.waiter_id for w in (late, early, urgent, same_time)} == {0, 1, 2, 3}


def test_cancelled_waiters_leave_the_queue() -> None:
    svc = service()
    req = slice_request({"gpu_memory": "1GiB"})
    first = svc.enqueue(req, "a", 1.0)
    second = svc.enqueue(req, "b", 2.0)
    svc.remove(first)
    assert svc.queue_depth == 1 and svc.is_first(second)


def test_a_leaving_node_loses_its_leases() -> None:
    svc = service()
    plan = svc.plan(slice_request({"gpu_memory": "4GiB"}), "task", 0.0)
    svc.confirm(plan.lease)
    lost = svc.remove_node("n1")
    assert [x.lease_id for x in lost] == [plan.lease.lease_id] and lost[0].state == "lost"
    assert svc.lost == lost and not svc.ledger.leases


def test_check_fails_fast_only_for_what_can_never_fit() -> None:
    svc = service()
    held = svc.plan(slice_request({"gpus": 1}), "whole", 0.0)  # the T4 is full now
    svc.check(slice_request({"gpu_memory": "1GiB"}))  # would wait: no error
    with pytest.raises(Unschedulable) as info:
        svc.check(slice_request({"gpu_memory": "1GiB", "gpu_type": "H100"}))
    assert info.value.never
    svc.release(held.lease.lease_id, held.lease.token)


def test_a_gang_is_one_request_of_one_queue_within_its_limit() -> None:
    from hami_ray.core.errors import InvalidRequest  # noqa: PLC0415
    from hami_ray.core.queues import QueueTree  # noqa: PLC0415

    svc = PlacementService(queues=QueueTree.parse("queues: [{name: a, limit: {memory: 24GiB}}, {name: b}]"))
    svc.register_node(NodeBuilder("n1").gpus(4, "16GiB", "T4").build(), "actor-n1")
    bundle = {"gpu_memory": "8GiB", "queue": "a"}
    with pytest.raises(Unschedulable, match="queue a: the request alone needs memory 32 GiB") as info:
        svc.check_group([slice_request(bundle)] * 4, "PACK")  # the gang as a whole is over a's limit
    assert info.value.never
    with pytest.raises(InvalidRequest, match="one queue"):
        svc.check_group([slice_request(bundle), slice_request({**bundle, "queue": "b"})], "SPREAD")
    plans = svc.plan_group([slice_request(bundle)] * 3, "SPREAD", "gang:g", 0.0)
    assert svc.book.usage("a").memory_mib == 3 * 8192 and {p.lease.queue for p in plans} == {"a"}
    with pytest.raises(Unschedulable, match="queue a at its limit"):
        svc.plan(slice_request({"gpu_memory": "1GiB", "queue": "a"}), "task", 0.0)
    svc.release(plans[0].lease.lease_id, plans[0].lease.token)
    assert svc.book.usage("a").memory_mib == 2 * 8192


@pytest.mark.parametrize("strategy", ["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"])
def test_a_gang_avoids_the_nodes_whose_actor_just_refused(strategy: str) -> None:
    """A gang planned again after a node actor could not hold its part (a full state disk) goes around that
    node, whatever the strategy; with no other room it waits (Unschedulable, not never)."""
    svc = PlacementService()
    for name in ("n1", "n2", "n3", "n4"):
        svc.register_node(NodeBuilder(name).gpus(2, "16GiB", "T4").build(), f"actor-{name}")
    gang = [slice_request({"gpu_memory": "4GiB"})] * 2
    first = svc.plan_group(gang, strategy, "gang:g", 0.0)
    used = {p.node_id for p in first}
    for plan in first:
        svc.abort(plan.lease.lease_id)
    again = svc.plan_group(gang, strategy, "gang:g", 0.0, avoid=used)
    assert not used & {p.node_id for p in again}, (used, [p.node_id for p in again])
    for plan in again:
        svc.abort(plan.lease.lease_id)
    with pytest.raises(Unschedulable) as info:
        svc.plan_group(gang, strategy, "gang:g", 0.0, avoid={"n1", "n2", "n3", "n4"})
    assert not info.value.never and not svc.ledger.leases  # nothing held


def test_a_node_sync_keeps_a_lease_confirmed_while_its_answer_travelled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sync frees what the node actor no longer holds, but a reservation confirmed (over the fast path)
    after the node actor answered is not in that answer yet: dropping it would free room still held there."""
    from hami_ray.runtime import placement  # noqa: PLC0415 - imports Ray (no cluster is started)

    node = NodeBuilder("n1").gpus(1, "16GiB", "T4").build()
    shell = placement.PlacementShell({"state_root": "/nonexistent"})
    shell.svc.register_node(node, "actor-n1")
    held: list[str] = []  # the node actor's leases when it answers
    during: list[str] = []

    class Info:
        @staticmethod
        def remote() -> Any:
            async def answer() -> dict[str, Any]:
                snapshot = [x.model_dump(mode="json") for x in shell.svc.ledger.leases_on("n1") if x.lease_id in held]
                if not during:  # while the answer travels, another reservation is confirmed
                    plan = shell.svc.plan(slice_request({"gpu_memory": "4GiB"}), "task", 0.0)
                    during.append(shell.svc.confirm(plan.lease).lease_id)
                return {"node": node.model_dump(mode="json"), "leases": snapshot}
            return answer()

    class Handle:
        info = Info

    monkeypatch.setattr(placement.ray, "nodes", lambda: [{"NodeID": "n1", "Alive": True}])
    shell._actors["n1"] = Handle()
    asyncio.run(shell._sync_nodes())
    assert during and during[0] in shell.svc.ledger.leases  # kept: confirmed after the question
    asyncio.run(shell._sync_nodes())  # asked again, the node actor does not hold it (freed there): freed here
    assert during[0] not in shell.svc.ledger.leases


def test_a_node_sync_frees_a_taken_over_reservation_that_its_node_actor_let_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted placement actor takes over the node actor's leases, reservations whose worker never came
    included; once the node actor lets such a reservation expire, the ledger must free it too (found by
    bench/chaos.py: two placement actor kills in a row left one in the ledger only)."""
    from hami_ray.core.model import LeaseState  # noqa: PLC0415
    from hami_ray.runtime import placement  # noqa: PLC0415

    node = NodeBuilder("n1").gpus(1, "16GiB", "T4").build()
    shell = placement.PlacementShell({"state_root": "/nonexistent"})
    donor = PlacementService()
    donor.register_node(node, "actor-n1")
    taken = donor.plan(slice_request({"gpu_memory": "4GiB"}), "task", 0.0).lease  # reserved, never confirmed
    assert taken.state == LeaseState.RESERVED
    shell.svc.register_node(node, "actor-n1", [taken])  # as the node actor reported it at the restart

    class Info:
        @staticmethod
        def remote() -> Any:
            async def answer() -> dict[str, Any]:
                return {"node": node.model_dump(mode="json"), "leases": []}  # expired there meanwhile
            return answer()

    class Handle:
        info = Info

    monkeypatch.setattr(placement.ray, "nodes", lambda: [{"NodeID": "n1", "Alive": True}])
    shell._actors["n1"] = Handle()
    assert taken.lease_id in shell.svc.ledger.leases
    asyncio.run(shell._sync_nodes())
    assert taken.lease_id not in shell.svc.ledger.leases
