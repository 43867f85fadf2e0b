"""The socket fast path (hami_ray.wire): both servers, both clients, typed errors, the secret, and a
server that outlives bad clients. Loopback only."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

import pytest

from hami_ray.core.errors import ReservationRefused
from hami_ray.wire import AsyncClient, AsyncServer, SyncClient, ThreadServer, WireError, encode, recv

HOST = "127.0.0.1"


def _refuse(lease_id: str) -> None:
    raise ReservationRefused(f"lease {lease_id} conflicts")


@pytest.fixture
def thread_server() -> ThreadServer:
    server = ThreadServer({"add": lambda a, b: a + b, "refuse": _refuse}, HOST)
    yield server
    server.close()


def test_sync_client_calls_and_gets_typed_errors(thread_server: ThreadServer) -> None:
    client = SyncClient(lambda: (*thread_server.address, thread_server.secret))
    assert client.call("add", a=2, b=3) == 5
    with pytest.raises(ReservationRefused, match="l1 conflicts"):
        client.call("refuse", lease_id="l1")
    with pytest.raises(ValueError, match="unknown operation"):
        client.call("nope")
    assert client.call("add", a=1, b=1) == 2  # the connection survived the errors
    client.close_idle()


def test_a_wrong_secret_is_refused(thread_server: ThreadServer) -> None:
    client = SyncClient(lambda: (*thread_server.address, "not-the-secret"))
    with pytest.raises(WireError):
        client.call("add", a=1, b=2)


def test_garbage_drops_only_that_connection(thread_server: ThreadServer) -> None:
    with socket.create_connection(thread_server.address) as raw:
        raw.sendall(encode({"secret": thread_server.secret}))
        assert recv(raw) == {"ok": True}
        raw.sendall(struct.pack(">I", 5) + b"{oops")  # not JSON
        assert raw.recv(16) == b""  # closed
    with socket.create_connection(thread_server.address) as raw:
        raw.sendall(struct.pack(">I", 2**31))  # a frame far over the limit, as the hello
        assert raw.recv(16) == b""
    client = SyncClient(lambda: (*thread_server.address, thread_server.secret))
    assert client.call("add", a=20, b=22) == 42
    client.close_idle()


def test_sync_client_reconnects_after_the_server_moves() -> None:
    first = ThreadServer({"who": lambda: "first"}, HOST)
    where = {"server": first}
    client = SyncClient(lambda: (*where["server"].address, where["server"].secret))
    assert client.call("who") == "first"
    first.close()
    second = ThreadServer({"who": lambda: "second"}, HOST)
    where["server"] = second
    try:
        for conn in client._idle:  # the old connection is dead: the kernel closed it with the server
            conn.shutdown(socket.SHUT_RDWR)
        assert client.call("who") == "second"
        client.close_idle()
    finally:
        second.close()


def test_async_server_and_client() -> None:
    async def main() -> None:
        async def slow_add(a: int, b: int) -> int:
            await asyncio.sleep(0.01)
            return a + b

        async def refuse(lease_id: str) -> None:
            _refuse(lease_id)

        server = AsyncServer({"add": slow_add, "refuse": refuse})
        host, port = await server.start(HOST)
        client = AsyncClient(host, port, server.secret)
        assert await asyncio.gather(*(client.call("add", a=i, b=i) for i in range(5))) == [0, 2, 4, 6, 8]
        with pytest.raises(ReservationRefused):
            await client.call("refuse", lease_id="l2")
        wrong = AsyncClient(host, port, "wrong")
        with pytest.raises(WireError):
            await wrong.call("add", a=1, b=1)
        wrong.close()
        # a blocking client from another thread, as drivers use it
        sync = SyncClient(lambda: (host, port, server.secret))
        out: list[int] = []
        thread = threading.Thread(target=lambda: out.append(sync.call("add", a=3, b=4)))
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.01)
        assert out == [7]
        sync.close_idle()
        client.close()
        await server.close()
        await asyncio.sleep(0.05)  # let the closed connections finish

    asyncio.run(main())
