"""The placement service without Ray: queue order, node loss, fail-fast checks."""

from __future__ import annotations

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
    while svc.head() is not None:
        order.append(svc.pop().owner)
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
