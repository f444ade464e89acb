"""The relay with the real third-party client (ffmpeg's ismv push), a relay process, and two real
ingest servers (``orchestrator ingest`` processes) behind the TCP fault proxy: the first field
report's question, "will the data streamed during a network failure be transmitted once the
network is restored?", answered by the archives.

* Through an outage of one remote, then of both: both archives whole (every fragment of both
  tracks, ffprobe reads each file through, no hole in the timeline), byte-identical.
* SIGKILL of the relay with the durable spool, mid-stream, while one remote is down: restarted,
  it sends what it had read; the remote that was down ends with everything the other has.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from relayrig import Push, ingest_tracks, packets, push, relay_profile, track_files
from rig import IngestServer, Orchestrator, free_port, wait_for

from orchestrator.testing.faultproxy import Fault, FaultProxy

pytestmark = pytest.mark.integration

FRAME = 400_000  # a 25 fps frame in ffmpeg's 10 MHz ticks
AAC_FRAME = 1024 * 10_000_000 // 48_000  # 213,333 (ticks of 10 MHz per AAC frame, rounded down)


async def logged(process: Orchestrator, needle: str, timeout: float = 30) -> None:
    await wait_for(lambda: needle in process.text(), timeout, f"{needle!r} in {process.log.name}")


def assert_whole(server: IngestServer, seconds: int) -> dict[str, bytes]:
    """Every fragment of both tracks archived, nothing rejected, no hole: the video has every
    frame of ``seconds`` (25 fps), the audio ``seconds`` of AAC frames, each file read through by
    ffprobe. Returns the files' bytes."""
    tracks = ingest_tracks(server.status())
    assert set(tracks) == {"video", "audio"}, tracks
    for name, track in tracks.items():
        assert track["rejected"] == 0, (name, track)
        assert track["fragments_archived"] == seconds // 2, (name, track)
    files = track_files(server.archive)
    video = packets(files["video"])
    assert len(video) == seconds * 25
    assert video == [k * FRAME for k in range(seconds * 25)]
    audio = packets(files["audio"])
    assert seconds * 48_000 // 1024 - 1 <= len(audio) <= seconds * 48_000 // 1024 + 2, len(audio)
    steps = {b - a for a, b in itertools.pairwise(audio)}
    assert steps <= {AAC_FRAME, AAC_FRAME + 1}, steps  # contiguous: no AAC frame missing
    return {name: path.read_bytes() for name, path in files.items()}


async def test_ffmpeg_through_the_relay_survives_an_outage_of_one_remote_then_of_both(
    tmp_path: Path, ingest_server: Callable[..., IngestServer], orchestrators: Callable[..., Orchestrator]
) -> None:
    seconds = 20
    servers = [ingest_server("ingest-a"), ingest_server("ingest-b")]
    async with trio.open_nursery() as nursery:
        proxies = [FaultProxy(("127.0.0.1", s.port)) for s in servers]
        ports = [(await nursery.start(p.run))[1] for p in proxies]
        listen, metrics = free_port(), free_port()
        profile = relay_profile(tmp_path / "relay.toml", listen=listen, ports=ports, metrics=metrics)
        relay = orchestrators("relay", str(profile), "--status", "log", log="relay.log")
        await logged(relay, "relay.started")
        encoder = push(listen, seconds)
        nursery.start_soon(encoder.run)
        await trio.sleep(4)
        proxies[0].set_fault(Fault.DOWN)  # remote a gone for 5 s
        await trio.sleep(5)
        proxies[0].heal()
        await trio.sleep(2)
        for proxy in proxies:  # both gone for 5 s
            proxy.set_fault(Fault.DOWN)
        await trio.sleep(5)
        for proxy in proxies:
            proxy.heal()
        await encoder.done.wait()
        assert encoder.code == 0, encoder.stderr.decode(errors="replace")[-2000:]

        def complete() -> bool:
            tracks = [ingest_tracks(s.status()) for s in servers]
            return all(len(t) == 2 and all(x["fragments_archived"] == seconds // 2 for x in t.values()) for t in tracks)

        await wait_for(complete, 40, "both archives to hold every fragment")
        assert "relay.post.ended post=1 stream=video status=ok" in relay.text()
        assert "publisher.backlog.dropped" not in relay.text()
        archives = [assert_whole(server, seconds) for server in servers]
        assert archives[0] == archives[1]
        assert relay.stop() == 0
        nursery.cancel_scope.cancel()


async def test_a_relay_killed_mid_stream_loses_nothing_it_had_read(
    tmp_path: Path, ingest_server: Callable[..., IngestServer], orchestrators: Callable[..., Orchestrator]
) -> None:
    """Remote b is down from the start; at 7 s the relay is SIGKILLed (ffmpeg's POST breaks: it
    does not reconnect), restarted with the same spool, and b comes back: b must end with every
    fragment that a (up all along) received, which is everything the relay read."""
    servers = [ingest_server("ingest-a"), ingest_server("ingest-b")]
    async with trio.open_nursery() as nursery:
        proxies = [FaultProxy(("127.0.0.1", s.port)) for s in servers]
        ports = [(await nursery.start(p.run))[1] for p in proxies]
        proxies[1].set_fault(Fault.DOWN)
        listen, metrics = free_port(), free_port()
        spool = tmp_path / "spool"
        profile = relay_profile(tmp_path / "relay.toml", listen=listen, ports=ports, metrics=metrics, spool=spool)
        relay = orchestrators("relay", str(profile), "--status", "log", log="relay-1.log")
        await logged(relay, "relay.started")
        encoder: Push = push(listen, 30)
        nursery.start_soon(encoder.run)
        await wait_for(lambda: ingest_tracks(servers[0].status()).get("audio", {}).get("fragments_archived", 0) >= 3,
                       30, "remote a to have 3 audio fragments")  # fmt: skip
        relay.process.send_signal(signal.SIGKILL)
        relay.process.wait()
        await encoder.done.wait()
        assert encoder.code != 0  # ffmpeg's POST broke with the relay: it had no more to give
        assert list((spool / "video").glob("*.seg")), "the spool holds what b has not had"
        before = {name: track["fragments_archived"] for name, track in ingest_tracks(servers[0].status()).items()}

        again = orchestrators("relay", str(profile), "--status", "log", log="relay-2.log")
        await logged(again, "relay.started")
        assert "relay.spool.recovered stream=video" in again.text()
        proxies[1].heal()

        def caught_up() -> bool:
            a, b = ingest_tracks(servers[0].status()), ingest_tracks(servers[1].status())
            return bool(b) and all(b.get(n, {}).get("fragments_archived") == a[n]["fragments_archived"] for n in a)

        await wait_for(caught_up, 40, "remote b to have everything remote a has")
        after = {name: track["fragments_archived"] for name, track in ingest_tracks(servers[0].status()).items()}
        # a may have received the last fragments read before the kill only after the restart: never fewer.
        assert all(after[n] >= before[n] >= 3 for n in before), (before, after)
        for server in servers:
            for name, track in ingest_tracks(server.status()).items():
                assert track["rejected"] == 0, (name, track)
        files = [track_files(s.archive) for s in servers]
        for name in ("video", "audio"):
            assert files[0][name].read_bytes() == files[1][name].read_bytes(), name
            assert packets(files[1][name])  # playable through
        video = packets(files[1]["video"])
        assert video == [k * FRAME for k in range(len(video))]  # from the first frame on, no hole
        assert again.stop() == 0
        nursery.cancel_scope.cancel()
