"""c. MPS compute share: two clients capped at 25 % and 75 % of the GPU's threads
(``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``, from ``build_env`` with cores 25 and 75) run the same bf16 matmul
loop at the same time, for a fixed time; each one's throughput and their ratio are reported.

Both clients warm up, signal ready, and start their timed loops together on a go file. A thread cap limits
the SMs a client's kernels may use, so on a compute-bound matmul the 75 % client should do about three
times the work of the 25 % one; the test asks for at least 1.5 times.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hami_ray.core.grades import Isolation
from tests.gpu.harness import SETUP_S, STOP_S, Worker, record, wait_for_file, worker_env
from tests.gpu.slices import NodeUnderTest

pytestmark = pytest.mark.gpu

SHARES = (25, 75)
SLICE_MIB = 16384
SECONDS = 10.0
SIZE = 8192
MIN_RATIO = 1.5


def test_mps_thread_percentages_share_compute(sliced: NodeUnderTest, tmp_path: Path) -> None:
    why = sliced.grade_reason(Isolation.MPS)
    if why is not None:
        pytest.skip(f"no MPS here: {why}")
    go = tmp_path / "go"
    figures: dict[str, Any] = {"seconds": SECONDS, "size": SIZE, "dtype": "bf16"}
    record("c_mps_share", "run", figures)
    workers = []
    try:
        for slot, cores in enumerate(SHARES):
            env = sliced.env(Isolation.MPS, SLICE_MIB, cores, slot=slot)
            assert env.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE") == str(cores), env
            cmd = ["matmul", "--dtype", "bf16", "--size", str(SIZE), "--seconds", str(SECONDS),
                   "--ready", str(tmp_path / f"ready-{cores}"), "--go", str(go)]
            workers.append(Worker(cmd, worker_env(env), tmp_path, f"mps-{cores}"))
        for cores, w in zip(SHARES, workers, strict=True):
            wait_for_file(tmp_path / f"ready-{cores}", w)
        go.write_text("go")
        for cores, w in zip(SHARES, workers, strict=True):
            got = w.result(SECONDS + SETUP_S)
            got["returncode"] = w.wait(STOP_S)
            figures[str(cores)] = got
    finally:
        for w in workers:
            w.stop()
    low, high = figures[str(SHARES[0])], figures[str(SHARES[1])]
    figures["ratio"] = high["tflops"] / low["tflops"] if low["tflops"] > 0 else None
    figures["sum_tflops"] = low["tflops"] + high["tflops"]

    assert low["returncode"] == 0 and high["returncode"] == 0, figures
    assert figures["ratio"] is not None and figures["ratio"] >= MIN_RATIO, (
        f"the 75 % client did {figures['ratio']} times the 25 % client's work (expected >= {MIN_RATIO})")
