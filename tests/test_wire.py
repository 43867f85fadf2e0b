"""The socket fast path (hami_ray.wire): both servers, both clients, typed errors, the secret, and a
server that outlives bad clients. Loopback only."""

from __future__ import annotations

import asyncio
import json
import time
import socket
import struct
import threading

import pytest

from hami_ray.core.errors import ReservationRefused
from hami_ray.wire import (
    AsyncClient,
    AsyncServer,
    Breaker,
    RemoteError,
    SyncClient,
    ThreadServer,
    WireError,
    encode,
    error_reply,
    recv,
    result,
)

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
    with pytest.raises(RemoteError, match="ValueError: unknown operation"):
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
        # every connection's handler ends once the server dropped it (waited for, so none is cut off by the
        # loop closing); Python 3.11's wait_closed() does not wait for them
        handlers = asyncio.all_tasks() - {asyncio.current_task()}
        _, pending = await asyncio.wait(handlers, timeout=10) if handlers else (set(), set())
        assert not pending, pending

    asyncio.run(main())


def test_errors_come_back_as_data_and_typed() -> None:
    from hami_ray.core.errors import LeaseNotFound, SliceQuotaExceeded, Unschedulable

    sent = Unschedulable(3, {"insufficient device memory": 2, "isolation below mps": 1}, never=False)
    reply = error_reply(sent)
    assert "exc" not in reply and json.loads(json.dumps(reply)) == reply  # plain JSON, nothing pickled
    with pytest.raises(Unschedulable) as info:
        result(reply)
    assert info.value.reasons == sent.reasons and str(info.value) == str(sent)
    with pytest.raises(SliceQuotaExceeded) as over:
        result(error_reply(SliceQuotaExceeded("l1", "GPU-0", 9000, 8192, 42, action="interrupted")))
    assert (over.value.used_mib, over.value.action) == (9000, "interrupted")
    with pytest.raises(LeaseNotFound, match="no lease 'l9'"):
        result(error_reply(LeaseNotFound("l9")))
    with pytest.raises(RemoteError, match="KeyError"):
        result(error_reply(KeyError("x")))  # not ours: the message only
    # a forged reply cannot make the client call anything but hami-ray's own error classes
    for forged in ({"error": "x", "rebuild": "system", "args": ["echo pwned"]},
                   {"error": "x", "rebuild": "Mapping", "args": []},
                   {"error": "x", "rebuild": "Unschedulable", "args": "not a list"}):
        with pytest.raises(RemoteError):
            result(forged)


def test_a_silent_peer_costs_one_timeout_then_the_breaker_answers_at_once() -> None:
    """A server that accepts and reads but never answers: the call gives up after its read timeout, and
    the next calls fail at once (the caller uses the Ray call) until the cool-down passes."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(8)
    held: list[socket.socket] = []

    def accept_and_hold() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            conn.recv(1024)  # read the hello, never answer

    threading.Thread(target=accept_and_hold, daemon=True).start()
    now = [0.0]
    breaker = Breaker(cooldown_s=5.0, clock=lambda: now[0])
    client = SyncClient(lambda: (HOST, listener.getsockname()[1], "s"), read_timeout_s=0.3, breaker=breaker)
    try:
        with pytest.raises(WireError):
            client.call("add", a=1, b=2)
        assert breaker.open()
        with pytest.raises(WireError, match="failed recently"):
            client.call("add", a=1, b=2)  # not tried at all
        now[0] = 6.0
        assert not breaker.open()
    finally:
        listener.close()
        for conn in held:
            conn.close()
        client.close_idle()


def test_a_blackholed_connect_gives_up_quickly() -> None:
    """SYNs to a listener whose accept queue is full are dropped (Linux), as a firewall would drop them:
    connecting gives up after the connect timeout instead of the kernel's minutes of retries."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue (nobody accepts)
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((HOST, port))
        fillers.append(s)
    client = SyncClient(lambda: (HOST, port, "s"), connect_timeout_s=0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(WireError):
            client.call("add", a=1, b=2)
        assert time.monotonic() - t0 < 5  # bounded (the default is 0.5 s; the kernel alone would take minutes)
    finally:
        for s in fillers:
            s.close()
        listener.close()
