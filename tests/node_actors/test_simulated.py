"""The simulated backend: spec parsing, devices, and usage reported through files."""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from hami_ray.core.errors import InvalidRequest
from node_actors import simulated_usage
from node_actors.backends.base import DeviceBackend
from node_actors.backends.simulated import SimulatedBackend, parse_spec
from tests.node_actors.conftest import PYTHON


@pytest.mark.parametrize(("spec", "expected"), [
    ("A100-80GB", [("A100-80GB", 81920)]),
    ("2xT4-16GB", [("T4-16GB", 16384)] * 2),
    ("4xA100-80GB,2xT4-16GB", [("A100-80GB", 81920)] * 4 + [("T4-16GB", 16384)] * 2),
    (" 1 x H100-SXM-80GB , RTX-4090-24GB ", [("H100-SXM-80GB", 81920), ("RTX-4090-24GB", 24576)]),
])
def test_parse_good_specs(spec: str, expected: list[tuple[str, int]]) -> None:
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", " , ", "4xA100", "A100-80", "0xT4-16GB", "T4-0GB", "2x", "4xA100-80GB;T4-16GB",
                                  "-4xT4-16GB", "4xA100-80TB"])
def test_parse_bad_specs_name_the_variable(spec: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_spec(spec)
    assert info.value.field == "HAMI_RAY_SIMULATE"
    assert "HAMI_RAY_SIMULATE" in str(info.value)


def test_devices_uuids_numa_and_links(tmp_path: Path) -> None:
    backend = SimulatedBackend("2xA100-80GB,2xT4-16GB", "n1", tmp_path)
    assert isinstance(backend, DeviceBackend)
    devs = backend.discover()
    assert [d.uuid for d in devs] == [f"GPU-sim-n1-{i}" for i in range(4)]
    assert [d.index for d in devs] == [0, 1, 2, 3]
    assert [d.numa for d in devs] == [0, 0, 1, 1]
    assert [d.memory_mib for d in devs] == [81920, 81920, 16384, 16384]
    # same model: NVLink 100; otherwise same NUMA 20, cross NUMA 10
    assert devs[0].links == {"GPU-sim-n1-1": 100, "GPU-sim-n1-2": 10, "GPU-sim-n1-3": 10}
    assert devs[2].links["GPU-sim-n1-3"] == 100
    assert SimulatedBackend("2xA100-80GB,2xT4-16GB", "n1", tmp_path).discover() == devs  # stable
    assert backend.health() == dict.fromkeys((d.uuid for d in devs), True)


def test_single_device_is_on_numa_zero(tmp_path: Path) -> None:
    assert [d.numa for d in SimulatedBackend("T4-16GB", "n", tmp_path).discover()] == [0]


def test_set_healthy_shows_in_discover_and_health(tmp_path: Path) -> None:
    backend = SimulatedBackend("2xT4-16GB", "n", tmp_path)
    backend.set_healthy("GPU-sim-n-1", False)
    assert backend.health()["GPU-sim-n-1"] is False
    assert [d.healthy for d in backend.discover()] == [True, False]


def test_usage_sums_live_reports(tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    backend = SimulatedBackend("2xT4-16GB", "n", tmp_path)
    child = spawn("sleep", "30")
    simulated_usage.report(tmp_path, "GPU-sim-n-0", 1000)  # this process
    simulated_usage.report(tmp_path, "GPU-sim-n-0", 500, pid=child.pid)
    simulated_usage.report(tmp_path, "GPU-sim-n-1", 300, pid=child.pid)
    simulated_usage.report(tmp_path, "GPU-unknown", 999, pid=child.pid)  # not ours: ignored
    sample = backend.usage()
    assert sample.device("GPU-sim-n-0") is not None
    assert sample.device("GPU-sim-n-0").used_mib == 1500  # type: ignore[union-attr]
    assert sample.per_process("GPU-sim-n-1") == {child.pid: 300}
    simulated_usage.report(tmp_path, "GPU-sim-n-0", 0, pid=child.pid)  # 0 forgets the device
    simulated_usage.clear(tmp_path)
    assert backend.usage().per_process("GPU-sim-n-0") == {}
    simulated_usage.clear(tmp_path, pid=child.pid, uuid="GPU-sim-n-1")
    assert backend.usage().per_process("GPU-sim-n-1") == {}


def test_usage_ignores_dead_and_malformed_files(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    backend = SimulatedBackend("T4-16GB", "n", tmp_path)
    dead = spawn(PYTHON, "-c", "pass")
    dead.wait(timeout=10)
    live = spawn("sleep", "30")
    folder = tmp_path / "sim-usage"
    folder.mkdir()
    (folder / f"{dead.pid}.json").write_text(json.dumps({"GPU-sim-n-0": 4000}))
    (folder / f"{live.pid}.json").write_text("{not json")
    (folder / "notapid.json").write_text("{}")
    other = spawn("sleep", "30")
    (folder / f"{other.pid}.json").write_text(json.dumps({"GPU-sim-n-0": -5}))
    with caplog.at_level(logging.WARNING):
        sample = backend.usage()
    assert sample.per_process("GPU-sim-n-0") == {}
    assert sample.device("GPU-sim-n-0").used_mib == 0  # type: ignore[union-attr]
    assert not (folder / f"{dead.pid}.json").exists()  # a dead process's report is dropped
    assert "malformed" in caplog.text


def test_report_rejects_negative(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="negative"):
        simulated_usage.report(tmp_path, "GPU-sim-n-0", -1)
