"""The node under test: one :class:`NvidiaBackend` per session, the GPU the suite slices, which isolation
grades it offers there (and why not the others), and the environment of a slice at a chosen grade.

The environment comes from :func:`node_actors.isolation.build_env`, exactly as the node actor hands it to a
worker. To test a grade weaker than the one the backend chose for the GPU (``hami-core`` or ``watchdog`` on
a GPU graded ``mps``), the slice is built against a copy of the GPU's :class:`GpuInfo` carrying that grade,
without the MPS daemon's variables. Used by ``conftest.py`` (the ``node`` fixture) and the tests.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hami_ray.core.grades import Isolation
from node_actors.backends.nvidia import COMPUTE_MODES, GpuInfo, NvidiaBackend
from node_actors.isolation import SLICE_ENV, IsolationConfig, build_env, region_key
from node_actors.pids import in_host_pidns

# The grades a slice on a whole GPU can hold, strongest first (MIG instances are handed out whole).
SLICE_GRADES: tuple[Isolation, ...] = (Isolation.MPS, Isolation.HAMI_CORE, Isolation.WATCHDOG)
COMPUTE_PROHIBITED = 2
EXCLUSIVE_MODES = (1, 3)  # EXCLUSIVE_THREAD, EXCLUSIVE_PROCESS: one process (or the MPS server) at a time


@dataclass(frozen=True, slots=True)
class Grant:
    """One device of a slice, as :func:`build_env` reads a grant (``DeviceGrant`` without pydantic)."""

    uuid: str
    memory_mib: int
    cores: int


@dataclass
class NodeUnderTest:
    """The session's backend and the whole GPU the suite slices (the first one NVML lists)."""

    backend: NvidiaBackend
    config: IsolationConfig
    gpus: list[GpuInfo]
    gpu: GpuInfo | None = field(init=False)

    def __post_init__(self) -> None:
        self.gpu = next((g for g in self.gpus if not g.mig), None)

    def unusable(self) -> str | None:
        """Why no slice can run here at all, or None."""
        if self.gpu is None:
            return "every GPU is in MIG mode (MIG instances are handed out whole; nothing to slice)"
        if self.gpu.compute_mode == COMPUTE_PROHIBITED:
            return f"GPU {self.gpu.index} is in compute mode PROHIBITED (hami-ray never changes compute modes)"
        return None

    def sharing_refused(self, grade: Isolation) -> str | None:
        """Why two processes cannot share the GPU at ``grade``, or None (an exclusive compute mode lets one
        process in, or the MPS server only)."""
        assert self.gpu is not None
        mode = self.gpu.compute_mode
        if grade is not Isolation.MPS and mode in EXCLUSIVE_MODES:
            return f"compute mode {COMPUTE_MODES[mode]}: two processes cannot share GPU {self.gpu.index}"
        return None

    def grade_reason(self, grade: Isolation) -> str | None:
        """Why slices on the GPU cannot hold ``grade`` here, or None when they can.

        ``mps`` needs the backend to have graded the GPU ``mps`` (its daemon runs); ``hami-core`` needs
        ``libvgpu.so`` at the configured path; ``watchdog`` needs nothing; ``none`` is no slice at all.
        """
        why = self.unusable()
        if why is not None:
            return why
        assert self.gpu is not None
        if grade is Isolation.MPS:
            if self.gpu.isolation is Isolation.MPS and self.backend.mps_env() is not None:
                return None
            return self.gpu.note or f"the backend graded GPU {self.gpu.index} {self.gpu.isolation.value}"
        if grade is Isolation.HAMI_CORE and self.config.libvgpu() is None:
            return f"HAMi-core is not installed (no libvgpu.so at {self.config.libvgpu_path})"
        if grade not in (*SLICE_GRADES, Isolation.NONE):
            return f"no slice on a whole GPU holds grade {grade.value}"
        return None

    def watchdog_reason(self) -> str | None:
        """Why the watchdog cannot attribute memory to this process's children, or None."""
        if in_host_pidns() is False:
            return ("this process runs in a container's PID namespace: NVML reports host pids "
                    "(nvidia-docker #1483), which cannot be mapped to its children from here")
        return None

    def device(self, grade: Isolation) -> GpuInfo:
        """The GPU as the slice's inventory entry at ``grade``: the backend's own for ``mps``, else a copy
        carrying the weaker grade (and no whole-device grade, so ``grade_for`` answers it for any cores)."""
        assert self.gpu is not None
        if grade is Isolation.MPS:
            return self.gpu
        return dataclasses.replace(self.gpu, isolation=grade, whole_isolation=None)

    def env(self, grade: Isolation, memory_mib: int, cores: int, slot: int = 0) -> dict[str, str]:
        """The environment of a one-GPU slice of ``memory_mib`` and ``cores`` at ``grade``.

        ``Isolation.NONE`` is no slice: only ``CUDA_VISIBLE_DEVICES`` (the baseline). ``slot`` tells
        identical slices apart (their HAMi-core accounting regions), as the node agent's slot numbers do.

        Raises:
            AssertionError: ``build_env`` did not give the slice the grade asked for.
        """
        assert self.gpu is not None
        if grade is Isolation.NONE:
            return {"CUDA_VISIBLE_DEVICES": self.gpu.uuid}
        grants: Sequence[Grant] = (Grant(self.gpu.uuid, memory_mib, cores),)
        dev = self.device(grade)
        mps = self.backend.mps_env() if grade is Isolation.MPS else None
        env = build_env(grants, {dev.uuid: dev}, f"{region_key(grants)}-{slot}", self.config, mps)
        got = json.loads(env[SLICE_ENV])["isolation"]
        assert got == grade.value, f"build_env gave the slice grade {got}, not {grade.value}: {env}"
        if grade is Isolation.MPS:
            assert "CUDA_MPS_PIPE_DIRECTORY" in env and "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" in env, env
        if grade is Isolation.HAMI_CORE:
            assert "LD_PRELOAD" in env and "CUDA_DEVICE_MEMORY_SHARED_CACHE" in env, env
        return env

    def summary(self) -> dict[str, Any]:
        """The GPUs as graded, and per grade whether slices can hold it here and why not (for the report)."""
        grades = {}
        for grade in SLICE_GRADES:
            why = self.grade_reason(grade)
            grades[grade.value] = {"available": why is None, "reason": why}
        # watchdog slices run anywhere; only its enforcement needs NVML's pids to be this process's
        grades[Isolation.WATCHDOG.value]["enforcement"] = self.watchdog_reason()
        report = self.backend.isolation_report()
        return {"gpus": [dataclasses.asdict(g) for g in self.gpus], "grades": grades,
                "isolation_report": dataclasses.asdict(report),
                "sliced": None if self.gpu is None else self.gpu.uuid}
