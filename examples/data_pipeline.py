"""Ray Data on slices: a ``map_batches`` actor pool of six "embedding models", each actor in its own slice
(4 GiB, 10 % of the cores), on a cluster with fewer whole GPUs than actors; the dataset runs to the end.

    python examples/data_pipeline.py      # starts a local Ray with simulated devices if none runs
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import ray

import hami_ray


class Embedder:
    def __init__(self) -> None:
        info = hami_ray.current_slice()  # taken before this runs, on the actor's node, for the actor's life
        assert info is not None
        self.lease, self.device = info.lease_id, info.devices[0].uuid
        self.visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        self.proj = np.random.default_rng(1).standard_normal((1, 4))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        return {"id": batch["id"], "norm": np.linalg.norm(batch["id"][:, None] * self.proj, axis=1),
                "lease": np.array([self.lease] * n), "device": np.array([self.device] * n),
                "visible": np.array([self.visible] * n)}


def main(rows: int = 600, pool: int = 6) -> dict[str, Any]:
    ds = ray.data.range(rows).map_batches(
        hami_ray.sliced(Embedder, gpu_memory="4GiB", gpu_cores=10), compute=ray.data.ActorPoolStrategy(size=pool),
        batch_size=25, num_cpus=0.05)
    out = ds.take_all()
    assert all(r["visible"] == r["device"] for r in out)  # each actor saw its slice's device only
    return {"rows": len(out), "pool": pool, "slices_used": len({r["lease"] for r in out}),
            "devices_used": len({r["device"] for r in out}),
            "whole_gpus": sum(len(n.devices) for n in hami_ray.status().nodes)}


def summary(r: dict[str, Any]) -> str:
    return (f"{r['rows']} rows through a map_batches pool of {r['pool']} actors, each in its own slice, "
            f"on a cluster of {r['whole_gpus']} GPUs; the batches ran in {r['slices_used']} of those slices "
            f"on {r['devices_used']} device(s)")


if __name__ == "__main__":
    hami_ray.init()
    print(summary(main()))
