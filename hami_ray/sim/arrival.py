"""The arrival simulator: replays a trace on a cluster with one policy, the FGD artifact's protocol.

Protocol (``reference/fgd.md`` 4.2 and the artifact's ``core.go``): typical shapes from the original
trace; shuffle; resample pods with replacement and append them until the requested GPU reaches 130 %
of capacity; pods arrive one by one and never leave; a pod that does not fit fails (no queue); after
every pod record arrived and allocated GPU. The curve value at X % arrived is the mean allocation over
the events whose arrived share rounds to X (``merge_alloc_discrete.py``), unallocated = 100 - value.

It drives the production :class:`Scheduler` and :class:`Ledger` unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hami_ray.core.errors import Unschedulable
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import Lease, Node
from hami_ray.core.names import DevicePolicyName
from hami_ray.core.scheduler import DEFAULT_DEVICE_POLICY, Scheduler, TieBreak
from hami_ray.sim.trace import TracePod

TUNE_RATIO = 1.3
CURVE_POINTS = tuple(range(0, 131))
REPORT_POINTS = ("90", "100", "110", "130")


@dataclass
class RunResult:
    policy: str
    seed: int
    arrived_pct: list[float] = field(default_factory=list)
    alloc_pct: list[float] = field(default_factory=list)
    pods: int = 0
    failed: int = 0
    runtime_s: float = 0.0

    def curve(self) -> dict[int, float]:
        """Unallocated % at each integer arrived % (artifact's discrete merge)."""
        arrived = np.round(np.asarray(self.arrived_pct))
        alloc = np.round(np.asarray(self.alloc_pct), 2)
        out: dict[int, float] = {}
        for x in CURVE_POINTS:
            hit = arrived == x
            if not hit.any():
                hit = (arrived >= x - 1) & (arrived <= x + 1)
            if hit.any():
                out[x] = round(100.0 - float(alloc[hit].mean()), 4)
        return out


def prepare_workload(pods: Sequence[TracePod], capacity_milli: int, seed: int,
                     ratio: float = TUNE_RATIO) -> list[TracePod]:
    """Shuffle the trace, then append resampled pods until requests reach ``ratio`` of capacity."""
    rng = np.random.default_rng(seed)
    order = list(pods)
    perm = rng.permutation(len(order))
    workload = [order[i] for i in perm]
    total = sum(p.total_milli for p in pods)
    target = ratio * capacity_milli
    if total > target:  # tune down: drop random pods
        while total > target and workload:
            victim = workload.pop(int(rng.integers(len(workload))))
            total -= victim.total_milli
        return workload
    while True:
        pod = order[int(rng.integers(len(order)))]
        if total + pod.gpu_milli > target:  # the artifact compares the per-GPU milli here
            break
        total += pod.total_milli
        workload.append(pod)
    return workload


def run(nodes: Sequence[Node], pods: Sequence[TracePod], policy: DevicePolicyName | str, seed: int,
        *, ratio: float = TUNE_RATIO) -> RunResult:
    """One replay of ``pods`` on ``nodes`` under ``policy`` (``default`` = the engine's default)."""
    name = DEFAULT_DEVICE_POLICY if policy == "default" else DevicePolicyName(policy)
    started = time.perf_counter()
    ledger = Ledger(nodes)
    scheduler = Scheduler(ledger, device_policy=name, seed=seed, tie_break=TieBreak.RANDOM)
    dp = scheduler.device_policy_for(name)
    seed_fn = getattr(dp, "seed", None)
    if seed_fn is not None:  # FGD learns its target workload from the whole trace, as the artifact
        seed_fn([p.request for p in pods])
        dp.workload.learn = False  # type: ignore[attr-defined]
    capacity = sum(len(n.devices) for n in nodes) * 1000
    workload = prepare_workload(pods, capacity, seed, ratio)
    result = RunResult(policy=str(policy), seed=seed)
    arrived = used = 0
    for i, pod in enumerate(workload):
        arrived += pod.total_milli
        try:
            alloc = scheduler.place(pod.request)
        except Unschedulable:
            result.failed += 1
        else:
            ledger.allocate(Lease(lease_id=str(i), owner=pod.name, allocation=alloc, token=""))
            used += pod.total_milli
        result.arrived_pct.append(100.0 * arrived / capacity)
        result.alloc_pct.append(100.0 * used / capacity)
    result.pods = len(workload)
    result.runtime_s = time.perf_counter() - started
    return result
