"""What operators see of the shared local Ray: the status (allocation, usage, owners), the metrics the
placement actor serves, ``hami-ray status --json``, and ``--watch`` redrawing in a real terminal (tmux).
Marked ``ray``."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
import ray
from rich.console import Console
from typer.testing import CliRunner

import hami_ray
from hami_ray.cli import app
from hami_ray.observe.view import render
from hami_ray.runtime import api
from tests.runtime.conftest import RayCluster, live_leases, wait_until

pytestmark = pytest.mark.ray


@hami_ray.remote(gpu_memory="2GiB", gpu_type="T4")
def holder(seconds: float, used_mib: int) -> str:
    api.report_simulated_memory(used_mib)
    time.sleep(seconds)
    return "done"


def test_status_shows_slices_owners_and_usage(hami: RayCluster) -> None:
    ref = holder.remote(6.0, 1500)
    assert wait_until(lambda: any(s.memory_used_mib == 1500 for n in api.status().nodes for d in n.devices
                                  for s in d.slices), timeout=30)
    status = api.status()
    (t4,) = [d for n in status.nodes for d in n.devices if "T4" in d.model]
    (mine,) = [s for s in t4.slices if s.owner == "task:holder"]
    assert (mine.memory_mib, mine.memory_used_mib) == (2048, 1500)
    assert t4.memory_allocated_mib == sum(s.memory_mib for s in t4.slices) and t4.memory_used_mib == 1500
    assert status.summary.leases == len(status.leases) >= 1
    console = Console(file=io.StringIO(), width=80, color_system=None)
    console.print(render(status, width=80))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "task:holder" in out and max(len(line) for line in out.splitlines()) <= 80
    assert ray.get(ref, timeout=60) == "done"
    assert wait_until(lambda: live_leases() == 0)


def test_the_placement_actor_serves_metrics(hami: RayCluster) -> None:
    where = api.metrics_address()
    assert where is not None
    host, port = where
    assert wait_until(lambda: b"hami_gpu_memory_limit_bytes" in _get(host, port), timeout=30)
    body = _get(host, port).decode()
    uuids = {d.uuid for n in api.status().nodes for d in n.devices}
    assert all(f'device_uuid="{u}"' in body for u in uuids)
    assert 'zone="vGPU"' in body and "hami_ray_placement_decision_seconds_bucket" in body


def _get(host: str, port: int) -> bytes:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:  # noqa: S310 - loopback
            return bytes(response.read())
    except OSError:
        return b""


def test_status_json_from_the_command_line(hami: RayCluster) -> None:
    result = CliRunner().invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    names = {n["name"] for n in data["nodes"]}
    assert names == {n.name for n in api.status().nodes}
    device = data["nodes"][0]["devices"][0]
    assert {"uuid", "model", "memory_mib", "memory_allocated_mib", "memory_used_mib", "cores_allocated",
            "slices"} <= set(device)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_watch_redraws_in_a_real_terminal(hami: RayCluster) -> None:
    """``hami-ray status --watch`` in a tmux pane: a capture after tasks start shows their slices, the
    capture before did not."""
    session = f"hami-watch-{os.getpid()}"
    env = f"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_ADDRESS={hami.cluster.address}"
    command = f"{env} {sys.executable} -m hami_ray.cli status --watch --interval 0.5 --address {hami.cluster.address}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "100", "-y", "50", command], check=True)
    try:
        assert wait_until(lambda: "hami-ray" in _capture(session), timeout=60), _capture(session)
        before = _capture(session)
        assert "task:watched" not in before

        @hami_ray.remote(gpu_memory="1GiB", gpu_type="A100")
        def watched() -> None:
            time.sleep(5)

        refs = [watched.remote() for _ in range(2)]
        assert wait_until(lambda: "task:watched" in _capture(session), timeout=30), _capture(session)
        after = _capture(session)
        assert after != before
        ray.get(refs, timeout=60)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    assert wait_until(lambda: live_leases() == 0)


def _capture(session: str) -> str:
    run = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True, check=False)
    return run.stdout

