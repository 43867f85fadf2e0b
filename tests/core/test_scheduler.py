"""Tests of hami_ray.core.scheduler: filtering, explanations, validation and the request's constraints.

Policy arithmetic lives in test_policies.py; here the policies are fixed (binpack/binpack unless a test
says otherwise) so that each test checks one constraint of the request.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hami_ray.core.errors import InvalidRequest, TemporaryError, Unschedulable
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import FULL_CORES, Allocation, Node, SliceRequest
from hami_ray.core.names import DevicePolicyName, NodePolicyName
from hami_ray.core.scheduler import Scheduler
from hami_ray.core.verdict import Reason, unschedulable
from tests.core.builders import allocate, hold, make_node, uuid_of

BINPACK, SPREAD = NodePolicyName.BINPACK, NodePolicyName.SPREAD


def sched(ledger: Ledger, device_policy: DevicePolicyName = DevicePolicyName.BINPACK,
          node_policy: NodePolicyName = BINPACK) -> Scheduler:
    return Scheduler(ledger, node_policy=node_policy, device_policy=device_policy)


def devices_of(alloc: Allocation) -> list[str]:
    return [g.uuid for g in alloc.devices]


# --- unschedulable: kube-scheduler style explanations ----------------------------------------------


def test_message_counts_reasons_like_kube_scheduler() -> None:
    ledger = Ledger([
        make_node("n1").gpus(1, mem="40GiB", model="A100").build(),
        make_node("n2").gpus(2, mem="40GiB", model="A100").build(),
        make_node("n3").gpus(1, mem="16GiB", model="T4").build(),
    ])
    hold(ledger, "n1", (uuid_of("n1", 0), 20480, 10))  # 20480 MiB free < 30720
    hold(ledger, "n2", (uuid_of("n2", 0), 15360, 10))  # 25600 MiB free on each device < 30720
    hold(ledger, "n2", (uuid_of("n2", 1), 15360, 10))
    request = SliceRequest(memory_mib=30720, include_types=("A100",))
    with pytest.raises(Unschedulable) as info:
        sched(ledger).place(request)
    exc = info.value
    assert str(exc) == "0/3 nodes are available: 2 insufficient device memory, 1 device type mismatch"
    assert exc.reasons == {"insufficient device memory": 2, "device type mismatch": 1}
    assert exc.total_nodes == 3 and exc.never is False
    assert isinstance(exc, TemporaryError)


def test_reason_ties_sort_by_name_and_never_is_spelled_out() -> None:
    exc = unschedulable(4, [Reason.TYPE_MISMATCH, Reason.INSUFFICIENT_CPU, Reason.INSUFFICIENT_CPU,
                            Reason.TYPE_MISMATCH], never=True)
    assert str(exc) == ("0/4 nodes are available: 2 device type mismatch, 2 insufficient cpu "
                        "(no node could ever hold this request)")
    assert str(Unschedulable(0, {})) == "0/0 nodes are available"


def _one(node: Node, *holds: tuple[str, int, int], cpu: int = 0, hmem: int = 0) -> Ledger:
    ledger = Ledger([node])
    for spec in holds:
        hold(ledger, node.name, spec, cpu_milli=cpu, host_memory_mib=hmem)
    return ledger


G0, G1 = uuid_of("g", 0), uuid_of("g", 1)


def _vendor_case() -> Ledger:
    # node "g" has no AMD device (the reason under test); node "amd"'s one device is in use, so it fails
    # too, on memory (counted separately below)
    ledger = Ledger([make_node("g").gpus(1).build(), make_node("amd").gpus(1, "64GiB", "MI250", vendor="AMD").build()])
    hold(ledger, "amd", (uuid_of("amd", 0), 1, 0))
    return ledger

# (ledger, request(s), device policy, the one reason every node fails with, never)
REASON_CASES: dict[str, tuple[Callable[[], Ledger], list[SliceRequest], DevicePolicyName, Reason, bool]] = {
    "vendor": (_vendor_case, [SliceRequest(vendor="amd", memory_mib=65536)],  # the whole (but used) MI250
               DevicePolicyName.BINPACK, Reason.VENDOR_MISMATCH, False),
    "type-include": (lambda: _one(make_node("g").gpus(2, model="NVIDIA A100-SXM4-80GB").build()),
                     [SliceRequest(include_types=("H100",))], DevicePolicyName.BINPACK, Reason.TYPE_MISMATCH, True),
    "type-exclude": (lambda: _one(make_node("g").gpus(2, model="NVIDIA A100-SXM4-80GB").build()),
                     [SliceRequest(exclude_types=("a100",))], DevicePolicyName.BINPACK, Reason.TYPE_MISMATCH, True),
    "uuid": (lambda: _one(make_node("g").gpus(2).build()),
             [SliceRequest(include_uuids=("GPU-elsewhere",))], DevicePolicyName.BINPACK, Reason.UUID_MISMATCH, True),
    "uuid-excluded": (lambda: _one(make_node("g").gpus(2).build()),
                      [SliceRequest(count=2, exclude_uuids=(G1,))], DevicePolicyName.BINPACK, Reason.UUID_MISMATCH,
                      True),
    "unhealthy": (lambda: _one(make_node("g").gpus(2).unhealthy(1).build()),
                  [SliceRequest(count=2, memory_mib=1024)], DevicePolicyName.BINPACK, Reason.UNHEALTHY, False),
    "cpu": (lambda: _one(make_node("g").gpus(2).cpu(8).build(), (G0, 1, 0), cpu=6000),
            [SliceRequest(memory_mib=1, cpu_milli=3000)], DevicePolicyName.BINPACK, Reason.INSUFFICIENT_CPU, False),
    "host-memory": (lambda: _one(make_node("g").gpus(2).memory("8GiB").build(), (G0, 1, 0), hmem=6144),
                    [SliceRequest(memory_mib=1, host_memory_mib=4096)], DevicePolicyName.BINPACK,
                    Reason.INSUFFICIENT_HOST_MEMORY, False),
    "split-count": (lambda: _one(make_node("g").gpus(1, split=2).build(), (G0, 1, 0), (G0, 1, 0)),
                    [SliceRequest(memory_mib=1)], DevicePolicyName.BINPACK, Reason.SLICES_EXHAUSTED, False),
    "exclusive-held": (lambda: _one(make_node("g").gpus(1).build(), (G0, 1, FULL_CORES)),
                       [SliceRequest(memory_mib=1)], DevicePolicyName.BINPACK, Reason.EXCLUSIVE_CONFLICT, False),
    "exclusive-wanted": (lambda: _one(make_node("g").gpus(1).build(), (G0, 1, 0)),
                         [SliceRequest(memory_mib=1, cores=FULL_CORES)], DevicePolicyName.BINPACK,
                         Reason.EXCLUSIVE_CONFLICT, False),
    "memory": (lambda: _one(make_node("g").gpus(1).build(), (G0, 80000, 0)),
               [SliceRequest(memory_mib=2048)], DevicePolicyName.BINPACK, Reason.INSUFFICIENT_MEMORY, False),
    "memory-percent": (lambda: _one(make_node("g").gpus(1).build(), (G0, 65536, 0)),
                       [SliceRequest(memory_percent=25.0)], DevicePolicyName.BINPACK, Reason.INSUFFICIENT_MEMORY,
                       False),  # 20480 MiB asked, 16384 free
    "cores": (lambda: _one(make_node("g").gpus(1).build(), (G0, 1, 90)),
              [SliceRequest(memory_mib=1, cores=20)], DevicePolicyName.BINPACK, Reason.INSUFFICIENT_CORES, False),
    "cores-exhausted": (lambda: _one(make_node("g").gpus(1).build(), (G0, 1, 60), (G0, 1, 40)),
                        [SliceRequest(memory_mib=1, cores=0)], DevicePolicyName.BINPACK, Reason.INSUFFICIENT_CORES,
                        False),  # HAMi's CardComputeUnitsExhausted: 0 cores still needs a free core
    "too-few-devices": (lambda: _one(make_node("g").gpus(1).build()),
                        [SliceRequest(memory_mib=50000), SliceRequest(memory_mib=50000)],  # a pod: each fits alone
                        DevicePolicyName.BINPACK, Reason.TOO_FEW_DEVICES, False),
    "numa": (lambda: _one(make_node("g").gpus(1, numa=0).gpus(1, numa=1).build()),
             [SliceRequest(count=2, memory_mib=1024, numa_bind=True)], DevicePolicyName.NUMA, Reason.NUMA_MISMATCH,
             True),  # one device per NUMA node: never two on one
}


@pytest.mark.parametrize("case", sorted(REASON_CASES))
def test_each_reason(case: str) -> None:
    build, reqs, device_policy, reason, never = REASON_CASES[case]
    ledger = build()
    with pytest.raises(Unschedulable) as info:
        sched(ledger, device_policy).place(reqs)
    expected = {str(reason): 1}
    if case == "vendor":
        expected[str(Reason.INSUFFICIENT_MEMORY)] = 1
    assert info.value.reasons == expected
    assert info.value.never is never
    assert info.value.total_nodes == len(ledger.nodes)


def test_never_when_no_empty_node_could_fit() -> None:
    ledger = Ledger([make_node("a").gpus(2, model="A100").cpu(32).build(),
                     make_node("t").gpus(4, "16GiB", "T4").cpu(16).build()])
    hold(ledger, "a", (uuid_of("a", 0), 81920, 100))
    # H100s: no node has one
    with pytest.raises(Unschedulable) as info:
        sched(ledger).place(SliceRequest(count=2, include_types=("H100",)))
    assert info.value.never and info.value.reasons == {"device type mismatch": 2}
    # 3 A100s: node "a" has 2, "t" none (but 4 devices, so it is not InvalidRequest)
    with pytest.raises(Unschedulable) as info:
        sched(ledger).place(SliceRequest(count=3, memory_mib=1, include_types=("A100",)))
    assert info.value.never
    # 64 CPUs on nodes of 32 and 16
    with pytest.raises(Unschedulable) as info:
        sched(ledger).place(SliceRequest(memory_mib=1, cpu_milli=64000))
    assert info.value.never and info.value.reasons == {"insufficient cpu": 2}
    # a request that fits an empty node but not now: not "never"
    with pytest.raises(Unschedulable) as info:
        sched(ledger).place(SliceRequest(count=2, memory_mib=1, include_types=("A100",)))
    assert not info.value.never
    assert info.value.reasons == {"exclusive device conflict": 1, "device type mismatch": 1}


def test_an_empty_cluster_is_unschedulable_not_invalid() -> None:
    """No node yet: the request waits for nodes to join (a Ray autoscaler, a starting cluster)."""
    with pytest.raises(Unschedulable) as info:
        sched(Ledger()).place(SliceRequest(memory_mib=10**9, count=64))
    assert str(info.value) == "0/0 nodes are available"
    assert not info.value.never


def test_removed_nodes_are_not_counted() -> None:
    ledger = Ledger([make_node("a").gpus(1).build(), make_node("b").gpus(1).build()])
    ledger.remove_node("b")
    with pytest.raises(Unschedulable) as info:
        sched(ledger).place(SliceRequest(include_types=("H100",)))
    assert info.value.total_nodes == 1


# --- invalid requests -----------------------------------------------------------------------------


def _cluster() -> Ledger:
    return Ledger([make_node("big").gpus(4, "80GiB", "A100").build(),
                   make_node("small").gpus(2, "40GiB", "A100-PCIE-40GB").build(),
                   make_node("amd").gpus(8, "192GiB", "MI300X", vendor="AMD").build()])


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (SliceRequest(memory_mib=81921), "gpu_memory"),  # above every NVIDIA device (the AMD one is bigger)
        (SliceRequest(memory_mib=81921, include_types=("A100",)), "gpu_memory"),
        (SliceRequest(count=5), "gpus"),  # most NVIDIA devices on a node: 4 (AMD's 8 do not count)
        (SliceRequest(count=5, memory_percent=1.0), "gpus"),
    ],
)
def test_invalid_requests(request_: SliceRequest, field: str) -> None:
    s = sched(_cluster())
    with pytest.raises(InvalidRequest) as info:
        s.validate(request_)
    assert info.value.field == field
    with pytest.raises(InvalidRequest) as info:
        s.place(request_)
    assert info.value.field == field


@pytest.mark.parametrize(
    "request_",
    [
        SliceRequest(memory_mib=81920),  # exactly the largest device
        SliceRequest(count=4),
        SliceRequest(count=8, vendor="AMD", memory_mib=196608),
        SliceRequest(memory_percent=100.0),
        SliceRequest(vendor="Intel", count=99, memory_mib=10**9),  # no such vendor yet: may wait for nodes
    ],
)
def test_valid_requests_pass_validation(request_: SliceRequest) -> None:
    sched(_cluster()).validate(request_)


def test_a_full_cluster_is_unschedulable_not_invalid() -> None:
    ledger = _cluster()
    for i in range(4):
        hold(ledger, "big", (uuid_of("big", i), 81920, 100))
    with pytest.raises(Unschedulable):
        sched(ledger).place(SliceRequest(memory_mib=81920))


# --- what the request asks for -----------------------------------------------------------------------


def _typed() -> Ledger:
    return Ledger([make_node("a100").gpus(1, model="NVIDIA A100-SXM4-80GB").build(),
                   make_node("t4").gpus(1, "16GiB", model="Tesla T4").build(),
                   make_node("h100").gpus(1, model="NVIDIA H100 80GB HBM3").build()])


@pytest.mark.parametrize(
    ("include", "exclude", "nodes"),
    [
        (("a100",), (), {"a100"}),  # substring, case-insensitive
        (("A100-SXM4",), (), {"a100"}),
        (("t4", "H100"), (), {"t4", "h100"}),  # any of the names
        ((), ("a100", "H100"), {"t4"}),
        (("nvidia",), ("h100",), {"a100"}),
        (("NVIDIA",), (), {"a100", "h100"}),
        ((), ("tesla",), {"a100", "h100"}),
    ],
)
def test_type_include_exclude(include: tuple[str, ...], exclude: tuple[str, ...], nodes: set[str]) -> None:
    ledger = _typed()
    s = sched(ledger)
    got = set()
    for _ in range(3):  # place whole devices until the allowed ones run out
        try:
            alloc = s.place(SliceRequest(cores=FULL_CORES, include_types=include, exclude_types=exclude))
        except Unschedulable:
            break
        allocate(ledger, alloc)
        got.add(alloc.node)
    assert got == nodes


def test_uuid_include_and_exclude() -> None:
    ledger = Ledger([make_node("a").gpus(2).build(), make_node("b").gpus(2).build()])
    s = sched(ledger)
    want = uuid_of("b", 1)
    assert devices_of(s.place(SliceRequest(include_uuids=(want,)))) == [want]
    alloc = s.place(SliceRequest(count=2, include_uuids=(uuid_of("a", 1), want, uuid_of("b", 0))))
    assert alloc.node == "b" and sorted(devices_of(alloc)) == [uuid_of("b", 0), want]
    # exclude three of four: only a-0 is left
    only = s.place(SliceRequest(exclude_uuids=(uuid_of("a", 1), uuid_of("b", 0), want)))
    assert devices_of(only) == [uuid_of("a", 0)]
    # include and exclude together: exclude wins
    with pytest.raises(Unschedulable) as info:
        s.place(SliceRequest(include_uuids=(want,), exclude_uuids=(want,)))
    assert info.value.reasons == {"device uuid mismatch": 2}


def test_percent_memory_resolves_per_device() -> None:
    ledger = Ledger([make_node("big").gpus(1, "80GiB", "A100-80GB").build(),
                     make_node("small").gpus(1, "40GiB", "A100-40GB").build()])
    s = sched(ledger)
    big = s.place(SliceRequest(memory_percent=25.0, include_types=("80GB",)))
    assert [(g.uuid, g.memory_mib) for g in big.devices] == [(uuid_of("big", 0), 20480)]  # 25 % of 81920
    small = s.place(SliceRequest(memory_percent=25.0, include_types=("40GB",)))
    assert [g.memory_mib for g in small.devices] == [10240]  # 25 % of 40960
    odd = s.place(SliceRequest(memory_percent=33.3, include_types=("40GB",)))
    assert [g.memory_mib for g in odd.devices] == [13639]  # floor(40960 x 0.333) = floor(13639.68)
    whole = s.place(SliceRequest(include_types=("80GB",)))
    assert [g.memory_mib for g in whole.devices] == [81920]  # no memory given: the whole device


def test_percent_memory_resolves_on_scaled_capacity() -> None:
    # memory_scaling 2 registers 2 x 40960 MiB (HAMi's devmem is scaled); 25 % of that is 20480
    ledger = Ledger([make_node("n").gpus(1, "40GiB", memory_scaling=2.0).build()])
    alloc = sched(ledger).place(SliceRequest(memory_percent=25.0))
    assert alloc.devices[0].memory_mib == 20480


def test_exclusive_only_on_untouched_devices() -> None:
    ledger = Ledger([make_node("n").gpus(3).build()])
    hold(ledger, "n", (uuid_of("n", 0), 0, 0))  # a 0-MiB, 0-core slice still touches device 0
    hold(ledger, "n", (uuid_of("n", 2), 1024, 10))
    s = sched(ledger)
    alloc = s.place(SliceRequest(cores=FULL_CORES))
    assert devices_of(alloc) == [uuid_of("n", 1)]
    assert alloc.devices[0].cores == 100 and alloc.devices[0].memory_mib == 81920
    allocate(ledger, alloc)
    with pytest.raises(Unschedulable) as info:
        s.place(SliceRequest(cores=FULL_CORES, memory_mib=1))
    assert info.value.reasons == {"exclusive device conflict": 1}
    # and nothing joins the exclusive device: a small slice goes to a shared one
    assert uuid_of("n", 1) not in devices_of(s.place(SliceRequest(memory_mib=1, cores=1)))


def test_multi_device_placement() -> None:
    ledger = Ledger([make_node("n").gpus(4).build()])
    hold(ledger, "n", (uuid_of("n", 3), 81920, 0))  # device 3 has no memory left
    alloc = sched(ledger).place(SliceRequest(count=3, memory_mib=8192, cores=30))
    assert len(alloc.slices) == 1 and len(alloc.slices[0]) == 3
    assert sorted(devices_of(alloc)) == [uuid_of("n", i) for i in range(3)]
    assert all((g.memory_mib, g.cores) == (8192, 30) for g in alloc.devices)
    allocate(ledger, alloc)
    ledger.check_invariants()


def test_multi_container_pod_lands_on_one_node_and_shares_arithmetic() -> None:
    ledger = Ledger([make_node("one").gpus(1).cpu(64).build(), make_node("two").gpus(2).cpu(64).build()])
    s = sched(ledger)
    # 60 + 60 cores cannot share a device: only "two" holds both containers
    pod = [SliceRequest(memory_mib=8192, cores=60, cpu_milli=1000),
           SliceRequest(memory_mib=4096, cores=60, cpu_milli=2000, host_memory_mib=512)]
    alloc = s.place(pod)
    assert alloc.node == "two" and len(alloc.slices) == 2
    (a,), (b,) = alloc.slices
    assert a.uuid != b.uuid
    assert (a.memory_mib, a.cores, b.memory_mib, b.cores) == (8192, 60, 4096, 60)
    assert (alloc.cpu_milli, alloc.host_memory_mib) == (3000, 512)
    allocate(ledger, alloc)
    ledger.check_invariants()


def test_containers_of_a_pod_may_share_a_device() -> None:
    ledger = Ledger([make_node("one").gpus(1).build()])
    shared = sched(ledger).place([SliceRequest(memory_mib=1024, cores=10), SliceRequest(memory_mib=2048, cores=20)])
    assert [[(g.uuid, g.memory_mib, g.cores) for g in part] for part in shared.slices] == [
        [(uuid_of("one", 0), 1024, 10)], [(uuid_of("one", 0), 2048, 20)]]
    allocate(ledger, shared)
    assert ledger.usage(uuid_of("one", 0)).slices == 2


def test_pod_with_a_device_less_container() -> None:
    ledger = Ledger([make_node("n").gpus(1).cpu(8).build()])
    alloc = sched(ledger).place([SliceRequest(count=0, cpu_milli=500), SliceRequest(memory_mib=1024)])
    assert alloc.slices[0] == () and len(alloc.slices[1]) == 1
    assert alloc.cpu_milli == 500
    allocate(ledger, alloc)


def test_cpu_only_request() -> None:
    ledger = Ledger([make_node("n").gpus(1).cpu(8).build()])
    alloc = sched(ledger).place(SliceRequest(count=0, cpu_milli=4000))
    assert alloc.slices == ((),) and alloc.cpu_milli == 4000
    allocate(ledger, alloc)
    with pytest.raises(Unschedulable) as info:
        sched(ledger).place(SliceRequest(count=0, cpu_milli=4001))
    assert info.value.reasons == {"insufficient cpu": 1}


def test_cpu_and_host_memory_are_respected() -> None:
    ledger = Ledger([make_node("busy").gpus(2).cpu(8).memory("32GiB").build(),
                     make_node("idle").gpus(2).cpu(32).memory("256GiB").build()])
    hold(ledger, "busy", (uuid_of("busy", 0), 40960, 50), cpu_milli=6000)
    s = sched(ledger)  # binpack: "busy" would win on device usage ...
    assert s.place(SliceRequest(memory_mib=1024)).node == "busy"
    assert s.place(SliceRequest(memory_mib=1024, cpu_milli=2000)).node == "busy"  # 2 CPUs left: fits exactly
    assert s.place(SliceRequest(memory_mib=1024, cpu_milli=2001)).node == "idle"  # ... unless CPU is short
    assert s.place(SliceRequest(memory_mib=1024, host_memory_mib=32769)).node == "idle"
    with pytest.raises(Unschedulable) as info:
        s.place(SliceRequest(memory_mib=1024, cpu_milli=32001))
    assert info.value.never
    # a pod's containers add up: 2 x 1.5 CPUs do not fit the 2 left on "busy"
    assert s.place([SliceRequest(memory_mib=1, cpu_milli=1500), SliceRequest(memory_mib=1, cpu_milli=1500)]).node \
        == "idle"


def test_request_policy_overrides_the_default() -> None:
    ledger = Ledger([make_node("busy").gpus(2).build(), make_node("idle").gpus(2).build()])
    hold(ledger, "busy", (uuid_of("busy", 0), 40960, 50))
    s = sched(ledger, node_policy=BINPACK)
    assert s.place(SliceRequest(memory_mib=1)).node == "busy"
    assert s.place(SliceRequest(memory_mib=1, node_policy=SPREAD)).node == "idle"
    # device policy override: binpack picks the busy device, spread the idle one
    assert devices_of(s.place(SliceRequest(memory_mib=1))) == [uuid_of("busy", 0)]
    assert devices_of(s.place(SliceRequest(memory_mib=1, device_policy=DevicePolicyName.SPREAD))) == \
        [uuid_of("busy", 1)]


def test_place_needs_something_to_place() -> None:
    with pytest.raises(InvalidRequest) as info:
        sched(_cluster()).place([])
    assert info.value.field == "requests"


def test_place_does_not_write_the_ledger() -> None:
    ledger = _cluster()
    before = ledger.to_json()
    for policy in DevicePolicyName:
        sched(ledger, policy).place(SliceRequest(memory_mib=1024, cores=10))
    assert ledger.to_json() == before


def test_caches_follow_the_ledger() -> None:
    """One scheduler over many decisions: each placement sees the previous ones (no stale cache)."""
    for policy in DevicePolicyName:
        ledger = Ledger([make_node(f"n{i}").gpus(2, "16GiB").build() for i in range(3)])
        s = sched(ledger, policy)
        placed = 0
        while True:
            try:
                alloc = s.place(SliceRequest(memory_mib=6144, cores=30))
            except Unschedulable:
                break
            allocate(ledger, alloc)
            placed += 1
        # 16384 // 6144 = 2 slices per device (memory), 3 by cores: 2 x 2 x 3 nodes = 12
        assert placed == 12, policy
        ledger.check_invariants()


# --- regressions -----------------------------------------------------------------------------------------


def _two_numa() -> Ledger:
    # NUMA 0: devices 0, 1; NUMA 1: devices 2, 3. Devices 0 and 2 are busier than 1 and 3.
    ledger = Ledger([make_node("n").gpus(2, numa=0).gpus(2, numa=1).build()])
    hold(ledger, "n", (uuid_of("n", 0), 40960, 40))
    hold(ledger, "n", (uuid_of("n", 2), 40960, 40))
    return ledger


def test_numa_bind_with_the_numa_policy() -> None:
    ledger = _two_numa()
    alloc = sched(ledger, DevicePolicyName.NUMA).place(SliceRequest(count=2, memory_mib=1024, numa_bind=True))
    numas = {ledger.device(u).numa for u in devices_of(alloc)}
    assert len(numas) == 1


# Regression test for a bug this suite found (since fixed): scheduler.py place()/_fit_row() never look at
# request.numa_bind; only NumaDevicePolicy honours it, so with any other device policy a numa_bind=True request
# gets devices on two NUMA nodes (HAMi honours nvidia.com/numa-bind whatever the gpu-scheduler-policy)
@pytest.mark.parametrize("policy", [DevicePolicyName.BINPACK, DevicePolicyName.FGD])
def test_numa_bind_is_honoured_by_every_device_policy(policy: DevicePolicyName) -> None:
    ledger = _two_numa()
    s = sched(ledger, policy)
    request = SliceRequest(count=2, memory_mib=1024, numa_bind=True)
    s.observe(request)
    alloc = s.place(request)
    assert len({ledger.device(u).numa for u in devices_of(alloc)}) == 1, devices_of(alloc)


# Regression test for a bug this suite found (since fixed): scheduler.py _fit_row() calls _select_with_overlay(...,
# overlaid=i > 0): when the pod's first container holds no device, the first container that does is placed by
# node order instead of by the device policy (binpack should pick the busier device 1)
def test_device_less_first_container_does_not_bypass_the_device_policy() -> None:
    ledger = Ledger([make_node("n").gpus(2).cpu(8).build()])
    hold(ledger, "n", (uuid_of("n", 1), 49152, 60))  # device 1 at 60 %
    pod = [SliceRequest(count=0, cpu_milli=100), SliceRequest(memory_mib=8192, cores=10)]
    alone = sched(ledger).place(pod[1])
    assert devices_of(alone) == [uuid_of("n", 1)]  # binpack on its own: the busier device
    assert devices_of(sched(ledger).place(pod)) == [uuid_of("n", 1)]


# Regression test for a bug this suite found (since fixed): scheduler.py _select_with_overlay() picks later containers'
# devices by node order and ignores numa_bind, so a pod's second numa_bind container can span NUMA nodes even
# under the numa policy
def test_numa_bind_holds_for_every_container_of_a_pod() -> None:
    ledger = _two_numa()
    hold(ledger, "n", (uuid_of("n", 1), 79872, 0))  # device 1: 2048 MiB free
    # the numa policy puts the first container on NUMA 0 (devices 0 and 1: both groups have two fitting
    # devices, the lower NUMA id wins); device 1 then has 1024 MiB left, too little for the second
    # container, whose only single-NUMA choice is devices 2 and 3; node order gives it devices 0 and 2
    pod = [SliceRequest(count=2, memory_mib=1024, numa_bind=True),
           SliceRequest(count=2, memory_mib=2048, numa_bind=True)]
    alloc = sched(ledger, DevicePolicyName.NUMA).place(pod)
    for part in alloc.slices:
        assert len({ledger.device(g.uuid).numa for g in part}) == 1, alloc.slices


# Regression test for a bug this suite found (since fixed): scheduler.py _could_ever_fit() ignores numa_bind, so a request
# no NUMA node of any node could ever hold is reported never=False and would wait in the queue forever
def test_numa_bind_that_can_never_fit_is_never() -> None:
    ledger = Ledger([make_node("n").gpus(1, numa=0).gpus(1, numa=1).build()])
    with pytest.raises(Unschedulable) as info:
        sched(ledger, DevicePolicyName.NUMA).place(SliceRequest(count=2, memory_mib=1, numa_bind=True))
    assert info.value.never


# Regression test for a bug this suite found (since fixed): scheduler.py _explain() marks VENDOR_MISMATCH with max(need, 1)
# even for a device-less request, so a CPU-only request that fails on CPU is explained as 'no device of the
# requested vendor' on GPU-less nodes
def test_cpu_only_request_on_a_gpu_less_node_is_explained_by_cpu() -> None:
    ledger = Ledger([make_node("cpu").cpu(4).build(), make_node("gpu").gpus(1).cpu(4).build()])
    with pytest.raises(Unschedulable) as info:
        sched(ledger).place(SliceRequest(count=0, cpu_milli=8000))
    assert info.value.reasons == {"insufficient cpu": 2}


# Regression test for a bug this suite found (since fixed): scheduler.py _explain() marks VENDOR_MISMATCH when a node has
# fewer devices of the vendor than the count (vendor.sum(axis=1) < max(need, 1)): a node with 2 NVIDIA GPUs
# asked for 3 is explained as 'no device of the requested vendor' instead of 'insufficient device count'
def test_too_few_devices_is_not_a_vendor_mismatch() -> None:
    ledger = Ledger([make_node("a").gpus(2).build(), make_node("t").gpus(4, "16GiB", "T4").build()])
    hold(ledger, "t", (uuid_of("t", 0), 1, FULL_CORES))
    hold(ledger, "t", (uuid_of("t", 1), 1, FULL_CORES))
    with pytest.raises(Unschedulable) as info:
        sched(ledger).place(SliceRequest(count=3, memory_mib=1))
    assert info.value.reasons == {"insufficient device count": 1, "exclusive device conflict": 1}


def test_numa_bind_that_fits_later_is_not_never() -> None:
    ledger = Ledger([make_node("n").gpus(2, numa=0).gpus(2, numa=1).build()])
    hold(ledger, "n", (uuid_of("n", 0), 81920, 100))
    hold(ledger, "n", (uuid_of("n", 2), 81920, 100))
    with pytest.raises(Unschedulable) as info:
        sched(ledger).place(SliceRequest(count=2, memory_mib=1, numa_bind=True))
    assert info.value.reasons == {"no NUMA node with enough devices": 1} and not info.value.never


# --- regressions (bugs this suite found) ----------------------------------------------------------


def test_heterogeneous_pod_that_fits_an_empty_node_is_not_never() -> None:
    pod = [SliceRequest(memory_mib=1024, include_types=("A100",)),
           SliceRequest(memory_mib=1024, include_types=("T4",))]
    empty = Ledger([make_node("n").gpus(1, model="A100").gpus(1, "16GiB", model="T4").build()])
    assert len(sched(empty).place(pod).slices) == 2  # it fits the empty node ...
    busy = Ledger([make_node("n").gpus(1, model="A100").gpus(1, "16GiB", model="T4").build()])
    hold(busy, "n", (uuid_of("n", 0), 81920, FULL_CORES))
    with pytest.raises(Unschedulable) as info:
        sched(busy).place(pod)
    assert not info.value.never  # ... so it is not "never" when the A100 is merely busy


def test_pod_of_two_exclusive_containers_on_one_gpu_nodes_is_never() -> None:
    ledger = Ledger([make_node("a").gpus(1).build(), make_node("b").gpus(1).build()])
    with pytest.raises(Unschedulable) as info:
        sched(ledger).place([SliceRequest(cores=FULL_CORES), SliceRequest(cores=FULL_CORES)])
    assert info.value.never


def test_a_later_container_does_not_join_an_earlier_exclusive_one() -> None:
    ledger = Ledger([make_node("n").gpus(2, core_scaling=2.0).build()])
    pod = [SliceRequest(memory_mib=1, cores=FULL_CORES), SliceRequest(memory_mib=1, cores=0)]
    alloc = sched(ledger).place(pod)
    (first,), (second,) = alloc.slices
    assert first.uuid != second.uuid, alloc.slices
    allocate(ledger, alloc)


def test_avoided_nodes_are_never_chosen_but_still_counted() -> None:
    """``avoid``: node actors that just refused (a full state disk) are left out of the plan."""
    s = sched(_cluster())
    request = SliceRequest(memory_mib=1024)
    first = s.place(request).node
    second = s.place(request, avoid=[first]).node
    assert second != first
    with pytest.raises(Unschedulable) as info:
        s.place(SliceRequest(memory_mib=1024, include_types=("A100",)), avoid=["big", "small"])
    assert info.value.total_nodes == 3
    assert s.place(request, avoid=["no-such-node"]).node == first
