"""The node agent: the plain class a node actor wraps, the authority for one node's devices.

The placement actor decides; the node agent confirms (DESIGN, Ray runtime). It keeps its own
:class:`~hami_ray.core.ledger.Ledger` of this one node, journals every lease, hands out each lease's
isolation environment, frees leases whose holder processes died, and stops processes that overrun
their slice (DESIGN, Isolation 5). A restarted agent rebuilds from its journal; leases whose processes
died meanwhile are freed at the first reap.

A slice's processes are the pids registered with it (mapped into this node actor's PID namespace when a
worker registers from a namespace of its own) and all their descendants, found in one procfs scan per
tick (:mod:`node_actors.pids`). A process is named by its pid *and* start time, so a recycled pid is never
reaped as alive or killed. A tick that fails marks enforcement ``degraded`` (with the reason, in status and
metrics) until a tick succeeds again; so does a node actor that cannot match NVML's host pids.

Called by the Ray node actor shell (one method call at a time, as a sync Ray actor runs them) and by
tests, with a fake clock and the simulated backend. Not thread-safe.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from hami_ray.core.errors import (
    InvalidRequest,
    InvariantViolation,
    JournalUnwritable,
    LeaseNotFound,
    ReservationRefused,
    SliceQuotaExceeded,
)
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import Lease, LeaseState, Node
from hami_ray.core.grades import Isolation
from node_actors.backends.base import DeviceBackend
from node_actors.enforcement import NodeSample, QuotaWatch, SliceUsage, slice_usage
from node_actors.interrupt import interrupt, interruptible
from node_actors.isolation import region_key, slice_grade
from node_actors.journal import Event, EventKind, Journal
from node_actors.pids import ProcessTable, in_host_pidns, kill_checked, own_pidns, same_process
from node_actors.processes import start_ticks
from node_actors.settings import AgentSettings

OK = "ok"
DEGRADED = "degraded"

log = logging.getLogger(__name__)


class NodeAgent:
    """Leases, isolation and enforcement of one node.

    Args:
        node_name: this node's name (the Ray node id).
        backend: the node's device backend; the caller owns it (and closes it).
        state_dir: where the journal and HAMi-core caches live.
        clock: seconds, injectable for tests; defaults to ``time.time``.
        settings: tolerance, grace and reap intervals.
        cpu_milli: host CPU capacity to track (0: not tracked).
        memory_mib: host memory capacity to track (0: not tracked).
        labels: node labels.
    """

    def __init__(self, node_name: str, backend: DeviceBackend, state_dir: str | Path, *,
                 clock: Callable[[], float] = time.time, settings: AgentSettings | None = None,
                 cpu_milli: int = 0, memory_mib: int = 0, labels: Mapping[str, str] | None = None) -> None:
        self.node_name = node_name
        self.state_dir = Path(state_dir)
        (self.state_dir / "vgpu").mkdir(parents=True, exist_ok=True)  # HAMi-core creates files, not dirs
        self.settings = settings or AgentSettings()
        self._backend = backend
        self._clock = clock
        devices = backend.discover()
        self._health = {d.uuid: d.healthy for d in devices}
        node = Node(name=node_name, devices=tuple(devices), cpu_milli=cpu_milli, memory_mib=memory_mib,
                    labels=dict(labels or {}))
        self._ledger = Ledger([node])
        self._journal = Journal(self.state_dir)
        self._journal.prune_events()
        self._watch = QuotaWatch(self.settings.tolerance_mib, self.settings.grace_s)
        self._regions: dict[str, tuple[str, int]] = {}
        self._waiting_since: dict[str, float] = {}
        self._interrupted: dict[str, float] = {}  # lease id -> when its tasks were interrupted for overrunning
        self._preempting: dict[str, tuple[float, dict[str, Any]]] = {}  # lease id -> (when it goes, the notice)
        self._told: dict[str, set[int]] = {}  # lease id under notice -> the pids that got it
        self.last_sample: NodeSample | None = None  # the last enforcement pass's, for the status view
        self._last_reap = -math.inf
        self.lost: list[Lease] = []
        self.peak: dict[str, tuple[int, int, int]] = {}  # uuid -> most (MiB, cores, slices) ever held at once
        self._marks: dict[str, str] = {}  # lease id -> what changed under its isolation (MPS restarted)
        self._members: dict[str, set[int]] = {}  # lease id -> its processes at the last sample
        self._table: ProcessTable | None = None  # the last sample's procfs scan
        self._pidns = own_pidns()
        self._failure: str | None = None  # why the last tick failed; None: it succeeded
        self._blind: str | None = None  # why enforcement cannot see the backend's processes at all
        if backend.isolation_report().host_pids and in_host_pidns() is False:
            self._blind = ("the node actor is not in the host PID namespace, so NVML's process ids cannot be "
                           "matched to slices (run it with hostPID: true; see deploy/)")
            log.error("node %s: %s", node_name, self._blind)
        self._restore()

    # --- restart -----------------------------------------------------------------------------
    def _restore(self) -> None:
        now = self._clock()
        for stored in self._journal.leases():
            lease = stored.lease
            try:
                if lease.allocation.node != self.node_name:
                    raise InvariantViolation(f"lease {lease.lease_id} is for node {lease.allocation.node}")
                self._ledger.allocate(lease)
            except InvariantViolation as exc:
                log.warning("node %s: journaled lease %s is lost: %s", self.node_name, lease.lease_id, exc)
                self._journal.delete_lease(lease.lease_id)
                self._journal.append_event(now, EventKind.LOST, lease.lease_id, {"reason": str(exc)})
                self.lost.append(lease.model_copy(update={"state": LeaseState.LOST}))
                continue
            self._regions[lease.lease_id] = (region_key(lease.allocation.devices), stored.slot)
            self._waiting_since[lease.lease_id] = now  # a fresh grace period: our clock restarted
            self._journal.append_event(now, EventKind.RESTORED, lease.lease_id, {"pids": list(lease.pids)})
            notices = self._journal.events(lease_id=lease.lease_id, kind=EventKind.PREEMPTING)
            if notices:  # a notice outlives a restart: the slice still goes, a grace after now at the latest
                notice = dict(notices[-1].detail)
                self._preempting[lease.lease_id] = (min(now + float(notice.get("grace_s", 0.0)),
                                                        float(notice.get("deadline", now))), notice)

    # --- queries -----------------------------------------------------------------------------
    def node(self) -> Node:
        """This node's inventory as the placement actor should see it (health included)."""
        return self._ledger.node(self.node_name)

    def leases(self) -> list[Lease]:
        """Live leases on this node (reserved or active), by id."""
        return self._ledger.leases_on(self.node_name)

    def check(self) -> None:
        """Recount this node's ledger from its leases (raises InvariantViolation on any difference)."""
        self._ledger.check_invariants()

    def events(self, lease_id: str | None = None, kind: str | None = None) -> list[Event]:
        """The journal's events, oldest first."""
        return self._journal.events(lease_id=lease_id, kind=kind)

    def _live(self, lease_id: str) -> Lease:
        lease = self._ledger.leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(lease_id)
        return lease

    # --- reserve / activate / release --------------------------------------------------------
    def reserve(self, lease: Lease) -> Lease:
        """Confirm a placement's reservation and journal it. Retrying the same reservation is a no-op.

        Raises:
            ReservationRefused: the lease is for another node, names an unknown or unhealthy device,
                conflicts with leases held here, or reuses a live lease id with other contents.
            JournalUnwritable: the journal cannot be written (the state disk is full): nothing is held.

        Example: ``agent.reserve(Lease(lease_id="l1", owner="task", token="t", allocation=alloc))``.
        """
        held = self._ledger.leases.get(lease.lease_id)
        if held is not None:
            if held.allocation == lease.allocation and held.token == lease.token:
                return held
            raise ReservationRefused(f"lease {lease.lease_id} is already held here with other contents")
        if lease.allocation.node != self.node_name:
            raise ReservationRefused(f"lease {lease.lease_id} is for node {lease.allocation.node}, "
                                     f"not {self.node_name}")
        sick = [g.uuid for g in lease.allocation.devices if not self._health.get(g.uuid, True)]
        if sick:
            raise ReservationRefused(f"lease {lease.lease_id}: device {sick[0]} is unhealthy")
        now = self._clock()
        if not lease.created_at:
            lease = lease.model_copy(update={"created_at": now})
        try:
            lease = self._ledger.allocate(lease)
        except InvariantViolation as exc:
            raise ReservationRefused(str(exc)) from exc
        for grant in lease.allocation.devices:
            use = self._ledger.usage(grant.uuid)
            old = self.peak.get(grant.uuid, (0, 0, 0))
            self.peak[grant.uuid] = (max(old[0], use.memory_mib), max(old[1], use.cores), max(old[2], use.slices))
        key = region_key(lease.allocation.devices)
        taken = {slot for k, slot in self._regions.values() if k == key}
        slot = next(i for i in range(len(taken) + 1) if i not in taken)
        self._regions[lease.lease_id] = (key, slot)
        self._waiting_since[lease.lease_id] = now
        try:
            self._journal.upsert_lease(lease, slot, must=True)
        except JournalUnwritable as exc:  # a slice the next restart would forget: refuse it, hold nothing
            self._ledger.release(lease.lease_id, None)
            self._regions.pop(lease.lease_id, None)
            self._waiting_since.pop(lease.lease_id, None)
            raise JournalUnwritable(f"node {self.node_name}: its journal cannot be written ({exc.__cause__}): "
                                    "no new slices here until it can") from exc
        self._journal.append_event(now, EventKind.RESERVED, lease.lease_id, {"owner": lease.owner})
        return lease

    def activate(self, lease_id: str, pid: int, pidns: int | None = None, start: int | None = None) -> Lease:
        """The holder process ``pid`` started: the lease becomes active.

        Args:
            lease_id: the lease.
            pid: the process as it numbers itself (``os.getpid()``).
            pidns: the inode of its PID namespace (``/proc/self/ns/pid``); a namespace other than this node
                actor's is mapped through ``NSpid`` (a worker in a container of its own).
            start: the process's start time as it read it itself (``start_ticks``), for a process that may
                be gone by now (it asked for the slice and died while it waited): a reused pid is then not
                taken for it. Default: read now.

        Raises:
            LeaseNotFound: the lease is not live here.
            InvalidRequest: ``pid`` is not positive.
        """
        return self._add_pid(lease_id, pid, EventKind.ACTIVATED, pidns, start)

    def claim(self, lease_id: str, pid: int | None = None, pidns: int | None = None) -> Lease:
        """A driver holds the lease (``holder="driver"``): it becomes active. ``pid`` only when the driver
        runs on this node (enforcement then counts its processes); a driver elsewhere is never looked for
        here: its Ray job's liveness decides.

        Raises:
            LeaseNotFound: the lease is not live here.
        """
        if pid is not None:
            return self._add_pid(lease_id, pid, EventKind.ACTIVATED, pidns)
        self._live(lease_id)
        lease = self._ledger.update(lease_id, state=LeaseState.ACTIVE)
        self._journal.upsert_lease(lease, self._regions[lease_id][1])
        self._journal.append_event(self._clock(), EventKind.ACTIVATED, lease_id, {"holder": lease.holder})
        return lease

    def attach_pid(self, lease_id: str, pid: int, pidns: int | None = None) -> Lease:
        """Another process (a subprocess, a data loader) uses the lease; it is reaped and enforced too.
        (Descendants of a lease's processes are counted without this.)

        Raises:
            LeaseNotFound: the lease is not live here.
            InvalidRequest: ``pid`` is not positive.
        """
        return self._add_pid(lease_id, pid, EventKind.ATTACHED, pidns)

    def _local_pid(self, pid: int, pidns: int | None) -> int:
        """``pid`` in this node actor's namespace (unchanged when it is already, or cannot be mapped)."""
        if pidns is None or pidns == self._pidns:
            return pid
        mapped = ProcessTable.scan().resolve(pid, pidns)
        if mapped is None:
            log.warning("node %s: process %d of PID namespace %d is not visible here; kept as is",
                        self.node_name, pid, pidns)
            return pid
        return mapped

    def _add_pid(self, lease_id: str, pid: int, kind: EventKind, pidns: int | None = None,
                 start: int | None = None) -> Lease:
        if pid <= 0:
            raise InvalidRequest("pid", f"must be a positive process id, got {pid}")
        lease = self._live(lease_id)
        local = self._local_pid(pid, pidns)
        pids = lease.pids if local in lease.pids else (*lease.pids, local)
        starts = dict(lease.pid_starts)
        if local not in starts:
            start = start if start is not None else start_ticks(local)
            if start is not None:
                starts[local] = start
        lease = self._ledger.update(lease_id, pids=pids, pid_starts=starts, state=LeaseState.ACTIVE)
        self._journal.upsert_lease(lease, self._regions[lease_id][1])
        detail: dict[str, Any] = {"pid": local}
        if local != pid:
            detail["registered_pid"] = pid
        self._journal.append_event(self._clock(), kind, lease_id, detail)
        return lease

    def finish(self, lease_id: str, pid: int) -> Lease | None:
        """Process ``pid`` is done with the lease (a task returned; Ray keeps the worker for the next task).

        The lease ends when no holder is left, so a lease outlives neither its work nor its processes,
        even when whoever asked for it (the placement actor) died meanwhile. Unknown leases: None.
        """
        lease = self._ledger.leases.get(lease_id)
        if lease is None:
            return None
        rest = tuple(p for p in lease.pids if p != pid)
        if rest or lease.holder == "driver":  # a driver's slice (a gang's) outlives the tasks it runs
            kept = self._ledger.update(lease_id, pids=rest, pid_starts=_starts_of(lease, rest))
            self._journal.upsert_lease(kept, self._regions[lease_id][1])
            return None
        return self._end(lease_id, EventKind.FINISHED, {"pid": pid})

    def disown(self, pid: int, pidns: int | None = None, keep: Collection[str] = ()) -> list[str]:
        """Process ``pid`` (numbered in ``pidns``, as :meth:`activate`) holds none of its Ray slices but
        ``keep``: it leaves each other one (:meth:`finish`; one nothing else holds ends). A lane worker says
        so when its lane ends, so that a slice bound to it that it never heard of (granted to it, the answer
        lost to a placement actor that died) or forgot (released to a placement actor that died before
        telling this node) is not held for as long as the worker lives. Returns the slices it left."""
        local = self._local_pid(pid, pidns)
        left = [x.lease_id for x in self._ledger.leases.values()
                if x.holder == "process" and local in x.pids and x.lease_id not in keep]
        for lease_id in left:
            self.finish(lease_id, local)
        return left

    def release(self, lease_id: str, token: str) -> Lease | None:
        """Free a lease. Idempotent, also across restarts: a lease that already ended returns None.

        Raises:
            LeaseTokenMismatch: ``token`` is not the lease's.
            LeaseNotFound: this node never held the lease.
        """
        try:
            return self._end(lease_id, EventKind.RELEASED, token=token)
        except LeaseNotFound:
            if any(EventKind(e.kind).ends_lease for e in self._journal.events(lease_id=lease_id)):
                return None
            raise

    def _end(self, lease_id: str, kind: EventKind, detail: Mapping[str, Any] | None = None,
             token: str | None = None) -> Lease | None:
        freed = self._ledger.release(lease_id, token)
        if freed is None:
            return None
        self._journal.delete_lease(lease_id)
        self._journal.append_event(self._clock(), kind, lease_id, detail)
        self._regions.pop(lease_id, None)
        self._waiting_since.pop(lease_id, None)
        self._watch.forget(lease_id)
        self._interrupted.pop(lease_id, None)
        self._marks.pop(lease_id, None)
        self._preempting.pop(lease_id, None)
        self._told.pop(lease_id, None)
        return freed

    # --- preemption --------------------------------------------------------------------------
    def preempt(self, lease_id: str, for_queue: str, reason: str = "reclaim", grace_s: float = 10.0) -> dict[str, Any]:
        """Notice that the slice is taken back: its running tasks fail now with
        :class:`~hami_ray.core.errors.SlicePreempted` (processes that armed themselves; their process lives
        on), and once ``grace_s`` has passed, whatever still holds the slice is stopped and the slice freed
        (``preempted`` in the journal). A lease with no process here (a driver's, a pod's, a reservation)
        is freed at the deadline too. A second notice for the same lease changes nothing. The notice is
        journaled, so a restarted node actor still frees the slice.

        Returns:
            ``{"deadline": when the slice goes, "interrupted": pids told now}``.

        Raises:
            LeaseNotFound: the lease is not live here (already gone: nothing to preempt).
        """
        lease = self._live(lease_id)
        known = self._preempting.get(lease_id)
        if known is not None:
            return {"deadline": known[0], "interrupted": []}
        now = self._clock()
        notice = {"lease_id": lease_id, "kind": "preempted", "for_queue": for_queue, "reason": reason,
                  "grace_s": grace_s, "deadline": now + grace_s}
        self._preempting[lease_id] = (now + grace_s, notice)
        live = [p for p in lease.pids if same_process(p, lease.pid_starts.get(p))]
        told = [p for p in live if interruptible(self.state_dir, p) and interrupt(self.state_dir, p, notice)]
        self._told[lease_id] = set(told)
        self._journal.append_event(now, EventKind.PREEMPTING, lease_id, {**notice, "interrupted": told})
        log.warning("node %s: slice %s preempted for queue %s (%s): tasks of %s interrupted, freed in %g s",
                    self.node_name, lease_id, for_queue, reason, told, grace_s)
        return {"deadline": now + grace_s, "interrupted": told}

    def preempting(self) -> dict[str, float]:
        """Leases under a preemption notice, and when each goes."""
        return {lease_id: deadline for lease_id, (deadline, _) in self._preempting.items()}

    def _tell_late(self, lease_id: str, notice: dict[str, Any]) -> None:
        """The notice for the processes of a slice under notice that did not get it yet (registered or
        armed after it was given)."""
        lease = self._ledger.leases.get(lease_id)
        if lease is None:
            return
        told = self._told.setdefault(lease_id, set())
        for p in lease.pids:
            if p not in told and same_process(p, lease.pid_starts.get(p)) and interruptible(self.state_dir, p) \
                    and interrupt(self.state_dir, p, notice):
                told.add(p)

    def _preempt_due(self) -> list[Lease]:
        """Free the slices whose notice ran out, stopping their processes first; returns them. Before that,
        a process that started on a slice under notice (it registered after the notice, or armed itself
        late) gets the notice too, so it stops its work instead of being killed at the deadline."""
        now = self._clock()
        freed = []
        for lease_id, (deadline, notice) in list(self._preempting.items()):
            if now < deadline:
                self._tell_late(lease_id, notice)
                continue
            lease = self._ledger.leases.get(lease_id)
            if lease is None:
                self._preempting.pop(lease_id, None)
                continue
            if lease.holder == "process":
                refused = self._stop(lease)
                if refused:
                    log.warning("cannot stop processes %s of preempted slice %s: not permitted", refused, lease_id)
                    self._journal.append_event(now, EventKind.KILL_FAILED, lease_id, {"pids": refused})
                    continue  # the slice stays held while something may still use it
            ended = self._end(lease_id, EventKind.PREEMPTED, {**notice, "killed": list(lease.pids)})
            if ended is not None:
                freed.append(ended)
        return freed

    # --- isolation ---------------------------------------------------------------------------
    def isolation_env(self, lease_id: str) -> dict[str, str]:
        """The environment a worker of this lease starts with (no lease id or token in it).

        The HAMi-core cache is named by the slice's shape and a slot: leases of the same shape held
        at once get different slots (separate accounting), one after another reuse slot 0, so their
        ``runtime_env`` is identical and Ray can reuse the worker.

        Raises:
            LeaseNotFound: the lease is not live here.
        """
        lease = self._live(lease_id)
        key, slot = self._regions[lease_id]
        return self._backend.isolation_env(lease.allocation.devices, f"{key}-{slot}")

    # --- housekeeping ------------------------------------------------------------------------
    def reap(self) -> list[Lease]:
        """Free leases whose holder processes all died, and reservations no process claimed in time.
        A pod's lease (``holder="pod"``) has no process here: the Kubernetes bridge frees it; a driver's
        (``holder="driver"``) lives as long as its Ray job: the placement actor frees it.

        Dead pids of a lease that still has live ones are dropped from it. Returns the freed leases.
        """
        now = self._clock()
        self._last_reap = now
        freed: list[Lease | None] = []
        for lease in self.leases():
            if lease.holder in ("pod", "driver"):
                continue
            if lease.pids:
                # a pid now naming another process (recycled) counts as dead
                alive = tuple(p for p in lease.pids if same_process(p, lease.pid_starts.get(p)))
                if not alive:
                    freed.append(self._end(lease.lease_id, EventKind.REAPED, {"pids": list(lease.pids)}))
                elif alive != lease.pids:
                    kept = self._ledger.update(lease.lease_id, pids=alive, pid_starts=_starts_of(lease, alive))
                    self._journal.upsert_lease(kept, self._regions[lease.lease_id][1])
            elif now - self._waiting_since.get(lease.lease_id, now) > self.settings.reserve_grace_s:
                freed.append(self._end(lease.lease_id, EventKind.EXPIRED, {"waited_s": self.settings.reserve_grace_s}))
        return [f for f in freed if f is not None]

    def refresh_health(self) -> dict[str, bool]:
        """Ask the backend for device health; update the inventory when it changed."""
        health = self._backend.health()
        if health and health != self._health:
            node = self.node()
            devices = tuple(d.model_copy(update={"healthy": health.get(d.uuid, d.healthy)}) for d in node.devices)
            self.lost.extend(self._ledger.add_node(node.model_copy(update={"devices": devices})))
            self._health = {d.uuid: d.healthy for d in devices}
        return dict(self._health)

    def sample(self) -> NodeSample:
        """Usage per device (from the backend) and per slice (memory of the lease's processes).

        Raises:
            DeviceError: the backend failed while sampling.
        """
        usage = self._backend.usage()
        leases = self.leases()
        table = ProcessTable.scan() if leases else ProcessTable({})  # one procfs scan, only with slices to watch
        self._members = {lease.lease_id: self._processes(lease, table) for lease in leases}
        self._table = table
        return NodeSample(devices=usage.devices, slices=tuple(slice_usage(leases, usage, self._members)))

    def _processes(self, lease: Lease, table: ProcessTable) -> set[int]:
        """The lease's registered processes still alive as themselves, and all their descendants."""
        roots = [p for p in lease.pids if lease.pid_starts.get(p) is None or table.same(p, lease.pid_starts[p])]
        return table.descendants(roots)

    def enforce(self) -> list[SliceQuotaExceeded]:
        """Stop the processes of slices that stayed over limit + tolerance for longer than the grace.

        Every live process of such a lease gets SIGKILL (its slice is freed, so none may stay on the
        device), an event is journaled and the lease is released. Returns one error per stopped lease
        for the caller to fail its task with; nothing is raised.

        Raises:
            DeviceError: the backend failed while sampling.
        """
        now = self._clock()
        out: list[SliceQuotaExceeded] = []
        sample = self.sample()
        self.last_sample = sample
        usages = sample.slices
        over = {u.lease_id for u in usages if self._watch.over(u)}
        for lease_id in [x for x in self._interrupted if x not in over]:
            del self._interrupted[lease_id]  # it let go: a later overrun is interrupted again first
        for usage in self._watch.due(usages, now):
            lease = self._ledger.leases.get(usage.lease_id)
            if lease is None:
                continue  # a second device of a lease already stopped in this pass
            pid = usage.top_pid or lease.pids[0]
            if self._interrupt(lease, usage, pid, now):
                out.append(SliceQuotaExceeded(lease.lease_id, usage.uuid, usage.used_mib, usage.limit_mib, pid,
                                              action="interrupted"))
                continue
            self._interrupted.pop(lease.lease_id, None)
            refused = self._stop(lease)
            if refused:
                log.warning("cannot stop processes %s of slice %s: not permitted", refused, lease.lease_id)
                self._journal.append_event(now, EventKind.KILL_FAILED, lease.lease_id, {"pids": refused})
                continue
            error = SliceQuotaExceeded(lease.lease_id, usage.uuid, usage.used_mib, usage.limit_mib, pid)
            self._end(lease.lease_id, EventKind.QUOTA_EXCEEDED, {
                "uuid": usage.uuid, "used_mib": usage.used_mib, "limit_mib": usage.limit_mib, "pid": pid,
                "killed": list(lease.pids), "message": str(error)})
            log.warning("node %s: %s", self.node_name, error)
            out.append(error)
        return out

    def _stop(self, lease: Lease) -> list[int]:
        """SIGKILL every process of the slice (its workers and their descendants), each only if its pid still
        names the process seen (start time); returns those it was not permitted to signal."""
        members = self._members.get(lease.lease_id, set(lease.pids))
        table = self._table
        refused = []
        for pid in sorted(members):
            start = lease.pid_starts.get(pid)
            if start is None and table is not None:
                proc = table.get(pid)
                start = proc.start if proc is not None else None
            if kill_checked(pid, start) is False:
                refused.append(pid)
        return refused

    def _interrupt(self, lease: Lease, usage: SliceUsage, pid: int, now: float) -> bool:
        """First overrun of a lease whose live processes all armed themselves: hand them the verdict
        (their running task fails, they live on) and give the slice another grace period."""
        live = [p for p in lease.pids if same_process(p, lease.pid_starts.get(p))]
        if lease.lease_id in self._interrupted or not live or not all(interruptible(self.state_dir, p) for p in live):
            return False
        verdict = {"lease_id": lease.lease_id, "uuid": usage.uuid, "used_mib": usage.used_mib,
                   "limit_mib": usage.limit_mib, "pid": pid}
        if not all([interrupt(self.state_dir, p, verdict) for p in live]):
            return False
        self._interrupted[lease.lease_id] = now
        self._watch.forget(lease.lease_id)
        self._journal.append_event(now, EventKind.INTERRUPTED, lease.lease_id, {**verdict, "pids": live})
        log.warning("node %s: slice %s over its limit (%d > %d MiB): tasks of %s interrupted", self.node_name,
                    lease.lease_id, usage.used_mib, usage.limit_mib, live)
        return True

    def tick(self) -> list[SliceQuotaExceeded]:
        """One housekeeping pass for the actor shell's timer: reap when due, refresh health, keep isolation
        running (the MPS daemon), enforce, and write what the journal could not write before. A step that fails is logged and marks enforcement ``degraded``
        until a whole pass succeeds again; the other steps still run. Never raises."""
        failures: list[str] = []
        out: list[SliceQuotaExceeded] = []
        self._journal.flush()  # never raises: what stays pending shows in journal_status()
        steps: list[tuple[str, Callable[[], object]]] = [
            ("reap", self._reap_if_due), ("health", self.refresh_health), ("isolation", self._maintain),
            ("preempt", self._preempt_due), ("enforce", lambda: out.extend(self.enforce()))]
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - a long-running loop never dies on one bad object
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                if self._failure is None:
                    log.exception("node %s: %s failed; enforcement is degraded", self.node_name, name)
        if failures:
            self._failure = "; ".join(failures)
        elif self._failure is not None:
            log.warning("node %s: enforcement recovered (was: %s)", self.node_name, self._failure)
            self._failure = None
        return out

    def _reap_if_due(self) -> None:
        if self._clock() - self._last_reap >= self.settings.reap_interval_s:
            self.reap()

    def _maintain(self) -> None:
        done = self._backend.maintain()
        if done.restarted:
            note = f"{done.note or 'the MPS daemon was restarted'} at {time.strftime('%H:%M:%S')}: processes " \
                   "started before then must restart to be limited by MPS again"
            now = self._clock()
            for lease in self.leases():
                if self.grade_of(lease) is Isolation.MPS:
                    self._marks[lease.lease_id] = note
                    self._journal.append_event(now, EventKind.MARKED, lease.lease_id, {"note": note})
        if done.changed:
            graded = {uuid: (grade, whole) for uuid, grade, whole in done.grades}
            node = self.node()
            devices = tuple(d.model_copy(update={"isolation": graded[d.uuid][0], "whole_isolation": graded[d.uuid][1]})
                            if d.uuid in graded else d for d in node.devices)
            self.lost.extend(self._ledger.add_node(node.model_copy(update={"devices": devices})))

    # --- isolation status ----------------------------------------------------------------------
    @property
    def enforcement(self) -> str:
        """``ok``, or ``degraded`` while the last tick failed or processes cannot be matched."""
        return DEGRADED if self._failure is not None or self._blind is not None else OK

    def grade_of(self, lease: Lease) -> Isolation:
        """The grade the lease's slice holds on this node."""
        return slice_grade(lease.allocation.devices, {d.uuid: d for d in self.node().devices})

    def isolation_status(self) -> dict[str, Any]:
        """What status shows of this node's isolation: its best grade, ``enforcement`` and why, each device's
        grade and note, the MPS daemon, and notes on slices (``marks``)."""
        report = self._backend.isolation_report()
        reasons = [r for r in (self._blind, self._failure) if r]
        return {"isolation": report.best.value, "enforcement": self.enforcement,
                "reason": "; ".join(reasons) or None,
                "devices": {uuid: {"isolation": grade.value, "note": note} for uuid, grade, note in report.devices},
                "mps": report.mps, "mps_reason": report.mps_reason, "marks": dict(self._marks)}

    def journal_status(self) -> dict[str, Any]:
        """Whether the journal takes writes: ``{"writable", "pending", "dropped_events", "error"}`` (see
        :meth:`node_actors.journal.Journal.status`). While it does not, reservations are refused."""
        return self._journal.status()

    def close(self) -> None:
        """Close the journal (the backend belongs to the caller)."""
        self._journal.close()


def _starts_of(lease: Lease, pids: tuple[int, ...]) -> dict[int, int]:
    return {p: s for p, s in lease.pid_starts.items() if p in pids}
