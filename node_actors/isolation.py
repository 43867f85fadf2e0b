"""The isolation environment of a slice: the variables a worker process starts with (DESIGN, Isolation).

Shared by every device backend (:meth:`DeviceBackend.isolation_env` forwards here), so that the
simulated backend hands out exactly the environment the NVIDIA backend does. What is set follows the
slice's **grade** (:mod:`hami_ray.core.grades`), the weakest of its devices' grades for its cores:

1. Visibility by vendor: ``CUDA_VISIBLE_DEVICES``/``NVIDIA_VISIBLE_DEVICES`` by uuid for NVIDIA (a MIG
   instance's ``MIG-...`` uuid included); the vendor's own variable, by index, elsewhere (:data:`VISIBILITY`).
2. HAMi-core's contract (hami.md §2.6 and §3), always on CUDA devices: ``CUDA_DEVICE_MEMORY_LIMIT_<i>=<MiB>m``
   per device in slice order and ``CUDA_DEVICE_SM_LIMIT`` when 0 < cores < 100; at grade ``hami-core`` also
   ``LD_PRELOAD`` of ``libvgpu.so`` with a ``CUDA_DEVICE_MEMORY_SHARED_CACHE`` per slice.
3. At grade ``mps``: the node's MPS daemon (``CUDA_MPS_PIPE_DIRECTORY``/``CUDA_MPS_LOG_DIRECTORY``), the
   per-client ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` and ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``.
4. Framework caps: ``XLA_PYTHON_CLIENT_MEM_FRACTION`` for JAX, and ``HAMI_RAY_SLICE`` (compact JSON of the
   slice and its grade), from which the in-task wrapper caps PyTorch's caching allocator.

Only stable slice facts go in: no lease id, no token. Ray starts workers with a ``runtime_env`` and reuses
them for tasks with an identical one (DESIGN, Ray runtime), so the environment must be a function of
the slice's shape. Pure: no I/O except checking that ``libvgpu.so`` exists. Duck-typed (devices need
``uuid``, ``index``, ``vendor``, ``memory_mib``, ``isolation`` and ``grade_for``; grants ``uuid``,
``memory_mib``, ``cores``) and free of pydantic, so the GPU conformance suite drives it directly.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hami_ray.core.errors import InvalidRequest
from hami_ray.core.grades import Isolation, weakest

FULL_CORES = 100  # a whole device (hami_ray.core.model.FULL_CORES, kept here free of pydantic)
DEFAULT_LIBVGPU_PATH = Path("/usr/local/vgpu/libvgpu.so")  # HAMi's gpuHookPath default + /vgpu
DEFAULT_MPS_CONTROL = "nvidia-cuda-mps-control"
SLICE_ENV = "HAMI_RAY_SLICE"
MPS_KEYS = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")


class GrantLike(Protocol):
    @property
    def uuid(self) -> str: ...
    @property
    def memory_mib(self) -> int: ...
    @property
    def cores(self) -> int: ...


class DeviceLike(Protocol):
    @property
    def uuid(self) -> str: ...
    @property
    def index(self) -> int: ...
    @property
    def vendor(self) -> str: ...
    @property
    def memory_mib(self) -> int: ...
    def grade_for(self, cores: int) -> Isolation: ...


@dataclass(frozen=True, slots=True)
class IsolationConfig:
    """How a node isolates slices (the node settings' isolation section).

    Args:
        state_dir: the node's state directory; HAMi-core caches live in ``<state_dir>/vgpu/``, the MPS
            daemon's pipe and log directories in ``<state_dir>/mps/``.
        libvgpu_path: HAMi-core's library (a setting: ``HAMI_RAY_LIBVGPU``); grade ``hami-core`` only
            where this file exists.
        setting: the strongest grade the node may use on whole GPUs: ``auto`` (the strongest it can
            provide), ``mps``, ``hami-core`` or ``watchdog`` (``HAMI_RAY_ISOLATION``). MIG instances are
            always ``mig``.
        mps_control: the MPS control program (``HAMI_RAY_MPS_CONTROL``).
    """

    state_dir: Path
    libvgpu_path: Path | None = None
    setting: str = "auto"
    mps_control: str = DEFAULT_MPS_CONTROL

    def libvgpu(self) -> Path | None:
        """HAMi-core's library where it is installed, else None."""
        return self.libvgpu_path if self.libvgpu_path is not None and Path(self.libvgpu_path).is_file() else None


@dataclass(frozen=True, slots=True)
class Visibility:
    """How one vendor's runtime is told which devices a process may see."""

    variables: tuple[str, ...]
    by_uuid: bool  # else by index
    cuda: bool  # HAMi-core and MPS apply (NVIDIA's CUDA driver only)


NVIDIA_VISIBILITY = Visibility(("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"), by_uuid=True, cuda=True)
_ROCM = Visibility(("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"), by_uuid=False, cuda=False)

# Keys are upper-case vendor words (hami_ray.core.vendors ``type_word``) or their prefixes.
VISIBILITY: Mapping[str, Visibility] = {
    "NVIDIA": NVIDIA_VISIBILITY,
    "AMD": _ROCM,
    "DCU": _ROCM,  # Hygon DCUs run ROCm (HIP)
    "ASCEND": Visibility(("ASCEND_VISIBLE_DEVICES",), by_uuid=False, cuda=False),
    "MLU": Visibility(("MLU_VISIBLE_DEVICES",), by_uuid=False, cuda=False),
    "CAMBRICON": Visibility(("MLU_VISIBLE_DEVICES",), by_uuid=False, cuda=False),
}


def visibility_for(vendor: str) -> Visibility:
    """The visibility rule of a vendor word; Ascend chip words (``Ascend910B``) match by prefix.

    Raises:
        InvalidRequest: no rule is known for the vendor (sharing it would not isolate anything).
    """
    key = vendor.upper()
    if key in VISIBILITY:
        return VISIBILITY[key]
    for prefix, rule in VISIBILITY.items():
        if key.startswith(prefix):
            return rule
    raise InvalidRequest("vendor", f"no isolation environment is known for {vendor!r}")


def memory_fraction(grants: Sequence[GrantLike], devices: Sequence[DeviceLike]) -> str:
    """The smallest slice/device memory ratio, rounded down to 3 decimals, as JAX reads it.

    JAX applies one fraction to every visible device, so the tightest device decides.
    Example: a 20480 MiB grant on an 81920 MiB device gives ``"0.25"``.
    """
    ratio = min(min(g.memory_mib / d.memory_mib, 1.0) for g, d in zip(grants, devices, strict=True))
    value = max(math.floor(ratio * 1000) / 1000, 0.001)
    return f"{value:.3f}".rstrip("0").rstrip(".")


def region_key(grants: Sequence[GrantLike]) -> str:
    """A digest of the slice's stable facts (uuids, MiB, cores): equal for equal slice shapes.

    The node agent appends a slot number to name the slice's HAMi-core cache (see
    ``NodeAgent.isolation_env``). Example: ``len(region_key(grants)) == 16``.
    """
    facts = [(g.uuid, g.memory_mib, g.cores) for g in grants]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]


def slice_json(grants: Sequence[GrantLike], devices: Sequence[DeviceLike] = (),
               grade: Isolation = Isolation.NONE) -> str:
    """Compact JSON of the slice's stable facts for ``HAMI_RAY_SLICE``: per device uuid, memory MiB,
    cores and the device's physical MiB (``device_mib``, for framework caps), and the slice's grade."""
    rows = []
    for i, g in enumerate(grants):
        row: dict[str, object] = {"uuid": g.uuid, "memory_mib": g.memory_mib, "cores": g.cores}
        if i < len(devices):
            row["device_mib"] = devices[i].memory_mib
        rows.append(row)
    body = {"devices": rows, "isolation": grade.value}
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def slice_grade(grants: Sequence[GrantLike], inventory: Mapping[str, DeviceLike]) -> Isolation:
    """The grade a slice holds: the weakest of its devices' grades for its cores (``none`` when empty).

    Raises:
        InvalidRequest: a grant names an unknown device.
    """
    out = []
    for g in grants:
        if g.uuid not in inventory:
            raise InvalidRequest("devices", f"device {g.uuid} is not on this node")
        out.append(inventory[g.uuid].grade_for(g.cores))
    return weakest(out)


def build_env(grants: Sequence[GrantLike], inventory: Mapping[str, DeviceLike], region: str,
              config: IsolationConfig, mps_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that confines a process to ``grants``.

    Args:
        grants: the slice's devices, in slice order (device ``i`` in the process is ``grants[i]``).
        inventory: this node's devices by uuid, with their grades.
        region: stem of the HAMi-core shared cache file (stable per slice shape, no lease id).
        config: the node's isolation settings.
        mps_env: the running MPS daemon's client variables (pipe and log directories); None when no
            daemon runs, in which case a device graded ``mps`` is treated as its whole-device grade.

    Returns:
        Variables to put in the worker's ``runtime_env``. An empty slice hides every CUDA device.

    Raises:
        InvalidRequest: a grant names an unknown device, or the slice mixes vendors.

    Example:
        ``build_env([DeviceGrant(uuid="GPU-a", memory_mib=8192, cores=30)], inv, "ab12-0", cfg, mps)`` on
        an MPS-graded device has ``CUDA_VISIBLE_DEVICES="GPU-a"``, ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT="0=8192M"``,
        ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE="30"`` and ``CUDA_DEVICE_MEMORY_LIMIT_0="8192m"``.
    """
    if not grants:
        return {"CUDA_VISIBLE_DEVICES": ""}  # Ray >= 2.4x no longer hides GPUs from num_gpus=0 tasks
    devices = []
    for g in grants:
        if g.uuid not in inventory:
            raise InvalidRequest("devices", f"device {g.uuid} is not on this node")
        devices.append(inventory[g.uuid])
    vendors = {d.vendor.upper() for d in devices}
    if len(vendors) != 1:
        raise InvalidRequest("devices", f"a slice must hold devices of one vendor, got {sorted(vendors)}")
    rule = visibility_for(devices[0].vendor)
    ids = ",".join(d.uuid if rule.by_uuid else str(d.index) for d in devices)
    env = {name: ids for name in rule.variables}
    cores = grants[0].cores  # HAMi-core takes one SM limit; HAMi's Allocate uses device 0's cores
    grade = slice_grade(grants, inventory)
    if grade is Isolation.MPS and mps_env is None:  # the daemon is gone: what the slice holds without it
        grade = weakest(d.grade_for(FULL_CORES) for d in devices)
    if rule.cuda and grade is not Isolation.MIG:  # a MIG instance is partitioned by the GPU itself
        for i, g in enumerate(grants):
            # HAMi-core reads 0 as "no limit": a 0 MiB grant must not unlock the whole device.
            env[f"CUDA_DEVICE_MEMORY_LIMIT_{i}"] = f"{max(g.memory_mib, 1)}m"
        if 0 < cores < FULL_CORES:
            env["CUDA_DEVICE_SM_LIMIT"] = str(cores)
        lib = config.libvgpu()
        if grade is Isolation.HAMI_CORE and lib is not None:
            # the shared cache keys HAMi-core's accounting region; it means nothing without HAMi-core,
            # and leaving it out keeps one runtime_env per slice shape, so Ray reuses workers
            env["CUDA_DEVICE_MEMORY_SHARED_CACHE"] = str(Path(config.state_dir) / "vgpu" / f"{region}.cache")
            env["LD_PRELOAD"] = str(lib)
        if grade is Isolation.MPS and mps_env is not None:
            env.update(mps_env)
            # Ordinals as the client sees them: CUDA_VISIBLE_DEVICES renumbers the slice from 0 (UUID-keyed
            # limits have failed to apply: k8s-device-plugin PR #572). A client can only lower the server's
            # limits, and the daemon sets none, so these are the limits.
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = ",".join(
                f"{i}={max(g.memory_mib, 1)}M" for i, g in enumerate(grants))
            if 0 < cores < FULL_CORES:
                env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(cores)
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = memory_fraction(grants, devices)
    env[SLICE_ENV] = slice_json(grants, devices, grade)
    return env
