"""The GPU suite's marker, skip reasons, session node and results file (issue 12, item 7).

- Marker ``gpu``, registered here so that ``pyproject.toml`` need not list it. Every test carrying it is
  skipped, with the reason, where no NVIDIA GPU answers (``make test`` on a machine without one).
- ``node``: ONE :class:`~node_actors.backends.nvidia.NvidiaBackend` for the session, state in pytest's
  temporary directory. Its first ``gpus()`` chooses the grades and starts the node's MPS daemon where MPS
  is usable; closing it at the end stops the daemon.
- ``HAMI_RAY_GPU_RESULTS``: when set (``bench/gpu_check.py`` sets it), the figures the tests recorded and
  every test's outcome are written there after each test, so a run cut short still leaves its figures.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.gpu.harness import RESULTS, dump_results
from tests.gpu.machine import gpu_absent_reason, torch_absent_reason

if TYPE_CHECKING:
    from tests.gpu.slices import NodeUnderTest

MESSAGE_LINES = 20


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (tests/gpu; `make gpu-check` runs them and "
                                       "writes docs/gpu-verification.md)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not marked:
        return
    reason = gpu_absent_reason()
    if reason is not None:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeUnderTest]:
    # Imported here rather than at the top: should the node side pull in pydantic on a machine without it,
    # each test says so in its own error, and the results file still records every test.
    from node_actors.backends.nvidia import NvidiaBackend  # noqa: PLC0415
    from node_actors.isolation import DEFAULT_LIBVGPU_PATH, DEFAULT_MPS_CONTROL, IsolationConfig  # noqa: PLC0415
    from node_actors.settings import ISOLATION_ENV, LIBVGPU_ENV, MPS_CONTROL_ENV  # noqa: PLC0415
    from tests.gpu.slices import NodeUnderTest  # noqa: PLC0415

    state = tmp_path_factory.mktemp("node")  # short: MPS puts Unix sockets under <state>/mps/pipe
    (state / "vgpu").mkdir()  # HAMi-core creates its cache files, not their directory
    config = IsolationConfig(state_dir=state, libvgpu_path=Path(os.environ.get(LIBVGPU_ENV) or DEFAULT_LIBVGPU_PATH),
                             setting=os.environ.get(ISOLATION_ENV) or "auto",
                             mps_control=os.environ.get(MPS_CONTROL_ENV) or DEFAULT_MPS_CONTROL)
    backend = NvidiaBackend(config)
    try:
        if not backend.available:
            pytest.skip("NVML did not initialise for the backend")
        found = NodeUnderTest(backend, config, backend.gpus())
        RESULTS["node"] = found.summary()
        dump_results()
        yield found
    finally:
        backend.close()  # stops the MPS daemon


@pytest.fixture(scope="session")
def sliced(node: NodeUnderTest) -> NodeUnderTest:
    """The node, for tests that run workers on a slice: skipped where no slice or no PyTorch can run."""
    why = node.unusable() or torch_absent_reason()
    if why is not None:
        pytest.skip(why)
    return node


def _message(report: pytest.TestReport | pytest.CollectReport) -> str:
    """A failure's ``E`` lines (the assertion and its explanation), else the end of its report."""
    text = report.longreprtext
    lines = [line for line in text.splitlines() if line.startswith("E ")]
    picked = lines[:MESSAGE_LINES] if lines else text.splitlines()[-MESSAGE_LINES:]
    return "\n".join(picked)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # "running" until its call passes: a test cut off by the time limit (SIGINT) stays "interrupted"
    entry = RESULTS["tests"].setdefault(report.nodeid, {"outcome": "running", "duration_s": 0.0, "message": None})
    entry["duration_s"] = round(entry["duration_s"] + report.duration, 3)
    if report.failed:
        entry["outcome"] = "failed" if report.when == "call" else "error"
        entry["message"] = _message(report)
    elif report.skipped and entry["outcome"] in ("running", "passed"):
        entry["outcome"] = "skipped"
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        entry["message"] = reason.removeprefix("Skipped: ")
    elif report.when == "call" and entry["outcome"] == "running":
        entry["outcome"] = "passed"
    if report.when == "teardown":
        dump_results()


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        RESULTS["errors"].append({"nodeid": report.nodeid, "message": _message(report)})
        dump_results()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for entry in RESULTS["tests"].values():
        if entry["outcome"] == "running":
            entry["outcome"] = "interrupted"
    RESULTS["exit_status"] = int(exitstatus)
    dump_results()
