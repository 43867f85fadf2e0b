"""Decisions do not change with the per-shape row caches (issue 14: fast placement at 100,000 nodes).

:class:`Scheduler` keeps, per request shape, each node's "fits now, or the first reason why not" and its
node-policy score, recomputing only nodes whose version moved (:mod:`hami_ray.core.rowfit`). The property
test drives it and :class:`ReferenceScheduler` (the scheduler before the caches, a full scan per decision)
side by side on random clusters through random runs of place / release / node-change steps, on the same
ledger, and requires the same answer every time: the same allocation (node, devices, grants), or the same
``Unschedulable`` (text, per-reason counts, ``never``), or the same ``InvalidRequest``; and the same
per-node verdicts. Clusters mix models, vendors, NUMA nodes, split counts, unhealthy devices, MIG
instances, isolation grades and host CPU/memory; requests mix memory in MiB and percent, cores 0-100,
several devices, pods of several containers, type and uuid filters, NUMA binding and isolation floors.
"""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hami_ray.core.errors import InvalidRequest, Unschedulable
from hami_ray.core.grades import Isolation
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import Allocation, DeviceMode, Node, SliceRequest
from hami_ray.core.names import DevicePolicyName, NodePolicyName
from hami_ray.core.rowfit import FITS, RowCache, row_codes
from hami_ray.core.scheduler import Scheduler, TieBreak
from tests.core.builders import allocate, make_node, uuid_of
from tests.core.reference_scheduler import ReferenceScheduler

MODELS = (("A100", 40960), ("T4", 15360), ("L4", 23034))
GRADES = (Isolation.NONE, Isolation.HAMI_CORE, Isolation.MPS)
_names = itertools.count()


@st.composite
def nodes(draw: st.DrawFn, name: str) -> Node:
    builder = make_node(name)
    for _ in range(draw(st.integers(0, 3))):  # groups of identical devices; a node may have none
        model, mem = draw(st.sampled_from(MODELS))
        mode = draw(st.sampled_from((DeviceMode.SHARED,) * 4 + (DeviceMode.MIG, DeviceMode.EXCLUSIVE)))
        builder.gpus(draw(st.integers(1, 3)), mem=mem, model=model, mode=mode,
                     vendor=draw(st.sampled_from(("NVIDIA",) * 5 + ("AMD",))),
                     numa=draw(st.integers(0, 1)), split=draw(st.integers(1, 4)),
                     healthy=draw(st.booleans()) or draw(st.booleans()),
                     isolation=draw(st.sampled_from(GRADES)).value,
                     whole_isolation=draw(st.sampled_from((None, Isolation.WATCHDOG.value))))
    if draw(st.booleans()):
        builder.cpu(draw(st.sampled_from((2, 8))))
    if draw(st.booleans()):
        builder.memory(draw(st.sampled_from(("4GiB", "64GiB"))))
    return builder.build()


@st.composite
def requests(draw: st.DrawFn, uuids: list[str]) -> SliceRequest:
    memory = draw(st.sampled_from(("none", "mib", "percent")))
    some_uuids = st.lists(st.sampled_from(uuids + ["GPU-nowhere-0"]), max_size=3).map(tuple)
    return SliceRequest(
        vendor=draw(st.sampled_from(("NVIDIA",) * 6 + ("nvidia", "AMD"))),
        count=draw(st.sampled_from((0, 1, 1, 1, 2, 3))),
        memory_mib=draw(st.sampled_from((1024, 8192, 20480, 40000))) if memory == "mib" else None,
        memory_percent=draw(st.sampled_from((10.0, 50.0, 100.0))) if memory == "percent" else None,
        cores=draw(st.sampled_from((0, 10, 50, 100))),
        cpu_milli=draw(st.sampled_from((0, 0, 1000, 4000))),
        host_memory_mib=draw(st.sampled_from((0, 0, 2048))),
        include_types=draw(st.sampled_from(((),) * 4 + (("A100",), ("t4", "L4")))),
        exclude_types=draw(st.sampled_from(((),) * 4 + (("T4",),))),
        include_uuids=draw(some_uuids) if draw(st.integers(0, 5)) == 0 else (),
        exclude_uuids=draw(some_uuids) if draw(st.integers(0, 5)) == 0 else (),
        numa_bind=draw(st.integers(0, 4)) == 0,
        isolation=draw(st.sampled_from((None,) * 4 + GRADES)),
    )


POLICIES = st.sampled_from((
    (NodePolicyName.BINPACK, DevicePolicyName.BINPACK), (NodePolicyName.SPREAD, DevicePolicyName.SPREAD),
    (NodePolicyName.BINPACK, DevicePolicyName.NUMA), (NodePolicyName.SPREAD, DevicePolicyName.TOPOLOGY),
    (NodePolicyName.BINPACK, DevicePolicyName.RANDOM), (NodePolicyName.BINPACK, DevicePolicyName.BESTFIT),
    (NodePolicyName.SPREAD, DevicePolicyName.CLUSTERING), (NodePolicyName.BINPACK, DevicePolicyName.FGD),
    (NodePolicyName.BINPACK, DevicePolicyName.FGD_PLUS), (NodePolicyName.BINPACK, DevicePolicyName.PACKING),
))


def outcome(call: object) -> tuple[object, ...]:
    """What a scheduler call answered, comparable across the two schedulers."""
    try:
        result = call()  # type: ignore[operator]
    except Unschedulable as exc:
        return ("unschedulable", str(exc), exc.reasons, exc.never, exc.total_nodes)
    except InvalidRequest as exc:
        return ("invalid", str(exc))
    return ("ok", result)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), policy=POLICIES, tie_break=st.sampled_from(tuple(TieBreak)))
def test_optimised_place_decides_as_the_full_scan_does(data: st.DataObject, policy: tuple[NodePolicyName,
                                                        DevicePolicyName], tie_break: TieBreak) -> None:
    run = next(_names)
    # a few nodes, or enough that a step moves few of them (the caches then refresh only those rows)
    names = [f"r{run}n{i}" for i in range(data.draw(st.integers(1, 6) | st.integers(12, 24)))]
    cluster = [data.draw(nodes(name)) for name in names]
    ledger = Ledger(cluster)
    uuids = [d.uuid for n in cluster for d in n.devices]
    node_policy, device_policy = policy
    fast = Scheduler(ledger, node_policy=node_policy, device_policy=device_policy, seed=3, tie_break=tie_break)
    slow = ReferenceScheduler(ledger, node_policy=node_policy, device_policy=device_policy, seed=3,
                              tie_break=tie_break)
    live: list[str] = []
    placed = 0
    for _ in range(data.draw(st.integers(1, 30))):
        step = data.draw(st.sampled_from(("place",) * 6 + ("pod", "release", "release", "node", "verdicts")))
        if step in ("place", "pod", "verdicts"):
            size = 1 if step == "place" else data.draw(st.integers(1, 3))
            reqs = [data.draw(requests(uuids)) for _ in range(size)]
            subset = data.draw(st.none() | st.lists(st.sampled_from(names + ["ghost"]), unique=True))
            if step == "verdicts":
                asked = subset if subset is not None else names
                assert outcome(lambda: fast.verdicts(reqs, asked)) == outcome(lambda: slow.verdicts(reqs, asked))
                continue
            got = outcome(lambda: fast.place(reqs if step == "pod" else reqs[0], nodes=subset))
            want = outcome(lambda: slow.place(reqs if step == "pod" else reqs[0], nodes=subset))
            assert got == want, (reqs, subset)
            event(f"{step}: {got[0]}")
            if got[0] == "ok" and isinstance(got[1], Allocation):
                live.append(allocate(ledger, got[1]).lease_id)
                placed += 1
        elif step == "release" and live:
            ledger.release(live.pop(data.draw(st.integers(0, len(live) - 1))))
        elif step == "node":  # the inventory changes: a node leaves, or comes back with other devices
            name = data.draw(st.sampled_from(names))
            if name in ledger.nodes and data.draw(st.booleans()):
                gone = {lease.lease_id for lease in ledger.remove_node(name)}
            else:
                lost = ledger.add_node(data.draw(nodes(name)))
                gone = {lease.lease_id for lease in lost}
            live = [lid for lid in live if lid not in gone and lid in ledger.leases]
            uuids = [d.uuid for n in ledger.nodes.values() for d in n.devices]
    ledger.check_invariants()


def test_row_codes_of_some_rows_match_a_pass_over_all_rows() -> None:
    ledger = Ledger([make_node(f"n{i}").gpus(2, mem="40GiB", model="A100").gpus(1, mem="16GiB", model="T4",
                                                                                 numa=1).cpu(8).build()
                     for i in range(5)])
    allocate(ledger, Scheduler(ledger).place(SliceRequest(memory_mib=30000, include_types=("A100",))))
    scheduler = Scheduler(ledger)
    for request in (SliceRequest(memory_mib=30000), SliceRequest(count=3, cores=100, numa_bind=True),
                    SliceRequest(cpu_milli=9000), SliceRequest(include_uuids=(uuid_of("n2", 2),))):
        whole = row_codes(scheduler.view, [request], request)
        some = row_codes(scheduler.view, [request], request, np.array([4, 1]))
        assert some.tolist() == [whole[4], whole[1]]
    assert row_codes(scheduler.view, [SliceRequest(memory_mib=1024)], SliceRequest())[:5].tolist() == [FITS] * 5


def test_row_cache_recomputes_only_rows_whose_version_moved() -> None:
    ledger = Ledger([make_node(f"n{i}").gpus(1, mem="40GiB").build() for i in range(8)])
    seen: list[list[int]] = []

    def compute(rows: object) -> np.ndarray:
        picked = np.arange(ledger.index.version.shape[0])[rows]  # type: ignore[index]
        seen.append(np.atleast_1d(picked).tolist())
        return ledger.index.node_mem_used[rows].astype(np.float64)

    cache = RowCache(ledger.index, np.float64)
    first = cache.get("k", compute)
    assert seen[-1] == list(range(ledger.index.version.shape[0])) and first[:8].tolist() == [0.0] * 8
    lease = allocate(ledger, Scheduler(ledger).place(SliceRequest(memory_mib=4096)))
    row = ledger.index.rows[lease.allocation.node]
    assert cache.get("k", compute)[row] == 4096.0 and seen[-1] == [row]
    calls = len(seen)
    cache.get("k", compute)
    assert len(seen) == calls  # nothing moved: nothing recomputed
