"""Isolation grades in the engine: the grade a slice holds on a device, the ``isolation=`` floor in
placement (and its reason when nothing holds it), and MIG instances handed out whole (issue 12)."""

from __future__ import annotations

import pytest

from hami_ray.core.errors import Unschedulable
from hami_ray.core.grades import ORDER, Isolation, isolation, strongest, weakest
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import DeviceMode, SliceRequest
from hami_ray.core.request import slice_request
from hami_ray.core.scheduler import Scheduler
from tests.core.builders import allocate, make_node


def test_grades_are_ordered_strongest_last() -> None:
    assert [g.value for g in ORDER] == ["none", "watchdog", "hami-core", "mps", "mig"]
    assert Isolation.MPS.at_least(Isolation.HAMI_CORE) and not Isolation.WATCHDOG.at_least(Isolation.MPS)
    assert Isolation.NONE.at_least(None)
    assert weakest([Isolation.MIG, Isolation.WATCHDOG]) is Isolation.WATCHDOG
    assert strongest([Isolation.WATCHDOG, Isolation.MPS]) is Isolation.MPS
    assert weakest([]) is Isolation.NONE and strongest([]) is Isolation.NONE
    assert isolation("Hami_Core") is Isolation.HAMI_CORE


def test_a_whole_device_slice_does_not_go_through_mps() -> None:
    dev = make_node("n").gpus(1, isolation="mps", whole_isolation="hami-core").build().devices[0]
    assert dev.grade_for(30) is Isolation.MPS
    assert dev.grade_for(100) is Isolation.HAMI_CORE
    mig = make_node("m").gpus(1, mem="10GiB", mode=DeviceMode.MIG, isolation="mig").build().devices[0]
    assert mig.grade_for(100) is Isolation.MIG and mig.slice_capacity == 1


def cluster() -> Scheduler:
    # n-watch: a GPU guarded by the watchdog only; n-mps: one under MPS (whole slices: hami-core)
    watch = make_node("n-watch").gpus(1, mem="80GiB", isolation="watchdog").build()
    mps = make_node("n-mps").gpus(1, mem="80GiB", isolation="mps", whole_isolation="hami-core").build()
    return Scheduler(Ledger([watch, mps]))


def test_a_floor_lands_only_where_the_grade_holds() -> None:
    sched = cluster()
    for _ in range(3):
        alloc = sched.place(slice_request({"gpu_memory": "8GiB", "gpu_cores": 20, "isolation": "mps"}))
        assert alloc.node == "n-mps"
        allocate(sched.ledger, alloc)
    # without a floor both nodes qualify
    nodes = {sched.place(slice_request({"gpu_memory": "8GiB"}), nodes=[n]).node for n in ("n-watch", "n-mps")}
    assert nodes == {"n-watch", "n-mps"}


def test_unschedulable_names_the_floor_per_node() -> None:
    sched = cluster()
    with pytest.raises(Unschedulable) as info:
        sched.place(slice_request({"gpu_memory": "8GiB", "isolation": "mig"}))
    assert str(info.value) == ("0/2 nodes are available: 2 isolation below mig "
                               "(no node could ever hold this request)")
    assert info.value.never
    # a whole-device slice on the MPS node holds hami-core only: an mps floor cannot be met there
    with pytest.raises(Unschedulable) as info:
        sched.place(slice_request({"gpu_cores": 100, "isolation": "mps"}))
    assert info.value.reasons == {"isolation below mps": 2}
    # type mismatch is reported before the grade (static reasons keep their order)
    with pytest.raises(Unschedulable) as info:
        sched.place(slice_request({"gpu_type": "H100", "isolation": "mps"}))
    assert info.value.reasons == {"device type mismatch": 2}


def test_extender_verdicts_say_isolation() -> None:
    sched = cluster()
    verdicts = sched.verdicts(slice_request({"gpu_memory": "8GiB", "gpu_cores": 10, "isolation": "mps"}),
                              ["n-watch", "n-mps"])
    assert verdicts == {"n-watch": "isolation below the requested grade", "n-mps": None}


def test_mig_instances_are_handed_out_whole_and_never_sliced() -> None:
    # an A100 in MIG mode offered as two instances (the parent is not a device at all)
    node = (make_node("n").gpus(1, mem="10GiB", model="A100-1g.10gb", cores=14, mode=DeviceMode.MIG, isolation="mig")
            .gpus(1, mem="20GiB", model="A100-2g.20gb", cores=28, mode=DeviceMode.MIG, isolation="mig").build())
    sched = Scheduler(Ledger([node]))
    request = SliceRequest(memory_mib=4096, cores=5)
    first = sched.place(request)
    grant = first.devices[0]
    held = next(d for d in node.devices if d.uuid == grant.uuid)
    assert (grant.memory_mib, grant.cores) == (held.memory_mib, held.cores)  # the whole instance
    allocate(sched.ledger, first)
    second = sched.place(request)
    assert second.devices[0].uuid != grant.uuid  # the first instance is not sliced again
    allocate(sched.ledger, second)
    with pytest.raises(Unschedulable) as info:
        sched.place(request)
    assert info.value.reasons == {"device split count exhausted": 1}
    sched.ledger.check_invariants()
