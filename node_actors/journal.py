"""The node's journal: its live leases and a log of what happened to them, in SQLite.

``<state_dir>/journal.sqlite3`` in WAL mode survives a node actor's restart (and its crash: every write
is its own committed transaction). Leases are stored as their pydantic JSON with the slice's
accounting-region slot; events as (time, kind, lease id, detail JSON). A row that no longer parses is
skipped with a logged warning, so one bad row never keeps a node actor from starting.

Called only by :class:`node_actors.agent.NodeAgent`, from one thread at a time (a lock guards the
connection in case a threaded actor shell calls in).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hami_ray.core.model import Lease

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.sqlite3"
DEFAULT_KEEP_EVENTS = 100_000

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
        """Open (or create) ``<state_dir>/journal.sqlite3``."""
        self.path = Path(state_dir) / JOURNAL_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
        self._db.executescript(_SCHEMA)

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- leases ------------------------------------------------------------------------------
    def upsert_lease(self, lease: Lease, slot: int = 0) -> None:
        """Insert or replace a lease (by its id)."""
        self._run("INSERT INTO leases (lease_id, body, slot) VALUES (?, ?, ?) "
                  "ON CONFLICT(lease_id) DO UPDATE SET body=excluded.body, slot=excluded.slot",
                  (lease.lease_id, lease.model_dump_json(), slot))

    def delete_lease(self, lease_id: str) -> None:
        """Forget a lease; a no-op when it is not there."""
        self._run("DELETE FROM leases WHERE lease_id = ?", (lease_id,))

    def leases(self) -> list[StoredLease]:
        """Every journaled lease that parses, oldest first; corrupt rows are skipped with a warning."""
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
        self._run("INSERT INTO events (time, kind, lease_id, detail) VALUES (?, ?, ?, ?)",
                  (time, str(kind), lease_id, json.dumps(dict(detail or {}), sort_keys=True)))

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
        out = []
        for seq, time, kind_, lid, detail in reversed(self._run(sql, tuple(args))):
            try:
                body = json.loads(detail)
                if not isinstance(body, dict):
                    raise ValueError("detail is not an object")
                out.append(Event(int(seq), float(time), str(kind_), lid, body))
            except (ValueError, TypeError) as exc:
                log.warning("journal %s: skipping corrupt event %s: %s", self.path, seq, exc)
        return out

    def prune_events(self, keep: int = DEFAULT_KEEP_EVENTS) -> None:
        """Keep only the newest ``keep`` events (the log must not grow without bound)."""
        self._run("DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?", (keep,))

    def close(self) -> None:
        """Close the database; idempotent."""
        with self._lock:
            self._db.close()
