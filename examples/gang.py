"""A gang: four slices reserved all or none (like a Ray placement group), one rank of a data-parallel job
in each, started together; the gang is given back at the end.

    python examples/gang.py      # starts a local Ray with simulated devices if none runs
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import ray

import hami_ray


@hami_ray.remote
class Rank:
    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def step(self, seed: int) -> dict[str, Any]:
        """One data-parallel step: a gradient from this rank's shard of the batch."""
        info = hami_ray.current_slice()
        assert info is not None
        shard = np.random.default_rng(seed + self.rank).standard_normal(64)
        return {"rank": self.rank, "device": info.devices[0].uuid, "memory_mib": info.memory_mib,
                "grad": float(shard.mean())}


def main(world: int = 4, until: threading.Event | None = None) -> dict[str, Any]:
    """One step per rank (``until``: steps again until the event is set, the gang held all along)."""
    with hami_ray.slice_group([{"gpu_memory": "8GiB", "gpu_cores": 25}] * world, strategy="PACK",
                              name="trainer") as gang:
        ranks = [Rank.options(slice_group=gang, slice_index=i).remote(i, world) for i in range(world)]
        seed = 7
        while True:
            steps = ray.get([r.step.remote(seed) for r in ranks])
            if until is None or until.wait(0.2):
                break
            seed += 1
        for r in ranks:
            ray.kill(r)
        return {"nodes": sorted(set(gang.nodes)), "ranks": [s["rank"] for s in steps],
                "devices": sorted({s["device"] for s in steps}), "mean_grad": round(sum(s["grad"] for s in steps) / world, 4)}


def summary(r: dict[str, Any]) -> str:
    return (f"a gang of {len(r['ranks'])} slices (PACK), reserved all at once on {len(r['nodes'])} node(s) and "
            f"{len(r['devices'])} device(s); one data-parallel step per rank, mean gradient {r['mean_grad']}")

if __name__ == "__main__":
    hami_ray.init()
    print(main())
