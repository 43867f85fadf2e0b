"""hami-ray's socket protocol: the fast path beside Ray calls for the few calls on the lease hot path.

A Ray actor call costs about 0.6-1.2 ms on a small machine (task spec, scheduling queue, a fiber per
async call); a lease round trip would be three of them. The placement actor (acquire, release) and the
node actors (reserve, release) also answer on a TCP socket of their node's address, the same methods
behind both doors; callers fall back to Ray calls where a socket cannot be reached.

Frames are a 4-byte big-endian length and a JSON body. The first frame of a connection is
``{"secret": ...}``, a secret handed out with the address (through Ray's internal KV store or a node
actor's ``info()``, so only members of the Ray cluster learn it). Requests are ``{"op": name, "args":
{...}}``; replies ``{"ok": value}`` or ``{"error": message, "type": name, "args": [...]}``: errors are data.
A client rebuilds a hami-ray error (:mod:`hami_ray.core.errors`, by name, from JSON arguments) and raises
it typed; any other error comes back as :class:`RemoteError` with the message. Nothing is ever unpickled
from a socket.

A good network client (DESIGN, Ray runtime): connecting gives up after :data:`CONNECT_TIMEOUT_S`; a request
still unanswered after :data:`ACK_CHECK_S` whose bytes the peer's kernel has not acknowledged (``SIOCOUTQ``:
the host is gone or the packets are dropped) fails at once; a peer that acknowledged but
does not answer gets :data:`READ_TIMEOUT_S` (it is alive, only slow). ``TCP_USER_TIMEOUT`` backs this up
in the kernel. A client whose peer failed stops trying it for
:data:`COOLDOWN_S` (:class:`Breaker`): a dead or blackholed peer costs one timeout of at most about a
second, then callers go straight to the Ray call. Servers bind the node's Ray address, not every
interface.

Used by :mod:`hami_ray.runtime.fastpath` (placement actor, drivers) and :mod:`node_actors.actor`.
"""

from __future__ import annotations

import asyncio
import json
import select
import secrets
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hami_ray.core import errors as _errors

MAX_FRAME = 16 * 1024 * 1024
CONNECT_TIMEOUT_S = 0.5  # a peer on the node's network answers a SYN in well under this
ACK_CHECK_S = 0.8  # no reply yet: has the peer's kernel acknowledged the request? (delayed ACKs: <= 0.2 s)
UNACKED_TIMEOUT_MS = 1000  # TCP_USER_TIMEOUT: the kernel's own limit (checked only at retransmissions)
READ_TIMEOUT_S = 10.0  # a live peer that acknowledged the request but has not answered (it is slow, not gone)
COOLDOWN_S = 5.0  # after a failure, callers use Ray calls this long before trying the socket again
_LEN = struct.Struct(">I")


class WireError(ConnectionError):
    """The other side cannot be reached, or did not answer in time (fall back to a Ray call)."""


class RemoteError(_errors.HamiRayError):
    """An error on the other side that is not a hami-ray error: its type name and message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class Breaker:
    """Remembers that a peer failed: :meth:`open` is true for ``cooldown_s`` after :meth:`trip`.

    Example: after ``b.trip("timeout")``, ``b.open()`` is True until ``cooldown_s`` passes.
    """

    def __init__(self, cooldown_s: float = COOLDOWN_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._until = 0.0
        self.last: str | None = None

    def open(self) -> bool:
        return self._clock() < self._until

    def trip(self, why: str) -> None:
        self._until = self._clock() + self.cooldown_s
        self.last = why

    def reset(self) -> None:
        self._until = 0.0


def bound(sock: socket.socket) -> None:
    """Fail a connection whose sent data the peer does not acknowledge within :data:`UNACKED_TIMEOUT_MS`."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux
    if user_timeout is not None:
        sock.setsockopt(socket.IPPROTO_TCP, user_timeout, UNACKED_TIMEOUT_MS)


def unacked(sock: socket.socket) -> int:
    """Bytes of the request the peer has not acknowledged yet: still queued to send, or sent and not acked
    (Linux ``SIOCOUTQ``; 0 where unknown). A live peer's kernel acknowledges within a delayed ACK (<= 0.2 s)."""
    try:
        import fcntl  # noqa: PLC0415 - POSIX only
        import termios  # noqa: PLC0415

        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))  # SIOCOUTQ == TIOCOUTQ
    except (ImportError, OSError, AttributeError):
        return 0
    return int(struct.unpack("i", raw)[0])


def answered(sock: socket.socket, read_timeout_s: float) -> None:
    """Wait until ``sock`` has a reply to read: fail fast when the peer never acknowledged the request.

    Raises:
        WireError: the peer's kernel did not acknowledge the request within :data:`ACK_CHECK_S`, or no reply
            came within ``read_timeout_s``.
    """
    deadline = time.monotonic() + read_timeout_s
    while True:
        left = deadline - time.monotonic()
        readable, _, _ = select.select([sock], [], [], max(0.0, min(ACK_CHECK_S, left)))
        if readable:
            return
        if unacked(sock):
            raise WireError(f"the peer did not acknowledge the request within {ACK_CHECK_S:g} s (gone or blackholed)")
        if time.monotonic() >= deadline:
            raise WireError(f"no reply within {read_timeout_s:g} s")


def encode(body: Any) -> bytes:
    data = json.dumps(body).encode()
    return _LEN.pack(len(data)) + data


def reply_for(call: Callable[[], Any]) -> dict[str, Any]:
    """``{"ok": call()}``, or the error it raised, typed."""
    try:
        return {"ok": call()}
    except Exception as exc:  # noqa: BLE001 - every error goes back to the caller
        return error_reply(exc)


def error_reply(exc: BaseException) -> dict[str, Any]:
    """An error as data: its message, type name and, for hami-ray's own errors, the JSON arguments that
    rebuild it (from its ``__reduce__``)."""
    body: dict[str, Any] = {"error": f"{type(exc).__name__}: {exc}", "type": type(exc).__name__}
    if isinstance(exc, _errors.HamiRayError) and type(exc).__module__ == _errors.__name__:
        try:
            reduced = exc.__reduce__()
            if isinstance(reduced, tuple):
                body["rebuild"] = getattr(reduced[0], "__name__", "")
                body["args"] = json.loads(json.dumps(list(reduced[1])))
        except (TypeError, ValueError):
            pass  # not JSON: the message still gets across
    return body


def _rebuilt(reply: dict[str, Any]) -> BaseException | None:
    """A hami-ray error named by the reply, made again from its arguments; None for anything else."""
    name, args = reply.get("rebuild"), reply.get("args")
    if not isinstance(name, str) or not isinstance(args, list):
        return None
    maker = getattr(_errors, name, None)  # only what hami_ray.core.errors defines
    if maker is None or getattr(maker, "__module__", None) != _errors.__name__:
        return None
    try:
        exc = maker(*args)
    except (TypeError, ValueError):
        return None
    return exc if isinstance(exc, _errors.HamiRayError) else None


def result(reply: Any) -> Any:
    """The value of a reply, or its error raised (typed where it is hami-ray's own).

    Raises:
        HamiRayError: the server's hami-ray error, rebuilt; :class:`RemoteError` for any other.
    """
    if isinstance(reply, dict) and "ok" in reply:
        return reply["ok"]
    if isinstance(reply, dict):
        exc = _rebuilt(reply)
        if exc is not None:
            raise exc
        raise RemoteError(str(reply.get("error", "bad reply")))
    raise RemoteError(f"bad reply: {reply!r:.200}")


def _check(message: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(message, dict) or not isinstance(message.get("args", {}), dict):
        raise ValueError(f"bad request frame: {message!r:.200}")
    return str(message.get("op")), message.get("args", {})


# --- asyncio server (the placement actor) ------------------------------------------------------
class AsyncServer:
    """Serves coroutine functions (name -> ``async def f(**args)``)."""

    def __init__(self, handlers: dict[str, Callable[..., Awaitable[Any]]]) -> None:
        self.handlers = handlers
        self.secret = secrets.token_urlsafe(24)
        self.address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host=host, port=0)
        self.address = (host, int(self._server.sockets[0].getsockname()[1]))
        return self.address

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            hello = await _read(reader)
            if not isinstance(hello, dict) or not secrets.compare_digest(str(hello.get("secret", "")), self.secret):
                return
            writer.write(encode({"ok": True}))
            while True:
                message = await _read(reader)
                try:
                    op, args = _check(message)
                    handler = self.handlers.get(op)
                    if handler is None:
                        raise ValueError(f"unknown operation {op!r}")
                    reply = {"ok": await handler(**args)}
                except Exception as exc:  # noqa: BLE001 - typed, back to the caller
                    reply = error_reply(exc)
                writer.write(encode(reply))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass  # the client went away or sent garbage: drop this connection, serve the others
        finally:
            self._writers.discard(writer)
            writer.close()


async def _read(reader: asyncio.StreamReader) -> Any:
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    return json.loads(await reader.readexactly(size))


class AsyncClient:
    """One connection to a server, calls one at a time (an asyncio lock); reconnects when it breaks.
    Bounded: connect and read time out (:data:`CONNECT_TIMEOUT_S`, :data:`READ_TIMEOUT_S`), and after a
    failure it refuses at once for :data:`COOLDOWN_S` (the caller falls back to a Ray call)."""

    def __init__(self, host: str, port: int, secret: str, *, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 read_timeout_s: float = READ_TIMEOUT_S, breaker: Breaker | None = None) -> None:
        self.host, self.port, self.secret = host, port, secret
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self.breaker = breaker or Breaker()
        self._lock = asyncio.Lock()
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def call(self, op: str, **args: Any) -> Any:
        if self.breaker.open():
            raise WireError(f"{self.host}:{self.port} failed recently ({self.breaker.last}); not tried")
        async with self._lock:
            try:
                if self._conn is None:
                    self._conn = await asyncio.wait_for(asyncio.open_connection(self.host, self.port),
                                                        self.connect_timeout_s)
                    raw = self._conn[1].get_extra_info("socket")
                    if raw is not None:
                        bound(raw)
                    self._conn[1].write(encode({"secret": self.secret}))
                    if "ok" not in await asyncio.wait_for(_read(self._conn[0]), self.read_timeout_s):
                        raise WireError("secret refused")
                reader, writer = self._conn
                writer.write(encode({"op": op, "args": args}))
                reply = await self._reply(reader, writer)
            except (OSError, asyncio.IncompleteReadError, ValueError, asyncio.TimeoutError, WireError) as exc:
                self.close()
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self.breaker.trip(why)
                raise WireError(f"{self.host}:{self.port}: {why}") from exc
        return result(reply)

    async def _reply(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        """The reply, failing fast when the peer never acknowledged the request (see :func:`answered`)."""
        raw = writer.get_extra_info("socket")
        read = asyncio.ensure_future(_read(reader))
        deadline = time.monotonic() + self.read_timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                done, _ = await asyncio.wait({read}, timeout=max(0.0, min(ACK_CHECK_S, left)))
                if done:
                    return read.result()
                if raw is not None and unacked(raw):
                    raise WireError(f"the peer did not acknowledge the request within {ACK_CHECK_S:g} s")
                if time.monotonic() >= deadline:
                    raise asyncio.TimeoutError()
        finally:
            if not read.done():
                read.cancel()

    def close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None


# --- threaded server (a node actor) ------------------------------------------------------------
class ThreadServer:
    """Serves plain functions (name -> ``f(**args)``) on a thread per connection."""

    def __init__(self, handlers: dict[str, Callable[..., Any]], host: str) -> None:
        self.handlers = handlers
        self.secret = secrets.token_urlsafe(24)
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((host, 0), Handler)
        self.address = (host, int(self._server.server_address[1]))
        threading.Thread(target=self._server.serve_forever, name="hami-ray-wire", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            hello = recv(conn)
            if not isinstance(hello, dict) or not secrets.compare_digest(str(hello.get("secret", "")), self.secret):
                return
            conn.sendall(encode({"ok": True}))
            while True:
                message = recv(conn)

                def run(message: Any = message) -> Any:
                    op, args = _check(message)
                    handler = self.handlers.get(op)
                    if handler is None:
                        raise ValueError(f"unknown operation {op!r}")
                    return handler(**args)

                conn.sendall(encode(reply_for(run)))
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- blocking client (drivers) -----------------------------------------------------------------
class SyncClient:
    """Connections to a server, a connection per call in flight (kept for the next); thread-safe.
    ``locate()`` returns ``(host, port, secret)`` and is asked again after a connection breaks.

    Bounded like :class:`AsyncClient`: connect and read time out, and after a failure (a refused or
    timed-out connection, a read that timed out) calls raise :class:`WireError` at once for
    :data:`COOLDOWN_S`. A stale kept connection (the server restarted) is retried once on a fresh one;
    a timeout is not retried (the peer is slow or gone: the caller's Ray call is the retry).
    """

    def __init__(self, locate: Callable[[], tuple[str, int, str]], *, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 read_timeout_s: float = READ_TIMEOUT_S, breaker: Breaker | None = None) -> None:
        self._locate = locate
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self.breaker = breaker or Breaker()
        self._lock = threading.Lock()
        self._idle: list[socket.socket] = []

    def call(self, op: str, **args: Any) -> Any:
        if self.breaker.open():
            raise WireError(f"the fast path failed recently ({self.breaker.last}); not tried")
        for attempt in range(2):
            conn = self._take(fresh=attempt > 0)
            try:
                conn.settimeout(self.read_timeout_s)
                conn.sendall(encode({"op": op, "args": args}))
                answered(conn, self.read_timeout_s)
                reply = recv(conn)
            except (TimeoutError, WireError) as exc:  # unacknowledged or unanswered: not retried
                conn.close()
                self.breaker.trip(str(exc) or type(exc).__name__)
                raise WireError(f"{op}: {exc or type(exc).__name__}") from exc
            except (OSError, ValueError) as exc:
                conn.close()
                if attempt:
                    self.breaker.trip(str(exc))
                    raise WireError(str(exc)) from exc
                continue
            with self._lock:
                self._idle.append(conn)
            return result(reply)
        raise WireError("unreachable")  # pragma: no cover - the loop returns or raises

    def _take(self, fresh: bool) -> socket.socket:
        with self._lock:
            if fresh:
                self.close_idle()
            elif self._idle:
                return self._idle.pop()
        try:
            host, port, secret = self._locate()
        except WireError as exc:
            self.breaker.trip(str(exc))
            raise
        try:
            conn = socket.create_connection((host, port), timeout=self.connect_timeout_s)
        except OSError as exc:  # refused, unreachable, or no answer within the timeout (blackholed)
            self.breaker.trip(f"connect {host}:{port}: {exc or type(exc).__name__}")
            raise WireError(f"connect {host}:{port}: {exc or type(exc).__name__}") from exc
        try:
            conn.settimeout(self.read_timeout_s)
            bound(conn)
            conn.sendall(encode({"secret": secret}))
            if "ok" not in recv(conn):
                raise WireError("secret refused")
        except (OSError, ValueError) as exc:
            conn.close()
            self.breaker.trip(f"hello to {host}:{port}: {exc or type(exc).__name__}")
            raise WireError(str(exc)) from exc
        return conn

    def close_idle(self) -> None:
        """Close the connections kept for later calls (the client stays usable)."""
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def recv(conn: socket.socket) -> Any:
    (size,) = _LEN.unpack(_exactly(conn, _LEN.size))
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    return json.loads(_exactly(conn, size))


def _exactly(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(left)
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
