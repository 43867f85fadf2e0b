"""A burst of short half-GPU tasks, more than the cluster holds at once: the rest wait in the placement
actor's queue (no processes), and run as slices free.

    python examples/burst.py
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray

import hami_ray


@hami_ray.remote(gpu_memory="50%", gpu_cores=50)
def step(i: int) -> str:
    time.sleep(0.2)
    info = hami_ray.current_slice()
    assert info is not None
    return info.devices[0].uuid


def main(tasks: int = 40) -> dict[str, Any]:
    deepest = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            deepest[0] = max(deepest[0], hami_ray.queue_depth())
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    devices = ray.get([step.remote(i) for i in range(tasks)])
    done.set()
    watcher.join()
    return {"tasks": tasks, "devices_used": len(set(devices)), "deepest_queue": deepest[0],
            "seconds": round(time.perf_counter() - start, 2)}


if __name__ == "__main__":
    hami_ray.init()
    print(main())
