"""Settings of the node side: how a node picks its device backend and how its agent enforces slices.

Plain frozen dataclasses with named defaults, filled by the node actor shell from what
``hami_ray.init()`` passed and the node's environment; nothing here reads ``os.environ``. Called by the node actor shell,
:func:`node_actors.backends.detect_backend` and :class:`node_actors.agent.NodeAgent`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hami_ray.core.errors import InvalidRequest
from hami_ray.core.grades import AUTO, Isolation
from node_actors.isolation import DEFAULT_LIBVGPU_PATH, DEFAULT_MPS_CONTROL

ISOLATION_ENV = "HAMI_RAY_ISOLATION"  # auto | mps | hami-core | watchdog
LIBVGPU_ENV = "HAMI_RAY_LIBVGPU"  # HAMi-core's libvgpu.so (also the device plugin's --libvgpu default)
MPS_CONTROL_ENV = "HAMI_RAY_MPS_CONTROL"  # the MPS control program
ISOLATION_SETTINGS = (AUTO, Isolation.MPS.value, Isolation.HAMI_CORE.value, Isolation.WATCHDOG.value)

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
        isolation: the strongest grade the node may use on whole GPUs (:data:`ISOLATION_SETTINGS`).
        mps_control: the CUDA MPS control program the node runs its daemon with.
    """

    node_name: str
    state_dir: Path
    simulate: str | None = None
    libvgpu_path: Path | None = DEFAULT_LIBVGPU_PATH
    isolation: str = AUTO
    mps_control: str = DEFAULT_MPS_CONTROL


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """The isolation settings of one node, from its environment (``ray start`` with these variables, or
    the manifests in ``deploy/``) overridden by ``hami_ray.init(node={...})``.

    Args:
        isolation: ``auto`` (the strongest grade the node can provide), ``mps``, ``hami-core`` or
            ``watchdog`` (a ceiling: a node never claims a grade it cannot provide, and says why).
        libvgpu_path: HAMi-core's library.
        mps_control: the MPS control program.
    """

    isolation: str = AUTO
    libvgpu_path: Path | None = DEFAULT_LIBVGPU_PATH
    mps_control: str = DEFAULT_MPS_CONTROL

    @classmethod
    def load(cls, environ: Mapping[str, str], overrides: Mapping[str, object] | None = None) -> NodeSettings:
        """Read ``HAMI_RAY_ISOLATION``, ``HAMI_RAY_LIBVGPU`` and ``HAMI_RAY_MPS_CONTROL``, then ``overrides``.

        Raises:
            InvalidRequest: an unknown setting, or an isolation word outside :data:`ISOLATION_SETTINGS`.

        Example: ``NodeSettings.load({"HAMI_RAY_ISOLATION": "hami-core"}).isolation == "hami-core"``.
        """
        values: dict[str, object] = {}
        if environ.get(ISOLATION_ENV, "").strip():
            values["isolation"] = environ[ISOLATION_ENV]
        if environ.get(LIBVGPU_ENV, "").strip():
            values["libvgpu_path"] = environ[LIBVGPU_ENV]
        if environ.get(MPS_CONTROL_ENV, "").strip():
            values["mps_control"] = environ[MPS_CONTROL_ENV]
        for key, value in (overrides or {}).items():
            if key not in ("isolation", "libvgpu_path", "mps_control"):
                raise InvalidRequest(f"node.{key}", "unknown node setting (known: isolation, libvgpu_path, mps_control)")
            values[key] = value
        word = str(values.get("isolation", AUTO)).strip().lower().replace("_", "-")
        if word not in ISOLATION_SETTINGS:
            raise InvalidRequest("isolation", f"unknown node isolation setting {word!r} "
                                              f"(known: {', '.join(ISOLATION_SETTINGS)})")
        lib = values.get("libvgpu_path", DEFAULT_LIBVGPU_PATH)
        return cls(isolation=word, libvgpu_path=Path(str(lib)) if lib else None,
                   mps_control=str(values.get("mps_control", DEFAULT_MPS_CONTROL)))


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
