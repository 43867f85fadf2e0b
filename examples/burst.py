"""A burst of short half-GPU tasks, more than the cluster holds at once: the rest wait (queued to the
driver's lanes, or in the placement actor's queue; no processes of their own) and run as slices free.

    python examples/burst.py
"""

from __future__ import annotations

import time
from typing import Any

import ray

import hami_ray


@hami_ray.remote(gpu_memory="50%", gpu_cores=50)
def step(i: int) -> tuple[str, float, float]:
    start = time.time()
    time.sleep(0.2)
    info = hami_ray.current_slice()
    assert info is not None
    return info.devices[0].uuid, start, time.time()


def most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = most = 0
    for _, step_ in edges:
        running += step_
        most = max(most, running)
    return most


def main(tasks: int = 40) -> dict[str, Any]:
    submitted = time.time()
    out = ray.get([step.remote(i) for i in range(tasks)])
    spans = [(s, e) for _, s, e in out]
    return {"tasks": tasks, "devices_used": len({u for u, _, _ in out}),
            "waited": sum(1 for s, _ in spans if s >= min(e for _, e in spans)),  # started once another ended
            "most_at_once": most_at_once(spans), "seconds": round(max(e for _, e in spans) - submitted, 2)}


def summary(r: dict[str, Any]) -> str:
    return (f"{r['tasks']} half-GPU tasks, more than the cluster holds at once: {r['most_at_once']} ran at once "
            f"on {r['devices_used']} device(s), {r['waited']} waited for a slice (no process each), all done in "
            f"{r['seconds']} s")

if __name__ == "__main__":
    hami_ray.init()
    print(main())
