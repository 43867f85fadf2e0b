"""The in-task slice environment: applied per task, put back between slices, and a process that loaded
CUDA refuses any other slice (no Ray started here)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator

import pytest

from hami_ray.runtime import worker
from hami_ray.runtime.worker import WorkerBound, apply_env

A = {"CUDA_VISIBLE_DEVICES": "GPU-a", "CUDA_DEVICE_MEMORY_LIMIT_0": "1024m", "LD_PRELOAD": "/x/libvgpu.so"}
B = {"CUDA_VISIBLE_DEVICES": "GPU-b", "CUDA_DEVICE_SM_LIMIT": "30"}


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "orig")
    monkeypatch.delenv("CUDA_DEVICE_MEMORY_LIMIT_0", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_SM_LIMIT", raising=False)
    monkeypatch.setattr(worker, "_original", {})
    monkeypatch.setattr(worker, "_bound", None)
    yield


def test_env_is_applied_then_replaced_and_earlier_keys_put_back() -> None:
    ld = os.environ.get("LD_PRELOAD")
    apply_env(A)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-a" and os.environ["CUDA_DEVICE_MEMORY_LIMIT_0"] == "1024m"
    assert os.environ.get("LD_PRELOAD") == ld  # only a new process can take it (runtime_env does)
    apply_env(B)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-b" and os.environ["CUDA_DEVICE_SM_LIMIT"] == "30"
    assert "CUDA_DEVICE_MEMORY_LIMIT_0" not in os.environ  # A's limit does not leak into B
    apply_env({})
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "orig" and "CUDA_DEVICE_SM_LIMIT" not in os.environ


def test_a_process_that_loaded_cuda_is_bound_to_its_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    meta = {"lease_id": "l1", "node": "n", "node_actor": "none", "slices": []}
    apply_env(A)
    monkeypatch.setattr(worker, "_cuda_loaded", lambda: True)
    worker.leave_slice(None, A)  # the task loaded CUDA under A
    apply_env(dict(A))  # the same slice again: fine
    with pytest.raises(WorkerBound, match="GPU-a") as info:
        worker.enter_slice(meta, B)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-a" and worker.current_slice() is None  # untouched
    again = pickle.loads(pickle.dumps(info.value))  # crosses Ray's process boundary intact
    assert isinstance(again, WorkerBound) and again.wanted == "GPU-b"


def test_without_cuda_a_process_serves_any_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "_cuda_loaded", lambda: False)
    apply_env(A)
    worker.leave_slice(None, A)
    apply_env(B)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-b"
