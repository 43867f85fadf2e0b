"""PyTorch's per-process memory fraction from the slice, without importing torch into tasks that never
use it (issue 12, item 5). A stand-in ``torch`` package on ``sys.path`` records what the wrapper queues
and what runs at CUDA's lazy initialisation; each case runs in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hami_ray.runtime.framework_caps import fractions, limits

FAKE_TORCH = '''
import types
queued = []
calls = []
def _lazy_call(fn):
    queued.append(fn)
def device_count():
    return 1
def mem_get_info(i):
    return (1, 81920 * 1024 * 1024)
def set_per_process_memory_fraction(f, i):
    calls.append((round(f, 4), i))
cuda = types.SimpleNamespace(_lazy_call=_lazy_call, device_count=device_count, mem_get_info=mem_get_info,
                             set_per_process_memory_fraction=set_per_process_memory_fraction, queued=queued, calls=calls)
'''
SLICE = '{"devices":[{"cores":30,"device_mib":81920,"memory_mib":8192,"uuid":"GPU-a"}],"isolation":"mps"}'


def run(tmp_path: Path, body: str) -> None:
    pkg = tmp_path / "torch"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text(FAKE_TORCH)
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr


def test_the_cap_waits_for_the_task_to_import_torch_and_start_cuda(tmp_path: Path) -> None:
    run(tmp_path, f"""
        from hami_ray.runtime import framework_caps
        framework_caps.install({SLICE!r})
        assert "torch" not in sys.modules  # a task that never uses torch never loads it
        import torch
        assert torch.cuda.calls == [] and len(torch.cuda.queued) == 1  # nothing until CUDA starts
        torch.cuda.queued[0]()  # what torch runs at its lazy CUDA initialisation
        assert torch.cuda.calls == [(0.1, 0)], torch.cuda.calls  # 8192 of 81920 MiB
    """)


def test_torch_already_imported_gets_the_cap_queued(tmp_path: Path) -> None:
    run(tmp_path, f"""
        import torch
        from hami_ray.runtime import framework_caps
        framework_caps.install({SLICE!r})
        torch.cuda.queued[0]()
        assert torch.cuda.calls == [(0.1, 0)]
    """)


def test_no_slice_no_hook(tmp_path: Path) -> None:
    run(tmp_path, """
        from hami_ray.runtime import framework_caps
        framework_caps.install(None)
        framework_caps.install('not json')
        import torch
        assert torch.cuda.queued == []
    """)


@pytest.mark.parametrize(("caps", "totals", "want"), [([8192], [81920], [0.1]), ([8192], [8192], [1.0]),
                                                      ([99999], [81920], [1.0]), ([1], [0], [1.0])])
def test_fraction_of_what_cuda_reports(caps: list[int], totals: list[int], want: list[float]) -> None:
    # under HAMi-core CUDA already reports the slice as the total: the cap is 1.0 there
    assert fractions(caps, totals) == want


def test_limits_read_the_slice() -> None:
    assert limits(SLICE) == [8192]
    assert limits(None) == [] and limits("{") == [] and limits('{"devices":[{}]}') == []
