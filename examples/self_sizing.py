"""Frameworks that size themselves from the slice: a vLLM-shaped actor (a stand-in: no model download) sets
its ``gpu_memory_utilization`` from ``current_slice().memory_fraction``, the share of the device's total
memory its slice holds, as vLLM reads that setting (nvidia-isolation.md §4). JAX already gets
``XLA_PYTHON_CLIENT_MEM_FRACTION`` from the slice.

    python examples/self_sizing.py      # starts a local Ray with simulated devices if none runs
"""

from __future__ import annotations

import os
from typing import Any

import ray

import hami_ray

HEADROOM = 0.02  # vLLM counts its CUDA context outside its pool: leave a little of the slice


class FakeEngine:
    """What vLLM's engine does with the setting: size its KV cache from a share of *total* device memory."""

    def __init__(self, gpu_memory_utilization: float, total_mib: int) -> None:
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.pool_mib = int(total_mib * gpu_memory_utilization)


@hami_ray.remote(gpu_memory="25%", gpu_cores=30)
class Server:
    def __init__(self) -> None:
        info = hami_ray.current_slice()
        assert info is not None
        self.fraction = info.memory_fraction[0]
        self.utilization = max(0.01, round(self.fraction - HEADROOM, 3))
        total = info.memory_mib / self.fraction if self.fraction else info.memory_mib
        self.engine = FakeEngine(self.utilization, int(total))
        self.slice_mib = info.memory_mib

    def describe(self) -> dict[str, Any]:
        return {"memory_fraction": self.fraction, "gpu_memory_utilization": self.utilization,
                "pool_mib": self.engine.pool_mib, "slice_mib": self.slice_mib,
                "jax": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}


def main(servers: int = 2) -> dict[str, Any]:
    pool = [Server.remote() for _ in range(servers)]
    out = ray.get([s.describe.remote() for s in pool])
    for s in pool:
        ray.kill(s)
    return {"servers": out}


def summary(r: dict[str, Any]) -> str:
    s = r["servers"][0]
    return (f"{len(r['servers'])} vLLM-shaped servers sized themselves from their slices: memory_fraction "
            f"{s['memory_fraction']} -> gpu_memory_utilization {s['gpu_memory_utilization']} "
            f"({s['pool_mib']} MiB pool in a {s['slice_mib']} MiB slice); JAX's fraction {s['jax']}")

if __name__ == "__main__":
    hami_ray.init()
    print(main())
