"""The short form of ``bench/chaos.py``: two minutes, a fixed seed, every fault kind once, on a Ray cluster
and a Kubernetes test cluster of its own (a subprocess: it shares nothing with the suite's clusters)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.k8s]


def test_two_minutes_of_faults_lose_nothing_and_break_no_invariant(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "chaos.py"), "--minutes", "2", "--seed", "11",
                          "--rounds", "1", "--k8s", "--json", str(out), "--logs", str(tmp_path / "logs")],
                         capture_output=True, text=True, timeout=1200, cwd=REPO)
    (tmp_path / "chaos.out").write_text(run.stdout)  # the bench's whole log (and its cluster's, in logs/), kept with --basetemp
    (tmp_path / "chaos.err").write_text(run.stderr)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-5000:]
    result = json.loads(out.read_text())
    log = run.stdout[-4000:] + run.stderr[-6000:]  # what the bench logged: which fault, which probe failed
    assert result["invariant_violations"] == 0, (result["violations"], log)
    assert result["lost"] == 0, (result["lost_detail"], log)
    faults = result["faults"]
    expected = {"kill_placement_actor", "kill_node_actor", "kill_task_process", "kill_lane_worker", "kill_driver",
                "remove_node", "add_node", "blackhole_fast_path", "nvml_error", "process_over_slice",
                "priority_preemption", "state_disk_full", "kill_bridge", "restart_apiserver", "node_not_ready",
                "slow_apiserver"}
    assert expected <= set(faults) and not result["not_injected"], (faults, result["not_injected"])
    assert all(row["recovered"] == row["count"] >= 1 for row in faults.values()), faults
    assert result["done"]["tasks"] > 0 and result["done"]["pods"] > 0 and result["done"]["leases"] > 0
    assert run.returncode == 0, run.stderr[-3000:]
