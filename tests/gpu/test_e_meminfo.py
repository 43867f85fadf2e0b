"""e. What ``torch.cuda.mem_get_info()`` reports inside a slice, per grade, next to the slice's size.

HAMi-core answers ``cuMemGetInfo`` with the slice (nvidia-isolation.md §5), so its total must be the
slice's; what MPS and the watchdog report is recorded, not asserted (MPS limits allocations, the watchdog
nothing). ``none`` is the same worker with no slice, for reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hami_ray.core.grades import Isolation
from tests.gpu.harness import record, run_worker, worker_env
from tests.gpu.slices import SLICE_GRADES, NodeUnderTest

pytestmark = pytest.mark.gpu

SLICE_MIB = 8192
CLOSE = 0.02  # "reports the slice" / "reports the device": within 2 %


def _reports(total_mib: int, slice_mib: int, device_mib: int) -> str:
    if abs(total_mib - slice_mib) <= CLOSE * slice_mib:
        return "slice"
    if abs(total_mib - device_mib) <= CLOSE * device_mib:
        return "device"
    return "other"


@pytest.mark.parametrize("grade", (Isolation.NONE, *SLICE_GRADES), ids=lambda g: g.value)
def test_mem_get_info_in_a_slice(sliced: NodeUnderTest, grade: Isolation, tmp_path: Path) -> None:
    why = sliced.grade_reason(grade)
    if why is not None:
        pytest.skip(f"no {grade.value} slice here: {why}")
    assert sliced.gpu is not None
    env = sliced.env(grade, SLICE_MIB, cores=0)
    got = run_worker(["meminfo"], worker_env(env), tmp_path, f"meminfo-{grade.value}")
    figures = {"slice_mib": None if grade is Isolation.NONE else SLICE_MIB, "device_mib": sliced.gpu.memory_mib,
               "free_mib": got["free_mib"], "total_mib": got["total_mib"], "device_count": got["device_count"],
               "device": got["device"], "sm_count": got["sm_count"], "torch_uuid": got["uuid"],
               "reports": _reports(got["total_mib"], SLICE_MIB, sliced.gpu.memory_mib)}
    record("e_meminfo", grade.value, figures)

    assert got["device_count"] == 1, got
    if grade is Isolation.HAMI_CORE:
        assert figures["reports"] == "slice", figures
