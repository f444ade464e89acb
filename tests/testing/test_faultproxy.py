"""The fault proxy itself, on real loopback sockets: each fault does what the suite relies on."""

from __future__ import annotations

import pytest
import trio

from orchestrator.testing.faultproxy import Fault, FaultProxy


async def sink_server(received: list[bytes], *, task_status=trio.TASK_STATUS_IGNORED):
    """Upstream that records what it reads and echoes "ok:<n>" for each read."""

    async def handle(stream):
        try:
            async for data in stream:
                received.append(data)
                await stream.send_all(b"ok")
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def start(nursery, **options) -> tuple[FaultProxy, list[bytes]]:
    received: list[bytes] = []
    port = await nursery.start(sink_server, received)
    proxy = FaultProxy(("127.0.0.1", port), **options)
    await nursery.start(proxy.run)
    return proxy, received


OPENED: list[trio.SocketStream] = []


async def use_until_broken(client: trio.SocketStream) -> None:
    """Read and write until the connection breaks (a reset may first read as an EOF)."""
    with trio.fail_after(5):
        while True:
            if not await client.receive_some(100):
                await client.send_all(b"more")


async def send_until_broken(client: trio.SocketStream) -> None:
    with trio.fail_after(5):
        for _ in range(100):
            await client.send_all(b"c" * 300)
            await trio.sleep(0.01)


async def connect(proxy: FaultProxy) -> trio.SocketStream:
    stream = await trio.open_tcp_stream(*proxy.address)
    OPENED.append(stream)
    return stream


async def answered(proxy: FaultProxy, data: bytes) -> trio.SocketStream:
    """A new connection through the proxy that sent ``data`` and got the server's "ok" back."""
    client = await connect(proxy)
    await client.send_all(data)
    assert await client.receive_some(100) == b"ok"
    return client


@pytest.fixture(autouse=True)
async def close_clients():
    yield
    while OPENED:
        await OPENED.pop().aclose()


async def test_pass_forwards_both_ways():
    async with trio.open_nursery() as nursery:
        proxy, received = await start(nursery)
        client = await answered(proxy, b"hello")
        assert b"".join(received) == b"hello"
        assert proxy.bytes_client_to_server == 5
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_reset_breaks_open_connections_and_new_ones_pass():
    async with trio.open_nursery() as nursery:
        proxy, _ = await start(nursery)
        client = await answered(proxy, b"x")
        proxy.set_fault(Fault.RESET)
        with pytest.raises(trio.BrokenResourceError):
            await use_until_broken(client)
        assert proxy.connections_reset == 1
        await answered(proxy, b"y")
        nursery.cancel_scope.cancel()


async def test_refuse_resets_new_connections_before_any_byte():
    async with trio.open_nursery() as nursery:
        proxy, received = await start(nursery)
        existing = await answered(proxy, b"a")
        proxy.set_fault(Fault.REFUSE)
        fresh = await connect(proxy)
        with pytest.raises(trio.BrokenResourceError):
            await use_until_broken(fresh)
        assert proxy.connections_refused == 1
        await existing.send_all(b"c")  # the open connection keeps working
        assert await existing.receive_some(100) == b"ok"
        assert b"more" not in b"".join(received)
        nursery.cancel_scope.cancel()


async def test_down_resets_open_connections_and_refuses_new_ones_until_healed():
    async with trio.open_nursery() as nursery:
        proxy, _ = await start(nursery)
        existing = await answered(proxy, b"a")
        proxy.set_fault(Fault.DOWN)
        with pytest.raises(trio.BrokenResourceError):
            await use_until_broken(existing)
        fresh = await connect(proxy)
        with pytest.raises(trio.BrokenResourceError):
            await use_until_broken(fresh)
        assert (proxy.connections_reset, proxy.connections_refused) == (1, 1)
        proxy.heal()
        await answered(proxy, b"y")
        nursery.cancel_scope.cancel()


async def test_black_hole_stalls_the_sender_and_heal_resets_it():
    async with trio.open_nursery() as nursery:
        proxy, received = await start(nursery)
        client = await connect(proxy)
        proxy.set_fault(Fault.BLACKHOLE)
        payload = b"z" * 20_000_000
        with trio.move_on_after(2) as stalled:
            await client.send_all(payload)
        assert stalled.cancelled_caught, "20 MB went into a black hole without blocking"
        assert sum(map(len, received)) < len(payload)
        proxy.heal()
        with pytest.raises(trio.BrokenResourceError):
            await use_until_broken(client)
        await answered(proxy, b"q")
        nursery.cancel_scope.cancel()


async def test_stall_stops_reading_keeps_connections_open_and_buffers_absorb_writes():
    async with trio.open_nursery() as nursery:
        proxy, received = await start(nursery, receive_buffer=None)  # the kernel's default buffers
        client = await answered(proxy, b"a")
        proxy.set_fault(Fault.STALL)
        # What a hung receiver does: the writes still complete (socket buffers take them)...
        with trio.fail_after(5):
            await client.send_all(b"s" * 100_000)
        # ...but nothing reaches the server, and the connection is neither closed nor reset.
        await trio.sleep(1.0)
        assert b"".join(received) == b"a"
        assert (proxy.open_connections, proxy.connections_reset) == (1, 0)
        # A new connection during the stall is accepted and not read either.
        fresh = await connect(proxy)
        await fresh.send_all(b"new")
        await trio.sleep(0.3)
        assert b"".join(received) == b"a"
        # Writes eventually block: the buffers are finite.
        with trio.move_on_after(2) as blocked:
            await client.send_all(b"z" * 50_000_000)
        assert blocked.cancelled_caught
        proxy.set_fault(Fault.RESET)  # the stall ends with a reset of every connection
        with pytest.raises(trio.BrokenResourceError):
            await use_until_broken(client)
        assert proxy.connections_reset == 2
        await answered(proxy, b"y")
        nursery.cancel_scope.cancel()


async def test_drip_holds_the_rate():
    async with trio.open_nursery() as nursery:
        proxy, received = await start(nursery)
        proxy.set_fault(Fault.DRIP, drip_bytes_per_second=4000)
        client = await connect(proxy)
        started = trio.current_time()
        await client.send_all(b"d" * 8000)
        with trio.fail_after(20):
            while sum(map(len, received)) < 8000:
                await trio.sleep(0.05)
        assert trio.current_time() - started >= 1.5  # 8000 bytes at 4000 B/s: about 2 s
        nursery.cancel_scope.cancel()


async def test_close_after_forwards_exactly_n_bytes_then_resets():
    async with trio.open_nursery() as nursery:
        proxy, received = await start(nursery)
        proxy.set_fault(Fault.CLOSE_AFTER, close_after_bytes=1000)
        client = await connect(proxy)
        with pytest.raises(trio.BrokenResourceError):
            await send_until_broken(client)
        await trio.sleep(0.1)
        assert sum(map(len, received)) == 1000
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("upstream", "listen"), [(("10.0.0.1", 80), ("127.0.0.1", 0)),
                                                  (("127.0.0.1", 80), ("0.0.0.0", 0))])  # fmt: skip
async def test_loopback_only(upstream, listen):
    with pytest.raises(ValueError, match="loopback only"):
        FaultProxy(upstream, listen)
