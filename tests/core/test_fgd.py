"""FGD against a brute-force transcription of the paper's definitions (reference/fgd.md 4.1).

The engine computes fragmentation vectorised over rows x classes x devices with incremental updates per
candidate device; here every quantity is recomputed from scratch, one node at a time, in plain Python.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from hami_ray.core.ledger import Ledger
from hami_ray.core.model import Allocation, Device, DeviceGrant, Lease, Node, SliceRequest
from hami_ray.core.names import DevicePolicyName
from hami_ray.core.policies.fgd import FgdDevicePolicy
from hami_ray.core.policies.framework import CycleState
from hami_ray.core.policies.workload import TargetWorkload
from hami_ray.core.scheduler import Scheduler

MILLIS = (100, 200, 250, 300, 470, 500, 650, 810, 1000)


def milli_request(milli: int, count: int = 1, cpu: int = 0) -> SliceRequest:
    if count == 0:
        return SliceRequest(count=0, cpu_milli=cpu)
    return SliceRequest(count=count, memory_percent=milli / 10, cores=milli // 10, cpu_milli=cpu)


def paper_fragment(left: list[int], cpu_left: int, classes: list[tuple[int, int, int, float]]) -> float:
    """F_n(M) = sum_m p_m (m fits ? sum of left_i < milli_m : sum of left), classes (count, milli, cpu, p)."""
    total = 0.0
    idle = sum(left)
    for count, milli, cpu, p in classes:
        if count == 0:
            total += p * idle
            continue
        fits = sum(1 for v in left if v >= milli) >= count and cpu_left >= cpu
        total += p * (sum(v for v in left if v < milli) if fits else idle)
    return total


def random_cluster(rng: random.Random) -> tuple[Ledger, list[list[int]]]:
    nodes = [Node(name=f"n{i}", cpu_milli=32000,
                  devices=tuple(Device(uuid=f"n{i}-g{j}", index=j, model="T4", memory_mib=16000, split_count=100)
                                for j in range(rng.choice([1, 2, 4]))))
             for i in range(6)]
    ledger = Ledger(nodes)
    lefts = []
    for node in nodes:
        left = []
        for dev in node.devices:
            used = rng.choice([0, 0, 100, 300, 500, 810, 1000])
            left.append(1000 - used)
            if used:
                grant = DeviceGrant(uuid=dev.uuid, memory_mib=16000 * used // 1000, cores=used // 10)
                ledger.allocate(Lease(lease_id=dev.uuid, owner="t", token="t",
                                      allocation=Allocation(node=node.name, slices=((grant,),), cpu_milli=4000)))
        lefts.append(left)
    return ledger, lefts


@pytest.mark.parametrize("seed", range(8))
def test_gradients_match_the_papers_definition(seed: int) -> None:
    rng = random.Random(seed)
    ledger, lefts = random_cluster(rng)
    shapes = [(1, rng.choice(MILLIS[:-1]), rng.choice([0, 2000, 30000])) for _ in range(4)]
    shapes += [(1, 1000, 4000), (2, 1000, 8000), (0, 0, 6000)]
    trace = [milli_request(m, c, cpu) for c, m, cpu in shapes for _ in range(rng.randint(1, 5))]
    policy = FgdDevicePolicy(TargetWorkload(trace, learn=False))
    classes = [(c.count, c.cores * 10, c.cpu_milli, c.p) for c in policy.workload.classes]
    scheduler = Scheduler(ledger, device_policy=DevicePolicyName.FGD)
    view = scheduler.view
    rows = np.array([ledger.index.rows[f"n{i}"] for i in range(6)])
    cpu_left = [int(ledger.index.cpu_cap[r] - ledger.index.cpu_used[r]) for r in rows]
    before = policy.fragment(view, rows)
    for i in range(6):
        assert before[i] == pytest.approx(paper_fragment(lefts[i], cpu_left[i], classes), abs=1e-6)
    request = milli_request(rng.choice(MILLIS[:-1]), 1, 2000)
    fit = view.device_fit(request)
    for i, row in enumerate(rows):
        choice = policy.select(view, int(row), fit[row], CycleState(request, np.random.default_rng(0)))
        candidates = [j for j, v in enumerate(lefts[i]) if v >= request.cores * 10]
        if not candidates or cpu_left[i] < request.cpu_milli:
            continue
        assert choice is not None
        expected = []
        for j in candidates:  # hypothetical placement on device j, F recomputed from scratch
            after = list(lefts[i])
            after[j] -= request.cores * 10
            grad = paper_fragment(lefts[i], cpu_left[i], classes) - paper_fragment(
                after, cpu_left[i] - request.cpu_milli, classes)
            expected.append((int(100 / (1 + math.exp(-grad / 1000))), -j))
        best_score, best_j = max(expected)
        assert choice.score == best_score
        assert choice.cols == (-best_j,)


def test_fragment_example_from_the_docstring() -> None:
    ledger = Ledger([Node(name="n", devices=(Device(uuid="g", index=0, model="T4", memory_mib=1000),))])
    policy = FgdDevicePolicy(TargetWorkload([milli_request(600)], learn=False))
    view = Scheduler(ledger).view
    row = np.array([0])
    assert policy.fragment(view, row)[0] == 0
    ledger.allocate(Lease(lease_id="a", owner="t", token="t", allocation=Allocation(
        node="n", slices=((DeviceGrant(uuid="g", memory_mib=500, cores=50),),))))
    assert policy.fragment(view, row)[0] == pytest.approx(500)


def test_two_dimensional_fragment_uses_the_scarcer_dimension() -> None:
    # memory 80 % free but cores only 20 % free: a class needing 30 % of both cannot use the device
    ledger = Ledger([Node(name="n", devices=(Device(uuid="g", index=0, model="A100", memory_mib=10000),))])
    ledger.allocate(Lease(lease_id="a", owner="t", token="t", allocation=Allocation(
        node="n", slices=((DeviceGrant(uuid="g", memory_mib=2000, cores=80),),))))
    policy = FgdDevicePolicy(TargetWorkload([SliceRequest(memory_percent=30, cores=30)], learn=False))
    frag = policy.fragment(Scheduler(ledger).view, np.array([0]))[0]
    assert frag == pytest.approx(200)  # idle share = min(0.8, 0.2) = 200 milli, all of it a fragment


def test_online_learning_changes_the_choice() -> None:
    """After observing 40 % slices, FGD avoids leaving a hole too small for them."""
    nodes = [Node(name=n, devices=(Device(uuid=f"{n}-g", index=0, model="T4", memory_mib=1000),)) for n in "ab"]
    ledger = Ledger(nodes)
    ledger.allocate(Lease(lease_id="x", owner="t", token="t", allocation=Allocation(
        node="a", slices=((DeviceGrant(uuid="a-g", memory_mib=500, cores=50),),))))
    scheduler = Scheduler(ledger, device_policy=DevicePolicyName.FGD)
    for _ in range(300):
        scheduler.observe(milli_request(400))
    # A 40 % slice on "a" (500 milli left) leaves 100 milli, a fragment for 40 % slices: F rises by
    # 100. On the idle "b" it leaves 600, still usable: F stays 0. FGD picks "b" (binpack would pick "a").
    alloc = scheduler.place(milli_request(400))
    assert alloc.node == "b"


# --- fgd-plus: the CPU-aware fragment -----------------------------------------------------------

from hami_ray.core.policies.fgd_plus import FgdPlusDevicePolicy, cpu_aware_fragment, fgd_fragment  # noqa: E402


def brute_cpu_aware(left: list[int], cpu_left: int, classes: list[tuple[int, int, int, float]]) -> float:
    """sum_m p_m (idle - the I_m x count_m largest usable shares), I_m = min(cpu // cpu_m, usable // count_m)."""
    idle = sum(left)
    total = 0.0
    for count, milli, cpu, p in classes:
        if count == 0:
            total += p * idle
            continue
        usable = sorted((v for v in left if v >= milli), reverse=True)
        pods = min(cpu_left // cpu if cpu else 10**9, len(usable) // count)
        total += p * (idle - sum(usable[: pods * count]))
    return total


@pytest.mark.parametrize("seed", range(8))
def test_cpu_aware_fragment_matches_its_definition(seed: int) -> None:
    rng = random.Random(100 + seed)
    ledger, lefts = random_cluster(rng)
    shapes = [(1, rng.choice(MILLIS[:-1]), rng.choice([0, 2000, 9000, 30000])) for _ in range(4)]
    shapes += [(1, 1000, 12000), (2, 1000, 8000), (0, 0, 6000)]
    trace = [milli_request(m, c, cpu) for c, m, cpu in shapes for _ in range(rng.randint(1, 5))]
    policy = FgdPlusDevicePolicy(TargetWorkload(trace, learn=False))
    classes = [(c.count, c.cores * 10, c.cpu_milli, c.p) for c in policy.workload.classes]
    view = Scheduler(ledger).view
    rows = np.array([ledger.index.rows[f"n{i}"] for i in range(6)])
    k = policy._class_arrays(view, rows)
    assert k is not None
    from hami_ray.core.policies.fgd import _RowState

    st = _RowState.of(view, rows)
    usable = policy._usable(k, st.free_slot, st.mem_left, st.core_left, st.untouched)
    got = cpu_aware_fragment(k, st.share0, usable, st.cpu)
    same_as_fgd = fgd_fragment(k, st.share0, usable, st.cpu)
    for i in range(6):
        cpu_left = int(ledger.index.cpu_cap[rows[i]] - ledger.index.cpu_used[rows[i]])
        assert got[i] == pytest.approx(brute_cpu_aware(lefts[i], cpu_left, classes), abs=1e-6)
        assert same_as_fgd[i] == pytest.approx(paper_fragment(lefts[i], cpu_left, classes), abs=1e-6)


def test_cpu_aware_fragment_equals_fgd_when_cpu_is_ample() -> None:
    """One device per pod and CPU for all: the measures agree (the CPU-aware one only adds stranding)."""
    ledger, lefts = random_cluster(random.Random(5))
    trace = [milli_request(m) for m in (200, 470, 810, 470)]
    policy = FgdPlusDevicePolicy(TargetWorkload(trace, learn=False))
    view = Scheduler(ledger).view
    rows = np.arange(6)
    k = policy._class_arrays(view, rows)
    assert k is not None
    from hami_ray.core.policies.fgd import _RowState

    st = _RowState.of(view, rows)
    usable = policy._usable(k, st.free_slot, st.mem_left, st.core_left, st.untouched)
    cpu = np.full(6, np.inf)
    assert np.allclose(cpu_aware_fragment(k, st.share0, usable, cpu), fgd_fragment(k, st.share0, usable, cpu))


def test_fgd_plus_sees_gpus_stranded_by_cpu() -> None:
    """Two idle 4-GPU nodes; b has CPU for four 10-core pods of the target class, a for two.

    A 500-milli, 5-core slice leaves, on either node, 500 milli FGD counts as fragment: FGD ties
    (score 37 both) and the node order picks b. The CPU-aware measure sees that a's last two GPUs were
    stranded by CPU anyway: on a its F drops from 2000 to 1500 (score 62), on b it rises from 0 to 500
    (score 37), so fgd-plus picks a and keeps b whole for the pods that need its CPU.
    """
    nodes = [Node(name=n, cpu_milli=cpu, devices=tuple(
        Device(uuid=f"{n}-{j}", index=j, model="T4", memory_mib=1000, split_count=100) for j in range(4)))
        for n, cpu in (("b", 45000), ("a", 25000))]
    expected = {DevicePolicyName.FGD: "b", DevicePolicyName.FGD_PLUS: "a"}
    for name, node in expected.items():
        scheduler = Scheduler(Ledger(nodes), device_policy=name)
        scheduler.device_policy_for(name).seed([milli_request(1000, 1, 10000)])  # type: ignore[attr-defined]
        assert scheduler.place(milli_request(500, 1, 5000)).node == node, name


def test_fgd_plus_cpu_levels_are_coarse() -> None:
    """The CPU-aware gradient only counts in six levels: near-equal choices tie (the node order then
    consolidates); a gradient that is not finite adds nothing."""
    grads = np.array([-np.inf, -2000.0, -1000.0, -1.0, 0.0, 800.0, 5000.0])
    assert FgdPlusDevicePolicy._level(grads).tolist() == [0, 0, 1, 2, 3, 4, 5]
    assert FgdPlusDevicePolicy._level(np.array([10.0]))[0] == FgdPlusDevicePolicy._level(np.array([600.0]))[0]
