"""Tests of hami_ray.core.policies: tables with the arithmetic in comments, as most_allocated_test.go.

HAMi's node score: 10 x (slots used/split + cores used/core cap + memory used/memory cap), each summed over
the node's devices, mapped to 0-100 by x 100/30; binpack takes the highest, spread 100 minus it.
HAMi's device score: 10 x ((slots+1)/split + (cores+req)/100 + (mem+req)/mem cap).
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hami_ray.core.errors import Unschedulable
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import FULL_CORES, SliceRequest
from hami_ray.core.names import DevicePolicyName, NodePolicyName
from hami_ray.core.policies import registry as default_registry
from hami_ray.core.policies.allocation_score import device_order, device_usage_scores
from hami_ray.core.policies.binpack import BinpackNodePolicy
from hami_ray.core.policies.bestfit import BestFitDevicePolicy
from hami_ray.core.policies.clustering import ClusteringDevicePolicy
from hami_ray.core.policies.dotprod import DotProdDevicePolicy, dot_score
from hami_ray.core.policies.fgd import FgdDevicePolicy
from hami_ray.core.policies.framework import CycleState, Registry
from hami_ray.core.policies.packing import PackingDevicePolicy, packing_score
from hami_ray.core.policies.spread import SpreadNodePolicy
from hami_ray.core.policies.workload import TargetWorkload
from hami_ray.core.scheduler import Scheduler, TieBreak
from tests.core.builders import allocate, hold, make_node, raw_allocation, uuid_of

BINPACK, SPREAD = NodePolicyName.BINPACK, NodePolicyName.SPREAD
JOINT = [p for p in DevicePolicyName if default_registry().device[p]().joint]


def state(request: SliceRequest, seed: int = 0) -> CycleState:
    return CycleState(request, np.random.default_rng(seed))


def rows_of(ledger: Ledger, *names: str) -> np.ndarray:
    return np.array([ledger.index.rows[n] for n in names])


def devices_of(ledger: Ledger, scheduler: Scheduler, request: SliceRequest | list[SliceRequest]) -> list[str]:
    return [g.uuid for g in scheduler.place(request).devices]


# --- node binpack and spread --------------------------------------------------------------------


def _three_nodes() -> Ledger:
    ledger = Ledger([make_node(n).gpus(4, mem="80GiB").build() for n in ("light", "heavy", "empty")])
    hold(ledger, "light", (uuid_of("light", 0), 8192, 25))
    hold(ledger, "heavy", (uuid_of("heavy", 0), 40960, 50))
    hold(ledger, "heavy", (uuid_of("heavy", 1), 40960, 50))
    return ledger


# light: 10 x (1/40 + 25/400 + 8192/327680)  = 10 x (0.025 + 0.0625 + 0.025) = 1.125 -> x 100/30 = 3.75
# heavy: 10 x (2/40 + 100/400 + 81920/327680) = 10 x (0.05 + 0.25 + 0.25)    = 5.5   -> 18.333...
# empty: 0
NODE_SCORES = {"light": 3.75, "heavy": 5.5 * 100 / 30, "empty": 0.0}


@pytest.mark.parametrize(("policy", "expected", "winner"), [
    (BinpackNodePolicy(), NODE_SCORES, "heavy"),
    (SpreadNodePolicy(), {n: 100 - s for n, s in NODE_SCORES.items()}, "empty"),  # 96.25, 81.67, 100
])
def test_node_scores(policy: BinpackNodePolicy, expected: dict[str, float], winner: str) -> None:
    ledger = _three_nodes()
    s = Scheduler(ledger)
    names = ["light", "heavy", "empty"]
    scores = policy.score(s.view, rows_of(ledger, *names), state(SliceRequest()))
    assert scores.tolist() == pytest.approx([expected[n] for n in names])
    assert all(0 <= x <= 100 for x in scores)
    node_policy = policy.name
    assert Scheduler(ledger, node_policy=node_policy, device_policy=DevicePolicyName.BINPACK).place(
        SliceRequest(memory_mib=1024, cores=10)).node == winner


def test_node_score_uses_ratios_of_sums() -> None:
    # 1 device of 80 GiB half used vs 4 devices with one half used: 10 x (1/10 + 50/100 + 0.5) = 11 vs
    # 10 x (1/40 + 50/400 + 40960/327680) = 2.75: binpack prefers the small, fuller node
    ledger = Ledger([make_node("one").gpus(1).build(), make_node("four").gpus(4).build()])
    hold(ledger, "one", (uuid_of("one", 0), 40960, 50))
    hold(ledger, "four", (uuid_of("four", 0), 40960, 50))
    s = Scheduler(ledger)
    scores = BinpackNodePolicy().score(s.view, rows_of(ledger, "one", "four"), state(SliceRequest()))
    assert scores.tolist() == pytest.approx([11 * 100 / 30, 2.75 * 100 / 30])


# --- device binpack and spread ------------------------------------------------------------------


def _three_devices() -> Ledger:
    ledger = Ledger([make_node("n").gpus(3, mem="80GiB").build()])
    hold(ledger, "n", (uuid_of("n", 0), 8192, 10))  # 10 %
    hold(ledger, "n", (uuid_of("n", 1), 49152, 60))  # 60 %
    return ledger


def test_device_scores_hami_formula() -> None:
    ledger = _three_devices()
    s = Scheduler(ledger)
    mem = np.full(3, 8192)
    # request 8192 MiB, 10 cores:
    # dev0: 10 x ((1+1)/10 + (10+10)/100 + (8192+8192)/81920)  = 10 x (0.2 + 0.2 + 0.2) = 6
    # dev1: 10 x ((1+1)/10 + (60+10)/100 + (49152+8192)/81920) = 10 x (0.2 + 0.7 + 0.7) = 16
    # dev2: 10 x ((0+1)/10 + (0+10)/100 + (0+8192)/81920)      = 10 x (0.1 + 0.1 + 0.1) = 3
    scores = device_usage_scores(s.view, 0, mem, 10)
    assert scores.tolist() == pytest.approx([6.0, 16.0, 3.0])
    assert device_order(scores, reverse=False).tolist() == [1, 0, 2]  # binpack: highest first
    assert device_order(scores, reverse=True).tolist() == [2, 0, 1]  # spread: lowest first
    # weights: memory only -> 10 x (0.2, 0.7, 0.1)
    assert device_usage_scores(s.view, 0, mem, 10, (0.0, 0.0, 1.0)).tolist() == pytest.approx([2.0, 7.0, 1.0])


def test_device_order_ties_keep_the_lower_column() -> None:
    scores = np.array([5.0, 5.0, 1.0, 5.0])
    assert device_order(scores, reverse=False).tolist() == [0, 1, 3, 2]
    assert device_order(scores, reverse=True).tolist() == [2, 0, 1, 3]


@pytest.mark.parametrize(("policy", "count", "expected"), [
    (DevicePolicyName.BINPACK, 1, [1]),  # 16 > 6 > 3
    (DevicePolicyName.BINPACK, 2, [1, 0]),
    (DevicePolicyName.SPREAD, 1, [2]),
    (DevicePolicyName.SPREAD, 2, [2, 0]),
    (DevicePolicyName.SPREAD, 3, [2, 0, 1]),
])
def test_device_binpack_and_spread_choose(policy: DevicePolicyName, count: int, expected: list[int]) -> None:
    ledger = _three_devices()
    s = Scheduler(ledger, device_policy=policy)
    got = devices_of(ledger, s, SliceRequest(count=count, memory_mib=8192, cores=10))
    assert got == [uuid_of("n", i) for i in expected]


def test_binpack_skips_a_device_that_does_not_fit() -> None:
    ledger = _three_devices()
    s = Scheduler(ledger, device_policy=DevicePolicyName.BINPACK)
    # 40 cores: device 1 (60 used) is the best score but 60 + 41 > 100
    assert devices_of(ledger, s, SliceRequest(memory_mib=8192, cores=41)) == [uuid_of("n", 0)]


# --- topology-aware -----------------------------------------------------------------------------


def _linked() -> Ledger:
    # pair scores: 0-1 NVLink 100, 2-3 40, 1-2 20, others 10
    node = (make_node("n").gpus(4).link(0, 1, 100).link(2, 3, 40).link(1, 2, 20).link(0, 2, 10).link(0, 3, 10)
            .link(1, 3, 10).build())
    return Ledger([node])


@pytest.mark.parametrize(("count", "busy", "expected"), [
    # two devices: the set with the highest pair score: (0, 1) = 100
    (2, [], (0, 1)),
    # device 1 full: (0,2)=10, (0,3)=10, (2,3)=40 -> (2, 3)
    (2, [1], (2, 3)),
    # three: (0,1,2) = 100+10+20 = 130 > (0,1,3) = 120 > (1,2,3) = 70 > (0,2,3) = 60
    (3, [], (0, 1, 2)),
    # one device: the lowest link sum keeps well-linked pairs free:
    # 0: 100+10+10 = 120, 1: 100+20+10 = 130, 2: 10+20+40 = 70, 3: 10+10+40 = 60 -> 3
    (1, [], (3,)),
    # device 3 full: 2 (70) is next
    (1, [3], (2,)),
])
def test_topology_aware(count: int, busy: list[int], expected: tuple[int, ...]) -> None:
    ledger = _linked()
    for i in busy:
        hold(ledger, "n", (uuid_of("n", i), 81920, 100))
    s = Scheduler(ledger, device_policy=DevicePolicyName.TOPOLOGY)
    alloc = s.place(SliceRequest(count=count, memory_mib=1024, cores=10))
    assert sorted(g.uuid for g in alloc.devices) == [uuid_of("n", i) for i in expected]


def test_topology_score_is_the_pair_sum() -> None:
    ledger = _linked()
    s = Scheduler(ledger, device_policy=DevicePolicyName.TOPOLOGY)
    policy = s.device_policy_for(DevicePolicyName.TOPOLOGY)
    request = SliceRequest(count=2, memory_mib=1)
    choice = policy.select(s.view, 0, s.view.device_fit(request)[0], state(request))
    assert choice is not None and choice.cols == (0, 1) and choice.score == 100.0


# --- numa ---------------------------------------------------------------------------------------


def _numa() -> Ledger:
    # NUMA 0: devices 0, 1; NUMA 1: devices 2, 3, 4
    return Ledger([make_node("n").gpus(2, numa=0).gpus(3, numa=1).build()])


@pytest.mark.parametrize(("count", "busy", "bind", "expected"), [
    (2, [], False, {0, 1}),  # both NUMA nodes hold 2; the tightest (2 fitting < 3) wins
    (3, [], False, {2, 3, 4}),  # only NUMA 1 has 3
    (2, [0], True, {2, 3}),  # NUMA 0 has one fitting device left; binpack order within NUMA 1: stable
    (4, [], False, {2, 3, 4, 0}),  # no single NUMA node: the largest group first, then the next
])
def test_numa_keeps_devices_together(count: int, busy: list[int], bind: bool, expected: set[int]) -> None:
    ledger = _numa()
    for i in busy:
        hold(ledger, "n", (uuid_of("n", i), 81920, 100))
    s = Scheduler(ledger, device_policy=DevicePolicyName.NUMA)
    alloc = s.place(SliceRequest(count=count, memory_mib=1024, numa_bind=bind))
    assert {int(g.uuid.rsplit("-", 1)[1]) for g in alloc.devices} == expected


def test_numa_packs_the_busier_devices_first() -> None:
    ledger = _numa()
    hold(ledger, "n", (uuid_of("n", 4), 40960, 50))  # device 4 busiest on NUMA 1
    s = Scheduler(ledger, device_policy=DevicePolicyName.NUMA)
    alloc = s.place(SliceRequest(count=3, memory_mib=1024))
    assert [g.uuid for g in alloc.devices] == [uuid_of("n", 4), uuid_of("n", 2), uuid_of("n", 3)]


def test_numa_bind_fails_when_no_single_numa_node_suffices() -> None:
    ledger = _numa()
    s = Scheduler(ledger, device_policy=DevicePolicyName.NUMA)
    with pytest.raises(Unschedulable) as info:
        s.place(SliceRequest(count=4, memory_mib=1024, numa_bind=True))
    assert info.value.reasons == {"no NUMA node with enough devices": 1}
    hold(ledger, "n", (uuid_of("n", 2), 81920, 100))  # NUMA 1 down to 2 free devices
    with pytest.raises(Unschedulable):
        s.place(SliceRequest(count=3, memory_mib=1024, numa_bind=True))
    # without the binding it spans NUMA nodes
    assert len(s.place(SliceRequest(count=3, memory_mib=1024)).devices) == 3


# --- the FGD paper's family: valid placements on a small cluster ------------------------------------


def _small_cluster() -> Ledger:
    return Ledger([
        make_node("a").gpus(4, "16GiB", "T4").cpu(32).build(),
        make_node("b").gpus(2, "32GiB", "V100").cpu(16).build(),
        make_node("c").gpus(8, "80GiB", "A100").cpu(96).build(),
    ])


STREAM = [
    SliceRequest(memory_percent=30.0, cores=30, cpu_milli=2000),
    SliceRequest(memory_percent=50.0, cores=50, cpu_milli=4000),
    SliceRequest(count=2, cores=FULL_CORES, cpu_milli=8000),
    SliceRequest(memory_mib=4096, cores=20, cpu_milli=1000),
    SliceRequest(count=0, cpu_milli=3000),
    SliceRequest(cores=FULL_CORES, cpu_milli=4000, include_types=("A100",)),
    SliceRequest(memory_percent=80.0, cores=80, cpu_milli=2000),
]


@pytest.mark.parametrize("policy", list(DevicePolicyName))
@pytest.mark.parametrize("tie_break", list(TieBreak))
def test_every_policy_places_validly_until_full(policy: DevicePolicyName, tie_break: TieBreak) -> None:
    ledger = _small_cluster()
    s = Scheduler(ledger, device_policy=policy, tie_break=tie_break, seed=7)
    placed, failures = 0, 0
    for i in range(120):
        request = STREAM[i % len(STREAM)]
        s.observe(request)
        try:
            alloc = s.place(request)
        except Unschedulable:
            failures += 1
            continue
        part = alloc.slices[0]
        assert len(part) == request.count and len({g.uuid for g in part}) == request.count
        for g in part:
            dev = ledger.device(g.uuid)
            assert g.memory_mib == request.memory_on(dev.memory_mib) and g.cores == request.cores
            where = ledger.where(g.uuid)
            assert where is not None and where[0] == ledger.index.rows[alloc.node]
            assert not request.include_types or "A100" in dev.model
        allocate(ledger, alloc)
        ledger.check_invariants()
        placed += 1
    # the cluster (14 devices, 144 CPUs) fills up: CPU alone caps it well below 120 requests
    assert placed > 20 and failures > 0


def test_random_is_reproducible_and_random() -> None:
    def run(seed: int) -> list[str]:
        ledger = Ledger([make_node(f"n{i}").gpus(2).build() for i in range(8)])
        s = Scheduler(ledger, device_policy=DevicePolicyName.RANDOM, seed=seed)
        out = []
        for _ in range(6):
            alloc = s.place(SliceRequest(memory_mib=1024, cores=10))
            allocate(ledger, alloc)
            out.append(alloc.devices[0].uuid)
        return out

    assert run(1) == run(1)
    assert len({tuple(run(seed)) for seed in range(5)}) > 1
    assert len({u.split("-")[1] for u in run(3)}) > 1  # not always the same node


# dotprod: n = (cpu left/128 CPUs, idle milli/8000), p = (cpu/128 CPUs, demand x count/8000),
# score = int(100 x (1 - n.p/2))
@pytest.mark.parametrize(("cpu_free", "share_free", "cpu_req", "share_req", "expected"), [
    # idle 8-GPU 96-CPU node, 1 GPU and 8 CPUs: 0.75 x 0.0625 + 1 x 0.125 = 0.171875 -> int(91.41) = 91
    (96000, 8000, 8000, 1000, 91),
    # nothing free: 100
    (0, 0, 8000, 1000, 100),
    # everything, asked everything: 1 + 1 = 2 -> 0
    (128000, 8000, 128000, 8000, 0),
    # 64 CPUs free, 4 GPUs idle; 32 CPUs + 0.5 GPU: 0.5 x 0.25 + 0.5 x 0.0625 = 0.15625 -> int(92.19) = 92
    (64000, 4000, 32000, 500, 92),
])
def test_dot_score(cpu_free: int, share_free: int, cpu_req: int, share_req: int, expected: int) -> None:
    assert dot_score(cpu_free, share_free, cpu_req, share_req) == expected


def test_dotprod_prefers_the_node_whose_free_vector_aligns_least() -> None:
    ledger = Ledger([make_node("many-cpus").gpus(2, "16GiB").cpu(64).build(),
                     make_node("few-cpus").gpus(2, "16GiB").cpu(16).build()])
    s = Scheduler(ledger, device_policy=DevicePolicyName.DOTPROD)
    request = SliceRequest(memory_percent=50.0, cores=50, cpu_milli=8000)  # demand 500 milli
    # many-cpus: n = (64/128, 2000/8000), p = (8/128, 500/8000): 0.5 x 0.0625 + 0.25 x 0.0625 = 0.046875
    #            -> int(100 x (1 - 0.0234)) = 97
    # few-cpus:  n = (16/128, 2000/8000): 0.125 x 0.0625 + 0.015625 = 0.0234375 -> int(98.83) = 98
    policy = DotProdDevicePolicy()
    scores = {}
    for name in ("many-cpus", "few-cpus"):
        row = ledger.index.rows[name]
        choice = policy.select(s.view, row, s.view.device_fit(request)[row], state(request))
        assert choice is not None
        scores[name] = choice.score
    assert scores == {"many-cpus": 97.0, "few-cpus": 98.0}
    assert s.place(request).node == "few-cpus"


# packing: all idle -> max(33 - f, f); an idle device used -> max(50 - u, 33); else 100 - r//10, r = sum
# left x 100 // 1000 over the chosen devices
@pytest.mark.parametrize(("left", "fit", "count", "devices", "expected"), [
    ([400.0, 1000.0], [True, True], 1, 2, 96),  # 0.3 slice -> 400 device: r = 40, 100 - 4
    ([1000.0, 1000.0], [True, True], 1, 2, 31),  # idle node: max(33 - 2, 2)
    ([1000.0] * 8, [True] * 8, 1, 8, 25),  # idle 8-GPU node: max(25, 8)
    ([0.0, 1000.0], [False, True], 1, 2, 49),  # one idle device used: max(50 - 1, 33)
    ([100.0, 200.0, 1000.0], [True, True, True], 2, 3, 97),  # r = 10 + 20 = 30 -> 100 - 3
])
def test_packing_score(left: list[float], fit: list[bool], count: int, devices: int, expected: int) -> None:
    assert packing_score(left, fit, count, devices) == expected


def test_packing_fills_partly_used_devices_first() -> None:
    ledger = Ledger([make_node("idle").gpus(2, "16GiB").build(), make_node("used").gpus(2, "16GiB").build()])
    hold(ledger, "used", (uuid_of("used", 1), 9830, 60))  # 400 milli left on used-1
    s = Scheduler(ledger, device_policy=DevicePolicyName.PACKING)
    request = SliceRequest(memory_percent=30.0, cores=30)
    assert [g.uuid for g in s.place(request).devices] == [uuid_of("used", 1)]
    policy = PackingDevicePolicy()
    row = ledger.index.rows["used"]
    choice = policy.select(s.view, row, s.view.device_fit(request)[row], state(request))
    assert choice is not None and choice.score == 96.0


# clustering: base = 25 x (8000 - idle) // 8000; bonus 75 only this tag, 50 among others, 25 no slices
def test_clustering_scores_and_colocation() -> None:
    ledger = Ledger([make_node(n).gpus(8, "16GiB").build() for n in ("empty", "shared", "mixed")])
    hold(ledger, "shared", (uuid_of("shared", 0), 8192, 50))  # a share-gpu slice: idle 7500
    hold(ledger, "mixed", (uuid_of("mixed", 0), 16384, 100), (uuid_of("mixed", 1), 16384, 100))  # 2-gpu
    hold(ledger, "mixed", (uuid_of("mixed", 2), 8192, 50))  # and share-gpu: idle 5500
    s = Scheduler(ledger, device_policy=DevicePolicyName.CLUSTERING)
    policy = ClusteringDevicePolicy()

    def score(node: str, request: SliceRequest) -> float:
        row = ledger.index.rows[node]
        choice = policy.select(s.view, row, s.view.device_fit(request)[row], state(request))
        assert choice is not None
        return choice.score

    share = SliceRequest(memory_percent=25.0, cores=25)
    two = SliceRequest(count=2, cores=FULL_CORES)
    # empty: 25 x 0 // 8000 + 25 = 25
    # shared: 25 x 500 // 8000 = 1, + 75 (only share-gpu) = 76; for a 2-gpu request: 1 + 0
    # mixed: 25 x 2500 // 8000 = 7, + 50 (share-gpu among others) = 57; for 2-gpu: 7 + 50 = 57
    assert [score(n, share) for n in ("empty", "shared", "mixed")] == [25.0, 76.0, 57.0]
    assert [score(n, two) for n in ("empty", "shared", "mixed")] == [25.0, 1.0, 57.0]
    assert s.place(share).node == "shared"
    assert s.place(two).node == "mixed"


def test_bestfit_normalises_and_picks_the_least_leftover() -> None:
    norm = BestFitDevicePolicy.normalize(np.array([90.0, 80.0, -np.inf, 85.0]))
    # (x - 80) x 100 / (90 - 80), floored; -inf stays
    assert norm.tolist() == [100.0, 0.0, -np.inf, 50.0]
    assert BestFitDevicePolicy.normalize(np.array([7.0, 7.0])).tolist() == [0.0, 0.0]
    ledger = Ledger([make_node("roomy").gpus(4, "16GiB").cpu(64).build(),
                     make_node("tight").gpus(4, "16GiB").cpu(64).build()])
    for i in range(3):
        hold(ledger, "tight", (uuid_of("tight", i), 16384, 100))
    s = Scheduler(ledger, device_policy=DevicePolicyName.BESTFIT)
    # tight: 0.5 x (64000-2000)/128000 + 0.5 x (1000 - 500)/8000 = 0.2422 + 0.0312 -> int(72.66) = 72
    # roomy: 0.2422 + 0.5 x (4000 - 500)/8000 = 0.2422 + 0.21875 -> int(53.9) = 53
    assert s.place(SliceRequest(memory_percent=50.0, cores=50, cpu_milli=2000)).node == "tight"


# --- FGD reduces to the paper's one-dimensional FGD ----------------------------------------------------


def paper_fragment(free: list[int], cpu_free: float, classes: list[tuple[Fraction, int, int, int]]) -> Fraction:
    """F_n(M) = sum_m p_m x (m fits ? sum of free milli on GPUs with free < m's demand : all free milli).

    ``classes``: (p, GPU count, per-GPU demand in milli, CPU milli); CPU-only classes (count 0) count all
    idle milli (the artifact's XL/XR), as does a class that lacks GPUs or CPU.
    """
    idle = sum(free)
    total = Fraction(0)
    for p, count, demand, cpu in classes:
        fits = count > 0 and sum(1 for f in free if f >= demand) >= count and cpu_free >= cpu
        total += p * (sum(f for f in free if f < demand) if fits else idle)
    return total


# four 1000-MiB devices with 100 cores: memory MiB = milli, cores = milli / 10 (proportional)
#   d0: 300 used -> 700 free;  d1: 2 x 400 used -> 200 free;  d2: idle 1000;  d3: 1000 used (exclusive) -> 0
# target workload (popularity 1.0, all kept):
#   A: 1 GPU x 300 (300 MiB, 30 cores) x5 -> p 0.5;  B: 1 GPU x 600 x3 -> p 0.3
#   C: 2 whole GPUs x1 -> p 0.1;                     D: CPU only x1 -> p 0.1
A = SliceRequest(memory_mib=300, cores=30)
B = SliceRequest(memory_mib=600, cores=60)
C = SliceRequest(count=2, cores=FULL_CORES)
D = SliceRequest(count=0, cpu_milli=1000)


def _fgd_case() -> tuple[Ledger, Scheduler, FgdDevicePolicy]:
    ledger = Ledger([make_node("n").gpus(4, mem=1000).cpu(8).build()])
    hold(ledger, "n", (uuid_of("n", 0), 300, 30))
    hold(ledger, "n", (uuid_of("n", 1), 400, 40))
    hold(ledger, "n", (uuid_of("n", 1), 400, 40))
    hold(ledger, "n", (uuid_of("n", 3), 1000, 100))
    policy = FgdDevicePolicy(TargetWorkload([A] * 5 + [B] * 3 + [C, D], popularity=1.0))
    return ledger, Scheduler(ledger, device_policy=DevicePolicyName.FGD), policy


def test_fgd_fragment_hand_computed() -> None:
    ledger, s, policy = _fgd_case()
    assert sorted((m.count, m.memory_mib, m.cores, m.p) for m in policy.workload.classes) == sorted(
        [(1, 300, 30, 0.5), (1, 600, 60, 0.3), (2, None, 100, 0.1), (0, None, 0, 0.1)])
    # F(A) = free < 300: d1 200 + d3 0 = 200 (A fits on d0, d2)
    # F(B) = free < 600: d1 200 + d3 0 = 200 (B fits on d0, d2)
    # F(C) = C needs 2 idle GPUs, only d2 is: all idle = 700 + 200 + 1000 + 0 = 1900
    # F(D) = CPU-only: all idle = 1900
    # F = 0.5 x 200 + 0.3 x 200 + 0.1 x 1900 + 0.1 x 1900 = 100 + 60 + 190 + 190 = 540
    assert policy.fragment(s.view, np.array([0])).tolist() == pytest.approx([540.0])
    assert paper_fragment([700, 200, 1000, 0], 8000, [(Fraction(1, 2), 1, 300, 0), (Fraction(3, 10), 1, 600, 0),
                                                      (Fraction(1, 10), 2, 1000, 0),
                                                      (Fraction(1, 10), 0, 0, 1000)]) == 540


def test_fgd_gradient_and_choice_hand_computed() -> None:
    ledger, s, policy = _fgd_case()
    rows = np.array([0])
    fit = s.view.device_fit(A)[0]
    assert fit.tolist() == [True, False, True, False]  # d1 has 200 < 300, d3 is exclusive
    # A on d0: free (400, 200, 1000, 0), idle 1600:
    #   F(A) = 200 -> 100; F(B) = 400 + 200 = 600 -> 180; F(C) = 1600 -> 160; F(D) = 160; F = 600: dF = -60
    # A on d2: free (700, 200, 700, 0), idle 1600:
    #   F(A) = 200 -> 100; F(B) = 200 -> 60; F(C) = 1600 -> 160; F(D) = 160; F = 480: dF = +60
    for col, grad in ((0, -60.0), (2, 60.0)):
        only = np.zeros(4, dtype=bool)
        only[col] = True
        choices, grads = policy.gradients(s.view, rows, only[None], A)
        assert choices == [(col,)] and grads.tolist() == pytest.approx([grad])
    # score = int(100 x sigmoid(dF/1000)): d2 -> int(51.50) = 51, d0 -> int(48.50) = 48
    choice = policy.select(s.view, 0, fit, state(A))
    assert choice is not None and choice.cols == (2,) and choice.score == 51.0
    assert math.floor(100 / (1 + math.exp(-0.06))) == 51


def test_fgd_without_a_workload_is_neutral() -> None:
    ledger, s, _ = _fgd_case()
    empty = FgdDevicePolicy(TargetWorkload())
    assert empty.fragment(s.view, np.array([0])).tolist() == [0.0]
    choice = empty.select(s.view, 0, s.view.device_fit(A)[0], state(A))
    assert choice is not None and choice.score == 50.0  # sigmoid(0) x 100


_SHAPES = st.one_of(
    st.tuples(st.just(1), st.integers(1, 100).map(lambda x: x * 10)),  # sharing (or whole at 1000)
    st.tuples(st.sampled_from([2, 4]), st.just(1000)),  # multi-GPU: whole devices
    st.tuples(st.just(0), st.just(0)),  # CPU only
)


def _as_request(count: int, demand: int, cpu: int) -> SliceRequest:
    if count == 0:
        return SliceRequest(count=0, cpu_milli=cpu or 1000)
    return SliceRequest(count=count, memory_mib=demand, cores=demand // 10, cpu_milli=cpu)


@settings(max_examples=150, deadline=None)
@given(
    used=st.lists(st.integers(0, 100).map(lambda x: x * 10), min_size=1, max_size=5),
    cpu_used=st.sampled_from([0, 4000, 7000]),
    shapes=st.lists(st.tuples(_SHAPES, st.sampled_from([0, 2000, 8000]), st.integers(1, 5)), min_size=1,
                    max_size=5, unique_by=lambda s: (s[0], s[1])),
    request=st.tuples(st.one_of(st.tuples(st.just(1), st.integers(1, 99).map(lambda x: x * 10)),
                                st.tuples(st.sampled_from([1, 2]), st.just(1000))),
                      st.sampled_from([0, 1000])),
)
def test_fgd_matches_the_paper_in_one_dimension(used: list[int], cpu_used: int,
                                                shapes: list[tuple[tuple[int, int], int, int]],
                                                request: tuple[tuple[int, int], int]) -> None:
    ledger = Ledger([make_node("n").gpus(len(used), mem=1000).cpu(8).build()])
    for i, u in enumerate(used):
        if u:
            hold(ledger, "n", (uuid_of("n", i), u, u // 10))
    if cpu_used:
        allocate(ledger, raw_allocation("n", slices=[[]], cpu_milli=cpu_used))
    requests = []
    for (count, demand), cpu, n in shapes:
        requests += [_as_request(count, demand, cpu)] * n
    policy = FgdDevicePolicy(TargetWorkload(requests, popularity=1.0))
    counts = Counter((r.count, r.memory_mib or 0, r.cpu_milli) for r in requests)
    total = sum(counts.values())
    classes = [(Fraction(n, total), c, d or 0, cpu) for (c, d, cpu), n in counts.items()]
    free = [1000 - u for u in used]
    cpu_free = 8000 - cpu_used
    s = Scheduler(ledger, device_policy=DevicePolicyName.FGD)
    f0 = paper_fragment(free, cpu_free, classes)
    assert policy.fragment(s.view, np.array([0])).tolist() == pytest.approx([float(f0)], abs=1e-6)

    (count, demand), cpu = request
    req = _as_request(count, demand, cpu)
    fit = s.view.device_fit(req)[0]
    assert fit.tolist() == [(f >= demand) for f in free]  # 1-D: a device fits when its free share covers it
    if count == 1 and demand < 1000:  # a sharing slice: every fitting device is a candidate
        for col in np.nonzero(fit)[0]:
            only = np.zeros(len(used), dtype=bool)
            only[col] = True
            after = list(free)
            after[col] -= demand
            expected = f0 - paper_fragment(after, cpu_free - cpu, classes)
            choices, grads = policy.gradients(s.view, np.array([0]), only[None], req)
            assert choices == [(int(col),)]
            assert grads.tolist() == pytest.approx([float(expected)], abs=1e-6)
    elif fit.sum() >= count:  # whole devices: the first idle ones (all equally idle)
        cols = [i for i, f in enumerate(free) if f >= demand][:count]
        after = [0 if i in cols else f for i, f in enumerate(free)]
        expected = f0 - paper_fragment(after, cpu_free - cpu, classes)
        choices, grads = policy.gradients(s.view, np.array([0]), fit[None], req)
        assert choices == [tuple(cols)]
        assert grads.tolist() == pytest.approx([float(expected)], abs=1e-6)


def test_fgd_scheduler_prefers_less_fragmentation_across_nodes() -> None:
    # two nodes, one 1000-MiB device each: "half" has 500 milli free, "idle" 1000; target: 60 % slices.
    # before: F(half) = 500 (60 % cannot run there: all idle), F(idle) = 0 (it runs, no device < 600)
    #   a 40 % slice on half: 100 left -> F = 100: dF = +400 -> int(100 x sigmoid(0.4)) = int(59.87) = 59
    #   a 40 % slice on idle: 600 left -> 60 % still runs, F = 0: dF = 0 -> 50
    # so FGD fills "half", although the spread node policy (the tie-break) would pick "idle"
    ledger = Ledger([make_node("half").gpus(1, mem=1000).build(), make_node("idle").gpus(1, mem=1000).build()])
    hold(ledger, "half", (uuid_of("half", 0), 500, 50))
    s = Scheduler(ledger, device_policy=DevicePolicyName.FGD, node_policy=SPREAD)  # spread would pick idle
    fgd = s.device_policy_for(DevicePolicyName.FGD)
    assert isinstance(fgd, FgdDevicePolicy)
    fgd.seed([SliceRequest(memory_mib=600, cores=60)] * 10)
    assert s.place(SliceRequest(memory_mib=400, cores=40)).node == "half"


# --- the target workload -----------------------------------------------------------------------------


def _req(mib: int) -> SliceRequest:
    return SliceRequest(memory_mib=mib, cores=10)


def test_workload_keeps_shapes_until_95_percent_and_renormalises() -> None:
    # 50 + 30 + 15 = 95 of 100 -> the 4- and 1-request shapes are dropped; p over the 95 kept
    reqs = [_req(1)] * 50 + [_req(2)] * 30 + [_req(3)] * 15 + [_req(4)] * 4 + [_req(5)] * 1
    w = TargetWorkload(reqs)
    assert [(m.memory_mib, m.p) for m in w.classes] == [(1, pytest.approx(50 / 95)), (2, pytest.approx(30 / 95)),
                                                        (3, pytest.approx(15 / 95))]
    assert sum(m.p for m in w.classes) == pytest.approx(1.0)
    # 50 + 30 + 14 = 94 < 95: the next shape is kept too
    w = TargetWorkload([_req(1)] * 50 + [_req(2)] * 30 + [_req(3)] * 14 + [_req(4)] * 5 + [_req(5)] * 1)
    assert [m.memory_mib for m in w.classes] == [1, 2, 3, 4]
    assert w.classes[-1].p == pytest.approx(5 / 99)
    # popularity 1.0 keeps all; CPU-only requests are classes too
    w = TargetWorkload(reqs + [SliceRequest(count=0, cpu_milli=1000)] * 10, popularity=1.0)
    assert len(w.classes) == 6
    cpu_only = [m for m in w.classes if m.count == 0]
    assert len(cpu_only) == 1 and cpu_only[0].p == pytest.approx(10 / 110)
    assert w.classes.index(cpu_only[0]) == 3  # by popularity: 50, 30, 15, then the 10 CPU-only


def test_workload_orders_ties_by_size() -> None:
    w = TargetWorkload([_req(1), SliceRequest(memory_mib=1, cores=90), SliceRequest(memory_mib=1, cores=50,
                                                                                     cpu_milli=4000)])
    # equal popularity: larger CPU first, then larger cores
    assert [(m.cpu_milli, m.cores) for m in w.classes] == [(4000, 50), (0, 90), (0, 10)]


def test_workload_learns_online() -> None:
    w = TargetWorkload(refresh_every=4)
    assert w.classes == () and w.generation == 0
    w.observe(_req(1))  # the first observation builds the set at once
    assert [(m.memory_mib, m.p) for m in w.classes] == [(1, 1.0)] and w.generation == 1
    for _ in range(3):
        w.observe(_req(2))
    assert [m.memory_mib for m in w.classes] == [1] and w.generation == 1  # not yet refreshed
    w.observe(_req(2))  # the 4th since the last refresh: 4 x shape 2, 1 x shape 1
    assert [(m.memory_mib, m.p) for m in w.classes] == [(2, 0.8), (1, pytest.approx(0.2))]
    assert w.generation == 2
    for _ in range(4):
        w.observe(_req(2))  # 8:1 -> 8/9 = 0.889 < 0.95: shape 1 still kept; p moved by 0.089
    assert w.generation == 3 and w.classes[0].p == pytest.approx(8 / 9)
    assert [m.memory_mib for m in w.classes] == [2, 1]
    for _ in range(4 * 40):
        w.observe(_req(2))  # 168:1 -> 168/169 = 0.994 >= 0.95: shape 1 is dropped, p renormalised to 1
    assert [(m.memory_mib, m.p) for m in w.classes] == [(2, 1.0)] and w.generation > 3


def test_workload_ignores_a_tiny_drift() -> None:
    # 1000:10 -> p = 0.990, 0.0099; one more of the first moves p by ~1e-5: the set and caches stay
    w = TargetWorkload([_req(1)] * 1000 + [_req(2)] * 10, popularity=1.0, refresh_every=1)
    gen = w.generation
    w.observe(_req(1))
    assert w.generation == gen


def test_workload_generation_is_stable_when_nothing_changes() -> None:
    w = TargetWorkload([_req(1)] * 10, refresh_every=1)
    gen = w.generation
    for _ in range(20):
        w.observe(_req(1))  # same single shape, p stays 1.0
    assert w.generation == gen


def test_workload_can_be_frozen_and_seeded() -> None:
    w = TargetWorkload([_req(1)] * 3, learn=False)
    gen = w.generation
    for _ in range(300):
        w.observe(_req(2))
    assert [m.memory_mib for m in w.classes] == [1] and w.generation == gen
    w.seed([_req(2)] * 100)  # a trace: recomputed at once
    assert w.classes[0].memory_mib == 2 and w.generation == gen + 1


def test_scheduler_observe_feeds_the_fgd_workload_and_caches_follow() -> None:
    def build() -> tuple[Ledger, Scheduler]:
        ledger = Ledger([make_node("half").gpus(1, mem=1000).build(), make_node("idle").gpus(1, mem=1000).build()])
        hold(ledger, "half", (uuid_of("half", 0), 500, 50))
        return ledger, Scheduler(ledger, device_policy=DevicePolicyName.FGD, node_policy=SPREAD)

    ledger, s = build()
    request = SliceRequest(memory_mib=400, cores=40)
    fgd = s.device_policy_for(DevicePolicyName.FGD)
    assert isinstance(fgd, FgdDevicePolicy)
    assert s.place(request).node == "idle"  # nothing learned: all tie at 50, spread breaks the tie
    gen = fgd.generation
    for _ in range(10):
        s.observe(SliceRequest(memory_mib=600, cores=60))
    assert fgd.generation != gen
    # the same scheduler (with its score caches) now agrees with a fresh one that saw the same requests
    fresh_ledger, fresh = build()
    for _ in range(10):
        fresh.observe(SliceRequest(memory_mib=600, cores=60))
    assert s.place(request).node == fresh.place(request).node == "half"


# --- the registry ------------------------------------------------------------------------------------


def test_registry_rejects_duplicates() -> None:
    reg = Registry()
    reg.add_node(NodePolicyName.BINPACK, BinpackNodePolicy)
    with pytest.raises(ValueError, match="twice"):
        reg.add_node(NodePolicyName.BINPACK, SpreadNodePolicy)
    assert reg.node[NodePolicyName.BINPACK] is BinpackNodePolicy  # the first registration stands
    reg.add_device(DevicePolicyName.FGD, FgdDevicePolicy)
    with pytest.raises(ValueError, match="twice"):
        reg.add_device(DevicePolicyName.FGD, FgdDevicePolicy)
    # the same name may exist once as a node policy and once as a device policy
    reg.add_device(DevicePolicyName.BINPACK, lambda: None)  # type: ignore[arg-type, return-value]


def test_default_registry_holds_every_name_once() -> None:
    reg = default_registry()
    assert set(reg.node) == set(NodePolicyName)
    assert set(reg.device) == set(DevicePolicyName)
    for name, factory in reg.device.items():
        policy = factory()
        assert policy.name is name
        assert isinstance(policy.joint, bool) and isinstance(policy.cacheable, bool)
    for node_name, node_factory in reg.node.items():
        assert node_factory().name is node_name
    assert {DevicePolicyName.RANDOM, DevicePolicyName.FGD} <= set(JOINT)
    with pytest.raises(ValueError):
        reg.add_device(DevicePolicyName.BINPACK, reg.device[DevicePolicyName.BINPACK])
