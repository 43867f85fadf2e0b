"""Which processes belong to a slice, under which pids, and whether a pid still names the same process.

The node actor enforces GPU memory per slice. NVML reports device memory per process by *host* pid (the
driver ignores PID namespaces, NVIDIA/nvidia-docker#1483), while a task worker registers itself with its own
``os.getpid()``, a pid in *its* namespace; the slice is that worker plus every descendant it forks
(DataLoader workers, multiprocessing children). The node agent's enforcement pass (:mod:`node_actors.agent`,
:mod:`node_actors.enforcement`) is meant to call this module to:

- take one :class:`ProcessTable` snapshot of procfs per enforcement pass (parent, start time, ``NSpid``
  and PID-namespace inode of every process) and, from it, find a worker's descendants and map a pid
  numbered inside a worker's namespace to the node actor's own numbering (:meth:`ProcessTable.resolve`);
- key processes by (pid, start time), so that a recycled pid is never mistaken for, or killed as, the
  process that registered (:func:`same_process`, :func:`kill_checked`);
- learn whether the node actor itself runs in the host (initial) PID namespace (:func:`in_host_pidns`):
  only there are NVML's pids the same numbers as the node actor's.

Linux only, stdlib only; liveness and signalling reuse :mod:`node_actors.processes`. See
``shared/reference/nvidia-isolation.md`` section 3 for the kernel interfaces.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from node_actors.processes import kill, pid_alive, start_ticks

__all__ = [
    "INIT_PIDNS_INO",
    "Proc",
    "ProcessTable",
    "in_host_pidns",
    "kill_checked",
    "own_pidns",
    "same_process",
]

log = logging.getLogger(__name__)

INIT_PIDNS_INO = 0xEFFFFFFC
"""Inode of the initial (host) PID namespace: ``PROC_PID_INIT_INO`` in ``include/linux/proc_ns.h``, fixed
since Linux 3.8. A namespace created later gets a dynamically allocated inode, never this one."""

_DEAD_STATES = (b"Z", b"X")  # zombie / dead: exited, not yet reaped; they hold no GPU memory
_STAT_MAX = 4096  # /proc/<pid>/stat is < 1 KiB even with a 64-bit field set and a 16-byte comm
_STATUS_MAX = 8192  # /proc/<pid>/status is ~1.5 KiB; NSpid sits in its first third


@dataclass(frozen=True, slots=True)
class Proc:
    """One process as one procfs saw it.

    Attributes:
        pid: Its pid in the procfs's namespace (the node actor's, for ``/proc``).
        ppid: Its parent's pid in that namespace; 0 when the parent lies outside it.
        start: ``/proc/<pid>/stat`` field 22, clock ticks since boot; (pid, start) names one process.
        nspid: The ``NSpid:`` line of ``/proc/<pid>/status``: its pid in each namespace it belongs to, the
            procfs's namespace first, the innermost (its own) last. ``(pid,)`` on kernels before 4.1.
        pidns: Inode of ``/proc/<pid>/ns/pid`` (its innermost PID namespace); None when unreadable (no
            ptrace-read access to another user's process, or no procfs namespace files).
    """

    pid: int
    ppid: int
    start: int
    nspid: tuple[int, ...]
    pidns: int | None


class ProcessTable:
    """One scan of procfs: every process's parent, start time and namespace ids.

    A snapshot: processes started after :meth:`scan` are absent and those that exited stay until the next
    scan. Zombies are left out: they have exited and hold no memory, and their pid may be reaped and
    reused at any moment.

    Example:
        >>> table = ProcessTable.scan()
        >>> table.get(os.getpid()).start == start_ticks(os.getpid())
        True
    """

    __slots__ = ("_by_ns", "_children", "_procs", "own_pidns")

    def __init__(self, procs: Mapping[int, Proc], own_pidns: int | None = None) -> None:
        """Build a table from already-read processes (tests and :meth:`scan`).

        Args:
            procs: Processes by pid in the procfs's namespace.
            own_pidns: Inode of the PID namespace the pids are numbered in (the reader's); None if unknown.
        """
        self._procs: dict[int, Proc] = dict(procs)
        self.own_pidns = own_pidns
        # Indexes are built on first use: most passes need either descendants or resolve, rarely both.
        self._children: dict[int, list[int]] | None = None
        self._by_ns: dict[tuple[int, int], int] | None = None

    @classmethod
    def scan(cls, procfs: str | os.PathLike[str] = "/proc") -> ProcessTable:
        """Read every process of ``procfs``: its ``stat``, ``status`` and the inode of ``ns/pid``.

        A process that exits mid-scan, or whose ``stat`` or ``status`` cannot be read or parsed, is
        skipped; an unreadable ``ns/pid`` leaves ``pidns`` None. ``status`` is read only for processes
        in another namespace than the procfs's (``NSpid`` is ``(pid,)`` otherwise), so a typical node
        costs two procfs reads per process.

        Args:
            procfs: Where procfs is mounted (a fake tree in tests).

        Returns:
            The table, numbered in the namespace of whoever mounted ``procfs``.

        Raises:
            OSError: Only when ``procfs`` itself cannot be listed.

        Example:
            >>> os.getpid() in ProcessTable.scan("/proc")
            True
        """
        root = os.fspath(procfs)
        mount_ns = _mount_pidns(root)
        procs: dict[int, Proc] = {}
        with os.scandir(root) as entries:
            for entry in entries:
                if not entry.name.isdigit():  # self, thread-self, meminfo, sys, ...
                    continue
                proc = _read_proc(f"{root}/{entry.name}", int(entry.name), mount_ns)
                if proc is not None:
                    procs[proc.pid] = proc
        return cls(procs, own_pidns(root))

    def __len__(self) -> int:
        return len(self._procs)

    def __contains__(self, pid: object) -> bool:
        return pid in self._procs

    def __iter__(self) -> Iterator[Proc]:
        return iter(self._procs.values())

    def get(self, pid: int) -> Proc | None:
        """The live process with this pid (in the table's namespace), or None.

        Example: ``ProcessTable.scan().get(os.getpid()).pid == os.getpid()``.
        """
        return self._procs.get(pid)

    def same(self, pid: int, start: int) -> bool:
        """Whether ``pid`` exists with exactly this start time; a recycled pid has a later one.

        Example: ``table.same(pid, table.get(pid).start) and not table.same(pid, table.get(pid).start + 1)``.
        """
        proc = self._procs.get(pid)
        return proc is not None and proc.start == start

    def descendants(self, roots: Iterable[int]) -> set[int]:
        """The roots that exist plus all their live descendants (children, grandchildren, ...), by ppid.

        A process whose parent exited before the scan has been re-parented to init or a subreaper and is
        no longer found from the root: a ppid walk cannot follow orphans (a cgroup can; see the reference,
        section 3). A zombie in the middle breaks nothing: its children were re-parented when it exited.

        Args:
            roots: Pids in the table's namespace, e.g. a slice's registered workers, already resolved.

        Returns:
            Pids in the table's namespace; empty when no root exists.

        Example:
            >>> ProcessTable.scan().descendants([os.getpid()]) >= {os.getpid()}
            True
        """
        if self._children is None:
            children: dict[int, list[int]] = {}
            for proc in self._procs.values():
                children.setdefault(proc.ppid, []).append(proc.pid)
            self._children = children
        found = {pid for pid in roots if pid in self._procs}
        stack = list(found)
        while stack:
            for child in self._children.get(stack.pop(), ()):
                if child not in found:  # guards a corrupt (cyclic) fake table; real ppids form a tree
                    found.add(child)
                    stack.append(child)
        return found

    def resolve(self, pid: int, pidns: int | None) -> int | None:
        """Map a pid as numbered inside PID namespace ``pidns`` to the pid in this table's namespace.

        A worker registers its own ``os.getpid()`` and ``os.stat('/proc/self/ns/pid').st_ino``; the node
        actor resolves them here before looking for descendants or matching NVML's pids. Only a process
        whose innermost namespace is ``pidns`` matches (its last ``NSpid`` entry); a process in a deeper,
        nested namespace is not found by its number in an outer one.

        Args:
            pid: The pid as the process sees itself.
            pidns: Inode of the process's PID namespace; None means "the table's own namespace".

        Returns:
            The pid in the table's namespace, or None when no live process matches (it exited, or its
            namespace is not visible from here, e.g. the node actor runs in a sibling container).

        Example:
            >>> ProcessTable.scan().resolve(os.getpid(), own_pidns()) == os.getpid()
            True
        """
        if pidns is None or pidns == self.own_pidns:
            return pid if pid in self._procs else None
        if self._by_ns is None:
            self._by_ns = {(p.pidns, p.nspid[-1]): p.pid for p in self._procs.values() if p.pidns is not None}
        return self._by_ns.get((pidns, pid))


def _mount_pidns(root: str) -> int | None:
    """The PID namespace ``root`` numbers pids in, when it is the caller's own; None when not or unknown.

    Processes of that namespace have ``NSpid`` ``(pid,)``, so the scan need not read their ``status``:
    a third of its cost. The caller's own entry tells: its ``NSpid`` has one value exactly when the procfs
    belongs to its namespace (not, e.g., a host ``/proc`` bind-mounted into a container). ``<root>/1``
    would name the namespace too, but its ``ns/pid`` needs ptrace access to init, often denied.
    """
    try:
        nspid = _nspid(_read(f"{root}/self/status", _STATUS_MAX))
    except OSError:
        return None
    return _pidns(f"{root}/self") if len(nspid) == 1 else None


def _read_proc(directory: str, pid: int, mount_ns: int | None) -> Proc | None:
    """One process's entry, or None when it vanished, is a zombie, or its files are unreadable or malformed."""
    try:
        stat = _read(f"{directory}/stat", _STAT_MAX)
        # "pid (comm) S ppid ...": comm may hold spaces and ')' itself, so split after the last ')'.
        fields = stat[stat.rindex(b")") + 1:].split()
        if fields[0] in _DEAD_STATES:
            return None
        ppid, start = int(fields[1]), int(fields[19])  # fields 4 and 22 overall; fields[0] is field 3
        pidns = _pidns(directory)
        if pidns is not None and pidns == mount_ns:
            nspid: tuple[int, ...] = (pid,)
        else:
            nspid = _nspid(_read(f"{directory}/status", _STATUS_MAX)) or (pid,)
    except (OSError, ValueError, IndexError):
        return None
    return Proc(pid=pid, ppid=ppid, start=start, nspid=nspid, pidns=pidns)


def _pidns(directory: str) -> int | None:
    """Inode of ``<directory>/ns/pid``, the value ``os.stat(...).st_ino`` gives; None when unreadable."""
    # The link reads "pid:[4026531836]", the namespace's inode (namespaces(7)). readlink costs half of
    # stat() here, which must also resolve the nsfs inode; the kernel checks the same ptrace-read access.
    try:
        link = os.readlink(f"{directory}/ns/pid")
    except OSError:  # EACCES for another user's process without CAP_SYS_PTRACE; ENOENT in fakes or if gone
        return None
    if not (link.startswith("pid:[") and link.endswith("]")):
        return None
    try:
        return int(link[5:-1])
    except ValueError:
        return None


def _read(path: str, size: int) -> bytes:
    # os.open/os.read skip the buffered file object open() builds: measured 15 us vs 19 us (open) and 36 us
    # (Path.read_bytes) per /proc/<pid>/stat read on a 2-core VM, where the scan is I/O-call bound.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def _nspid(status: bytes) -> tuple[int, ...]:
    """The ``NSpid:`` values of a status file, empty when the kernel has none (before 4.1) or it is garbled."""
    start = status.find(b"\nNSpid:")
    if start < 0:
        return ()
    end = status.find(b"\n", start + 1)
    line = status[start + len(b"\nNSpid:"):end if end >= 0 else len(status)]
    try:
        return tuple(int(value) for value in line.split())
    except ValueError:
        return ()


def own_pidns(procfs: str | os.PathLike[str] = "/proc") -> int | None:
    """Inode of the caller's PID namespace, as ``<procfs>/self/ns/pid`` shows it; None when unknown.

    Args:
        procfs: Where procfs is mounted.

    Returns:
        The inode, comparable with :attr:`Proc.pidns`; None without procfs or namespace files.

    Example: ``own_pidns() == INIT_PIDNS_INO`` on a bare-metal host or a ``hostPID`` pod.
    """
    return _pidns(f"{os.fspath(procfs)}/self")


def in_host_pidns(procfs: str | os.PathLike[str] = "/proc") -> bool | None:
    """Whether the caller runs in the initial (host) PID namespace, where NVML's pids are its own pids.

    Args:
        procfs: Where procfs is mounted.

    Returns:
        True in the host namespace, False in a container's or any other; None when unknown (no
        ``/proc/self/ns/pid``).

    Example: ``in_host_pidns()`` is False in a pod without ``hostPID: true``.
    """
    ino = own_pidns(procfs)
    return None if ino is None else ino == INIT_PIDNS_INO


def same_process(pid: int, start: int | None) -> bool:
    """Whether ``pid`` is alive (not a zombie) and, when ``start`` is given, started at exactly that tick.

    Args:
        pid: A pid in the caller's namespace.
        start: The start time recorded with the pid (``start_ticks``); None checks liveness only.

    Returns:
        False when it is gone, a zombie, or a different process now holds the pid.

    Example: ``same_process(os.getpid(), start_ticks(os.getpid())) is True``.
    """
    return pid_alive(pid) and (start is None or start_ticks(pid) == start)


def kill_checked(pid: int, start: int | None) -> bool | None:
    """SIGKILL ``pid`` only if it is still the process recorded as (pid, start).

    Where the kernel has pidfds (Linux 5.3+), the signal goes through a pidfd opened *before* the start
    time is checked, so a pid recycled between check and signal cannot be hit.

    Args:
        pid: A pid in the caller's namespace.
        start: The start time recorded with the pid; None skips the reuse check (liveness only).

    Returns:
        True when signalled (or it exited between check and signal), False when the signal was not
        permitted (another user's process), None when it is not that process (gone, a zombie, or the pid
        was reused): it is left alone.

    Example: ``kill_checked(worker_pid, worker_start)`` after the slice overran its memory.
    """
    pidfd = _pidfd(pid)
    try:
        if not same_process(pid, start):
            log.info("not killing pid %d: no longer the process that started at tick %s", pid, start)
            return None
        if pidfd is None:
            return kill(pid)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return True  # it exited after the check: gone, as kill() counts it
        except PermissionError:
            return False
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    """A pidfd pinning the process that holds ``pid`` now, or None (gone, or no pidfd support)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # AttributeError: not Linux; ENOSYS: kernel < 5.3; ESRCH: gone
        return None
