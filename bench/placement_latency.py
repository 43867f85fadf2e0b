"""Latency of one placement decision on synthetic clusters of 1,000, 10,000 and 100,000 nodes x 8 GPUs,
with or without team queues (issue 14).

Each cluster is filled to about half of its device memory (random placement, so every policy starts from
the same state), then each policy makes DECISIONS decisions; after every decision the lease is recorded
and an older one released, so the cluster stays half full and the policies' caches see real churn.
Percentiles are over steady-state decisions (after ``--warmup`` unmeasured ones); the first decision for a
request shape never seen before fills the joint policies' per-shape score cache and is reported apart
(``first_of_shape_*``).

Without queues (``--queues 0``) only ``Scheduler.place`` is timed. With ``--queues 8`` two parent queues
of four leaves each are defined (equal guarantees of 1/16 of the cluster on memory, cores and devices,
so the guarantees add up to the half the fill holds; ``org-0/team-0`` also has a limit of twice its
guarantee's memory), the fill's slices are spread over the leaves, and ~100 requests wait across the 8
queues (:class:`WaitList`). A decision is then what the runtime does per placement with queues:
``WaitList.heads`` (each line's head in fair-share order, each with its limit's reason), for the first
head its limit does not hold back ``QueueBook.limit_reason``, ``Scheduler.place``, ``QueueBook.over_limit``
on the allocation and ``QueueBook.hold``, plus the ``QueueBook.drop`` of the lease released after it;
each part's p50/p99 is reported as well as the total (``ledger.allocate``/``release`` are not timed, as
without queues). The served entry leaves the wait list and a new random request joins it.

At 100,000 nodes the fill of 1,000 and 10,000 nodes would be about 2.6 million single-device slices
(15,000 a second and 2.6 KiB each on the 2-core development machine: near 3 minutes and 7 GB more), so with
``--bulk-fill-from`` nodes or more (50,000) each node is filled by one lease with a slice on each device,
its memory drawn uniformly (about half the device) and its cores 0-70 %; each slot then holds one slice,
so fewer decisions end ``Unschedulable`` than in the mixed fill. Build and fill times are in
``meta.build_s``. Decisions per size: ``--decisions`` (2,000).

    python bench/placement_latency.py --queues 8 --nodes 1000,10000,100000 --policies binpack,spread,default \\
        --json docs/placement_latency.json

writes ``{POLICY: {"1000": {"p50_ms": x, "p99_ms": y, ...}, ...}, "meta": {...}}``. Targets (issue 14,
with 8 queues): p99 <= 1 ms at 10,000 nodes and <= 5 ms at 100,000 nodes for binpack and the default
(issue 2's, without queues: <= 1 ms at 1,000 and <= 5 ms at 10,000).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict, deque
from pathlib import Path

import numpy as np

from hami_ray.core.errors import Unschedulable
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import Allocation, Device, DeviceGrant, Lease, Node, SliceRequest
from hami_ray.core.names import DevicePolicyName, NodePolicyName
from hami_ray.core.queues import QueueBook, QueueTree
from hami_ray.core.scheduler import DEFAULT_DEVICE_POLICY, DEFAULT_NODE_POLICY, Scheduler
from hami_ray.core.waitlist import WaitList

MODELS = (("NVIDIA A100-SXM4-80GB", 81920), ("NVIDIA H100 80GB HBM3", 81920), ("NVIDIA L4", 23034),
          ("Tesla T4", 15360))
POLICIES = {
    "binpack": (NodePolicyName.BINPACK, DevicePolicyName.BINPACK),
    "spread": (NodePolicyName.SPREAD, DevicePolicyName.SPREAD),
    "fgd": (NodePolicyName.BINPACK, DevicePolicyName.FGD),
    "fgd-plus": (NodePolicyName.BINPACK, DevicePolicyName.FGD_PLUS),
    "default": (DEFAULT_NODE_POLICY, DEFAULT_DEVICE_POLICY),
}
WAITING = 100  # requests waiting across the queues (--queues)
PARTS = ("heads", "limit_reason", "place", "over_limit", "hold", "drop")


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


def fill_half(ledger: Ledger, rng: np.random.Generator, queues: list[str]) -> deque[Lease]:
    """Random first-fit placement of mixed slices until half of all device memory is allocated."""
    idx = ledger.index
    total = int(idx.mem_cap.sum())
    used = int(idx.mem_used.sum())  # kept here: a sum over every device per slice is quadratic
    live: deque[Lease] = deque()
    names = list(ledger.nodes)
    n = 0
    while used < total // 2:
        node = ledger.nodes[names[int(rng.integers(len(names)))]]
        row = idx.rows[node.name]
        col = int(rng.integers(8))
        free = int(idx.mem_cap[row, col] - idx.mem_used[row, col])
        if free < 1024 or idx.excl[row, col] or idx.slot_used[row, col] >= idx.slot_cap[row, col]:
            continue
        mem = int(min(free, rng.choice([1024, 4096, 8192, 20480])))
        cores = int(min(idx.core_cap[row, col] - idx.core_used[row, col], rng.choice([0, 10, 25])))
        grant = DeviceGrant(uuid=node.devices[col].uuid, memory_mib=mem, cores=cores)
        live.append(ledger.allocate(Lease(lease_id=f"fill-{n}", owner="fill", token="t",
                                          allocation=Allocation(node=node.name, slices=((grant,),)),
                                          queue=queues[n % len(queues)])))
        used += mem
        n += 1
    return live


def fill_half_bulk(ledger: Ledger, rng: np.random.Generator, queues: list[str]) -> deque[Lease]:
    """One lease per node, a slice on each device: memory uniform in [0, capacity] GiB, cores 0-70 %."""
    idx = ledger.index
    live: deque[Lease] = deque()
    for n, node in enumerate(ledger.nodes.values()):
        row = idx.rows[node.name]
        gib = rng.integers(0, idx.mem_cap[row, :8] // 1024 + 1)
        cores = rng.integers(0, 15, size=8) * 5
        parts = tuple((DeviceGrant(uuid=d.uuid, memory_mib=int(g) * 1024, cores=int(c)),)
                      for d, g, c in zip(node.devices, gib, cores) if g)
        if parts:
            live.append(ledger.allocate(Lease(lease_id=f"fill-{n}", owner="fill", token="t",
                                              allocation=Allocation(node=node.name, slices=parts),
                                              queue=queues[n % len(queues)])))
    return live


def queue_tree(ledger: Ledger, count: int) -> QueueTree:
    """Two parents of ``count // 2`` leaves, each leaf guaranteed 1/(2 * count) of the cluster."""
    idx = ledger.index
    mask = idx.exists & idx.healthy
    share = 2 * count
    memory, cores, devices = (int(idx.mem_cap[mask].sum()) // share, int(idx.core_cap[mask].sum()) // share,
                              int(mask.sum()) // share)
    entries: list[dict[str, object]] = []
    for p in range(2):
        entries.append({"name": f"org-{p}"})
        for t in range(count // 2):
            entry: dict[str, object] = {"name": f"org-{p}/team-{t}",
                                        "guaranteed": {"memory": memory, "cores": cores, "devices": devices}}
            if p == 0 and t == 0:
                entry["limit"] = {"memory": 2 * memory}
            entries.append(entry)
    return QueueTree.load({"queues": entries})


def percentiles(values: list[float]) -> dict[str, float]:
    ms = np.array(values) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4)}


def measure(nodes: int, policy: str, decisions: int, seed: int, warmup: int, queues: int,
            bulk_from: int) -> tuple[dict[str, object], dict[str, float]]:
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    ledger = Ledger(make_cluster(nodes, rng))
    t1 = time.perf_counter()
    tree = queue_tree(ledger, queues) if queues else QueueTree()
    leaves = [q for q in tree.leaves() if q != "default"] if queues else ["default"]
    live = (fill_half_bulk if nodes >= bulk_from else fill_half)(ledger, rng, leaves)
    book = QueueBook(tree, ledger)
    for lease in live:
        book.hold(lease)
    t2 = time.perf_counter()
    build = {"cluster_s": round(t1 - t0, 1), "fill_s": round(t2 - t1, 1), "fill_leases": len(live),
             "bulk_fill": nodes >= bulk_from}
    node_policy, device_policy = POLICIES[policy]
    scheduler = Scheduler(ledger, node_policy=node_policy, device_policy=device_policy, seed=seed)
    for _ in range(2000):  # the FGD policies learn their target workload from what they see
        scheduler.observe(random_request(rng))
    waitlist = WaitList("queues")
    for k in range(WAITING if queues else 0):
        waitlist.add(f"w{k}", [random_request(rng)], queue=leaves[k % len(leaves)], submitted=float(k))
    steady: list[float] = []
    cold: list[float] = []
    parts: dict[str, list[float]] = defaultdict(list)
    placed: list[bool] = []  # per steady decision: it ended in a placement
    seen: set[tuple[object, ...]] = set()
    failed = held = 0
    for i in range(warmup + decisions):
        spent = dict.fromkeys(PARTS, 0.0)
        alloc = None
        if queues:
            t = time.perf_counter()
            heads = waitlist.heads(book)
            spent["heads"] = time.perf_counter() - t
            pending = next((p for p, why in heads if why is None), None)
            if pending is None:  # every line held back by its limit (does not happen with one limited queue)
                held += 1
                ledger.release(live[0].lease_id)
                book.drop(live.popleft().lease_id)
                continue
            request, queue = pending.requests[0], pending.queue
            waitlist.remove(pending.key)
            waitlist.add(f"w{WAITING + i}", [random_request(rng)], queue=leaves[int(rng.integers(len(leaves)))],
                         submitted=float(WAITING + i))
        else:
            request, queue = random_request(rng), "default"
        first = request.shape() not in seen
        seen.add(request.shape())
        t = time.perf_counter()
        why = book.limit_reason(queue, [request]) if queues else None
        spent["limit_reason"] = time.perf_counter() - t
        if why is None:
            t = time.perf_counter()
            try:
                alloc = scheduler.place(request)
            except Unschedulable:
                failed += 1
            spent["place"] = time.perf_counter() - t
        if alloc is not None and queues:
            t = time.perf_counter()
            if book.over_limit(queue, alloc) is not None:
                held += 1
                alloc = None
            spent["over_limit"] = time.perf_counter() - t
        if alloc is not None:
            lease = ledger.allocate(Lease(lease_id=f"b-{i}", owner="bench", token="t", allocation=alloc,
                                          queue=queue))
            t = time.perf_counter()
            if queues:
                book.hold(lease)
            spent["hold"] = time.perf_counter() - t
            live.append(lease)
        old = live.popleft()
        ledger.release(old.lease_id)
        t = time.perf_counter()
        if queues:
            book.drop(old.lease_id)
        spent["drop"] = time.perf_counter() - t
        elapsed = sum(spent.values())
        if first:
            cold.append(elapsed)
        elif i >= warmup:
            steady.append(elapsed)
            placed.append(alloc is not None)
            for part, value in spent.items():
                parts[part].append(value)
    ledger.check_invariants()
    ms = np.array(steady) * 1000
    cold_ms = np.array(cold) * 1000
    out: dict[str, object] = {
        **percentiles(steady), "max_ms": round(float(ms.max()), 3), "mean_ms": round(float(ms.mean()), 4),
        "decisions": int(ms.size), "unschedulable": failed, "first_of_shape_count": int(cold_ms.size),
        "first_of_shape_p50_ms": round(float(np.percentile(cold_ms, 50)), 3),
        "first_of_shape_max_ms": round(float(cold_ms.max()), 3)}
    if queues:
        out["held_by_limit"] = held
        out["parts"] = {part: percentiles(parts[part]) for part in PARTS}
    ok = [s for s, p in zip(steady, placed, strict=True) if p]
    out["placed_p99_ms"] = percentiles(ok)["p99_ms"] if ok else None  # without the Unschedulable ones
    return out, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--nodes", default="1000,10000")
    parser.add_argument("--policies", default="binpack,spread,default")
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=500, help="unmeasured decisions first (steady state)")
    parser.add_argument("--queues", type=int, default=0, choices=(0, 8), help="define 8 team queues (issue 14)")
    parser.add_argument("--bulk-fill-from", type=int, default=50_000,
                        help="fill clusters of this many nodes or more one lease per node")
    args = parser.parse_args()
    results: dict[str, object] = {}
    build: dict[str, object] = {}
    for policy in args.policies.split(","):
        per: dict[str, object] = {}
        for nodes in (int(n) for n in args.nodes.split(",")):
            per[str(nodes)], build[str(nodes)] = measure(nodes, policy, args.decisions, args.seed, args.warmup,
                                                         args.queues, args.bulk_fill_from)
            print(policy, nodes, per[str(nodes)], build[str(nodes)], flush=True)
        results[policy] = per
    results["meta"] = {"python": platform.python_version(), "machine": platform.machine(),
                       "default_policy": f"{DEFAULT_NODE_POLICY}+{DEFAULT_DEVICE_POLICY}", "queues": args.queues,
                       "waiting": WAITING if args.queues else 0, "decisions": args.decisions,
                       "warmup": args.warmup, "bulk_fill_from": args.bulk_fill_from, "build_s": build}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
