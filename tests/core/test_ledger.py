"""Tests of hami_ray.core.ledger: leases, invariants, inventory changes, snapshot/restore.

The last part is a Hypothesis state machine that interleaves scheduler placements, raw (possibly
invalid) grants, releases, node removal/replacement and snapshot/restore, and checks the ledger against
usage recomputed independently from the live leases after every step.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hami_ray.core.errors import (
    InvalidRequest,
    InvariantViolation,
    LeaseError,
    LeaseNotFound,
    LeaseTokenMismatch,
    Unschedulable,
)
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import (
    FULL_CORES,
    Allocation,
    ClusterSnapshot,
    Device,
    DeviceMode,
    Lease,
    LeaseState,
    Node,
    SliceRequest,
)
from hami_ray.core.names import DevicePolicyName, NodePolicyName
from hami_ray.core.scheduler import Scheduler, TieBreak
from tests.core.builders import allocate, hold, lease_of, make_node, raw_allocation, uuid_of

A0, A1 = uuid_of("n1", 0), uuid_of("n1", 1)


def two_a100() -> Ledger:
    return Ledger([make_node("n1").gpus(2, mem="80GiB", model="A100").cpu(16).memory("64GiB").build()])


# --- allocate and release -----------------------------------------------------------------------


def test_allocate_then_release_frees_everything() -> None:
    ledger = two_a100()
    lease = hold(ledger, "n1", (A0, 8192, 30), (A1, 4096, 10), cpu_milli=2000, host_memory_mib=1024)
    assert ledger.leases == {lease.lease_id: lease}
    assert ledger.leases_on("n1") == [lease]
    u = ledger.usage(A0)
    assert (u.memory_mib, u.cores, u.slices, u.free_memory_mib) == (8192, 30, 1, 81920 - 8192)
    assert (ledger.usage(A1).memory_mib, ledger.usage(A1).cores) == (4096, 10)
    assert (int(ledger.index.cpu_used[0]), int(ledger.index.hmem_used[0])) == (2000, 1024)

    released = ledger.release(lease.lease_id, lease.token)
    assert released is not None and released.state is LeaseState.RELEASED
    assert released.model_copy(update={"state": lease.state}) == lease
    assert ledger.leases == {}
    for uuid in (A0, A1):
        u = ledger.usage(uuid)
        assert (u.memory_mib, u.cores, u.slices, u.free_memory_mib) == (0, 0, 0, 81920)
    assert (int(ledger.index.cpu_used[0]), int(ledger.index.hmem_used[0])) == (0, 0)
    ledger.check_invariants()


def test_release_is_idempotent() -> None:
    ledger = two_a100()
    lease = hold(ledger, "n1", (A0, 8192, 30))
    assert ledger.release(lease.lease_id, lease.token) is not None
    assert ledger.release(lease.lease_id, lease.token) is None
    assert ledger.release(lease.lease_id) is None
    assert ledger.release(lease.lease_id, "any token at all") is None  # already gone: nothing to protect
    assert ledger.usage(A0).memory_mib == 0


def test_wrong_token_is_refused_and_changes_nothing() -> None:
    ledger = two_a100()
    lease = hold(ledger, "n1", (A0, 8192, 30))
    before = ledger.to_json()
    with pytest.raises(LeaseTokenMismatch) as info:
        ledger.release(lease.lease_id, "not-the-token")
    assert info.value.lease_id == lease.lease_id and isinstance(info.value, LeaseError)
    assert ledger.to_json() == before
    assert ledger.usage(A0).memory_mib == 8192
    assert ledger.release(lease.lease_id, None) is not None  # trusted internal caller: no token


def test_unknown_lease_is_not_found() -> None:
    ledger = two_a100()
    with pytest.raises(LeaseNotFound) as info:
        ledger.release("never-allocated", "t")
    assert info.value.lease_id == "never-allocated"
    assert str(info.value) == "no lease 'never-allocated'"
    with pytest.raises(LeaseNotFound):
        ledger.update("never-allocated", state=LeaseState.ACTIVE)


def test_a_released_id_may_be_allocated_again() -> None:
    ledger = two_a100()
    lease = hold(ledger, "n1", (A0, 8192, 30))
    ledger.release(lease.lease_id)
    again = ledger.allocate(lease)
    assert ledger.leases == {lease.lease_id: again}
    assert ledger.usage(A0).memory_mib == 8192


def test_update_changes_state_and_pids_not_allocation() -> None:
    ledger = two_a100()
    lease = hold(ledger, "n1", (A0, 8192, 30))
    active = ledger.update(lease.lease_id, state=LeaseState.ACTIVE, pids=(123,))
    assert (active.state, active.pids) == (LeaseState.ACTIVE, (123,))
    assert ledger.leases[lease.lease_id] == active
    with pytest.raises(InvariantViolation):
        ledger.update(lease.lease_id, allocation=raw_allocation("n1", (A1, 1, 0)))
    assert ledger.usage(A0).memory_mib == 8192 and ledger.usage(A1).memory_mib == 0


# --- atomicity ----------------------------------------------------------------------------------


def test_multi_device_allocation_is_atomic() -> None:
    ledger = two_a100()
    hold(ledger, "n1", (A1, 80000, 10))
    before = ledger.to_json()
    # A0 alone would fit; A1 has 1920 MiB left and is asked for 4096: nothing may change
    with pytest.raises(InvariantViolation, match="memory"):
        hold(ledger, "n1", (A0, 8192, 30), (A1, 4096, 10))
    assert ledger.to_json() == before
    assert ledger.usage(A0).memory_mib == 0 and ledger.usage(A0).slices == 0
    ledger.check_invariants()


def test_multi_slice_allocation_is_atomic() -> None:
    ledger = two_a100()
    before = ledger.to_json()
    # two containers; the second asks 101 % of A1's cores in total with the first
    alloc = raw_allocation("n1", slices=[[(A0, 1024, 10), (A1, 1024, 60)], [(A1, 1024, 41)]])
    with pytest.raises(InvariantViolation, match="cores"):
        allocate(ledger, alloc)
    assert ledger.to_json() == before
    assert ledger.index.tags[0] == {}


def test_same_device_twice_in_one_lease_counts_twice() -> None:
    ledger = two_a100()
    # two slices of 50000 MiB on one 81920 MiB device: each alone fits, together they do not
    with pytest.raises(InvariantViolation, match="memory"):
        allocate(ledger, raw_allocation("n1", slices=[[(A0, 50000, 10)], [(A0, 50000, 10)]]))
    assert ledger.usage(A0).memory_mib == 0


# --- every invariant is refused with InvariantViolation ---------------------------------------------


def _cluster() -> Ledger:
    return Ledger([
        make_node("n1").gpus(2, mem="80GiB").cpu(16).memory("64GiB").build(),
        make_node("sc").gpus(1, mem="10GiB", memory_scaling=1.5, core_scaling=2.0, split=3).build(),
        make_node("ex").gpus(1, mem="80GiB", model="H100", mode=DeviceMode.EXCLUSIVE).build(),
    ])


S0, E0 = uuid_of("sc", 0), uuid_of("ex", 0)


@pytest.mark.parametrize(
    ("setup", "attempt", "match"),
    [
        # memory: 81920 MiB per device
        ([("n1", [(A0, 80000, 0)])], ("n1", [(A0, 1921, 0)]), "memory"),
        ([], ("n1", [(A0, 81921, 0)]), "memory"),
        # memory_scaling 1.5: 10240 x 1.5 = 15360 MiB schedulable
        ([("sc", [(S0, 15000, 0)])], ("sc", [(S0, 361, 0)]), "memory"),
        # cores: 100 per device
        ([("n1", [(A0, 1, 60)])], ("n1", [(A0, 1, 41)]), "cores"),
        # core_scaling 2: 200 schedulable; 99 + 99 + 3 > 200
        ([("sc", [(S0, 1, 99)]), ("sc", [(S0, 1, 99)])], ("sc", [(S0, 1, 3)]), "cores"),
        # split count 3 on "sc"
        ([("sc", [(S0, 1, 0)]), ("sc", [(S0, 1, 0)]), ("sc", [(S0, 1, 0)])], ("sc", [(S0, 1, 0)]), "slice"),
        # exclusive mode: one slice per device
        ([("ex", [(E0, 1, 10)])], ("ex", [(E0, 1, 10)]), "slice"),
        # a 100-core slice is exclusive: not on a used device ...
        ([("n1", [(A0, 1, 0)])], ("n1", [(A0, 1, FULL_CORES)]), "exclusive"),
        # ... and nothing joins it, not even a 0-core, 0-MiB slice
        ([("n1", [(A0, 1, FULL_CORES)])], ("n1", [(A0, 0, 0)]), "exclusive|cores"),
        # core_scaling 2 leaves 100 cores free next to a 100-core slice, but it is still exclusive
        ([("sc", [(S0, 1, FULL_CORES)])], ("sc", [(S0, 1, 50)]), "exclusive"),
        ([("sc", [(S0, 1, 50)])], ("sc", [(S0, 1, FULL_CORES)]), "exclusive"),
    ],
    ids=["memory", "memory-one-grant", "memory-scaled", "cores", "cores-scaled", "split-count",
         "exclusive-mode", "exclusive-on-used", "join-exclusive", "exclusive-scaled", "exclusive-scaled-2"],
)
def test_device_invariants(setup: list[tuple[str, list[tuple[str, int, int]]]],
                           attempt: tuple[str, list[tuple[str, int, int]]], match: str) -> None:
    ledger = _cluster()
    for node, specs in setup:
        hold(ledger, node, *specs)
    ledger.check_invariants()
    before = ledger.to_json()
    with pytest.raises(InvariantViolation, match=match):
        hold(ledger, attempt[0], *attempt[1])
    assert ledger.to_json() == before
    ledger.check_invariants()


@pytest.mark.parametrize(
    ("setup", "attempt"),
    [
        ([("n1", [(A0, 40000, 0)])], ("n1", [(A0, 41920, 0)])),  # exactly full memory
        ([("n1", [(A0, 1, 60)])], ("n1", [(A0, 1, 40)])),  # exactly 100 cores
        ([("sc", [(S0, 15000, 0)])], ("sc", [(S0, 360, 0)])),  # exactly 15360 scaled MiB
        ([("sc", [(S0, 1, 99)]), ("sc", [(S0, 1, 99)])], ("sc", [(S0, 1, 2)])),  # exactly 200 cores
        ([("sc", [(S0, 1, 0)]), ("sc", [(S0, 1, 0)])], ("sc", [(S0, 1, 0)])),  # the 3rd of 3 slices
        ([], ("n1", [(A0, 81920, FULL_CORES)])),  # a whole device
    ],
    ids=["full-memory", "full-cores", "full-scaled-memory", "full-scaled-cores", "last-slice", "whole"],
)
def test_limits_are_inclusive(setup: list[tuple[str, list[tuple[str, int, int]]]],
                              attempt: tuple[str, list[tuple[str, int, int]]]) -> None:
    ledger = _cluster()
    for node, specs in setup:
        hold(ledger, node, *specs)
    hold(ledger, attempt[0], *attempt[1])
    ledger.check_invariants()


def test_host_cpu_and_memory_are_invariants_where_tracked() -> None:
    ledger = _cluster()
    hold(ledger, "n1", (A0, 1, 0), cpu_milli=15000, host_memory_mib=60000)
    with pytest.raises(InvariantViolation, match="CPU"):
        hold(ledger, "n1", (A1, 1, 0), cpu_milli=1001)
    with pytest.raises(InvariantViolation, match="host memory"):
        hold(ledger, "n1", (A1, 1, 0), host_memory_mib=65537 - 60000)
    hold(ledger, "n1", (A1, 1, 0), cpu_milli=1000, host_memory_mib=65536 - 60000)
    # "sc" tracks neither (0 means untracked): anything goes
    hold(ledger, "sc", (S0, 1, 0), cpu_milli=10**9, host_memory_mib=10**9)


@pytest.mark.parametrize(
    ("lease", "match"),
    [
        (lease_of(raw_allocation("ghost", (A0, 1, 0))), "unknown node"),
        (lease_of(raw_allocation("n1", ("GPU-ghost", 1, 0))), "not on n1"),
        (lease_of(raw_allocation("n1", (S0, 1, 0))), "not on n1"),  # a device of another node
        (lease_of(raw_allocation("n1", (A0, 1, 0)), state=LeaseState.RELEASED), "released"),
        (lease_of(raw_allocation("n1", (A0, 1, 0)), state=LeaseState.LOST), "lost"),
    ],
    ids=["unknown-node", "unknown-device", "foreign-device", "released-state", "lost-state"],
)
def test_malformed_leases_are_refused(lease: Lease, match: str) -> None:
    ledger = _cluster()
    before = ledger.to_json()
    with pytest.raises(InvariantViolation, match=match):
        ledger.allocate(lease)
    assert ledger.to_json() == before


def test_a_live_lease_id_cannot_be_allocated_twice() -> None:
    ledger = _cluster()
    lease = hold(ledger, "n1", (A0, 1, 0))
    with pytest.raises(InvariantViolation, match="already held"):
        ledger.allocate(lease.model_copy(update={"allocation": raw_allocation("n1", (A1, 1, 0))}))
    assert ledger.usage(A1).slices == 0


def test_check_invariants_can_fail() -> None:
    ledger = _cluster()
    hold(ledger, "n1", (A0, 1024, 10))
    ledger.index.mem_used[0, 0] += 1  # a counter drifting from its leases
    with pytest.raises(InvariantViolation, match="disagree"):
        ledger.check_invariants()


# --- inventory changes ----------------------------------------------------------------------------


def test_remove_node_returns_its_leases_as_lost_and_frees_capacity() -> None:
    ledger = _cluster()
    a = hold(ledger, "n1", (A0, 1024, 10))
    b = hold(ledger, "n1", (A1, 2048, 20), cpu_milli=4000)
    other = hold(ledger, "sc", (S0, 1, 10))
    lost = ledger.remove_node("n1")
    assert sorted(lost, key=lambda x: x.lease_id) == sorted(
        [x.model_copy(update={"state": LeaseState.LOST}) for x in (a, b)], key=lambda x: x.lease_id)
    assert ledger.leases == {other.lease_id: other}
    assert "n1" not in ledger.nodes and ledger.where(A0) is None and ledger.leases_on("n1") == []
    assert ledger.remove_node("n1") == []  # removing again is a no-op
    ledger.check_invariants()
    # the node comes back empty: the capacity held by the lost leases is free
    ledger.add_node(make_node("n1").gpus(2, mem="80GiB").cpu(16).memory("64GiB").build())
    assert ledger.usage(A0).memory_mib == 0 and ledger.usage(A1).slices == 0
    assert int(ledger.index.cpu_used[ledger.index.rows["n1"]]) == 0
    hold(ledger, "n1", (A0, 81920, 100), cpu_milli=16000)
    ledger.check_invariants()


def test_add_node_replaces_inventory_and_loses_only_what_no_longer_fits() -> None:
    ledger = Ledger([make_node("n1").gpus(3, mem="80GiB").build()])
    n1_2 = uuid_of("n1", 2)
    first = hold(ledger, "n1", (A0, 30000, 10), created_at=1.0)
    second = hold(ledger, "n1", (A0, 30000, 10), created_at=2.0)  # A0 holds 60000 MiB
    gone = hold(ledger, "n1", (n1_2, 1024, 10), created_at=3.0)
    spans = hold(ledger, "n1", (A1, 1024, 10), (n1_2, 1024, 10), created_at=4.0)
    keeps = hold(ledger, "n1", (A1, 1024, 10), created_at=5.0)
    # re-registration: device 2 is gone and device 0 now reports 40 GiB; a new device 3 appears
    new = Node(name="n1", devices=(
        Device(uuid=A0, index=0, model="A100", memory_mib=40960),
        Device(uuid=A1, index=1, model="A100", memory_mib=81920),
        Device(uuid=uuid_of("n1", 3), index=2, model="A100", memory_mib=81920),
    ))
    lost = ledger.add_node(new)
    # replayed oldest first: `first` still fits in 40960 MiB, `second` (60000 in total) does not
    assert {x.lease_id for x in lost} == {second.lease_id, gone.lease_id, spans.lease_id}
    assert all(x.state is LeaseState.LOST for x in lost)
    assert set(ledger.leases) == {first.lease_id, keeps.lease_id}
    assert ledger.usage(A0).memory_mib == 30000 and ledger.usage(A1).memory_mib == 1024
    assert ledger.where(n1_2) is None and ledger.usage(uuid_of("n1", 3)).slices == 0
    assert ledger.node("n1") == new
    ledger.check_invariants()


def test_add_node_refuses_a_device_of_another_node() -> None:
    ledger = _cluster()
    before = ledger.to_json()
    thief = Node(name="n9", devices=(Device(uuid=A0, index=0, model="A100", memory_mib=1),))
    with pytest.raises(InvariantViolation, match="already registered"):
        ledger.add_node(thief)
    assert ledger.to_json() == before and "n9" not in ledger.nodes


def test_removed_rows_are_reused_cleanly() -> None:
    ledger = _cluster()
    hold(ledger, "n1", (A0, 4096, 100), cpu_milli=1000)
    ledger.remove_node("n1")
    ledger.add_node(make_node("n2").gpus(1, mem="16GiB", model="T4").cpu(4).build())
    t4 = uuid_of("n2", 0)
    assert ledger.usage(t4).slices == 0 and not ledger.index.excl[ledger.where(t4)]
    assert ledger.index.tags[ledger.index.rows["n2"]] == {}
    hold(ledger, "n2", (t4, 16384, 100), cpu_milli=4000)
    ledger.check_invariants()


# --- snapshot and restore -------------------------------------------------------------------------


def _busy_ledger() -> Ledger:
    ledger = Ledger([
        make_node("n1").gpus(2, mem="80GiB", numa=0).gpus(2, mem="80GiB", numa=1).link(0, 1, 100).link(2, 3, 100)
        .cpu(64).memory("512GiB").label("zone", "a").build(),
        make_node("sc").gpus(1, mem="10GiB", memory_scaling=1.5, core_scaling=2.0, split=3).build(),
    ])
    hold(ledger, "n1", (A0, 1024, 10), cpu_milli=1000, created_at=5.5)
    hold(ledger, "n1", (A1, 81920, 100), host_memory_mib=4096, created_at=0.1)
    lease = hold(ledger, "sc", (S0, 15000, 99), created_at=0.1)
    ledger.update(lease.lease_id, state=LeaseState.ACTIVE, pids=(10, 11))
    allocate(ledger, raw_allocation("n1", slices=[[(uuid_of("n1", 2), 1, 0)], [(uuid_of("n1", 3), 2, 3)]]))
    return ledger


def test_snapshot_json_restore_is_exact() -> None:
    ledger = _busy_ledger()
    snap = ledger.snapshot()
    text = ledger.to_json()
    assert ClusterSnapshot.model_validate_json(text) == snap
    for restored in (Ledger.restore(text), Ledger.restore(snap)):
        assert restored.snapshot() == snap
        assert restored.to_json() == text
        restored.check_invariants()
        for uuid in [d.uuid for n in ledger.nodes.values() for d in n.devices]:
            assert restored.usage(uuid) == ledger.usage(uuid)
        assert restored.index.tags[restored.index.rows["n1"]] == ledger.index.tags[ledger.index.rows["n1"]]


def test_snapshot_is_ordered_and_independent_of_insertion_order() -> None:
    ledger = _busy_ledger()
    snap = ledger.snapshot()
    assert [n.name for n in snap.nodes] == sorted(n.name for n in snap.nodes)
    keys = [(x.created_at, x.lease_id) for x in snap.leases]
    assert keys == sorted(keys)
    rebuilt = Ledger(reversed(snap.nodes))
    for lease in reversed(snap.leases):
        rebuilt.allocate(lease)
    assert rebuilt.snapshot() == snap


def test_restore_refuses_an_overcommitted_snapshot() -> None:
    ledger = _busy_ledger()
    snap = ledger.snapshot()
    extra = lease_of(raw_allocation("n1", (A1, 1, 0)))  # joins the 100-core slice on A1
    with pytest.raises(InvariantViolation):
        Ledger.restore(snap.model_copy(update={"leases": snap.leases + (extra,)}))


# --- bugs and regressions -----------------------------------------------------------------------------------------


# Regression test for a bug this suite found (since fixed): ledger.py remove_node()/add_node() drop lost leases without
# remembering them in _released, so the holder's own release (a task ending after its node died) raises
# LeaseNotFound instead of the idempotent no-op DESIGN promises
def test_releasing_a_lost_lease_is_a_no_op() -> None:
    ledger = _cluster()
    lease = hold(ledger, "n1", (A0, 1024, 10))
    ledger.remove_node("n1")
    assert ledger.release(lease.lease_id, lease.token) is None


# Regression test for a bug this suite found (since fixed): ledger.py update() applied any field with
# model_copy(update=...); state=LOST or RELEASED on a live lease made snapshot() hold a lease that restore() ->
# allocate() refuses, so the ledger no longer restored from its own JSON
@pytest.mark.parametrize("changes", [{"state": LeaseState.LOST}, {"state": LeaseState.RELEASED},
                                     {"token": "stolen"}, {"created_at": 9.0}, {"pids": (1,), "token": "x"}],
                         ids=["lost", "released", "token", "created-at", "valid-and-invalid"])
def test_update_refuses_ending_states_and_other_fields(changes: dict[str, object]) -> None:
    ledger = _cluster()
    lease = hold(ledger, "n1", (A0, 1024, 10))
    before = ledger.to_json()
    with pytest.raises(InvariantViolation):
        ledger.update(lease.lease_id, **changes)
    assert ledger.to_json() == before


def test_every_ledger_reachable_through_update_restores() -> None:
    ledger = _cluster()
    lease = hold(ledger, "n1", (A0, 1024, 10))
    ledger.update(lease.lease_id, state=LeaseState.ACTIVE, pids=(1, 2), owner="actor-7", priority=3)
    restored = Ledger.restore(ledger.to_json())
    assert restored.snapshot() == ledger.snapshot()
    assert restored.leases == ledger.leases


# Regression test for a bug this suite found (since fixed): ledger.py check_invariants() recounts only device memory, cores
# and slices; drift in the host CPU and host memory counters or in the exclusive flags (which the scheduler
# filters on) goes unnoticed
@pytest.mark.parametrize("counter", ["cpu_used", "hmem_used", "excl"])
def test_check_invariants_sees_every_counter(counter: str) -> None:
    ledger = _cluster()
    hold(ledger, "n1", (A0, 1024, 10), cpu_milli=1000, host_memory_mib=1024)
    if counter == "excl":
        ledger.index.excl[ledger.where(A1)] = True  # A1 holds nothing, yet looks exclusively held
    else:
        getattr(ledger.index, counter)[ledger.index.rows["n1"]] += 1
    try:
        ledger.check_invariants()
    except InvariantViolation:
        return
    raise AssertionError(f"drift in {counter} passed check_invariants()")


# --- the state machine ------------------------------------------------------------------------------


def machine_nodes() -> list[Node]:
    return [
        make_node("n1").gpus(1, mem="80GiB", model="NVIDIA A100-SXM4-80GB", numa=0)
        .gpus(1, mem="80GiB", model="NVIDIA A100-SXM4-80GB", numa=1).cpu(16).memory("64GiB").build(),
        make_node("n2").gpus(1, mem="16GiB", model="Tesla T4", split=2, memory_scaling=1.5, core_scaling=2.0)
        .gpus(1, mem="16GiB", model="Tesla T4", healthy=False).cpu(8).build(),
        make_node("n3").gpus(1, mem="80GiB", model="H100", mode=DeviceMode.EXCLUSIVE)
        .gpus(2, mem="40GiB", model="A100-PCIE-40GB", split=3, numa=1).link(1, 2, 100).build(),
        make_node("n4").gpus(2, mem="64GiB", model="MI250", vendor="AMD").memory("8GiB").build(),
    ]


ALL_UUIDS = [d.uuid for n in machine_nodes() for d in n.devices] + ["GPU-ghost"]
NODE_NAMES = [n.name for n in machine_nodes()]


def capacity(dev: Device) -> tuple[int, int, int]:
    """(MiB, cores, slices) a device can hold, from the DESIGN's definitions (not the model's properties)."""
    return (int(dev.memory_mib * dev.memory_scaling), int(dev.cores * dev.core_scaling),
            1 if dev.mode is DeviceMode.EXCLUSIVE else dev.split_count)


def usage_of(leases: list[Lease]) -> dict[str, list[int]]:
    """Per device: [memory, cores, slices, 100-core slices], summed from the leases."""
    out: dict[str, list[int]] = {}
    for lease in leases:
        for g in lease.allocation.devices:
            u = out.setdefault(g.uuid, [0, 0, 0, 0])
            u[0] += g.memory_mib
            u[1] += g.cores
            u[2] += 1
            u[3] += int(g.cores >= FULL_CORES)
    return out


def host_usage(leases: list[Lease], node: str) -> tuple[int, int]:
    mine = [x for x in leases if x.allocation.node == node]
    return sum(x.allocation.cpu_milli for x in mine), sum(x.allocation.host_memory_mib for x in mine)


def holds(nodes: dict[str, Node], leases: list[Lease]) -> bool:
    """Do these leases respect every ledger invariant together?"""
    devices = {d.uuid: (n.name, d) for n in nodes.values() for d in n.devices}
    for lease in leases:
        if lease.allocation.node not in nodes:
            return False
        if any(devices.get(g.uuid, ("", None))[0] != lease.allocation.node for g in lease.allocation.devices):
            return False
    for uuid, (mem, cores, slices, excl) in usage_of(leases).items():
        cap_mem, cap_cores, cap_slices = capacity(devices[uuid][1])
        if mem > cap_mem or cores > cap_cores or slices > cap_slices or (excl and slices > 1):
            return False
    for node in nodes.values():
        cpu, hmem = host_usage(leases, node.name)
        if (node.cpu_milli and cpu > node.cpu_milli) or (node.memory_mib and hmem > node.memory_mib):
            return False
    return True


def _matches(model: str, names: tuple[str, ...]) -> bool:
    return any(n.lower() in model.lower() for n in names)


def device_can_take(dev: Device, used: list[int], req: SliceRequest) -> bool:
    """HAMi's per-device Fit, written out from the DESIGN and HAMi's rules."""
    cap_mem, cap_cores, cap_slices = capacity(dev)
    mem, cores, slices, excl = used
    return (dev.vendor.lower() == req.vendor.lower()
            and (not req.include_types or _matches(dev.model, req.include_types))
            and not (req.exclude_types and _matches(dev.model, req.exclude_types))
            and (not req.include_uuids or dev.uuid in req.include_uuids)
            and dev.uuid not in req.exclude_uuids
            and dev.healthy and slices < cap_slices and not excl
            and cap_mem - mem >= req.memory_on(cap_mem)
            and cap_cores - cores >= req.cores
            and (req.cores < FULL_CORES or slices == 0)
            and (req.cores > 0 or cores < cap_cores))


def feasible_now(nodes: dict[str, Node], leases: list[Lease], req: SliceRequest) -> bool:
    """Could some node hold this single request now (brute force)?"""
    used = usage_of(leases)
    for node in nodes.values():
        cpu, hmem = host_usage(leases, node.name)
        if node.cpu_milli and cpu + req.cpu_milli > node.cpu_milli:
            continue
        if node.memory_mib and hmem + req.host_memory_mib > node.memory_mib:
            continue
        ok = [d for d in node.devices if device_can_take(d, used.get(d.uuid, [0, 0, 0, 0]), req)]
        if req.numa_bind:
            if any(sum(d.numa == z for d in ok) >= req.count for z in {d.numa for d in node.devices}):
                return True
        elif len(ok) >= req.count:
            return True
    return False


def check_placement(nodes: dict[str, Node], reqs: list[SliceRequest], alloc: Allocation) -> None:
    """Does the allocation give every request what it asked for?"""
    node = nodes[alloc.node]
    by_uuid = {d.uuid: d for d in node.devices}
    assert len(alloc.slices) == len(reqs)
    assert alloc.cpu_milli == sum(r.cpu_milli for r in reqs)
    assert alloc.host_memory_mib == sum(r.host_memory_mib for r in reqs)
    for req, part in zip(reqs, alloc.slices):
        assert len(part) == req.count
        assert len({g.uuid for g in part}) == len(part), "a slice's devices are distinct"
        for g in part:
            dev = by_uuid[g.uuid]
            assert dev.healthy and dev.vendor.lower() == req.vendor.lower()
            assert not req.include_types or _matches(dev.model, req.include_types)
            assert not (req.exclude_types and _matches(dev.model, req.exclude_types))
            assert not req.include_uuids or g.uuid in req.include_uuids
            assert g.uuid not in req.exclude_uuids
            assert g.memory_mib == req.memory_on(capacity(dev)[0])
            assert g.cores == req.cores
        if req.numa_bind:  # a must whatever the device policy, for every container
            assert len({by_uuid[g.uuid].numa for g in part}) <= 1


def joins_own_exclusive(alloc: Allocation) -> bool:
    """Does a later container of the pod share a device with an earlier container's 100-core slice?"""
    per_device = Counter(g.uuid for g in alloc.devices)
    return any(g.cores >= FULL_CORES and per_device[g.uuid] > 1 for g in alloc.devices)


@st.composite
def slice_requests(draw: st.DrawFn) -> SliceRequest:
    count = draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3]))
    memory = draw(st.one_of(
        st.none(),
        st.sampled_from([1, 512, 8192, 8192, 20000, 40960, 81920, 100000]).map(lambda m: {"memory_mib": m}),
        st.sampled_from([10.0, 25.0, 50.0, 100.0]).map(lambda p: {"memory_percent": p}),
    )) or {}
    return SliceRequest(
        count=count,
        **memory,
        cores=draw(st.sampled_from([0, 10, 30, 50, 100])),
        cpu_milli=draw(st.sampled_from([0, 0, 1000, 8000])) or (1000 if count == 0 else 0),
        host_memory_mib=draw(st.sampled_from([0, 0, 4096])),
        vendor=draw(st.sampled_from(["NVIDIA", "NVIDIA", "nvidia", "AMD"])),
        include_types=draw(st.sampled_from([(), (), (), ("a100",), ("T4", "H100")])),
        exclude_types=draw(st.sampled_from([(), (), ("pcie",)])),
        include_uuids=draw(st.sampled_from([(), (), (), (uuid_of("n1", 1), uuid_of("n3", 2), "GPU-ghost")])),
        exclude_uuids=draw(st.sampled_from([(), (), (), (uuid_of("n1", 0),)])),
        numa_bind=draw(st.sampled_from([False, False, True])),
    )


@st.composite
def placements(draw: st.DrawFn) -> tuple[NodePolicyName, DevicePolicyName, TieBreak, list[SliceRequest]]:
    node_policy = draw(st.sampled_from(list(NodePolicyName)))
    device_policy = draw(st.sampled_from(list(DevicePolicyName)))
    tie_break = draw(st.sampled_from(list(TieBreak)))
    reqs = draw(st.lists(slice_requests(), min_size=1, max_size=2))
    return node_policy, device_policy, tie_break, reqs


class LedgerMachine(RuleBasedStateMachine):
    """A model of the ledger: the live leases. Everything else is recomputed from them."""

    def __init__(self) -> None:
        super().__init__()
        self.all_nodes = {n.name: n for n in machine_nodes()}
        self.nodes = dict(self.all_nodes)  # the inventory the ledger should have
        self.ledger = Ledger(self.nodes.values())
        self.live: dict[str, Lease] = {}
        self.released: set[str] = set()
        self.schedulers: dict[tuple[NodePolicyName, DevicePolicyName, TieBreak], Scheduler] = {}
        self.clock = 0

    def _lease(self, allocation: Allocation, **kw: object) -> Lease:
        self.clock += 1
        return lease_of(allocation, created_at=float(self.clock % 7), **kw)  # type: ignore[arg-type]

    # --- allocations ---------------------------------------------------------------------------
    @rule(placement=placements())
    def place(self, placement: tuple[NodePolicyName, DevicePolicyName, TieBreak, list[SliceRequest]]) -> None:
        node_policy, device_policy, tie_break, reqs = placement
        key = (node_policy, device_policy, tie_break)
        sched = self.schedulers.get(key)
        if sched is None:
            sched = self.schedulers[key] = Scheduler(self.ledger, node_policy=node_policy, device_policy=device_policy,
                                                     tie_break=tie_break, seed=self.clock)
        for r in reqs:
            sched.observe(r)
        leases = list(self.live.values())
        try:
            alloc = sched.place(reqs)
        except Unschedulable as exc:
            assert sum(exc.reasons.values()) == exc.total_nodes == len(self.nodes)
            if len(reqs) == 1:  # no false "unschedulable" for a single slice
                assert not feasible_now(self.nodes, leases, reqs[0]), f"{reqs[0]} fits but was refused: {exc}"
            return
        except InvalidRequest as exc:
            assert exc.field in ("gpu_memory", "gpus")
            if len(reqs) == 1:
                assert not feasible_now(self.nodes, leases, reqs[0])
            return
        check_placement(self.nodes, reqs, alloc)
        assert not joins_own_exclusive(alloc), alloc
        lease = self._lease(alloc)
        assert holds(self.nodes, [*leases, lease]), "the scheduler over-committed"
        self.ledger.allocate(lease)  # must not raise
        self.live[lease.lease_id] = lease

    @rule(data=st.data(), node=st.sampled_from([*NODE_NAMES, "ghost"]),
          cpu=st.sampled_from([0, 0, 2000, 20000]), hmem=st.sampled_from([0, 0, 1024, 70000]),
          state=st.sampled_from([LeaseState.RESERVED, LeaseState.ACTIVE, LeaseState.RESERVED, LeaseState.RELEASED]),
          reuse_id=st.sampled_from([False, False, False, True]))
    def raw(self, data: st.DataObject, node: str, cpu: int, hmem: int, state: LeaseState, reuse_id: bool) -> None:
        mine = [d.uuid for d in self.all_nodes[node].devices] if node in self.all_nodes else ALL_UUIDS
        busy = sorted({g.uuid for x in self.live.values() for g in x.allocation.devices} & set(mine))
        uuids = st.one_of(st.sampled_from(mine), st.sampled_from(busy or mine), st.sampled_from(ALL_UUIDS))
        grant = st.tuples(uuids, st.sampled_from([0, 1, 1024, 20000, 40960, 81920, 90000]),
                          st.sampled_from([0, 10, 50, 99, 100]))
        slices = data.draw(st.lists(st.lists(grant, min_size=1, max_size=3), min_size=1, max_size=2))
        alloc = raw_allocation(node, slices=slices, cpu_milli=cpu, host_memory_mib=hmem)
        lease = self._lease(alloc, state=state)
        if reuse_id and self.live:
            lease = lease.model_copy(update={"lease_id": sorted(self.live)[0]})
        valid = (state is not LeaseState.RELEASED and lease.lease_id not in self.live
                 and holds(self.nodes, [*self.live.values(), lease]))
        before = self.ledger.to_json()
        if valid:
            self.ledger.allocate(lease)
            self.live[lease.lease_id] = lease
            self.released.discard(lease.lease_id)
        else:
            with pytest.raises(InvariantViolation):
                self.ledger.allocate(lease)
            assert self.ledger.to_json() == before

    # --- releases ------------------------------------------------------------------------------
    @precondition(lambda self: self.live)
    @rule(data=st.data(), trusted=st.booleans())
    def release(self, data: st.DataObject, trusted: bool) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.live)))
        lease = self.live.pop(lease_id)
        out = self.ledger.release(lease_id, None if trusted else lease.token)
        assert out == lease.model_copy(update={"state": LeaseState.RELEASED})
        self.released.add(lease_id)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def release_with_wrong_token(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.live)))
        before = self.ledger.to_json()
        with pytest.raises(LeaseTokenMismatch):
            self.ledger.release(lease_id, "wrong")
        assert self.ledger.to_json() == before

    @precondition(lambda self: self.released)
    @rule(data=st.data())
    def release_again(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.released)))
        assert self.ledger.release(lease_id, "whatever") is None

    @rule()
    def release_unknown(self) -> None:
        with pytest.raises(LeaseNotFound):
            self.ledger.release("never-seen", "t")

    @precondition(lambda self: self.live)
    @rule(data=st.data(), state=st.sampled_from(list(LeaseState)), pids=st.lists(st.integers(1, 99), max_size=2))
    def update(self, data: st.DataObject, state: LeaseState, pids: list[int]) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.live)))
        if state in (LeaseState.RELEASED, LeaseState.LOST):
            with pytest.raises(InvariantViolation):
                self.ledger.update(lease_id, state=state)
            return
        new = self.ledger.update(lease_id, state=state, pids=tuple(pids))
        assert new == self.live[lease_id].model_copy(update={"state": state, "pids": tuple(pids)})
        self.live[lease_id] = new

    # --- inventory -----------------------------------------------------------------------------
    @precondition(lambda self: len(self.nodes) > 1)
    @rule(data=st.data())
    def remove_node(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.nodes)))
        expected = {i for i, x in self.live.items() if x.allocation.node == name}
        lost = self.ledger.remove_node(name)
        assert {x.lease_id for x in lost} == expected
        assert all(x.state is LeaseState.LOST for x in lost)
        for i in expected:
            assert lost[[x.lease_id for x in lost].index(i)] == self.live.pop(i).model_copy(
                update={"state": LeaseState.LOST})
        del self.nodes[name]

    @precondition(lambda self: len(self.nodes) < len(self.all_nodes))
    @rule(data=st.data())
    def add_node_back(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(set(self.all_nodes) - set(self.nodes))))
        assert self.ledger.add_node(self.all_nodes[name]) == []
        self.nodes[name] = self.all_nodes[name]

    @precondition(lambda self: any(len(n.devices) > 1 for n in self.nodes.values()))
    @rule(data=st.data())
    def drop_last_device(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(n for n, x in self.nodes.items() if len(x.devices) > 1)))
        node = self.nodes[name]
        dropped = node.devices[-1].uuid
        smaller = node.model_copy(update={"devices": node.devices[:-1]})
        expected = {i for i, x in self.live.items()
                    if x.allocation.node == name and any(g.uuid == dropped for g in x.allocation.devices)}
        lost = self.ledger.add_node(smaller)
        assert {x.lease_id for x in lost} == expected
        for i in expected:
            del self.live[i]
        self.nodes[name] = smaller

    # --- persistence ---------------------------------------------------------------------------
    @rule(as_json=st.booleans())
    def snapshot_restore(self, as_json: bool) -> None:
        snap = self.ledger.snapshot()
        restored = Ledger.restore(self.ledger.to_json() if as_json else snap)
        assert restored.snapshot() == snap
        assert restored.to_json() == self.ledger.to_json()
        self.ledger = restored
        self.schedulers.clear()
        self.released.clear()  # the released-id memory is not part of a snapshot

    # --- invariants ----------------------------------------------------------------------------
    @invariant()
    def ledger_matches_the_model(self) -> None:
        self.ledger.check_invariants()
        assert set(self.ledger.leases) == set(self.live)
        assert self.ledger.leases == self.live
        assert set(self.ledger.nodes) == set(self.nodes)
        live = list(self.live.values())
        assert holds(self.nodes, live)
        used = usage_of(live)
        for node in self.nodes.values():
            for dev in node.devices:
                cap_mem, cap_cores, cap_slices = capacity(dev)
                mem, cores, slices, _ = used.get(dev.uuid, [0, 0, 0, 0])
                u = self.ledger.usage(dev.uuid)
                assert u.free_memory_mib == cap_mem - mem
                assert (u.memory_mib, u.cores, u.slices) == (mem, cores, slices)
                assert (u.memory_capacity_mib, u.core_capacity, u.slice_capacity) == (cap_mem, cap_cores,
                                                                                       cap_slices)
            row = self.ledger.index.rows[node.name]
            cpu, hmem = host_usage(live, node.name)
            assert (int(self.ledger.index.cpu_used[row]), int(self.ledger.index.hmem_used[row])) == (cpu, hmem)
        for uuid in ALL_UUIDS:
            if not any(d.uuid == uuid for n in self.nodes.values() for d in n.devices):
                assert self.ledger.where(uuid) is None


LedgerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLedgerMachine = LedgerMachine.TestCase
