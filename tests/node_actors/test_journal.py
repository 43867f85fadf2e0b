"""The SQLite journal: round trips, restarts, corrupt rows."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from hami_ray.core.model import LeaseState
from node_actors.journal import EventKind, Journal
from tests.node_actors.conftest import make_lease


def test_lease_round_trip_and_restart(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    a = make_lease((0, 8192, 30), lease_id="a").model_copy(update={"created_at": 2.0})
    b = make_lease((1, 1024, 0), lease_id="b").model_copy(update={"created_at": 1.0})
    journal.upsert_lease(a, slot=1)
    journal.upsert_lease(b)
    journal.upsert_lease(a.model_copy(update={"state": LeaseState.ACTIVE, "pids": (7,)}), slot=1)
    journal.close()

    reopened = Journal(tmp_path)
    stored = reopened.leases()
    assert [s.lease.lease_id for s in stored] == ["b", "a"]  # oldest first
    assert stored[1].lease.pids == (7,) and stored[1].lease.state is LeaseState.ACTIVE
    assert stored[1].slot == 1
    assert stored[1].lease.allocation == a.allocation
    reopened.delete_lease("a")
    reopened.delete_lease("never")
    assert [s.lease.lease_id for s in reopened.leases()] == ["b"]
    mode = sqlite3.connect(tmp_path / "journal.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    reopened.close()


def test_events_append_filter_and_prune(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append_event(1.0, EventKind.RESERVED, "a", {"owner": "x"})
    journal.append_event(2.0, EventKind.RELEASED, "a")
    journal.append_event(3.0, EventKind.RESERVED, "b")
    assert [(e.time, e.kind, e.lease_id) for e in journal.events()] == [
        (1.0, "reserved", "a"), (2.0, "released", "a"), (3.0, "reserved", "b")]
    assert journal.events(lease_id="a")[0].detail == {"owner": "x"}
    assert [e.lease_id for e in journal.events(kind=EventKind.RESERVED)] == ["a", "b"]
    assert [e.time for e in journal.events(limit=2)] == [2.0, 3.0]
    journal.prune_events(keep=1)
    assert [e.time for e in journal.events()] == [3.0]
    journal.close()


def test_corrupt_rows_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = Journal(tmp_path)
    journal.upsert_lease(make_lease((0, 1, 0), lease_id="good"))
    journal.append_event(1.0, EventKind.RESERVED, "good")
    raw = sqlite3.connect(tmp_path / "journal.sqlite3")
    raw.execute("INSERT INTO leases (lease_id, body) VALUES ('bad', 'not json')")
    raw.execute("INSERT INTO leases (lease_id, body) VALUES ('other', ?)",
                (make_lease((0, 1, 0), lease_id="mismatch").model_dump_json(),))
    raw.execute("INSERT INTO events (time, kind, lease_id, detail) VALUES (2, 'x', 'good', '[1')")
    raw.commit()
    raw.close()
    with caplog.at_level(logging.WARNING):
        assert [s.lease.lease_id for s in journal.leases()] == ["good"]
        assert len(journal.events()) == 1
    assert "corrupt lease row 'bad'" in caplog.text
    assert "corrupt lease row 'other'" in caplog.text
    assert "corrupt event" in caplog.text
    journal.close()
