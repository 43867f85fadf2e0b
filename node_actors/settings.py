"""Settings of the node side: how a node picks its device backend and how its agent enforces slices.

Plain frozen dataclasses with named defaults, filled by the node actor shell from what
``hami_ray.init()`` passed and the node's environment; nothing here reads ``os.environ``. Called by the node actor shell,
:func:`node_actors.backends.detect_backend` and :class:`node_actors.agent.NodeAgent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node_actors.isolation import DEFAULT_LIBVGPU_PATH

DEFAULT_TOLERANCE_MIB = 64  # allocator slack: CUDA contexts and fragmentation push a little over
DEFAULT_GRACE_S = 10.0  # a slice may be over its limit this long before its processes are stopped
DEFAULT_REAP_INTERVAL_S = 5.0  # how often dead holders are looked for
DEFAULT_RESERVE_GRACE_S = 600.0  # a reservation waits this long for its worker (runtime_env setup is slow)


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """What :func:`~node_actors.backends.detect_backend` needs.

    Args:
        node_name: this node's name (simulated uuids are derived from it).
        state_dir: the node's state directory (journal, HAMi-core caches, simulated usage).
        simulate: the value of ``HAMI_RAY_SIMULATE`` (e.g. ``"4xA100-80GB"``), or None.
        libvgpu_path: HAMi-core's library; used only where the file exists.
        mps: a CUDA MPS daemon serves this node.
    """

    node_name: str
    state_dir: Path
    simulate: str | None = None
    libvgpu_path: Path | None = DEFAULT_LIBVGPU_PATH
    mps: bool = False


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """Enforcement and reaping knobs of a :class:`~node_actors.agent.NodeAgent`.

    Args:
        tolerance_mib: MiB a slice may exceed its memory before it counts as over.
        grace_s: seconds a slice may stay over before its processes are stopped.
        reap_interval_s: minimum seconds between two reaps in :meth:`NodeAgent.tick`.
        reserve_grace_s: seconds a reservation may wait for its first process before it is freed.
    """

    tolerance_mib: int = DEFAULT_TOLERANCE_MIB
    grace_s: float = DEFAULT_GRACE_S
    reap_interval_s: float = DEFAULT_REAP_INTERVAL_S
    reserve_grace_s: float = DEFAULT_RESERVE_GRACE_S
