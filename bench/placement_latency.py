"""Latency of one placement decision on synthetic clusters of 1,000 and 10,000 nodes x 8 GPUs.

Each cluster is filled to about half of its device memory with mixed slices (random placement, so
every policy starts from the same state), then each policy makes DECISIONS decisions; after every
decision the lease is recorded and an older one released, so the cluster stays half full and the
policies' caches see real churn. Only ``Scheduler.place`` is timed. Percentiles are over steady-state
decisions (after ``--warmup`` unmeasured ones); the first decision for a request shape never seen
before fills the joint policies' per-shape score cache and is reported apart (``first_of_shape_*``).

    python bench/placement_latency.py --json out/placement_latency.json

writes ``{POLICY: {"1000": {"p50_ms": x, "p99_ms": y, ...}, "10000": {...}}}``. Targets (issue 2):
p99 <= 1 ms at 1,000 nodes and <= 5 ms at 10,000 nodes for binpack, spread and the default.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import deque
from pathlib import Path

import numpy as np

from hami_ray.core.errors import Unschedulable
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import Allocation, Device, DeviceGrant, Lease, Node, SliceRequest
from hami_ray.core.names import DevicePolicyName, NodePolicyName
from hami_ray.core.scheduler import DEFAULT_DEVICE_POLICY, DEFAULT_NODE_POLICY, Scheduler

MODELS = (("NVIDIA A100-SXM4-80GB", 81920), ("NVIDIA H100 80GB HBM3", 81920), ("NVIDIA L4", 23034),
          ("Tesla T4", 15360))
POLICIES = {
    "binpack": (NodePolicyName.BINPACK, DevicePolicyName.BINPACK),
    "spread": (NodePolicyName.SPREAD, DevicePolicyName.SPREAD),
    "fgd": (NodePolicyName.BINPACK, DevicePolicyName.FGD),
    "fgd-plus": (NodePolicyName.BINPACK, DevicePolicyName.FGD_PLUS),
    "default": (DEFAULT_NODE_POLICY, DEFAULT_DEVICE_POLICY),
}


def make_cluster(nodes: int, rng: np.random.Generator) -> list[Node]:
    out = []
    for n in range(nodes):
        model, mem = MODELS[int(rng.integers(len(MODELS)))]
        devices = tuple(Device(uuid=f"GPU-{n:05d}-{i}", index=i, model=model, memory_mib=mem, numa=i // 4)
                        for i in range(8))
        out.append(Node(name=f"node-{n:05d}", devices=devices, cpu_milli=128_000, memory_mib=1_048_576))
    return out


def random_request(rng: np.random.Generator) -> SliceRequest:
    roll = rng.random()
    if roll < 0.05:
        return SliceRequest(count=int(rng.choice([2, 4, 8])), cores=100)
    if roll < 0.15:
        return SliceRequest(count=1, cores=100)
    if roll < 0.45:
        return SliceRequest(memory_percent=float(rng.choice([10, 25, 50])), cores=int(rng.choice([10, 25, 50])))
    return SliceRequest(memory_mib=int(rng.choice([1024, 2048, 4096, 8192, 12288])),
                        cores=int(rng.choice([0, 10, 20, 30])))


def fill_half(ledger: Ledger, rng: np.random.Generator) -> deque[str]:
    """Random first-fit placement of mixed slices until half of all device memory is allocated."""
    idx = ledger.index
    total = int(idx.mem_cap.sum())
    live: deque[str] = deque()
    names = list(ledger.nodes)
    n = 0
    while int(idx.mem_used.sum()) < total // 2:
        node = ledger.nodes[names[int(rng.integers(len(names)))]]
        row = idx.rows[node.name]
        col = int(rng.integers(8))
        free = int(idx.mem_cap[row, col] - idx.mem_used[row, col])
        if free < 1024 or idx.excl[row, col] or idx.slot_used[row, col] >= idx.slot_cap[row, col]:
            continue
        mem = int(min(free, rng.choice([1024, 4096, 8192, 20480])))
        cores = int(min(idx.core_cap[row, col] - idx.core_used[row, col], rng.choice([0, 10, 25])))
        grant = DeviceGrant(uuid=node.devices[col].uuid, memory_mib=mem, cores=cores)
        lease = Lease(lease_id=f"fill-{n}", owner="fill", token="t",
                      allocation=Allocation(node=node.name, slices=((grant,),)))
        ledger.allocate(lease)
        live.append(lease.lease_id)
        n += 1
    return live


def measure(nodes: int, policy: str, decisions: int, seed: int, warmup: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    ledger = Ledger(make_cluster(nodes, rng))
    live = fill_half(ledger, rng)
    node_policy, device_policy = POLICIES[policy]
    scheduler = Scheduler(ledger, node_policy=node_policy, device_policy=device_policy, seed=seed)
    for _ in range(2000):  # the FGD policies learn their target workload from what they see
        scheduler.observe(random_request(rng))
    steady: list[float] = []
    cold: list[float] = []
    seen: set[tuple[object, ...]] = set()
    failed = 0
    for i in range(warmup + decisions):
        request = random_request(rng)
        first = request.shape() not in seen
        seen.add(request.shape())
        t0 = time.perf_counter()
        try:
            alloc = scheduler.place(request)
        except Unschedulable:
            failed += 1
            alloc = None
        elapsed = time.perf_counter() - t0
        if first:
            cold.append(elapsed)
        elif i >= warmup:
            steady.append(elapsed)
        if alloc is not None:
            ledger.allocate(Lease(lease_id=f"b-{i}", owner="bench", token="t", allocation=alloc))
            live.append(f"b-{i}")
        ledger.release(live.popleft())
    ledger.check_invariants()
    ms = np.array(steady) * 1000
    cold_ms = np.array(cold) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
            "max_ms": round(float(ms.max()), 3), "mean_ms": round(float(ms.mean()), 4),
            "decisions": int(ms.size), "unschedulable": failed,
            "first_of_shape_count": int(cold_ms.size),
            "first_of_shape_p50_ms": round(float(np.percentile(cold_ms, 50)), 3),
            "first_of_shape_max_ms": round(float(cold_ms.max()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--nodes", default="1000,10000")
    parser.add_argument("--policies", default="binpack,spread,default")
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=500, help="unmeasured decisions first (steady state)")
    args = parser.parse_args()
    results: dict[str, object] = {}
    for policy in args.policies.split(","):
        per: dict[str, object] = {}
        for nodes in (int(n) for n in args.nodes.split(",")):
            per[str(nodes)] = measure(nodes, policy, args.decisions, args.seed, args.warmup)
            print(policy, nodes, per[str(nodes)], flush=True)
        results[policy] = per
    results["meta"] = {"python": platform.python_version(), "machine": platform.machine(),
                       "default_policy": f"{DEFAULT_NODE_POLICY}+{DEFAULT_DEVICE_POLICY}"}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
