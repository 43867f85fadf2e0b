"""A task that uses more device memory than its slice: the node actor stops it and the caller gets
``SliceQuotaExceeded`` naming the slice and the usage seen. On simulated devices the task reports its
usage (what NVML shows on a real GPU); on a real GPU, allocate past the slice with your framework.

    python examples/overrun.py
"""

from __future__ import annotations

import time
from typing import Any

import ray

import hami_ray
from hami_ray.core.errors import SliceQuotaExceeded
from hami_ray.runtime.api import report_simulated_memory


@hami_ray.remote(gpu_memory="2GiB")
def greedy() -> None:
    report_simulated_memory(3072)  # 3 GiB used in a 2 GiB slice
    time.sleep(120)


def main() -> dict[str, Any]:
    try:
        ray.get(greedy.remote(), timeout=120)
    except SliceQuotaExceeded as exc:
        return {"stopped": True, "lease": exc.lease_id, "device": exc.uuid, "used_mib": exc.used_mib,
                "limit_mib": exc.limit_mib}
    return {"stopped": False}


def summary(r: dict[str, Any]) -> str:
    if not r["stopped"]:
        return "the greedy task was not stopped"
    return (f"a task used {r['used_mib']} MiB in a {r['limit_mib']} MiB slice: the node actor stopped it and the "
            f"caller got SliceQuotaExceeded naming the slice")

if __name__ == "__main__":
    hami_ray.init(agent={"grace_s": 1.0})
    print(main())
