"""d. Overhead of a slice against no slice: bf16 matmul throughput (8192 x 8192, a fixed number of
iterations after warm-up, timed with CUDA events) and the per-batch latency (p50, p99 over 200 batches) of a
small transformer built in code, each in a fresh worker process, first with no slice (only
``CUDA_VISIBLE_DEVICES``), then in a half-GPU slice with no thread cap (cores 0) at each available grade.

Reported as ratios slice / no slice (throughput: higher is better; latency: lower is better). Nothing is
asserted on the ratios: the ``watchdog`` slice runs the same code as no slice and shows the noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hami_ray.core.grades import Isolation
from tests.gpu.harness import record, run_worker, worker_env
from tests.gpu.slices import SLICE_GRADES, NodeUnderTest

pytestmark = pytest.mark.gpu

MATMUL = ["matmul", "--dtype", "bf16", "--size", "8192", "--iters", "1000", "--warmup", "50"]
MODEL = ["model", "--batches", "200", "--warmup", "20"]


def _measure(node: NodeUnderTest, grade: Isolation, logs: Path) -> dict[str, Any]:
    assert node.gpu is not None
    env = worker_env(node.env(grade, node.gpu.memory_mib // 2, cores=0))
    mm = run_worker(MATMUL, env, logs, f"matmul-{grade.value}")
    model = run_worker(MODEL, env, logs, f"model-{grade.value}")
    return {"matmul_tflops": mm["tflops"], "matmul_iters": mm["iters"], "matmul_gpu_s": mm["gpu_s"],
            "model_p50_ms": model["p50_ms"], "model_p99_ms": model["p99_ms"], "model_mean_ms": model["mean_ms"],
            "model_finite": model["finite"], "sm_count": mm["sm_count"],
            "slice_mib": None if grade is Isolation.NONE else node.gpu.memory_mib // 2}


@pytest.fixture(scope="module")
def baseline(sliced: NodeUnderTest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    figures = _measure(sliced, Isolation.NONE, tmp_path_factory.mktemp("baseline"))
    record("d_overhead", Isolation.NONE.value, figures)
    return figures


def test_no_slice_baseline(baseline: dict[str, Any]) -> None:
    assert baseline["matmul_tflops"] > 0 and baseline["model_finite"], baseline


@pytest.mark.parametrize("grade", SLICE_GRADES, ids=lambda g: g.value)
def test_slice_overhead(sliced: NodeUnderTest, baseline: dict[str, Any], grade: Isolation, tmp_path: Path) -> None:
    why = sliced.grade_reason(grade)
    if why is not None:
        pytest.skip(f"no {grade.value} slice here: {why}")
    figures = _measure(sliced, grade, tmp_path)
    figures["ratio_matmul"] = figures["matmul_tflops"] / baseline["matmul_tflops"]
    figures["ratio_p50"] = figures["model_p50_ms"] / baseline["model_p50_ms"]
    figures["ratio_p99"] = figures["model_p99_ms"] / baseline["model_p99_ms"]
    record("d_overhead", grade.value, figures)
    assert figures["matmul_tflops"] > 0 and figures["model_finite"], figures
