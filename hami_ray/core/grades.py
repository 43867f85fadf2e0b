"""Isolation grades: how strongly a slice holds, strongest first ``mig`` > ``mps`` > ``hami-core`` >
``watchdog`` > ``none`` (DESIGN, Isolation).

- ``mig``: a whole MIG instance; memory and SMs are partitioned by the GPU itself.
- ``mps``: CUDA MPS applies the slice's memory limit and thread percentage in the driver and MPS server;
  an allocation past the limit fails with out-of-memory inside the slice.
- ``hami-core``: HAMi-core's ``libvgpu.so`` is preloaded into the slice's processes; it caps allocations
  in-process (cooperative code, not a driver boundary: hami.md §3).
- ``watchdog``: nothing stops an allocation; the node actor samples per-process memory (NVML) and stops a
  slice that stays over its limit (after the grace).
- ``none``: simulated devices; nothing real to isolate.

A device offers one grade to shared slices and may offer a weaker one to a whole-device (100-core) slice:
those do not go through MPS (they share the device with nobody). Requests may demand a floor
(``isolation="mps"``). Pure and free of pydantic, so the GPU conformance suite imports it on machines that
have neither pydantic nor Ray.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from hami_ray.core.errors import InvalidRequest


class Isolation(StrEnum):
    """One isolation grade; compare with :func:`rank` (or :meth:`at_least`), not with ``<`` on strings."""

    NONE = "none"
    WATCHDOG = "watchdog"
    HAMI_CORE = "hami-core"
    MPS = "mps"
    MIG = "mig"

    @property
    def rank(self) -> int:
        """0 (``none``) .. 4 (``mig``)."""
        return ORDER.index(self)

    def at_least(self, floor: Isolation | None) -> bool:
        """Whether this grade meets ``floor`` (None: no floor)."""
        return floor is None or self.rank >= floor.rank


ORDER: tuple[Isolation, ...] = (Isolation.NONE, Isolation.WATCHDOG, Isolation.HAMI_CORE, Isolation.MPS, Isolation.MIG)

AUTO = "auto"  # a node's setting: the strongest grade it can provide


def isolation(value: object, field: str = "isolation") -> Isolation:
    """Parse a grade word (``"mps"``, ``"HAMi-core"``, ``"hami_core"``).

    Raises:
        InvalidRequest: naming ``field``, for anything else.

    Example: ``isolation("MPS") is Isolation.MPS``.
    """
    if isinstance(value, Isolation):
        return value
    if isinstance(value, str):
        word = value.strip().lower().replace("_", "-")
        for grade in ORDER:
            if grade.value == word:
                return grade
    known = ", ".join(g.value for g in reversed(ORDER))
    raise InvalidRequest(field, f"unknown isolation grade {value!r} (known, strongest first: {known})")


def weakest(grades: Iterable[Isolation]) -> Isolation:
    """The grade a slice over several devices holds: its weakest device's (``none`` for no device)."""
    out: Isolation | None = None
    for g in grades:
        if out is None or g.rank < out.rank:
            out = g
    return out if out is not None else Isolation.NONE


def strongest(grades: Iterable[Isolation]) -> Isolation:
    """A node's best grade (``none`` for a node without devices)."""
    out = Isolation.NONE
    for g in grades:
        if g.rank > out.rank:
            out = g
    return out
