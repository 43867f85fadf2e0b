"""What a dead or blackholed fast path costs a lease, on a real multi-host cluster (issue 13).

Two hosts made of network and PID namespaces on this machine (``tests/multihost/hosts.py``; root needed):
h1 runs ``ray start --head`` with a simulated T4, h0 the driver (a Ray node with no CPUs). The driver times
``--leases`` ``hami_ray.lease()`` round trips with the placement actor's fast path reachable, then the bench
drops every packet to that port with nftables inside h0's namespace and the driver times as many again
(the first pays the connect timeout, the rest go straight to Ray calls).

    python bench/multihost_fastpath.py --json docs/multihost_fastpath.json [--leases 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_io import report  # noqa: E402
from tests.multihost.conftest import DRIVER, DriverRun  # noqa: E402
from tests.multihost.hosts import Hosts, refusal  # noqa: E402


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"p50_s": round(statistics.median(ordered), 4), "max_s": round(ordered[-1], 4),
            "first_s": round(times[0], 4), "rest_max_s": round(max(times[1:]), 4) if len(times) > 1 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--leases", type=int, default=20)
    args = parser.parse_args()
    why = refusal()
    if why is not None:
        sys.exit(f"this machine refuses separate hosts: {why}")
    work = Path(tempfile.mkdtemp(prefix="hami-multihost-bench-"))
    with Hosts(work) as hosts:
        h0, h1 = hosts.add("h0"), hosts.add("h1")
        h1.start_ray(None, num_cpus=2, env={"HAMI_RAY_NODE_SIMULATE": "2xT4-16GB"})
        h0.start_ray(h1, num_cpus=0)
        setup = DriverRun(h0.run([sys.executable, str(DRIVER), f"{h1.ip}:6379", h0.ip, "setup", str(work / "state"),
                                  "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        setup.line()
        setup.finish()
        go = work / "go"
        run = DriverRun(h0.run([sys.executable, str(DRIVER), f"{h1.ip}:6379", h0.ip, "blackhole", str(go),
                                str(args.leases)], stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        try:
            host, port = run.line()["fastpath"]  # type: ignore[misc]
            nft = ["ip", "netns", "exec", h0.netns, "nft"]
            subprocess.run(nft + ["add", "table", "inet", "hrbench"], check=True)
            subprocess.run(nft + ["add", "chain", "inet", "hrbench", "out",
                                  "{ type filter hook output priority 0; }"], check=True)
            subprocess.run(nft + ["add", "rule", "inet", "hrbench", "out", "ip", "daddr", str(host), "tcp", "dport",
                                  str(port), "drop"], check=True)
            go.write_text("go")
            got: dict[str, Any] = run.line()
        finally:
            run.stop()
    result = {"bench": "multihost_fastpath", "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "leases": args.leases,
              "hosts": 2, "reachable": _summary(got["baseline_s"]), "blackholed": _summary(got["lease_s"]),
              "breaker": got["breaker"], "reachable_s": got["baseline_s"], "blackholed_s": got["lease_s"]}
    report(result, args.json)


if __name__ == "__main__":
    main()
