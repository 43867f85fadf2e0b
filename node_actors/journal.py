"""The node's journal: its live leases and a log of what happened to them, in SQLite.

``<state_dir>/journal.sqlite3`` in WAL mode survives a node actor's restart (and its crash: every write
is its own committed transaction). Leases are stored as their pydantic JSON with the slice's
accounting-region slot; events as (time, kind, lease id, detail JSON). A row that no longer parses is
skipped with a logged warning, so one bad row never keeps a node actor from starting.

A disk that stops taking writes (full, failing) never loses what the node actor knows: a write that fails
is kept in memory, in order, and written with the next one that succeeds (:meth:`Journal.flush` retries;
the node actor calls it every tick). Only a new reservation insists (``must=True``): it raises
:class:`~hami_ray.core.errors.JournalUnwritable`, and the node actor refuses the reservation rather than
hold a slice its next restart would forget. A node actor that restarts while its disk is full opens the
journal read-only (its leases come back as usual) and opens it for writing again once the disk lets it.
:meth:`Journal.status` says which state it is in. Events kept
in memory are bounded (:data:`MAX_PENDING_EVENTS`, the oldest dropped and counted); lease rows are one per
lease. A node actor killed while writes are pending restarts from what was written: leases whose end was
pending come back and are reaped again (their processes are gone), reservations expire.

Called only by :class:`node_actors.agent.NodeAgent`, from one thread at a time (a lock guards the
connection in case a threaded actor shell calls in).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hami_ray.core.errors import JournalUnwritable
from hami_ray.core.model import Lease

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.sqlite3"
DEFAULT_KEEP_EVENTS = 100_000
MAX_PENDING_EVENTS = 10_000  # events kept in memory while the disk takes no writes; the oldest are dropped
_UNSET = object()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    lease_id TEXT PRIMARY KEY,
    body     TEXT NOT NULL,
    slot     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    time     REAL NOT NULL,
    kind     TEXT NOT NULL,
    lease_id TEXT,
    detail   TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_by_lease ON events (lease_id);
"""


class EventKind(StrEnum):
    RESERVED = "reserved"
    ACTIVATED = "activated"
    ATTACHED = "attached"
    RELEASED = "released"
    REAPED = "reaped"  # every holder process died
    EXPIRED = "expired"  # reserved, but no process came within the grace period
    QUOTA_EXCEEDED = "quota-exceeded"  # processes stopped for overrunning the slice
    INTERRUPTED = "interrupted"  # its running tasks were interrupted for overrunning the slice (lease kept)
    KILL_FAILED = "kill-failed"
    RESTORED = "restored"
    LOST = "lost"  # a journaled lease no longer fits this node's devices
    FINISHED = "finished"  # its last holder process said it is done (a task returned; the worker lives on)
    MARKED = "marked"  # something that enforced the slice changed (the MPS daemon was restarted)
    PREEMPTING = "preempting"  # notice given: its tasks were interrupted, the slice goes when the grace ends
    PREEMPTED = "preempted"  # the grace ended: its processes were stopped and the slice freed

    @property
    def ends_lease(self) -> bool:
        return self in (EventKind.RELEASED, EventKind.REAPED, EventKind.EXPIRED, EventKind.QUOTA_EXCEEDED,
                        EventKind.LOST, EventKind.FINISHED, EventKind.PREEMPTED)


@dataclass(frozen=True, slots=True)
class StoredLease:
    """A journaled lease and the slot of its accounting region (see ``NodeAgent.isolation_env``)."""

    lease: Lease
    slot: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    time: float
    kind: str
    lease_id: str | None
    detail: Mapping[str, Any] = field(default_factory=dict)


class Journal:
    """SQLite-backed lease store and event log of one node."""

    def __init__(self, state_dir: str | Path) -> None:
        """Open (or create) ``<state_dir>/journal.sqlite3``. On a disk that takes no writes (a node actor
        restarting while its state disk is full) the journal opens read-only: what was written is read as
        usual, writes wait in memory (as on any refused write) and the database is opened for writing again
        by the first write or :meth:`flush` that the disk lets through.

        Raises:
            JournalUnwritable: the journal can be neither opened for writing nor read.
        """
        self.path = Path(state_dir) / JOURNAL_FILE
        self._lock = threading.Lock()
        # writes the disk refused, in order: lease id -> (body, slot), or None to delete; events as rows
        self._pending_leases: dict[str, tuple[str, int] | None] = {}
        self._pending_events: deque[tuple[float, str, str | None, str]] = deque()
        self.dropped_events = 0
        self.error: str | None = None  # why the last write failed; None while writes succeed
        self._read_only = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._open()
        except (sqlite3.Error, OSError) as exc:
            self._db = self._open_read_only(exc)
            self._read_only = True
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("journal %s cannot be opened for writing (%s): read-only until the disk takes writes",
                      self.path, exc)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _open_read_only(self, cause: BaseException) -> sqlite3.Connection:
        """What was written, to read while the disk takes no writes: the database read-only (or, where
        SQLite cannot set up its WAL index on the full disk and no WAL is left to replay, as an immutable
        file); an empty one in memory where none was ever written."""
        if not self.path.exists():
            db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            db.executescript(_SCHEMA)
            return db
        wal = self.path.with_name(self.path.name + "-wal")
        tries = ["mode=ro"] + (["immutable=1"] if not wal.exists() or wal.stat().st_size == 0 else [])
        for query in tries:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?{query}", uri=True, check_same_thread=False,
                                 isolation_level=None)
            try:
                db.execute("SELECT count(*) FROM leases").fetchone()
                return db
            except sqlite3.Error as exc:
                db.close()
                log.debug("journal %s: read-only open (%s): %s", self.path, query, exc)
        raise JournalUnwritable(f"{self.path}: the journal can be neither written nor read ({cause})") from cause

    def _reopen_locked(self) -> None:
        """Open the database for writing again after a read-only start; raises what SQLite raised."""
        db = self._open()
        self._db.close()
        self._db, self._read_only = db, False
        log.warning("journal %s: opened for writing again", self.path)

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- writing, and riding out a disk that refuses writes -----------------------------------
    def _flush_locked(self) -> None:
        """Write everything pending in one transaction; raises what SQLite raised (nothing is lost)."""
        if self._read_only:
            self._reopen_locked()
        if not self._pending_leases and not self._pending_events:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for lease_id, row in self._pending_leases.items():
                if row is None:
                    self._db.execute("DELETE FROM leases WHERE lease_id = ?", (lease_id,))
                else:
                    self._db.execute("INSERT INTO leases (lease_id, body, slot) VALUES (?, ?, ?) ON CONFLICT(lease_id)"
                                     " DO UPDATE SET body=excluded.body, slot=excluded.slot", (lease_id, *row))
            self._db.executemany("INSERT INTO events (time, kind, lease_id, detail) VALUES (?, ?, ?, ?)",
                                 self._pending_events)
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error as exc:  # the failed statement may have rolled back already
                    log.debug("journal %s: rollback: %s", self.path, exc)
            raise
        if self.error is not None:
            log.warning("journal %s: writable again; %d lease rows and %d events written late (%d events dropped)",
                        self.path, len(self._pending_leases), len(self._pending_events), self.dropped_events)
        self._pending_leases.clear()
        self._pending_events.clear()
        self.error = None

    def _write(self, lease: tuple[str, tuple[str, int] | None] | None = None,
               event: tuple[float, str, str | None, str] | None = None, must: bool = False) -> None:
        with self._lock:
            before: Any = _UNSET
            if lease is not None:
                before = self._pending_leases.get(lease[0], _UNSET)
                self._pending_leases[lease[0]] = lease[1]
            if event is not None:
                self._pending_events.append(event)
                while len(self._pending_events) > MAX_PENDING_EVENTS:
                    self._pending_events.popleft()
                    self.dropped_events += 1
            try:
                self._flush_locked()
            except (sqlite3.Error, OSError) as exc:
                if self.error is None:
                    log.error("journal %s cannot be written (%s): writes are kept in memory until it can",
                              self.path, exc)
                self.error = f"{type(exc).__name__}: {exc}"
                if must:
                    if lease is not None:  # the caller gives the write up: it must never land later
                        if before is _UNSET:
                            del self._pending_leases[lease[0]]
                        else:
                            self._pending_leases[lease[0]] = before
                    if event is not None:
                        self._pending_events.pop()
                    raise JournalUnwritable(f"{self.path}: its journal cannot be written ({exc})") from exc

    def flush(self) -> bool:
        """Write what the disk refused before; True when nothing is pending any more."""
        with self._lock:
            try:
                self._flush_locked()
            except (sqlite3.Error, OSError) as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                return False
            return True

    def status(self) -> dict[str, Any]:
        """``{"writable", "pending", "dropped_events", "error"}``: whether the last write succeeded, how many
        writes wait in memory, events dropped meanwhile, and the last error."""
        with self._lock:
            return {"writable": self.error is None, "pending": len(self._pending_leases) + len(self._pending_events),
                    "dropped_events": self.dropped_events, "error": self.error}

    # --- leases ------------------------------------------------------------------------------
    def upsert_lease(self, lease: Lease, slot: int = 0, must: bool = False) -> None:
        """Insert or replace a lease (by its id).

        Raises:
            JournalUnwritable: ``must`` and the disk refused the write (then it is not kept either).
        """
        self._write(lease=(lease.lease_id, (lease.model_dump_json(), slot)), must=must)

    def delete_lease(self, lease_id: str) -> None:
        """Forget a lease; a no-op when it is not there."""
        self._write(lease=(lease_id, None))

    def leases(self) -> list[StoredLease]:
        """Every journaled lease that parses, oldest first; corrupt rows are skipped with a warning. (Read at
        start, when nothing is pending.)"""
        out = []
        for lease_id, body, slot in self._run("SELECT lease_id, body, slot FROM leases ORDER BY rowid"):
            try:
                lease = Lease.model_validate_json(body)
                if lease.lease_id != lease_id:
                    raise ValueError(f"row key {lease_id!r} holds lease {lease.lease_id!r}")
                out.append(StoredLease(lease, int(slot)))
            except (ValidationError, ValueError, TypeError) as exc:
                log.warning("journal %s: skipping corrupt lease row %r: %s", self.path, lease_id, exc)
        return sorted(out, key=lambda s: (s.lease.created_at, s.lease.lease_id))

    # --- events ------------------------------------------------------------------------------
    def append_event(self, time: float, kind: str, lease_id: str | None = None,
                     detail: Mapping[str, Any] | None = None) -> None:
        """Append one event; ``detail`` must be JSON-serialisable."""
        self._write(event=(time, str(kind), lease_id, json.dumps(dict(detail or {}), sort_keys=True)))

    def events(self, lease_id: str | None = None, kind: str | None = None, limit: int | None = None) -> list[Event]:
        """Events oldest first, optionally of one lease or kind, the newest ``limit`` of them.

        Example: ``journal.events(lease_id="l1")[-1].kind == "released"``.
        """
        where, args = [], []
        if lease_id is not None:
            where.append("lease_id = ?")
            args.append(lease_id)
        if kind is not None:
            where.append("kind = ?")
            args.append(str(kind))
        sql = "SELECT seq, time, kind, lease_id, detail FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = list(reversed(self._db.execute(sql, tuple(args)).fetchall()))
            rows += [(0, t, k, lid, d) for t, k, lid, d in self._pending_events  # written late: seq 0 until then
                     if (lease_id is None or lid == lease_id) and (kind is None or k == str(kind))]
        if limit is not None:
            rows = rows[-int(limit):] if limit > 0 else []
        out = []
        for seq, time, kind_, lid, detail in rows:
            try:
                body = json.loads(detail)
                if not isinstance(body, dict):
                    raise ValueError("detail is not an object")
                out.append(Event(int(seq), float(time), str(kind_), lid, body))
            except (ValueError, TypeError) as exc:
                log.warning("journal %s: skipping corrupt event %s: %s", self.path, seq, exc)
        return out

    def prune_events(self, keep: int = DEFAULT_KEEP_EVENTS) -> None:
        """Keep only the newest ``keep`` events (the log must not grow without bound); skipped, with a
        warning, while the disk takes no writes."""
        try:
            self._run("DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?", (keep,))
        except (sqlite3.Error, OSError) as exc:
            log.warning("journal %s: old events not pruned: %s", self.path, exc)

    def close(self) -> None:
        """Write what is pending if the disk lets it, and close the database; idempotent."""
        self.flush()
        with self._lock:
            self._db.close()
