"""Many small models on few GPUs with Ray Serve: every replica holds its own slice (a sixth of an A100's
memory, 20 % of its cores), replicas pack onto shared devices by hami-ray's policy, and HTTP requests go
through Serve's own proxy; each answer says which slice served it.

    python examples/serve_models.py      # starts a local Ray with simulated devices if none runs
"""

from __future__ import annotations

import json
import socket
import urllib.request
from typing import Any

import numpy as np
from ray import serve

import hami_ray

APP = "models"


@hami_ray.serve.deployment(gpu_memory="6GiB", gpu_cores=20, num_replicas=4, ray_actor_options={"num_cpus": 0.05})
class TinyModel:
    def __init__(self) -> None:
        info = hami_ray.current_slice()  # already there: the replica took its slice before this runs
        assert info is not None
        self.where = {"lease": info.lease_id, "device": info.devices[0].uuid, "isolation": info.isolation}
        self.weights = np.random.default_rng(0).standard_normal(8)

    async def __call__(self, request: Any) -> dict[str, Any]:
        x = float(request.query_params.get("x", "1"))
        return {"y": round(float(np.tanh(self.weights * x).sum()), 4), **self.where}


def start_serve() -> int:
    """Serve's HTTP proxy on a free port of 127.0.0.1 (on the head node only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    return port


def main(requests: int = 40, keep: bool = False) -> dict[str, Any]:
    port = start_serve()
    serve.run(TinyModel.bind(), name=APP, route_prefix="/models")
    answers = []
    for i in range(requests):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/models?x={i}", timeout=30) as reply:
            answers.append(json.loads(reply.read()))
    replicas = [x for x in hami_ray.status().leases if x.owner.startswith(f"serve:{APP}/")]
    if not keep:
        serve.delete(APP)
    return {"replicas": len(replicas), "devices": len({x.allocation.slices[0][0].uuid for x in replicas}),
            "requests": len(answers), "answered_by": len({a["lease"] for a in answers}),
            "isolation": sorted({a["isolation"] for a in answers}), "port": port}


def summary(r: dict[str, Any]) -> str:
    return (f"{r['replicas']} Serve replicas in their own slices on {r['devices']} shared device(s); "
            f"{r['requests']} HTTP requests through Serve's proxy answered by {r['answered_by']} of them "
            f"(isolation {', '.join(r['isolation'])})")


if __name__ == "__main__":
    hami_ray.init()
    print(summary(main()))
    serve.shutdown()
