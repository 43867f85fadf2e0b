"""The extender's filter: every candidate node's answer for one pod, over 1,000 nodes x 8 GPUs half full.
Side by side in one run: placing on each node alone (what the filter did first) and ``Scheduler.verdicts``
(one pass over the cluster's columns, the exact fit only where it cannot decide).

    python bench/extender_filter.py --json out/extender_filter.json [--nodes 1000 --pods 200]

Writes per method the p50/p99 milliseconds per pod (all nodes) and checks that both give the same answers.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np

from bench_io import report
from hami_ray.core.errors import InvalidRequest, Unschedulable
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import Device, Lease, LeaseState, Node, SliceRequest
from hami_ray.core.scheduler import Scheduler


def cluster(nodes: int, rng: random.Random) -> Ledger:
    ledger = Ledger([Node(name=f"n{i:04d}", devices=tuple(
        Device(uuid=f"GPU-{i}-{d}", index=d, model="T4", memory_mib=16384) for d in range(8)))
        for i in range(nodes)])
    engine = Scheduler(ledger)
    for k in range(nodes * 8 * 2):  # about half of the memory
        request = SliceRequest(memory_mib=rng.choice([1024, 2048, 4096, 8192]), cores=rng.choice([0, 10, 30]))
        try:
            allocation = engine.place(request)
        except Unschedulable:
            break
        ledger.allocate(Lease(lease_id=f"l{k}", owner="bench", token="t", allocation=allocation,
                              state=LeaseState.ACTIVE))
    return ledger


def alone(engine: Scheduler, pod: list[SliceRequest], names: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            engine.place(pod, nodes=[name])
            out[name] = None
        except Unschedulable as exc:
            out[name] = next(iter(exc.reasons))
        except InvalidRequest as exc:
            out[name] = str(exc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=200)
    args = parser.parse_args()
    rng = random.Random(7)
    ledger = cluster(args.nodes, rng)
    engine = Scheduler(ledger)
    names = sorted(ledger.nodes)
    pods = [[SliceRequest(count=rng.choice([1, 1, 2]), memory_mib=rng.choice([1024, 4096, 12000]),
                          cores=rng.choice([0, 30]))] for _ in range(args.pods)]
    timings: dict[str, list[float]] = {"each_node_alone": [], "verdicts": []}
    same = 0
    for pod in pods:
        t0 = time.perf_counter()
        a = alone(engine, pod, names)
        t1 = time.perf_counter()
        b = engine.verdicts(pod, names)
        t2 = time.perf_counter()
        timings["each_node_alone"].append((t1 - t0) * 1000)
        timings["verdicts"].append((t2 - t1) * 1000)
        same += a == b
    result = {"nodes": args.nodes, "gpus": args.nodes * 8, "pods": args.pods, "same_answers": same}
    for method, ms in timings.items():
        result[method] = {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}
    result["speedup_p50"] = round(result["each_node_alone"]["p50_ms"] / result["verdicts"]["p50_ms"], 1)
    report(result, args.json)


if __name__ == "__main__":
    main()
