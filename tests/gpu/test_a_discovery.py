"""a. NVML discovery (``NvidiaBackend.gpus()``) equals ``nvidia-smi``'s uuid, name and memory per GPU."""

from __future__ import annotations

import csv
import subprocess

import pytest

from tests.gpu.harness import record
from tests.gpu.slices import NodeUnderTest

pytestmark = pytest.mark.gpu

QUERY = ["nvidia-smi", "--query-gpu=uuid,name,memory.total", "--format=csv,noheader,nounits"]


def _mib(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:  # "[N/A]"
        return None


def test_nvml_discovery_matches_nvidia_smi(node: NodeUnderTest) -> None:
    done = subprocess.run(QUERY, capture_output=True, text=True, timeout=60, check=True)
    smi = {row[0]: (row[1], _mib(row[2]))
           for row in csv.reader(done.stdout.splitlines(), skipinitialspace=True) if len(row) >= 3}
    whole = [g for g in node.gpus if not g.mig]
    parents = {g.parent_uuid for g in node.gpus if g.mig}  # nvidia-smi lists a MIG GPU as its parent
    rows = [{"uuid": g.uuid, "index": g.index, "nvml_name": g.name, "smi_name": smi.get(g.uuid, (None, None))[0],
             "nvml_mib": g.memory_mib, "smi_mib": smi.get(g.uuid, (None, None))[1], "grade": g.isolation.value,
             "whole_grade": g.whole_isolation.value if g.whole_isolation else None, "compute_mode": g.compute_mode,
             "capability": list(g.capability) if g.capability else None, "note": g.note} for g in whole]
    for row in rows:
        row["match"] = (row["nvml_name"], row["nvml_mib"]) == (row["smi_name"], row["smi_mib"])
    record("a_discovery", "gpus", rows)
    record("a_discovery", "mig_instances", [{"uuid": g.uuid, "parent": g.parent_uuid, "mib": g.memory_mib}
                                            for g in node.gpus if g.mig])
    record("a_discovery", "smi_only", sorted(set(smi) - {g.uuid for g in whole} - parents))

    assert node.gpus, "NVML initialised but the backend found no GPU"
    assert set(smi) == {g.uuid for g in whole} | parents, (smi, node.gpus)
    for row in rows:
        assert row["match"], row
