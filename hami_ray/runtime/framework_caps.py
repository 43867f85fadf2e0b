"""PyTorch's per-process memory cap for a slice, set without importing torch into tasks that never use it.

``torch.cuda.set_per_process_memory_fraction(f, device)`` caps PyTorch's caching allocator at ``f`` times
the device's total memory (nvidia-isolation.md §4). It initialises CUDA, so it must not run before the
task itself uses CUDA (a worker that never touches CUDA must stay free to serve another slice). So:

- if ``torch`` is already imported in this process, the cap is queued with ``torch.cuda._lazy_call``: it
  runs when (and if) the task first initialises CUDA, as ``torch.cuda.manual_seed`` does;
- otherwise an import hook waits for ``torch`` to be imported (by the task) and then queues the same.

The fraction is ``slice MiB / total MiB as CUDA reports it``, taken when CUDA initialises: under HAMi-core
the reported total is already the slice, so the cap is 1.0 there. It caps the caching allocator only (not
the CUDA context, NCCL or other libraries) and is cooperative: the grades enforce, this is a first line.
It is a no-op where ``torch.cuda._lazy_call`` does not exist (a PyTorch that removed it).

Called by :func:`hami_ray.runtime.worker.enter_slice` with the slice's ``HAMI_RAY_SLICE``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import logging
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

_pending: list[int] = []  # per visible device, the slice's MiB (the next cap to apply)
_applied = False
_hooked = False
_last: str | None = None  # the slice this process was last asked about (a lane runs many tasks of one slice)


def limits(slice_json: str | None) -> list[int]:
    """Per visible device (slice order), the slice's MiB; empty when there is nothing to cap.

    Example: ``limits('{"devices":[{"uuid":"GPU-a","memory_mib":8192,"cores":30}]}') == [8192]``.
    """
    if not slice_json:
        return []
    try:
        body = json.loads(slice_json)
        return [int(d["memory_mib"]) for d in body.get("devices", ())]
    except (ValueError, TypeError, KeyError, AttributeError):
        return []


def install(slice_json: str | None) -> None:
    """Cap PyTorch's allocator for this slice once CUDA starts in this process (see the module doc)."""
    global _hooked, _last
    if _applied or slice_json == _last:
        return  # CUDA, once initialised, stays bound to one slice (worker.WorkerBound): one cap per process
    _last = slice_json
    caps = limits(slice_json)
    if not caps:
        return
    _pending[:] = caps
    torch = sys.modules.get("torch")
    if torch is not None:
        _queue(torch)
    elif not _hooked:
        sys.meta_path.insert(0, _TorchHook())
        _hooked = True


def fractions(caps: Sequence[int], totals_mib: Sequence[int]) -> list[float]:
    """The fraction per device: slice MiB over the total CUDA reports, at most 1.

    Example: ``fractions([8192], [81920]) == [0.1]``.
    """
    return [min(1.0, cap / total) if total > 0 else 1.0 for cap, total in zip(caps, totals_mib, strict=False)]


def _apply(torch: Any) -> None:
    """Runs inside CUDA's lazy initialisation (torch calls the queued functions there)."""
    global _applied
    if _applied or not _pending:
        return
    count = min(len(_pending), int(torch.cuda.device_count()))
    totals = [int(torch.cuda.mem_get_info(i)[1]) // (1024 * 1024) for i in range(count)]
    for i, f in enumerate(fractions(_pending[:count], totals)):
        torch.cuda.set_per_process_memory_fraction(f, i)
    _applied = True


def _queue(torch: Any) -> None:
    lazy = getattr(getattr(torch, "cuda", None), "_lazy_call", None)
    if lazy is None:
        log.info("torch.cuda._lazy_call is missing: PyTorch's allocator is not capped (the grade still holds)")
        return
    lazy(lambda: _apply(torch))


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        if _pending and not _applied:
            _queue(module)


class _TorchHook(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``torch`` so that the cap is queued right after the task imports it."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if name != "torch":
            return None
        sys.meta_path.remove(self)  # find the real spec (and never again)
        global _hooked
        _hooked = False
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec
