"""An inference-style actor pool: four model replicas share the GPUs, each in its own slice (a fifth of a
device's memory, 25 % of its cores), and serve a batch of requests round-robin.

    python examples/shared_inference.py      # starts a local Ray with simulated devices if none runs
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import ray

import hami_ray


@hami_ray.remote(gpu_memory="20%", gpu_cores=25)
class Replica:
    def __init__(self, dim: int) -> None:
        self.weights = np.random.default_rng(0).standard_normal((dim, dim))

    def infer(self, batch: list[float]) -> float:
        return float(np.tanh(np.asarray(batch) @ self.weights[: len(batch)]).sum())

    def slice(self) -> dict[str, Any]:
        info = hami_ray.current_slice()
        assert info is not None
        return {"devices": [d.uuid for d in info.devices], "memory_mib": info.memory_mib, "cores": info.cores,
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def main(replicas: int = 4, requests: int = 32) -> dict[str, Any]:
    pool = [Replica.remote(64) for _ in range(replicas)]
    slices = ray.get([r.slice.remote() for r in pool])
    outs = ray.get([pool[i % replicas].infer.remote([float(i)] * 8) for i in range(requests)])
    for r in pool:
        ray.kill(r)
    return {"replicas": slices, "answers": len(outs)}


def summary(r: dict[str, Any]) -> str:
    devices = {d for x in r["replicas"] for d in x["devices"]}
    first = r["replicas"][0]
    return (f"{len(r['replicas'])} actor replicas in their own slices ({first['memory_mib']} MiB, "
            f"{first['cores']} % cores each) on {len(devices)} device(s) answered {r['answers']} requests")

if __name__ == "__main__":
    hami_ray.init()
    print(main())
