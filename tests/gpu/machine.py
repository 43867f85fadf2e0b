"""Is there an NVIDIA GPU here, and what is it: the GPU suite's skip reason and the machine's facts.

Imported by ``tests/gpu/conftest.py`` (every test marked ``gpu`` is skipped with :func:`gpu_absent_reason`)
and by ``bench/gpu_check.py`` (which skips the whole run for the same reason, and puts :func:`nvml_facts`
and :func:`torch_facts` in its report). Standard library plus ``pynvml``, imported lazily: no pydantic,
no Ray, and no PyTorch in this process (``torch_facts`` asks a worker subprocess).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

WORKERS = Path(__file__).with_name("workers.py")
MIB = 1024 * 1024
FACTS_TIMEOUT_S = 120.0  # a cold ``import torch`` plus CUDA initialisation


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml() -> Any:
    """``pynvml`` (package ``nvidia-ml-py``); ImportError when it is missing."""
    return importlib.import_module("pynvml")


def gpu_absent_reason() -> str | None:
    """Why the GPU suite cannot run here, or None when NVML sees at least one NVIDIA GPU.

    Example: ``"no NVIDIA GPU: nvidia-smi not found"`` on a machine without the driver.
    """
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU: nvidia-smi not found"
    try:
        nv = _nvml()
    except ImportError:
        return f"no NVML bindings: pynvml (nvidia-ml-py) is not installed for {sys.executable}"
    try:
        nv.nvmlInit()
    except Exception as exc:  # NVMLError (driver not loaded, no device) or OSError (no libnvidia-ml)
        return f"NVML: {exc}"
    try:
        count = int(nv.nvmlDeviceGetCount())
    except Exception as exc:
        return f"NVML: {exc}"
    finally:
        nv.nvmlShutdown()
    return None if count > 0 else "no NVIDIA GPU: NVML sees no device"


def torch_absent_reason() -> str | None:
    """Why the worker subprocesses cannot run (PyTorch missing for this interpreter), or None."""
    if importlib.util.find_spec("torch") is None:
        return f"PyTorch is not installed for {sys.executable}"
    return None


def cuda_version(value: int) -> str:
    """NVML's CUDA driver version as words: ``13000`` gives ``"13.0"``."""
    return f"{value // 1000}.{value % 1000 // 10}"


def nvml_facts() -> dict[str, Any]:
    """Driver, CUDA driver version and every GPU (name, uuid, MiB, compute mode, MIG) as NVML reports them.

    Returns ``{"error": ...}`` when NVML fails; never raises.
    """
    try:
        nv = _nvml()
        nv.nvmlInit()
    except Exception as exc:
        return {"error": f"NVML: {exc}"}
    try:
        out: dict[str, Any] = {"driver": _text(nv.nvmlSystemGetDriverVersion()),
                               "cuda_driver": cuda_version(int(nv.nvmlSystemGetCudaDriverVersion())), "gpus": []}
        for i in range(int(nv.nvmlDeviceGetCount())):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            gpu: dict[str, Any] = {"index": i, "name": _text(nv.nvmlDeviceGetName(h)),
                                   "uuid": _text(nv.nvmlDeviceGetUUID(h)),
                                   "memory_mib": int(nv.nvmlDeviceGetMemoryInfo(h).total) // MIB}
            for key, fn in (("compute_mode", "nvmlDeviceGetComputeMode"), ("mig_mode", "nvmlDeviceGetMigMode"),
                            ("capability", "nvmlDeviceGetCudaComputeCapability")):
                try:
                    gpu[key] = getattr(nv, fn)(h)
                except Exception:  # NVMLError_NotSupported, or a binding without the function
                    gpu[key] = None
            out["gpus"].append(gpu)
        return out
    except Exception as exc:
        return {"error": f"NVML: {exc}"}
    finally:
        nv.nvmlShutdown()


def torch_facts(timeout_s: float = FACTS_TIMEOUT_S) -> dict[str, Any]:
    """PyTorch's version, its CUDA and what it sees, from ``workers.py facts`` in a subprocess.

    Returns ``{"error": ...}`` when the worker fails or times out; never raises.
    """
    try:
        done = subprocess.run([sys.executable, str(WORKERS), "facts"], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"workers.py facts: {exc}"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            try:
                facts: dict[str, Any] = json.loads(line)
                return facts
            except ValueError:
                break
    return {"error": f"workers.py facts exited {done.returncode}: {done.stderr.strip()[-800:]}"}
