"""Team queues (issue 14): a tree of named queues with guarantees and limits, and the book that counts
what each queue holds and decides admission, the order of waiting work and preemption.

Called by the placement service (admission before placing, the order of its waiting list, a reclaim plan
when waiting work does not fit) and by the Kubernetes bridge (a pod's namespace names its queue). Pure:
callers pass the YAML text, the ledger and the times; nothing here reads a file or a clock.

The semantics follow what KAI scheduler and Kueue document (no code of theirs is used):

- Queues are named by path: ``org/team-a`` is a child of ``org``. A parent must be defined too (a typo in
  a path would otherwise make a silently unbounded queue; KAI also refuses a queue whose parent does not
  exist). An explicit ``parent:`` may name the parent of a flat name instead; it must agree with the path.
- ``default`` always exists (no guarantee, unbounded) unless it is defined; work that names no queue goes
  there. It cannot have children.
- Work is submitted to leaf queues only (as KAI's and Kueue's jobs are); a parent's usage is the sum of its
  subtree's.
- ``guaranteed``: what the queue gets back by reclaiming when it needs it. A resource left out means 0,
  except on a parent, where it means the sum of its children's guarantees (a parent that only caps its
  children, as ``org`` below). Where a parent names it, its children's guarantees must fit in it.
- ``limit``: never exceeded by the queue's subtree. A resource left out means unbounded. A child's limit
  may not be above an ancestor's.
- ``weight`` (> 0): how idle capacity beyond guarantees is shared: at equal borrowed share, a queue of
  weight 2 is served before a queue of weight 1 until it holds twice as much (KAI's over-quota weight).
- ``preemptible: false``: no slice of this queue or of its descendants is ever preempted.
- A queue is *within its guarantee* only when it is within it on every resource (KAI's over-quota test): a
  queue that guarantees memory but not devices borrows when it takes whole devices. Guarantee the three
  resources together (``memory: 160GiB, cores: 200, devices: 2``) for whole-device work.

Resources: ``memory`` in MiB (an int, or a string with a binary unit: ``512MiB``, ``80GiB``, ``1TiB``,
``80Gi``; decimal ``GB``/``G`` are refused as ambiguous); ``cores`` in percent of one device (200: two
devices' worth); ``devices``: whole devices. The YAML format::

    queues:
      - name: org
        limit: {memory: 640GiB, devices: 8}
      - name: org/team-a
        guaranteed: {memory: 160GiB, cores: 200}
        limit: {memory: 320GiB}
        weight: 2
      - name: org/team-b
        guaranteed: {memory: 160GiB}
        preemptible: false
      - name: research            # a flat name with an explicit parent
        parent: org

Every mistake raises :class:`QueueConfigError` naming the queue and the field, and a tree is never changed
after it is built: a caller keeps its old tree when a new definition is refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Literal

import numpy as np
import yaml  # type: ignore[import-untyped]  # PyYAML (via Ray); parses a string, no I/O here
from pydantic import BaseModel, ConfigDict

from hami_ray.core.errors import InvalidRequest, Unschedulable
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import DEFAULT_QUEUE, FULL_CORES, Allocation, Lease, LeaseState, SliceRequest
from hami_ray.core.scheduler import Scheduler

__all__ = [
    "DEFAULT_QUEUE", "MAX_PREEMPTION_NODES", "Preemption", "QueueBook", "QueueConfigError", "QueueSpec",
    "QueueTree", "Quota", "Usage", "allocation_usage", "request_usage",
]

RESOURCES = ("memory", "cores", "devices")  # the YAML keys of a quota, in message order
_FIELD = {"memory": "memory_mib", "cores": "cores", "devices": "devices"}
MAX_PREEMPTION_NODES = 64  # nodes with candidates a preemption plan tries (see QueueBook.plan_preemption)
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
_NAME = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})*$")
_MAX_NAME = 253
# binary units only, in MiB; "" is MiB. Case-insensitive as hami_ray.core.units is ("80gib" is 80 GiB).
_MEMORY_UNITS = {"": 1.0, "ki": 1 / 1024, "kib": 1 / 1024, "mi": 1.0, "mib": 1.0, "gi": 1024.0, "gib": 1024.0,
                 "ti": 1024.0**2, "tib": 1024.0**2}
_ACCEPTED_UNITS = "MiB, GiB, TiB, Mi, Gi, Ti, or a plain number of MiB"
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


class QueueConfigError(InvalidRequest):
    """A queue definition is invalid; ``queue`` and ``field`` say where.

    Example: ``queue org/team-a: guaranteed.memory 320 GiB is over limit.memory 160 GiB``.
    ``queue`` is ``""`` for a mistake outside any one queue (the YAML itself).
    """

    def __init__(self, queue: str, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.queue = queue
        where = f"queue {queue}" if queue else "queues"
        self.args = (f"{where}: {reason if field in reason else f'{field}: {reason}'}",)

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:  # type: ignore[override]
        return (type(self), (self.queue, self.field, self.reason))


def _amount(resource: str, value: int) -> str:
    """``memory`` 327680 -> ``"320 GiB"``; cores and devices as plain numbers."""
    if resource != "memory":
        return str(value)
    return f"{value // 1024} GiB" if value and value % 1024 == 0 else f"{value} MiB"


# --- definitions ---------------------------------------------------------------------------------


class Quota(BaseModel):
    """Memory (MiB), cores (percent of a device) and whole devices; None: not given (see the module)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_mib: int | None = None
    cores: int | None = None
    devices: int | None = None

    def get(self, resource: str) -> int | None:
        value: int | None = getattr(self, _FIELD[resource])
        return value

    def to_dict(self) -> dict[str, int]:
        """The YAML form, given resources only: ``{"memory": 163840, "cores": 200}``."""
        return {r: v for r in RESOURCES if (v := self.get(r)) is not None}

    @classmethod
    def from_dict(cls, data: object, queue: str, field: str) -> Quota:
        """Parse a YAML quota such as ``{memory: 80GiB, cores: 200}``.

        Raises:
            QueueConfigError: not a mapping, an unknown key, a unit that is not binary, a negative number.
        """
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise QueueConfigError(queue, field, f"{field} must be a mapping of {', '.join(RESOURCES)}, "
                                   f"got {data!r}")
        values: dict[str, int] = {}
        for key, value in data.items():
            if key not in RESOURCES:
                raise QueueConfigError(queue, f"{field}.{key}", f"unknown key {field}.{key} "
                                       f"(known: {', '.join(RESOURCES)})")
            where = f"{field}.{key}"
            values[_FIELD[key]] = _parse_memory(value, queue, where) if key == "memory" else \
                _parse_count(value, queue, where)
        return cls(**values)


def _parse_memory(value: object, queue: str, field: str) -> int:
    """``"80GiB"`` -> 81920 MiB, ``4096`` -> 4096; rounds a fraction of a MiB up, as hami_ray.core.units.

    A separate parser from :func:`hami_ray.core.units.parse_memory`: that one takes decimal ``GB`` (a
    request's size is forgiving), a quota must not be ambiguous, and 0 is a valid quota.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise QueueConfigError(queue, field, f"{field} must be a size such as 80GiB or a number of MiB, "
                               f"got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0 or value != int(value):
            raise QueueConfigError(queue, field, f"{field} must be a whole number of MiB >= 0, got {value!r}")
        return int(value)
    if value.strip().startswith("-"):
        raise QueueConfigError(queue, field, f"{field} must be >= 0, got {value!r}")
    match = _QUANTITY.match(value)
    if match is None:
        raise QueueConfigError(queue, field, f"{field}: not a size: {value!r} (use {_ACCEPTED_UNITS})")
    number, unit = float(match.group(1)), match.group(2)
    factor = _MEMORY_UNITS.get(unit.lower())
    if factor is None:
        raise QueueConfigError(queue, field, f"{field}: unknown unit {unit!r} in {value!r}; use {_ACCEPTED_UNITS} "
                               "(decimal GB/MB are refused: say GiB or MiB)")
    return math.ceil(number * factor)


def _parse_count(value: object, queue: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise QueueConfigError(queue, field, f"{field} must be a whole number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise QueueConfigError(queue, field, f"{field} must be a whole number >= 0, got {value!r}")
    return int(value)


_SPEC_KEYS = ("name", "guaranteed", "limit", "weight", "preemptible", "parent")


class QueueSpec(BaseModel):
    """One queue as defined (a value). :class:`QueueTree` validates specs against each other."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    guaranteed: Quota = Quota()
    limit: Quota = Quota()
    weight: float = 1.0
    preemptible: bool = True
    parent: str | None = None

    @classmethod
    def from_dict(cls, data: object, where: str = "") -> QueueSpec:
        """Parse one YAML entry; ``where`` names it in errors until its name is known (``"#3"``).

        Example: ``QueueSpec.from_dict({"name": "a", "limit": {"memory": "80GiB"}}).limit.memory_mib == 81920``.

        Raises:
            QueueConfigError: a missing or non-string name, an unknown key, a bad value.
        """
        if not isinstance(data, Mapping):
            raise QueueConfigError(where, "name", f"a queue must be a mapping with a name, got {data!r}")
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise QueueConfigError(where, "name", f"name must be a non-empty string, got {name!r}")
        for key in data:
            if key not in _SPEC_KEYS:
                raise QueueConfigError(name, str(key), f"unknown key {key!r} (known: {', '.join(_SPEC_KEYS)})")
        weight = data.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise QueueConfigError(name, "weight", f"weight must be a number > 0, got {weight!r}")
        preemptible = data.get("preemptible", True)
        if not isinstance(preemptible, bool):
            raise QueueConfigError(name, "preemptible", f"preemptible must be true or false, got {preemptible!r}")
        parent = data.get("parent")
        if parent is not None and not isinstance(parent, str):
            raise QueueConfigError(name, "parent", f"parent must be a queue name, got {parent!r}")
        return cls(name=name, guaranteed=Quota.from_dict(data.get("guaranteed"), name, "guaranteed"),
                   limit=Quota.from_dict(data.get("limit"), name, "limit"), weight=float(weight),
                   preemptible=preemptible, parent=parent)

    def to_dict(self) -> dict[str, object]:
        """The YAML form, defaults left out; memory in MiB. :meth:`from_dict` reads it back."""
        out: dict[str, object] = {"name": self.name}
        if self.parent is not None:
            out["parent"] = self.parent
        if guaranteed := self.guaranteed.to_dict():
            out["guaranteed"] = guaranteed
        if limit := self.limit.to_dict():
            out["limit"] = limit
        if self.weight != 1.0:
            out["weight"] = self.weight
        if not self.preemptible:
            out["preemptible"] = False
        return out


@dataclass(frozen=True, slots=True)
class Usage:
    """Memory (MiB), cores (percent units) and whole devices held, or asked for."""

    memory_mib: int = 0
    cores: int = 0
    devices: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.memory_mib + other.memory_mib, self.cores + other.cores, self.devices + other.devices)

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.memory_mib - other.memory_mib, self.cores - other.cores, self.devices - other.devices)

    def get(self, resource: str) -> int:
        value: int = getattr(self, _FIELD[resource])
        return value

    def floor(self) -> Usage:
        """Each resource at least 0."""
        return Usage(max(0, self.memory_mib), max(0, self.cores), max(0, self.devices))

    @property
    def empty(self) -> bool:
        return not (self.memory_mib or self.cores or self.devices)

    def over(self, quota: Quota | Usage) -> list[str]:
        """The resources over ``quota`` (a :class:`Quota`'s None: unbounded)."""
        return [r for r in RESOURCES if (cap := quota.get(r)) is not None and self.get(r) > cap]

    def within(self, quota: Quota | Usage) -> bool:
        """Within ``quota`` on every resource (None: unbounded). Example: ``Usage(10).within(Quota())``."""
        return not self.over(quota)

    def describe(self) -> str:
        """``"320 GiB memory, 200 cores, 2 devices"`` (zeros left out; ``"nothing"``)."""
        parts = [f"{_amount(r, self.get(r))} {r}" for r in RESOURCES if self.get(r)]
        return ", ".join(parts) or "nothing"


class QueueTree:
    """Validated queue definitions: an immutable value (build a new tree to change them).

    Example::

        tree = QueueTree.parse("queues: [{name: org}, {name: org/a, guaranteed: {devices: 2}}]")
        tree.ancestors("org/a") == ["org/a", "org"]; tree.resolve(None) == "default"
    """

    def __init__(self, specs: Iterable[QueueSpec] = ()) -> None:
        """Validate ``specs``; prefer :meth:`from_specs` or :meth:`parse`.

        Raises:
            QueueConfigError: see the module docstring.
        """
        given = list(specs)
        self._specs: dict[str, QueueSpec] = {}
        for i, spec in enumerate(given):
            _check_spec(spec, f"#{i + 1}")
            if spec.name in self._specs:
                raise QueueConfigError(spec.name, "name", f"name {spec.name} is defined twice")
            self._specs[spec.name] = spec
        self._explicit = tuple(self._specs)
        if DEFAULT_QUEUE not in self._specs:
            self._specs[DEFAULT_QUEUE] = QueueSpec(name=DEFAULT_QUEUE)
        self._parent: dict[str, str | None] = {name: self._parent_of(spec) for name, spec in self._specs.items()}
        self._children: dict[str, list[str]] = {name: [] for name in self._specs}
        for name, parent in self._parent.items():
            if parent is not None:
                self._children[parent].append(name)
        self._chain: dict[str, tuple[str, ...]] = {}
        for name in self._specs:
            self._chain[name] = self._walk_up(name)
        self._guarantee: dict[str, Usage] = {}
        for name in self._specs:
            self._effective_guarantee(name)
        for name in self._specs:
            self._check_limits(name)
        self._protected = {name: any(not self._specs[q].preemptible for q in chain)
                           for name, chain in self._chain.items()}

    # --- building ----------------------------------------------------------------------------
    @classmethod
    def from_specs(cls, specs: Iterable[QueueSpec]) -> QueueTree:
        """A tree of ``specs`` (``default`` added unless among them).

        Raises:
            QueueConfigError: see the module docstring.
        """
        return cls(specs)

    @classmethod
    def load(cls, data: object) -> QueueTree:
        """A tree from parsed YAML/JSON: ``{"queues": [...]}``, a bare list (as :meth:`dump` writes), or
        None (no queues: ``default`` alone).

        Raises:
            QueueConfigError: see the module docstring.
        """
        if data is None:
            return cls()
        if isinstance(data, Mapping):
            for key in data:
                if key != "queues":
                    raise QueueConfigError("", str(key), f"unknown top-level key {key!r} (known: queues)")
            data = data.get("queues") or []
        if not isinstance(data, list):
            raise QueueConfigError("", "queues", f"queues must be a list of queues, got {data!r}")
        return cls(QueueSpec.from_dict(item, f"#{i + 1}") for i, item in enumerate(data))

    @classmethod
    def parse(cls, text: str) -> QueueTree:
        """A tree from YAML text (the format in the module docstring).

        Raises:
            QueueConfigError: the text is not YAML, or see the module docstring.
        """
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise QueueConfigError("", "yaml", f"yaml: not valid YAML: {exc}") from None
        return cls.load(data)

    def dump(self) -> list[dict[str, object]]:
        """The queues as defined (the implied ``default`` left out), JSON-able; :meth:`load` reads it back.

        Example: ``QueueTree.load(tree.dump()) == tree``.
        """
        return [self._specs[name].to_dict() for name in self._explicit]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QueueTree) and self._specs == other._specs

    def __hash__(self) -> int:
        return hash(tuple(self._specs.items()))

    def __repr__(self) -> str:
        return f"QueueTree({', '.join(self._specs)})"

    # --- validation --------------------------------------------------------------------------
    def _parent_of(self, spec: QueueSpec) -> str | None:
        path = spec.name.rpartition("/")[0] or None
        parent = spec.parent if spec.parent is not None else path
        if spec.parent is not None and path is not None and spec.parent != path:
            raise QueueConfigError(spec.name, "parent", f"parent {spec.parent} disagrees with the name's path "
                                   f"(its parent is {path})")
        if parent is None:
            return None
        if parent not in self._specs:
            raise QueueConfigError(spec.name, "parent", f"parent {parent} is not defined (define it too: "
                                   f"- name: {parent})")
        if parent == DEFAULT_QUEUE:
            raise QueueConfigError(spec.name, "parent", f"parent {DEFAULT_QUEUE} cannot have child queues "
                                   "(work that names no queue goes there)")
        return parent

    def _walk_up(self, name: str) -> tuple[str, ...]:
        chain = [name]
        parent = self._parent[name]
        while parent is not None:
            if parent in chain:
                cycle = " -> ".join([*chain[chain.index(parent):], parent])
                raise QueueConfigError(name, "parent", f"parent cycle: {cycle}")
            chain.append(parent)
            parent = self._parent[parent]
        return tuple(chain)

    def _effective_guarantee(self, name: str) -> Usage:
        """The explicit guarantee, or a parent's children's summed where it leaves a resource out."""
        done = self._guarantee.get(name)
        if done is not None:
            return done
        spec = self._specs[name]
        kids = {kid: self._effective_guarantee(kid) for kid in self._children[name]}
        values: dict[str, int] = {}
        for r in RESOURCES:
            summed = sum(g.get(r) for g in kids.values())
            explicit = spec.guaranteed.get(r)
            if explicit is not None and summed > explicit:
                parts = ", ".join(f"{kid} {_amount(r, g.get(r))}" for kid, g in kids.items() if g.get(r))
                raise QueueConfigError(name, f"guaranteed.{r}", f"guaranteed.{r} {_amount(r, explicit)} is below "
                                       f"its children's guarantees, {_amount(r, summed)} ({parts})")
            value = explicit if explicit is not None else summed
            cap = spec.limit.get(r)
            if cap is not None and value > cap:
                how = "" if explicit is not None else " (its children's, summed)"
                raise QueueConfigError(name, f"guaranteed.{r}", f"guaranteed.{r}{how} {_amount(r, value)} is over "
                                       f"limit.{r} {_amount(r, cap)}")
            values[_FIELD[r]] = value
        self._guarantee[name] = result = Usage(**values)
        return result

    def _check_limits(self, name: str) -> None:
        spec = self._specs[name]
        for r in RESOURCES:
            own = spec.limit.get(r)
            if own is None:
                continue
            for up in self._chain[name][1:]:
                cap = self._specs[up].limit.get(r)
                if cap is not None and own > cap:
                    raise QueueConfigError(name, f"limit.{r}", f"limit.{r} {_amount(r, own)} is over its "
                                           f"ancestor {up}'s limit.{r} {_amount(r, cap)}")

    # --- queries -----------------------------------------------------------------------------
    @property
    def specs(self) -> Mapping[str, QueueSpec]:
        """Every queue by name, ``default`` included, in definition order."""
        return MappingProxyType(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def parent(self, name: str) -> str | None:
        return self._parent[name]

    def ancestors(self, name: str) -> list[str]:
        """``name`` first, then its parent, ..., the root last."""
        return list(self._chain[name])

    def children(self, name: str) -> list[str]:
        """Direct children, in definition order."""
        return list(self._children[name])

    def is_leaf(self, name: str) -> bool:
        return not self._children[name]

    def leaves(self) -> list[str]:
        """The queues work may name, sorted."""
        return sorted(name for name, kids in self._children.items() if not kids)

    def guarantee(self, name: str) -> Usage:
        """The effective guarantee (a parent's left-out resource: its children's summed)."""
        return self._guarantee[name]

    def limit(self, name: str) -> Quota:
        return self._specs[name].limit

    def weight(self, name: str) -> float:
        return self._specs[name].weight

    def protected(self, name: str) -> bool:
        """True when the queue or an ancestor is ``preemptible: false``."""
        return self._protected[name]

    def resolve(self, name: str | None) -> str:
        """The queue work naming ``name`` goes to: None or ``""`` is ``default``.

        Raises:
            InvalidRequest: an unknown queue, or a parent queue (work goes to leaves), naming the leaves.
        """
        if not name:
            return DEFAULT_QUEUE
        if name not in self._specs:
            raise InvalidRequest("queue", f"unknown queue {name!r} (known: {_names(self.leaves())})")
        if self._children[name]:
            raise InvalidRequest("queue", f"queue {name!r} has child queues; name one of them "
                                 f"({_names(self._children[name])})")
        return name


def _names(names: Sequence[str], most: int = 20) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", ... ({len(names) - most} more)" if len(names) > most else "")


def _check_spec(spec: QueueSpec, where: str) -> None:
    """What a spec built in Python (not through YAML) may still get wrong on its own."""
    name = spec.name
    if not isinstance(name, str) or len(name) > _MAX_NAME or not _NAME.match(name):
        raise QueueConfigError(name or where, "name", f"name {name!r} is not a queue name (segments of letters, "
                               "digits, '.', '_', '-' separated by '/', such as org/team-a)")
    if spec.parent is not None and (len(spec.parent) > _MAX_NAME or not _NAME.match(spec.parent)):
        raise QueueConfigError(name, "parent", f"parent {spec.parent!r} is not a queue name")
    for field, quota in (("guaranteed", spec.guaranteed), ("limit", spec.limit)):
        for r in RESOURCES:
            value = quota.get(r)
            if value is not None and value < 0:
                raise QueueConfigError(name, f"{field}.{r}", f"{field}.{r} must be >= 0, got {value}")
    if not math.isfinite(spec.weight) or spec.weight <= 0:
        raise QueueConfigError(name, "weight", f"weight must be a number > 0, got {spec.weight!r}")


# --- accounting ----------------------------------------------------------------------------------


def allocation_usage(allocation: Allocation, ledger: Ledger) -> Usage:
    """What an allocation counts against its queue: its grants' memory and cores, and as ``devices`` the
    grants that hold a whole device (100 cores, or all of the device's memory, as a MIG instance).

    Example: two grants of 40960 MiB / 30 cores on 80 GiB devices -> ``Usage(81920, 60, 0)``.
    """
    memory = cores = devices = 0
    for grant in allocation.devices:
        memory += grant.memory_mib
        cores += grant.cores
        whole = grant.cores >= FULL_CORES
        if not whole:
            try:
                whole = grant.memory_mib >= ledger.device(grant.uuid).memory_capacity_mib
            except KeyError:  # its node has left: count what the grant says
                whole = False
        devices += int(whole)
    return Usage(memory, cores, devices)


def request_usage(requests: Sequence[SliceRequest], ledger: Ledger,
                  smallest_device: Callable[[str], int] | None = None) -> Usage:
    """The least ``requests`` can count against a queue wherever they are placed (for admission before a
    placement exists): a percentage or a whole-device memory counts on the smallest device of the vendor.
    ``smallest_device(vendor)`` (MiB) may come from a cache (:class:`QueueBook` keeps one): finding it
    scans every device of the cluster.
    """
    memory = cores = devices = 0
    smallest: dict[str, int] = {}
    for r in requests:
        if r.count == 0:
            continue
        if r.memory_mib is not None:
            each = r.memory_mib
        else:
            if r.vendor not in smallest:
                smallest[r.vendor] = (smallest_device or (lambda v: _smallest_device(ledger, v)))(r.vendor)
            each = r.memory_on(smallest[r.vendor])
        whole = r.exclusive or (r.memory_mib is None and (r.memory_percent is None or r.memory_percent >= 100))
        memory += each * r.count
        cores += r.cores * r.count
        devices += r.count if whole else 0
    return Usage(memory, cores, devices)


def _smallest_device(ledger: Ledger, vendor: str) -> int:
    idx = ledger.index
    ids = [i for i, v in enumerate(idx.model_vendors) if v == vendor]
    mask = np.isin(idx.model_id, ids) & idx.exists
    return int(idx.mem_cap[mask].min()) if mask.any() else 0


@dataclass(frozen=True)
class Preemption:
    """Victims on one node whose release lets a request fit there (``reason``: why they may be taken).

    The caller interrupts the victims, waits for them to leave, then places the request, which may still
    find the node taken by then (the plan reserves nothing).
    """

    victims: tuple[Lease, ...]
    node: str
    reason: Literal["reclaim", "priority"]
    for_queue: str

    def describe(self) -> str:
        """``"reclaim for org/team-a: 2 slices on n1 (lease-3, lease-9)"``."""
        ids = ", ".join(v.lease_id for v in self.victims)
        return f"{self.reason} for {self.for_queue}: {len(self.victims)} slice(s) on {self.node} ({ids})"


@dataclass(frozen=True)
class _Candidate:
    lease: Lease
    usage: Usage
    levels: tuple[str, ...] = ()  # reclaim: the victim's queues that lose it (below the common ancestor)
    depth: int = 0  # reclaim: the requester's levels (below the common ancestor) to stay within guarantee


def _victim_order(c: _Candidate) -> tuple[int, float, str]:
    """Lowest priority first, then youngest (the issue's order), then by id."""
    return (c.lease.priority, -c.lease.created_at, c.lease.lease_id)


def _of(queue: str, name: str) -> str:
    return "" if queue == name else f" (an ancestor of {name})"


class QueueBook:
    """Per-queue usage of the live leases, and admission, order and preemption decisions.

    Callers serialise (as for the ledger): ``hold`` each lease the ledger allocates, ``drop`` each one it
    releases or loses. Usage of a queue is its subtree's.
    """

    def __init__(self, tree: QueueTree, ledger: Ledger) -> None:
        self._tree = tree
        self.ledger = ledger
        self._held: dict[str, tuple[Lease, str, Usage]] = {}  # lease id -> (lease, queue, usage)
        self._by_queue: dict[str, set[str]] = {}  # queue -> ids of the leases it holds itself
        self._total: dict[str, Usage] = {}  # queue -> usage of its subtree
        self._capacity: tuple[int, Usage] | None = None  # (index inventory count, capacity then)
        self._smallest: tuple[int, dict[str, int]] = (-1, {})  # (index inventory count, vendor -> MiB)

    @property
    def tree(self) -> QueueTree:
        return self._tree

    def apply(self, tree: QueueTree) -> None:
        """Swap the definitions; live leases keep their queues.

        Raises:
            QueueConfigError: a queue that holds live leases is missing from ``tree`` (the old tree stays).
        """
        for queue, ids in self._by_queue.items():
            if ids and queue not in tree:
                raise QueueConfigError(queue, "name", f"name {queue} still holds {len(ids)} live lease(s); "
                                       "keep it until they end")
        self._tree = tree
        self._total = {}
        for _, queue, usage in self._held.values():
            self._add(queue, usage)

    # --- accounting --------------------------------------------------------------------------
    def _name(self, queue: str | None) -> str:
        name = queue or DEFAULT_QUEUE
        if name not in self._tree:
            raise InvalidRequest("queue", f"unknown queue {name!r} (known: {_names(self._tree.leaves())})")
        return name

    def _add(self, queue: str, usage: Usage) -> None:
        for q in self._tree.ancestors(queue):
            self._total[q] = self._total.get(q, Usage()) + usage

    def hold(self, lease: Lease) -> None:
        """Count a lease the ledger holds (again: replaces it). A released or lost lease is dropped.

        Raises:
            InvalidRequest: the lease's queue is not in the tree.
        """
        self.drop(lease.lease_id)
        if lease.state in (LeaseState.RELEASED, LeaseState.LOST):
            return
        queue = self._name(lease.queue)
        usage = allocation_usage(lease.allocation, self.ledger)
        self._held[lease.lease_id] = (lease, queue, usage)
        self._by_queue.setdefault(queue, set()).add(lease.lease_id)
        self._add(queue, usage)

    def drop(self, lease_id: str) -> None:
        """Stop counting a lease; idempotent."""
        held = self._held.pop(lease_id, None)
        if held is None:
            return
        _, queue, usage = held
        self._by_queue[queue].discard(lease_id)
        self._add(queue, Usage() - usage)

    def leases(self, queue: str) -> list[Lease]:
        """The live leases a queue holds itself (not its descendants), oldest first."""
        held = [self._held[i][0] for i in self._by_queue.get(self._name(queue), ())]
        return sorted(held, key=lambda lease: (lease.created_at, lease.lease_id))

    def usage(self, queue: str) -> Usage:
        """What the queue and its descendants hold."""
        return self._total.get(self._name(queue), Usage())

    def capacity(self) -> Usage:
        """The cluster's healthy devices: memory and cores (schedulable, scaled) and their number.
        Kept until a node is put or dropped (a sum over every device: 800,000 of them at 100,000 nodes)."""
        idx = self.ledger.index
        if self._capacity is None or self._capacity[0] != idx.inventory:
            mask = idx.exists & idx.healthy
            self._capacity = (idx.inventory, Usage(int(idx.mem_cap[mask].sum()), int(idx.core_cap[mask].sum()),
                                                   int(mask.sum())))
        return self._capacity[1]

    def _smallest_device(self, vendor: str) -> int:
        """The smallest device of ``vendor`` (MiB), kept until a node is put or dropped: a scan of every
        device, which admission would otherwise pay per waiting head (2 ms at 100,000 nodes)."""
        inventory = self.ledger.index.inventory
        if self._smallest[0] != inventory:
            self._smallest = (inventory, {})
        known = self._smallest[1]
        if vendor not in known:
            known[vendor] = _smallest_device(self.ledger, vendor)
        return known[vendor]

    def borrowed(self, queue: str) -> Usage:
        """Usage beyond the guarantee, per resource, floored at 0."""
        name = self._name(queue)
        return (self.usage(name) - self._tree.guarantee(name)).floor()

    # --- admission ---------------------------------------------------------------------------
    def never_fits(self, queue: str, requests: Sequence[SliceRequest]) -> str | None:
        """Why ``requests`` alone exceed the limit of ``queue`` or an ancestor (so they can never be served
        from it), or None. Sizes not known before placement count at their least (:func:`request_usage`).

        Example: ``"queue org/team-a: the request alone needs memory 400 GiB, over its limit.memory 320 GiB"``.
        """
        name = self._name(queue)
        asked = request_usage(requests, self.ledger, self._smallest_device)
        for q in self._tree.ancestors(name):
            limit = self._tree.limit(q)
            over = asked.over(limit)
            if over:
                parts = ", ".join(f"{r} {_amount(r, asked.get(r))}, over its limit.{r} "
                                  f"{_amount(r, limit.get(r) or 0)}" for r in over)
                return f"queue {q}{_of(q, name)}: the request alone needs {parts}"
        return None

    def over_limit(self, queue: str, allocation: Allocation) -> str | None:
        """Why holding ``allocation`` now would put ``queue`` or an ancestor over its limit, or None.

        Example: ``"queue org/team-a at its limit: memory 320 GiB held + 40 GiB asked > limit 320 GiB"``.
        """
        name = self._name(queue)
        return self._limit_reason(name, allocation_usage(allocation, self.ledger), {})

    def limit_reason(self, queue: str, requests: Sequence[SliceRequest]) -> str | None:
        """Why ``queue``'s limit (or an ancestor's) holds ``requests`` back now: what it holds plus their
        least size (:func:`request_usage`) is over it; None when they may be tried. A waiting reason.

        Example: ``"queue org/team-a at its limit: memory 300 GiB held + 40 GiB asked > limit 320 GiB"``.
        """
        return self._limit_reason(self._name(queue), request_usage(requests, self.ledger, self._smallest_device), {})

    def _limit_reason(self, name: str, asked: Usage, freed: Mapping[str, Usage]) -> str | None:
        for q in self._tree.ancestors(name):
            limit = self._tree.limit(q)
            held = self.usage(q) - freed.get(q, Usage())
            over = (held + asked).over(limit)
            if over:
                parts = "; ".join(f"{r} {_amount(r, held.get(r))} held + {_amount(r, asked.get(r))} asked > "
                                  f"limit {_amount(r, limit.get(r) or 0)}" for r in over)
                return f"queue {q}{_of(q, name)} at its limit: {parts}"
        return None

    # --- order -------------------------------------------------------------------------------
    def share(self, queue: str) -> float:
        """The queue's weighted dominant share: waiting work of the lowest share is served first.

        Within its guarantee on every resource, the share is the largest fraction of a guaranteed resource
        in use, in [0, 1] (weight plays no part: guarantees are owed in full). A queue borrowing (over its
        guarantee on some resource) is at 1 + its largest borrowed fraction of the cluster's capacity,
        divided by its weight: it comes after every queue still within its guarantee, and borrowers share the
        idle capacity by weight (DRF). A zero guarantee counts as "no claim": using any of that resource is
        borrowing it, and a queue that guarantees nothing at all is at 1 even when idle.

        Example: guarantee 160 GiB, holding 80 GiB -> 0.5; guarantee 0, weight 2, holding a quarter of the
        cluster's memory -> 1 + 0.25 / 2 = 1.125.
        """
        name = self._name(queue)
        used = self.usage(name)
        guarantee = self._tree.guarantee(name)
        over = used.over(guarantee)
        if over or guarantee.empty:
            capacity = self.capacity()
            borrowed = (used - guarantee).floor()
            fraction = max(borrowed.get(r) / max(capacity.get(r), 1) for r in RESOURCES)
            return 1.0 + fraction / self._tree.weight(name)
        return max((used.get(r) / guarantee.get(r) for r in RESOURCES if guarantee.get(r)), default=0.0)

    def order_key(self, queue: str, priority: int, submitted: float, seq: int) -> tuple[float, int, float, int]:
        """The sort key of waiting work, smallest first: queue share, then priority (higher first), then
        submission time, then arrival ``seq``. A snapshot: shares move as leases come and go, so a waiting
        list is re-keyed when it is served from, not kept in a heap across changes.
        """
        return (self.share(queue), -priority, submitted, seq)

    # --- preemption --------------------------------------------------------------------------
    def plan_preemption(self, scheduler: Scheduler, requests: Sequence[SliceRequest], queue: str,
                        priority: int, *, nodes: Collection[str] | None = None,
                        spare: Collection[str] = ()) -> Preemption | None:
        """The slices to preempt so that ``requests`` (one task, or a pod's containers: one node) fit, or None.

        ``reclaim`` first: when ``queue`` would stay within its guarantee with the request, preemptible
        slices of other queues that borrow may go, each leaving its queue (and every ancestor below the one
        it shares with ``queue``) at or above its guarantee; ``queue``'s levels below that common ancestor
        must stay within theirs. Otherwise ``priority``: preemptible slices of ``queue`` itself with a lower
        priority. Never a ``preemptible=False`` slice nor one of a protected queue; never when the request
        alone exceeds a limit, nor when it would exceed one once the victims are gone.

        Per node (at most :data:`MAX_PREEMPTION_NODES` of those holding candidates, lowest candidate priority
        first), every candidate is released in order (lowest priority first, then youngest), the request is
        placed with ``scheduler`` on that node alone, and victims are then given back most important first
        while it still fits (kube-scheduler's reprieve): a minimal set. Candidates are taken in that order
        only while their queues stay at their guarantees; when those find no room, the minimal set found
        from every candidate is used if it keeps each queue at its guarantee. The node with the fewest victims
        wins; ties go to the lowest highest victim priority, then the youngest victims. Cost: per node tried,
        (candidates + 1) placements restricted to it and as many ledger release/allocate pairs; the ledger
        ends as it began (its rows' versions move on, so score caches recompute those rows). Gangs spread
        over several nodes are not planned (None).

        ``nodes``: only victims on these nodes (the request may go nowhere else: a pod's node selector and
        taints); ``spare``: lease ids never taken (victims already leaving for another plan, or ones an
        eviction refused lately: a PodDisruptionBudget).

        Raises:
            InvalidRequest: ``queue`` is unknown.
        """
        name = self._name(queue)
        reqs = list(requests)
        if not reqs or scheduler.ledger is not self.ledger or self.never_fits(name, reqs) is not None:
            return None
        asked = request_usage(reqs, self.ledger, self._smallest_device)
        depth = self._within_depth(name, asked)
        allowed = None if nodes is None else set(nodes)

        def keep(candidates: list[_Candidate]) -> list[_Candidate]:
            if allowed is None and not spare:
                return candidates
            return [c for c in candidates if c.lease.lease_id not in spare
                    and (allowed is None or c.lease.allocation.node in allowed)]

        plan = None
        if depth:
            plan = self._plan(scheduler, reqs, name, "reclaim", keep(self._reclaim_candidates(name, depth)))
        if plan is None:
            plan = self._plan(scheduler, reqs, name, "priority", keep(self._priority_candidates(name, priority)))
        return plan

    def _within_depth(self, name: str, asked: Usage) -> int:
        """How many levels of ``name`` (itself first) stay within their guarantees holding ``asked`` too."""
        depth = 0
        for q in self._tree.ancestors(name):
            if not (self.usage(q) + asked).within(self._tree.guarantee(q)):
                break
            depth += 1
        return depth

    def _priority_candidates(self, name: str, priority: int) -> list[_Candidate]:
        if self._tree.protected(name):
            return []
        out = []
        for lease_id in self._by_queue.get(name, ()):
            lease, _, usage = self._held[lease_id]
            if lease.preemptible and lease.priority < priority:
                out.append(_Candidate(lease, usage))
        return out

    def _reclaim_candidates(self, name: str, depth: int) -> list[_Candidate]:
        tree = self._tree
        mine = tree.ancestors(name)
        out = []
        for queue, ids in self._by_queue.items():
            if not ids or tree.protected(queue):
                continue
            theirs = tree.ancestors(queue)
            if name in theirs or queue in mine:
                continue  # the requester's own line: not a reclaim
            common = next((i for i, q in enumerate(mine) if q in theirs), len(mine))
            if common > depth:
                continue  # a level of the requester below the common ancestor would go over its guarantee
            levels = tuple(theirs[:theirs.index(mine[common])] if common < len(mine) else theirs)
            if not all(self.usage(q).over(tree.guarantee(q)) for q in levels):
                continue  # not borrowing at every level that would lose the slice
            for lease_id in ids:
                lease, _, usage = self._held[lease_id]
                if lease.preemptible:
                    out.append(_Candidate(lease, usage, levels, common))
        return out

    def _plan(self, scheduler: Scheduler, reqs: list[SliceRequest], name: str,
              reason: Literal["reclaim", "priority"], candidates: list[_Candidate]) -> Preemption | None:
        by_node: dict[str, list[_Candidate]] = {}
        for c in candidates:
            live = self.ledger.leases.get(c.lease.lease_id)  # the ledger's own value: it is put back as it was
            if live is not None and live.allocation == c.lease.allocation:
                by_node.setdefault(live.allocation.node, []).append(replace(c, lease=live))
        for group in by_node.values():
            group.sort(key=_victim_order)
        nodes = sorted(by_node, key=lambda n: (_victim_order(by_node[n][0]), n))[:MAX_PREEMPTION_NODES]
        best: tuple[tuple[int, int, float, str], list[_Candidate]] | None = None
        for node in nodes:
            group = by_node[node]
            eligible = self._eligible(group)
            victims = self._victims_on(scheduler, reqs, name, node, eligible) if eligible else []
            if not victims and len(eligible) < len(group):
                # the greedy set may have spent a queue's room above its guarantee on slices that make no
                # room here (one beside a slice that stays): a minimal set from all of them may still keep
                # every queue at its guarantee
                trial = self._victims_on(scheduler, reqs, name, node, group)
                victims = trial if len(self._eligible(trial)) == len(trial) else []
            if not victims:
                continue
            key = (len(victims), max(v.lease.priority for v in victims),
                   -min(v.lease.created_at for v in victims), node)
            if best is None or key < best[0]:
                best = (key, victims)
        if best is None:
            return None
        key, victims = best
        return Preemption(tuple(v.lease for v in victims), key[3], reason, name)

    def _eligible(self, ordered: list[_Candidate]) -> list[_Candidate]:
        """The candidates (in victim order) that may go together: each is taken while every queue that loses
        it stays at or above its guarantee on every resource the victims taken from it free."""
        taken: dict[str, Usage] = {}
        out = []
        for c in ordered:
            ok = True
            for q in c.levels:
                after = taken.get(q, Usage()) + c.usage
                left = self.usage(q) - after
                guarantee = self._tree.guarantee(q)
                if any(after.get(r) > 0 and left.get(r) < guarantee.get(r) for r in RESOURCES):
                    ok = False
                    break
            if ok:
                for q in c.levels:
                    taken[q] = taken.get(q, Usage()) + c.usage
                out.append(c)
        return out

    def _victims_on(self, scheduler: Scheduler, reqs: list[SliceRequest], name: str, node: str,
                    eligible: list[_Candidate]) -> list[_Candidate]:
        """A minimal set of ``eligible`` whose release lets ``reqs`` fit on ``node`` within the limits; [] if
        none does. Releases candidates from the ledger and allocates every one back before returning."""
        ledger = self.ledger

        def fits(victims: list[_Candidate]) -> bool:
            try:
                allocation = scheduler.place(reqs, nodes=[node])
            except (Unschedulable, InvalidRequest):
                return False
            asked = allocation_usage(allocation, ledger)
            freed: dict[str, Usage] = {}
            for v in victims:
                for q in self._tree.ancestors(self._held[v.lease.lease_id][1]):
                    freed[q] = freed.get(q, Usage()) + v.usage
            if self._limit_reason(name, asked, freed) is not None:
                return False
            need = max((v.depth for v in victims), default=0)
            return need == 0 or self._within_depth(name, asked) >= need

        out: list[Lease] = []  # released from the ledger now
        try:
            for c in eligible:
                ledger.release(c.lease.lease_id)
                out.append(c.lease)
            if not fits(eligible):
                return []
            victims = list(eligible)
            for c in reversed(eligible):  # reprieve: most important first
                ledger.allocate(c.lease)
                out.remove(c.lease)
                trial = [v for v in victims if v is not c]
                if fits(trial):
                    victims = trial
                else:
                    ledger.release(c.lease.lease_id)
                    out.append(c.lease)
            return victims
        finally:
            for lease in out:
                ledger.allocate(lease)

