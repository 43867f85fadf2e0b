"""The target workload of FGD: the typical request shapes and how often each is seen.

As the artifact's ``GetTypicalPods``: shapes sorted by popularity, kept until they cover 95 % of the
requests (device-less ones included), frequencies renormalised over the kept shapes. Learned online
from the requests the scheduler observes, or seeded from a trace. Every change of the kept set bumps
``generation`` so that score caches are dropped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from hami_ray.core.model import SliceRequest

POPULARITY = 0.95
REFRESH_EVERY = 256  # observations between recomputations of the typical set
DRIFT = 0.01  # a frequency change smaller than this keeps the current set (and the score caches)


@dataclass(frozen=True, slots=True)
class ShapeClass:
    """One typical request shape with its frequency ``p``."""

    count: int
    memory_mib: int | None
    memory_percent: float | None
    cores: int
    cpu_milli: int
    include_types: tuple[str, ...]
    p: float

    @property
    def exclusive(self) -> bool:
        return self.cores >= 100


def _key(r: SliceRequest) -> tuple[int, int | None, float | None, int, int, tuple[str, ...]]:
    return (r.count, r.memory_mib, r.memory_percent, r.cores, r.cpu_milli, r.include_types)


def _order(item: tuple[tuple[int, int | None, float | None, int, int, tuple[str, ...]], int]) -> tuple[object, ...]:
    # popularity first; ties by descending (cpu, per-device share, count, types), as the artifact
    (count, mib, pct, cores, cpu, types), n = item
    return (-n, -cpu, -cores, -(pct or 0.0), -(mib or 0), -count, tuple(sorted(types)))


class TargetWorkload:
    """Typical shapes learned from requests; ``classes`` is what FGD measures fragmentation against."""

    def __init__(self, requests: Iterable[SliceRequest] = (), *, popularity: float = POPULARITY,
                 refresh_every: int = REFRESH_EVERY, learn: bool = True) -> None:
        self.popularity = popularity
        self.refresh_every = refresh_every
        self.learn = learn
        self.generation = 0
        self._counts: Counter[tuple[int, int | None, float | None, int, int, tuple[str, ...]]] = Counter()
        self._since = 0
        self.classes: tuple[ShapeClass, ...] = ()
        self.seed(requests)

    def seed(self, requests: Iterable[SliceRequest]) -> None:
        """Count a batch of requests (a trace) and recompute the typical set now."""
        self._counts.update(_key(r) for r in requests)
        self._recompute()

    def observe(self, request: SliceRequest) -> None:
        if not self.learn:
            return
        self._counts[_key(request)] += 1
        self._since += 1
        if self._since >= self.refresh_every or not self.classes:
            self._recompute()

    def _recompute(self) -> None:
        self._since = 0
        total = sum(self._counts.values())
        kept: list[tuple[tuple[int, int | None, float | None, int, int, tuple[str, ...]], int]] = []
        covered = 0
        for item in sorted(self._counts.items(), key=_order):
            if total and covered >= self.popularity * total:
                break
            kept.append(item)
            covered += item[1]
        classes = tuple(
            ShapeClass(count, mib, pct, cores, cpu, types, n / covered)
            for (count, mib, pct, cores, cpu, types), n in kept
        )
        if self._differs(classes):
            self.classes = classes
            self.generation += 1

    def _differs(self, classes: tuple[ShapeClass, ...]) -> bool:
        """A new typical set, or a frequency moved by more than ``DRIFT``: worth dropping caches for."""
        if len(classes) != len(self.classes):
            return True
        for new, old in zip(classes, self.classes):
            if (new.count, new.memory_mib, new.memory_percent, new.cores, new.cpu_milli, new.include_types) != (
                    old.count, old.memory_mib, old.memory_percent, old.cores, old.cpu_milli, old.include_types):
                return True
            if abs(new.p - old.p) > DRIFT:
                return True
        return False
