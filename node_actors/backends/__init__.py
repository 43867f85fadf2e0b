"""Device backends, and the choice of one for this node.

:func:`detect_backend` prefers real hardware: NVIDIA where NVML loads and sees devices; else the
simulated backend when ``HAMI_RAY_SIMULATE`` holds a spec; else :class:`EmptyBackend`. The simulation
spec is passed in as a value (the settings loader read the environment), never read here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from node_actors.backends.base import DeviceBackend, DeviceSample, ProcessSample, UsageSample
from node_actors.isolation import IsolationConfig

if TYPE_CHECKING:
    from node_actors.backends.empty import EmptyBackend
    from node_actors.backends.nvidia import NvidiaBackend
    from node_actors.backends.simulated import SimulatedBackend
    from node_actors.settings import BackendSettings

# The backends load on first use (PEP 562): `node_actors.backends.nvidia` alone must import without pydantic,
# for the GPU conformance suite on machines that have none (the simulated backend builds pydantic models).
_LAZY = {"EmptyBackend": "node_actors.backends.empty", "NvidiaBackend": "node_actors.backends.nvidia",
         "SimulatedBackend": "node_actors.backends.simulated"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'node_actors.backends' has no attribute {name!r}")

__all__ = [
    "DeviceBackend",
    "DeviceSample",
    "EmptyBackend",
    "NvidiaBackend",
    "ProcessSample",
    "SimulatedBackend",
    "UsageSample",
    "detect_backend",
]


def detect_backend(settings: BackendSettings, nvml: Any | None = None) -> DeviceBackend:
    """The backend for this node.

    Args:
        settings: node name, state directory, the ``HAMI_RAY_SIMULATE`` value and isolation settings.
        nvml: a ``pynvml``-shaped module to use instead of importing ``pynvml`` (tests).

    Returns:
        An :class:`NvidiaBackend` that sees at least one GPU, else a :class:`SimulatedBackend` when
        ``settings.simulate`` is set, else an :class:`EmptyBackend`.

    Raises:
        InvalidRequest: ``settings.simulate`` is set but malformed (naming ``HAMI_RAY_SIMULATE``).
        DeviceError: NVML initialised but failed while listing devices.

    Example: ``detect_backend(BackendSettings("n1", Path("/tmp/s"), simulate="2xT4-16GB"))``.
    """
    from node_actors.backends.empty import EmptyBackend  # noqa: PLC0415
    from node_actors.backends.nvidia import NvidiaBackend  # noqa: PLC0415
    from node_actors.backends.simulated import SimulatedBackend  # noqa: PLC0415

    isolation = IsolationConfig(state_dir=settings.state_dir, libvgpu_path=settings.libvgpu_path,
                                setting=settings.isolation, mps_control=settings.mps_control)
    nvidia = NvidiaBackend(isolation, nvml=nvml)
    try:
        found = nvidia.discover()
    except BaseException:
        nvidia.close()
        raise
    if found:
        return nvidia
    nvidia.close()
    if settings.simulate:
        return SimulatedBackend(settings.simulate, settings.node_name, settings.state_dir, isolation=isolation)
    return EmptyBackend()
