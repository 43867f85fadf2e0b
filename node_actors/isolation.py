"""The isolation environment of a slice: the variables a worker process starts with (DESIGN, Isolation).

Shared by every device backend (:meth:`DeviceBackend.isolation_env` forwards here), so that the
simulated backend hands out exactly the environment the NVIDIA backend does. Layers, strongest last:

1. Visibility by vendor: ``CUDA_VISIBLE_DEVICES``/``NVIDIA_VISIBLE_DEVICES`` by uuid for NVIDIA; the
   vendor's own variable, by index, elsewhere (:data:`VISIBILITY`).
2. HAMi-core (``libvgpu.so``, hami.md §2.6 and §3): ``CUDA_DEVICE_MEMORY_LIMIT_<i>=<MiB>m`` per device in
   slice order, ``CUDA_DEVICE_SM_LIMIT`` when 0 < cores < 100 and, where the library is installed,
   ``LD_PRELOAD`` with its ``CUDA_DEVICE_MEMORY_SHARED_CACHE``.
3. CUDA MPS, when configured: ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` and
   ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``.
4. Framework caps: ``XLA_PYTHON_CLIENT_MEM_FRACTION``, and ``HAMI_RAY_SLICE`` (compact JSON of the
   slice) from which the in-task wrapper sets PyTorch's per-process memory fraction.

Only stable slice facts go in: no lease id, no token. Ray starts workers with a ``runtime_env`` and reuses
them for tasks with an identical one (DESIGN, Ray runtime), so the environment must be a function of
the slice's shape. Pure: no I/O except checking that ``libvgpu.so`` exists.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hami_ray.core.errors import InvalidRequest
from hami_ray.core.model import FULL_CORES, Device, DeviceGrant

DEFAULT_LIBVGPU_PATH = Path("/usr/local/vgpu/libvgpu.so")  # HAMi's gpuHookPath default + /vgpu
SLICE_ENV = "HAMI_RAY_SLICE"


@dataclass(frozen=True, slots=True)
class IsolationConfig:
    """How a node isolates slices.

    Args:
        state_dir: the node's state directory; HAMi-core caches live in ``<state_dir>/vgpu/``.
        libvgpu_path: HAMi-core's library; ``LD_PRELOAD`` is set only when this file exists.
        mps: a CUDA MPS daemon serves this node's devices.
    """

    state_dir: Path
    libvgpu_path: Path | None = None
    mps: bool = False


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


def memory_fraction(grants: Sequence[DeviceGrant], devices: Sequence[Device]) -> str:
    """The smallest slice/device memory ratio, rounded down to 3 decimals, as JAX reads it.

    JAX applies one fraction to every visible device, so the tightest device decides.
    Example: a 20480 MiB grant on an 81920 MiB device gives ``"0.25"``.
    """
    ratio = min(min(g.memory_mib / d.memory_mib, 1.0) for g, d in zip(grants, devices, strict=True))
    value = max(math.floor(ratio * 1000) / 1000, 0.001)
    return f"{value:.3f}".rstrip("0").rstrip(".")


def region_key(grants: Sequence[DeviceGrant]) -> str:
    """A digest of the slice's stable facts (uuids, MiB, cores): equal for equal slice shapes.

    The node agent appends a slot number to name the slice's HAMi-core cache (see
    ``NodeAgent.isolation_env``). Example: ``len(region_key(grants)) == 16``.
    """
    facts = [(g.uuid, g.memory_mib, g.cores) for g in grants]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]


def slice_json(grants: Sequence[DeviceGrant]) -> str:
    """Compact JSON of the slice's stable facts (uuids, memory MiB, cores) for ``HAMI_RAY_SLICE``."""
    body = {"devices": [{"uuid": g.uuid, "memory_mib": g.memory_mib, "cores": g.cores} for g in grants]}
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def build_env(grants: Sequence[DeviceGrant], inventory: Mapping[str, Device], region: str,
              config: IsolationConfig) -> dict[str, str]:
    """The environment that confines a process to ``grants``.

    Args:
        grants: the slice's devices, in slice order (device ``i`` in the process is ``grants[i]``).
        inventory: this node's devices by uuid.
        region: stem of the HAMi-core shared cache file (stable per slice shape, no lease id).
        config: the node's isolation settings.

    Returns:
        Variables to put in the worker's ``runtime_env``. An empty slice hides every CUDA device.

    Raises:
        InvalidRequest: a grant names an unknown device, or the slice mixes vendors.

    Example:
        ``build_env([DeviceGrant(uuid="GPU-a", memory_mib=8192, cores=30)], inv, "ab12-0", cfg)`` has
        ``CUDA_VISIBLE_DEVICES="GPU-a"``, ``CUDA_DEVICE_MEMORY_LIMIT_0="8192m"``,
        ``CUDA_DEVICE_SM_LIMIT="30"``.
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
    if rule.cuda:
        for i, g in enumerate(grants):
            # HAMi-core reads 0 as "no limit": a 0 MiB grant must not unlock the whole device.
            env[f"CUDA_DEVICE_MEMORY_LIMIT_{i}"] = f"{max(g.memory_mib, 1)}m"
        if 0 < cores < FULL_CORES:
            env["CUDA_DEVICE_SM_LIMIT"] = str(cores)
        if config.libvgpu_path is not None and Path(config.libvgpu_path).is_file():
            # the shared cache keys HAMi-core's accounting region; it means nothing without HAMi-core,
            # and leaving it out keeps one runtime_env per slice shape, so Ray reuses workers
            env["CUDA_DEVICE_MEMORY_SHARED_CACHE"] = str(Path(config.state_dir) / "vgpu" / f"{region}.cache")
            env["LD_PRELOAD"] = str(config.libvgpu_path)
        if config.mps:
            # Ordinals as the client sees them: CUDA_VISIBLE_DEVICES renumbers the slice from 0.
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = ",".join(
                f"{i}={max(g.memory_mib, 1)}M" for i, g in enumerate(grants))
            if 0 < cores < FULL_CORES:
                env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(cores)
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = memory_fraction(grants, devices)
    env[SLICE_ENV] = slice_json(grants)
    return env
