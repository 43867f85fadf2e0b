"""A node actor's state disk that stops taking writes (full): the journal keeps what it could not write and
writes it later, the agent refuses new reservations (``JournalUnwritable``) and holds nothing for them,
slices it holds still end, and after the disk frees a restart finds the journal as the node last knew it.

The journal tests make SQLite itself full (``PRAGMA max_page_count``: the same ``SQLITE_FULL`` a full disk
gives); the agent tests fill a real filesystem: a small tmpfs mounted for the test (root only; skipped,
saying why, where the machine refuses the mount).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hami_ray.core.errors import JournalUnwritable, ReservationRefused
from node_actors.agent import NodeAgent
from node_actors.backends.simulated import SimulatedBackend
from node_actors.journal import MAX_PENDING_EVENTS, EventKind, Journal
from node_actors.settings import AgentSettings
from tests.node_actors.conftest import NODE, SPEC, FakeClock, make_lease


def _fill_sqlite(journal: Journal) -> None:
    """Cap the database at the pages it has and fill both tables' pages: the next write fails with
    SQLITE_FULL."""
    db = journal._db  # noqa: SLF001 - the test makes it full
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
    pads = {"events": "INSERT INTO events (time, kind, lease_id, detail) VALUES (0, 'pad', NULL, ?)",
            "leases": "INSERT INTO leases (lease_id, body) VALUES ('pad-' || hex(randomblob(4)), ?)"}
    for sql in pads.values():
        for size in (2000, 200, 20, 1):  # big rows first, then ever smaller ones into what is left
            for _ in range(10_000):
                try:
                    db.execute(sql, ("x" * size,))
                except sqlite3.OperationalError as exc:
                    assert "full" in str(exc)
                    break
            else:
                raise AssertionError("SQLite never got full")


def _unfill_sqlite(journal: Journal) -> None:
    journal._db.execute("PRAGMA max_page_count = 1073741823")  # noqa: SLF001
    journal._db.execute("DELETE FROM leases WHERE lease_id LIKE 'pad-%'")  # noqa: SLF001


def test_writes_a_full_journal_refuses_are_kept_in_order_and_written_later(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    a, b = make_lease((0, 1024, 0), lease_id="a"), make_lease((1, 2048, 0), lease_id="b")
    journal.upsert_lease(a)
    journal.append_event(1.0, EventKind.RESERVED, "a")
    _fill_sqlite(journal)

    journal.upsert_lease(b)  # refused by the disk: kept
    journal.append_event(2.0, EventKind.RESERVED, "b")
    journal.delete_lease("a")
    journal.append_event(3.0, EventKind.RELEASED, "a")
    status = journal.status()
    assert status["writable"] is False and status["pending"] == 4 and "full" in status["error"]
    assert [e.kind for e in journal.events(lease_id="a")] == ["reserved", "released"]  # pending ones count
    with pytest.raises(JournalUnwritable, match="cannot be written"):
        journal.upsert_lease(make_lease((0, 1, 0), lease_id="c"), must=True)
    assert journal.status()["pending"] == 4  # the insisting write is not kept: it must never land later
    assert journal.flush() is False

    _unfill_sqlite(journal)
    assert journal.flush() is True
    assert journal.status() == {"writable": True, "pending": 0, "dropped_events": 0, "error": None}
    journal.close()
    reopened = Journal(tmp_path)
    assert [s.lease.lease_id for s in reopened.leases()] == ["b"]
    assert [e.kind for e in reopened.events(lease_id="a")] == ["reserved", "released"]
    assert [e.kind for e in reopened.events(lease_id="b")] == ["reserved"]
    reopened.close()


def test_events_kept_in_memory_are_bounded(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    _fill_sqlite(journal)
    for i in range(MAX_PENDING_EVENTS + 5):
        journal.append_event(float(i), EventKind.MARKED, "a")
    status = journal.status()
    assert status["pending"] == MAX_PENDING_EVENTS and status["dropped_events"] == 5
    assert journal.events(lease_id="a")[0].time == 5.0  # the oldest went first
    _unfill_sqlite(journal)
    journal.close()  # writes them on the way out
    assert len(Journal(tmp_path).events(lease_id="a")) == MAX_PENDING_EVENTS


# --- a real full filesystem -------------------------------------------------------------------------
class Disk:
    """A 4 MiB tmpfs; ``fill`` writes a file until the kernel says ENOSPC, ``free`` deletes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        chunk = b"\0" * 65536
        with self.filler.open("ab") as f:
            try:
                while True:
                    f.write(chunk)
                    f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
        small = self.path / "small"
        with pytest.raises(OSError, match="No space"):
            small.write_bytes(chunk)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)
        (self.path / "small").unlink(missing_ok=True)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    mount = tmp_path / "state"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False) if os.geteuid() == 0 else None
    if done is None or done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() if done else 'not root'}")
    try:
        yield Disk(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def agent_on(disk: Disk) -> Iterator[NodeAgent]:
    clock = FakeClock()
    settings = AgentSettings(tolerance_mib=64, grace_s=10.0, reap_interval_s=5.0, reserve_grace_s=60.0)
    agent = NodeAgent(NODE, SimulatedBackend(SPEC, NODE, disk.path), disk.path, clock=clock, settings=settings)
    yield agent
    agent.close()


def test_a_full_state_disk_refuses_new_slices_frees_held_ones_and_catches_up(disk: Disk, agent_on: NodeAgent) -> None:
    agent = agent_on
    held = agent.reserve(make_lease((0, 8192, 30), lease_id="held"))
    kept = agent.reserve(make_lease((1, 4096, 10), lease_id="kept"))
    disk.fill()

    with pytest.raises(JournalUnwritable, match="journal cannot be written") as refused:
        agent.reserve(make_lease((0, 1024, 0), lease_id="new"))
    assert isinstance(refused.value, ReservationRefused)  # placement's retry path takes it as a refusal
    assert {x.lease_id for x in agent.leases()} == {"held", "kept"}  # nothing held for the refused one
    agent.check()  # the ledger recounts clean
    assert agent.release("held", held.token) is not None  # ends still happen, in memory at once
    assert {x.lease_id for x in agent.leases()} == {"kept"}
    assert agent.journal_status()["writable"] is False and agent.journal_status()["pending"] >= 1
    agent.tick()  # never raises on the full disk
    with pytest.raises(JournalUnwritable):
        agent.reserve(make_lease((0, 1024, 0), lease_id="new"))

    disk.free()
    agent.tick()  # writes what was pending
    assert agent.journal_status() == {"writable": True, "pending": 0, "dropped_events": 0, "error": None}
    assert agent.reserve(make_lease((0, 1024, 0), lease_id="new")).lease_id == "new"
    stored = {s.lease.lease_id for s in Journal(disk.path).leases()}
    assert stored == {"kept", "new"}  # the release written late; the refused reservation never
    assert kept.lease_id in stored


@pytest.mark.parametrize("crashed", [False, True], ids=["closed", "crashed"])
def test_a_node_actor_restarts_on_a_full_state_disk(disk: Disk, crashed: bool) -> None:
    """It starts with the slices it journaled, refuses new ones while the disk is full and writes what it
    kept in memory once the disk frees. ``crashed``: the first one never closed its journal (its WAL not
    checkpointed, as after SIGKILL)."""
    settings = AgentSettings(tolerance_mib=64, grace_s=10.0, reap_interval_s=5.0, reserve_grace_s=60.0)

    def start() -> NodeAgent:
        return NodeAgent(NODE, SimulatedBackend(SPEC, NODE, disk.path), disk.path, clock=FakeClock(),
                         settings=settings)

    first = start()
    first.reserve(make_lease((0, 8192, 30), lease_id="held"))
    if not crashed:
        first.close()
    disk.fill()

    agent = start()
    assert [x.lease_id for x in agent.leases()] == ["held"]
    assert agent.journal_status()["writable"] is False
    with pytest.raises(JournalUnwritable):
        agent.reserve(make_lease((1, 1024, 0), lease_id="new"))
    agent.tick()  # never raises on the full disk
    disk.free()
    agent.tick()
    assert agent.journal_status() == {"writable": True, "pending": 0, "dropped_events": 0, "error": None}
    assert agent.reserve(make_lease((1, 1024, 0), lease_id="new")).lease_id == "new"
    agent.close()
    if crashed:
        first.close()
    assert {s.lease.lease_id for s in Journal(disk.path).leases()} == {"held", "new"}


def test_a_journal_that_can_be_neither_written_nor_read_says_so(tmp_path: Path) -> None:
    (tmp_path / "journal.sqlite3").write_bytes(b"not a database" * 100)
    with pytest.raises(JournalUnwritable, match="neither written nor read"):
        Journal(tmp_path)
