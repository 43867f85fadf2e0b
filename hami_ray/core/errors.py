"""The exception tree of hami-ray, rooted at :class:`HamiRayError`.

Every error raised by hami-ray code is one of these; third-party exceptions are translated at the edge
(the Ray shell, the Kubernetes bridge, the device backends). Retry semantics come from the type: a
:class:`TemporaryError` may succeed when tried again (capacity frees, a node actor restarts), a
:class:`PermanentError` will not until the input changes.

    HamiRayError
    ├── PermanentError
    │   ├── InvalidRequest          bad input: names the field and the reason
    │   │   └── AnnotationFormatError   a malformed HAMi annotation
    │   ├── UnknownPolicy           a policy name the registry does not know (also an InvalidRequest)
    │   ├── LeaseError
    │   │   ├── LeaseNotFound
    │   │   └── LeaseTokenMismatch  releasing with a wrong token
    │   ├── InvariantViolation      an allocation would break a ledger invariant (a bug or a race)
    │   └── SliceQuotaExceeded      a process stayed over its slice's device memory and was stopped
    └── TemporaryError
        ├── Unschedulable           nothing fits now; carries kube-scheduler-style reason counts
        ├── ReservationRefused      a node actor refused a reservation (two-phase placement)
        │   └── JournalUnwritable   ... because it cannot write its journal (its state disk is full)
        ├── DeviceError             a device backend failed
        └── SlicePreempted          the slice was taken back for another queue's guarantee or a higher priority
"""

from __future__ import annotations

from collections.abc import Mapping


class HamiRayError(Exception):
    """Root of every hami-ray error."""


class PermanentError(HamiRayError):
    """Retrying with the same input will fail the same way."""


class TemporaryError(HamiRayError):
    """May succeed later (capacity frees, a component restarts)."""


class InvalidRequest(PermanentError, ValueError):
    """A request (Python keyword, Kubernetes resource or annotation) is malformed.

    Example: ``InvalidRequest("gpu_memory", "unknown unit 'gigs' in '8 gigs'")``.
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"invalid {field}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.field, self.reason))


class AnnotationFormatError(InvalidRequest):
    """A HAMi annotation (pod allocation, node register) cannot be decoded."""


class UnknownPolicy(InvalidRequest):
    """A node or device policy name that is not registered."""


class LeaseError(PermanentError):
    """A lease operation was refused."""


class LeaseNotFound(LeaseError, KeyError):
    def __init__(self, lease_id: str) -> None:
        self.lease_id = lease_id
        super().__init__(f"no lease {lease_id!r}")

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return f"no lease {self.lease_id!r}"

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (type(self), (self.lease_id,))


class LeaseTokenMismatch(LeaseError):
    def __init__(self, lease_id: str) -> None:
        self.lease_id = lease_id
        super().__init__(f"wrong token for lease {lease_id!r}: release refused")

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (type(self), (self.lease_id,))


class InvariantViolation(PermanentError):
    """An allocation would over-commit a device; nothing was changed."""


class SliceQuotaExceeded(PermanentError):
    """A slice used more device memory than it holds, for longer than the grace period.

    Raised in the task by its node actor's verdict (``action="interrupted"``: the task stops, its
    process and the lease live on), or after the node actor killed the slice's processes and freed its
    lease (``"killed"``: a process that did not arm itself, or kept overrunning); the task fails with it. Permanent: the same work in the same slice
    will overrun it again. Example message: ``slice 'lease-7' used 9000 MiB on device GPU-0 over its
    limit of 8192 MiB (process 4242); the process was stopped``.
    """

    def __init__(self, lease_id: str, uuid: str, used_mib: int, limit_mib: int, pid: int,
                 action: str = "killed") -> None:
        self.lease_id = lease_id
        self.uuid = uuid
        self.used_mib = used_mib
        self.limit_mib = limit_mib
        self.pid = pid
        self.action = action  # "interrupted": the task was stopped, its process lives on; "killed"
        outcome = "its task was interrupted" if action == "interrupted" else "the process was stopped"
        super().__init__(
            f"slice {lease_id!r} used {used_mib} MiB on device {uuid} over its limit of {limit_mib} MiB "
            f"(process {pid}); {outcome}")

    def __reduce__(self) -> tuple[type, tuple[str, str, int, int, int, str]]:
        return (type(self), (self.lease_id, self.uuid, self.used_mib, self.limit_mib, self.pid, self.action))


class Unschedulable(TemporaryError):
    """No node can hold the request now.

    The message reads like kube-scheduler's:
    ``0/1213 nodes are available: 800 insufficient device memory, 413 device type mismatch``.
    ``reasons`` maps a reason (a :class:`hami_ray.core.verdict.Reason` value) to the number of nodes
    that failed for it; ``never`` is true when no node could hold it even when empty.
    """

    def __init__(self, total_nodes: int, reasons: Mapping[str, int], *, never: bool = False) -> None:
        self.total_nodes = total_nodes
        self.reasons = dict(reasons)
        self.never = never
        parts = ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        msg = f"0/{total_nodes} nodes are available"
        if parts:
            msg += f": {parts}"
        if never:
            msg += " (no node could ever hold this request)"
        super().__init__(msg)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_unschedulable, (self.total_nodes, self.reasons, self.never))


def _rebuild_unschedulable(total: int, reasons: dict[str, int], never: bool) -> Unschedulable:
    return Unschedulable(total, reasons, never=never)


class ReservationRefused(TemporaryError):
    """The node actor that owns a device refused a reservation (it saw a conflicting lease)."""


class JournalUnwritable(ReservationRefused):
    """A node actor cannot write its journal (its state disk is full or failing), so it takes no new
    slices: a reservation it could not make durable would be forgotten by its next restart. Slices it holds
    keep working, and their ends are written once the disk takes writes again. Placement tries other nodes.

    Example message: ``node 5f3c...: its journal cannot be written (database or disk is full): no new slices
    here until it can``.
    """


class DeviceError(TemporaryError):
    """A device backend failed (NVML error, device lost)."""


class SlicePreempted(TemporaryError):
    """The slice was taken back: another queue reclaimed its guarantee (``reason="reclaim"``), or a request
    of higher priority in the same queue needed the room (``"priority"``).

    Raised in the running task at the notice (its process lives on until the grace ends, then the node
    actor kills whatever is left and frees the slice). Temporary: the same work fits again once capacity
    frees, so Ray retries it where ``max_retries`` allows. Example message: ``slice 'lease-7' was preempted:
    queue org/team-a reclaimed its guarantee; the slice is freed 10 s after this notice``.
    """

    def __init__(self, lease_id: str, for_queue: str, reason: str = "reclaim", grace_s: float = 0.0) -> None:
        self.lease_id = lease_id
        self.for_queue = for_queue
        self.reason = reason
        self.grace_s = grace_s
        why = (f"queue {for_queue} reclaimed its guarantee" if reason == "reclaim"
               else f"a request of higher priority in queue {for_queue} needed the room")
        super().__init__(f"slice {lease_id!r} was preempted: {why}; the slice is freed {grace_s:g} s after "
                         f"this notice")

    def __reduce__(self) -> tuple[type, tuple[str, str, str, float]]:
        return (type(self), (self.lease_id, self.for_queue, self.reason, self.grace_s))
