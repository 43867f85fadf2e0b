"""hami-ray's socket protocol: the fast path beside Ray calls for the few calls on the lease hot path.

A Ray actor call costs about 0.6-1.2 ms on a small machine (task spec, scheduling queue, a fiber per
async call); a lease round trip would be three of them. The placement actor (acquire, release) and the
node actors (reserve, release) also answer on a TCP socket of their node's address, the same methods
behind both doors; callers fall back to Ray calls where a socket cannot be reached.

Frames are a 4-byte big-endian length and a JSON body. The first frame of a connection is
``{"secret": ...}``, a secret handed out with the address (through Ray's internal KV store or a node
actor's ``info()``, so only members of the Ray cluster learn it). Requests are ``{"op": name, "args":
{...}}``; replies ``{"ok": value}`` or ``{"error": message, "exc": base64 pickle}``, raised by the client
as the original (typed) exception. Servers parse JSON only; only clients unpickle, and only from the
server they authenticated to.

Used by :mod:`hami_ray.runtime.fastpath` (placement actor, drivers) and :mod:`node_actors.actor`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import pickle
import secrets
import socket
import socketserver
import struct
import threading
from collections.abc import Awaitable, Callable
from typing import Any

MAX_FRAME = 16 * 1024 * 1024
_LEN = struct.Struct(">I")


class WireError(ConnectionError):
    """The other side cannot be reached (fall back to a Ray call)."""


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
    try:
        blob = base64.b64encode(pickle.dumps(exc)).decode()
    except Exception:  # noqa: BLE001 - an error that does not pickle still gets its message across
        blob = ""
    return {"error": f"{type(exc).__name__}: {exc}", "exc": blob}


def result(reply: Any) -> Any:
    """The value of a reply, or its error raised."""
    if isinstance(reply, dict) and "ok" in reply:
        return reply["ok"]
    blob = reply.get("exc") if isinstance(reply, dict) else None
    if blob:
        try:
            exc = pickle.loads(base64.b64decode(blob))  # noqa: S301 - from the server we authenticated to
        except Exception:  # noqa: BLE001 - fall back to the message
            exc = None
        if isinstance(exc, BaseException):
            raise exc
    raise RuntimeError(str(reply.get("error", "bad reply") if isinstance(reply, dict) else reply))


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
    """One connection to a server, calls one at a time (an asyncio lock); reconnects when it breaks."""

    def __init__(self, host: str, port: int, secret: str) -> None:
        self.host, self.port, self.secret = host, port, secret
        self._lock = asyncio.Lock()
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def call(self, op: str, **args: Any) -> Any:
        async with self._lock:
            try:
                if self._conn is None:
                    self._conn = await asyncio.open_connection(self.host, self.port)
                    self._conn[1].write(encode({"secret": self.secret}))
                    if "ok" not in await _read(self._conn[0]):
                        raise WireError("secret refused")
                reader, writer = self._conn
                writer.write(encode({"op": op, "args": args}))
                reply = await _read(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                self.close()
                raise WireError(f"{self.host}:{self.port}: {exc}") from exc
        return result(reply)

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
    ``locate()`` returns ``(host, port, secret)`` and is asked again after a connection breaks."""

    def __init__(self, locate: Callable[[], tuple[str, int, str]]) -> None:
        self._locate = locate
        self._lock = threading.Lock()
        self._idle: list[socket.socket] = []

    def call(self, op: str, **args: Any) -> Any:
        for attempt in range(2):
            conn = self._take(fresh=attempt > 0)
            try:
                conn.sendall(encode({"op": op, "args": args}))
                reply = recv(conn)
            except (OSError, ValueError) as exc:
                conn.close()
                if attempt:
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
        host, port, secret = self._locate()
        try:
            conn = socket.create_connection((host, port))
        except OSError as exc:
            raise WireError(str(exc)) from exc
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(encode({"secret": secret}))
            if "ok" not in recv(conn):
                raise WireError("secret refused")
        except (OSError, ValueError) as exc:
            conn.close()
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
