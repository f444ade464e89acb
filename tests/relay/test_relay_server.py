"""The relay in-process (orchestrator/relay/server.py): an encoder's POSTs over real HTTP (httpx,
chunked) into ``run_relay``, pushed to a real ingest server (in-process, on loopback): duplicates
from a reconnecting encoder are not forwarded twice, a new header re-opens the outbound POST, a
silent encoder shows in metrics and /status, credentials and TLS on the encoder listener, and a
profile that cannot run as a relay is refused with its key path."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme
from prometheus_client import CollectorRegistry
from relaykit import FRAGMENT, PRIMING, SECOND, ffmpeg_body, fragment, header
from relayserverkit import STREAMS, post, relay_in_process, relay_profile, relay_url
from rig import TEST_SETTINGS, build_profile, endpoint, group, loopback_ingest, wait_for

from orchestrator.errors import ProfileError
from orchestrator.fmp4 import boxes
from orchestrator.relay.server import RelayOptions, RelayRunning, run_relay
from orchestrator.supervisor import UpOptions, run_up
from orchestrator.testing.faultproxy import Fault


def tracks(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    stream = status["publishing_points"].get("live/relay", {}).get("streams", {}).get("video", {})
    return {t["name"]: t for t in stream.get("tracks", {}).values()}


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"stream": "video", "group": "primary", **labels})


async def test_duplicates_are_dropped_and_a_new_header_reopens_the_outbound_post(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    async with loopback_ingest(tmp_path / "archive") as ingest, \
            relay_in_process(relay_profile(ingest.port), registry) as running:  # fmt: skip
        url = relay_url(running)
        assert (await post(url, header(), *ffmpeg_body(3))).status_code == 200
        # The encoder reconnects and resends its last two fragments of each track, then goes on.
        assert (await post(url, header(), *ffmpeg_body(2, first=1), *ffmpeg_body(2, first=3))).status_code == 200
        await wait_for(lambda: tracks(ingest.app.point.status()).get("audio", {}).get("fragments_archived") == 5, 10,
                       "the ingest to archive 5 fragments a track")  # fmt: skip
        assert sample(registry, "orchestrator_relay_fragments_total", outcome="duplicate") == 4
        assert sample(registry, "orchestrator_relay_fragments_total", outcome="forwarded") == 10
        archived = tracks(ingest.app.point.status())
        assert [(t["fragments_received"], t["duplicates_dropped"]) for t in archived.values()] == [(5, 0), (5, 0)]
        labels = {"endpoint": "ingest-a", "endpoint_region": "region-a"}
        assert sample(registry, "orchestrator_posts_opened_total", **labels) == 1

        # The encoder restarts with new settings (another header) and a timeline from 0 again.
        assert (await post(url, header(creator="restarted"), *ffmpeg_body(2))).status_code == 200
        await wait_for(lambda: sample(registry, "orchestrator_posts_opened_total", **labels) == 2, 10,
                       "the outbound POST to be re-opened with the new header")  # fmt: skip
        assert sample(registry, "orchestrator_relay_header_changes_total") == 1
        assert ingest.app.point.status()["posts"]["total"] == 2  # the relay's second outbound POST
        # The ingest takes the new header as an encoder restart: the new timeline goes to new files.
        await wait_for(lambda: (tmp_path / "archive/live/relay/video/audio-2.mp4").exists(), 10, "the new timeline")
        audio = registry.get_sample_value("orchestrator_relay_last_fragment_start_ticks",
                                          {"presentation": "relay", "stream": "video", "group": "primary",
                                           "track": "2"})  # fmt: skip
        assert audio == 20_000_000 - PRIMING


async def test_a_silent_encoder_shows_in_metrics_and_status(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    async with loopback_ingest(tmp_path / "archive") as ingest, \
            relay_in_process(relay_profile(ingest.port, metrics=True), registry) as running:  # fmt: skip
        assert running.metrics_address is not None
        status_url = f"http://127.0.0.1:{running.metrics_address[1]}/status"
        assert (await post(relay_url(running), header(), *ffmpeg_body(2))).status_code == 200
        async with httpx.AsyncClient(timeout=5) as http:

            async def encoder_up() -> bool:
                return bool((await http.get(status_url)).json()["groups"]["primary"]["encoder_up"])

            await wait_for(encoder_up, 5, "the encoder to be up in /status")
            await wait_for(lambda: sample(registry, "orchestrator_relay_encoder_silent") == 1, 10,
                           "the relay to call the encoder silent (1 fragment duration)")  # fmt: skip
            document = (await http.get(status_url)).json()
        assert document["groups"]["primary"]["encoder_up"] is False
        assert document["groups"]["primary"]["last_error"] == "encoder silent: stream video"
        assert "group primary: encoder down" in document["not_ready"]
        since = registry.get_sample_value("orchestrator_relay_seconds_since_last_fragment",
                                          {"presentation": "relay", "stream": "video", "group": "primary"})  # fmt: skip
        assert since is not None
        assert since >= 2


async def test_credentials_and_tls_on_the_encoder_listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(tmp_path / "relay.pem")
    monkeypatch.setenv("RELAY_TOKEN", "s3cret")
    pem = str(tmp_path / "relay.pem")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with loopback_ingest(tmp_path / "archive") as ingest:
        profile = relay_profile(ingest.port, tls_cert=pem, tls_key=pem, credentials={"token_env": "RELAY_TOKEN"})
        async with relay_in_process(profile, CollectorRegistry()) as running:
            url = relay_url(running, "https")
            refused = await post(url, header(), client=httpx.AsyncClient(verify=context, timeout=10))
            assert refused.status_code == 401
            wrong = await post(url, header(), client=httpx.AsyncClient(verify=context, timeout=10),
                               Authorization="Bearer nope")  # fmt: skip
            assert wrong.status_code == 401
            ok = await post(url, header(), *ffmpeg_body(1), client=httpx.AsyncClient(verify=context, timeout=10),
                            Authorization="Bearer s3cret")  # fmt: skip
            assert ok.status_code == 200
            with pytest.raises(httpx.ConnectError):  # the listener speaks TLS only, and its CA is not a default one
                await post(url, header(), Authorization="Bearer s3cret")
            await wait_for(lambda: len(tracks(ingest.app.point.status())) == 2, 10, "the fragments to reach the ingest")


async def test_profiles_that_cannot_run_as_a_relay_are_refused_with_their_key_path(tmp_path: Path) -> None:
    profile = relay_profile(1, credentials={"token_env": "RELAY_TOKEN_THAT_IS_NOT_SET"})
    with pytest.raises(ProfileError, match=r"groups\.primary\.encoder\.credentials: environment variable"):
        await run_relay(profile, RelayOptions(handle_signals=False, status="off"))
    with pytest.raises(ProfileError, match=r"groups\.backup\.encoder\.backend: a relay runs a group"):
        await run_relay(profile, RelayOptions(group="backup", handle_signals=False, status="off"))
    with pytest.raises(ProfileError, match=r"groups\.primary\.encoder\.backend: a relay group is run by"):
        await run_up(profile, UpOptions(status="off", handle_signals=False))


async def test_a_cmaf_endpoint_gets_each_track_as_cmaf_segments(tmp_path: Path) -> None:
    """The profile's tracks name the encoder's track IDs (video 1, audio 2): each goes to the CMAF
    endpoint on its own path, header first, a segment per fragment (orchestrator/push/cmafroute.py)."""
    streams = {"video": [*STREAMS["video"], {"kind": "audio", "name": "audio", "bitrate": 64_000,
                                             "sample_rate": 48_000, "channels": 2}]}  # fmt: skip
    async with loopback_ingest(tmp_path / "archive") as ingest:
        cmaf = endpoint(ingest.port, name="ingest-c", region="region-c", format="cmaf", cmaf_paths="template")
        profile = build_profile(name="relay", streams=streams, groups={
            "primary": group(cmaf, encoder={"backend": "relay", "listen": "127.0.0.1:0"}),
            "backup": group(endpoint(ingest.port))})  # fmt: skip
        async with relay_in_process(profile, CollectorRegistry()) as running:
            assert (await post(relay_url(running), header(), *ffmpeg_body(3))).status_code == 200

            def archived() -> dict[str, int]:
                points = ingest.app.cmaf.status()["publishing_points"]
                streams = next(iter(points.values()), {}).get("streams", {})
                return {name: next(iter(s["tracks"].values()))["fragments_archived"] for name, s in streams.items()}

            await wait_for(lambda: archived() == {"video": 3, "audio": 3}, 10, "3 CMAF segments of each track")


async def test_the_spool_keeps_what_a_down_endpoint_lacks_and_lets_it_go_once_it_has_it(tmp_path: Path) -> None:
    """Two endpoints, one down: every fragment stays on disk (the other endpoint has them all);
    once the down one is back and has caught up, the spool keeps only the segment being written."""
    spool = tmp_path / "spool"
    registry = CollectorRegistry()
    async with loopback_ingest(tmp_path / "a") as up, loopback_ingest(tmp_path / "b", proxy=True) as down:
        assert down.proxy is not None
        assert down.proxy_port is not None
        down.proxy.set_fault(Fault.DOWN)
        profile = build_profile(name="relay", streams=STREAMS, groups={
            "primary": group(endpoint(up.port, name="ingest-a"), endpoint(down.proxy_port, name="ingest-b"),
                             encoder={"backend": "relay", "listen": "127.0.0.1:0", "spool": str(spool)}),
            "backup": group(endpoint(up.port))})  # fmt: skip
        async with relay_in_process(profile, registry, spool_segment_bytes=4096) as running:
            body = ffmpeg_body(6, sample_bytes=1200)  # ~5 kB a fragment: one a 4 kB segment
            assert (await post(relay_url(running), header(), *body)).status_code == 200
            await wait_for(lambda: tracks(up.app.point.status()).get("audio", {}).get("fragments_archived") == 6, 10,
                           "ingest a to have everything")  # fmt: skip
            await trio.sleep(1.5)  # the watcher trims the spool once a second: nothing may go while b lacks it
            segments = sorted((spool / "video").glob("*.seg"))
            numbers = [int(p.stem) for p in segments]
            # None holding a fragment deleted (segment 0 held the header alone: every segment repeats it).
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
            assert numbers[0] <= 1
            assert len(segments) >= 12
            assert sample(registry, "orchestrator_relay_spool_fragments") == 12
            down.proxy.heal()
            await wait_for(lambda: tracks(down.app.point.status()).get("audio", {}).get("fragments_archived") == 6,
                           20, "ingest b to catch up")  # fmt: skip
            # b's outbox (and a's) keeps its forward buffer, the last 1 MiB sent plus what the socket's
            # send queue held: the spool keeps all of it. 16 MB more push the first fragments out of
            # every forward buffer; then their segments go.
            more = ffmpeg_body(10, first=6, sample_bytes=200_000)
            assert (await post(relay_url(running), header(), *more)).status_code == 200
            await wait_for(lambda: tracks(down.app.point.status()).get("audio", {}).get("fragments_archived") == 16,
                           30, "ingest b to have the rest")  # fmt: skip

            def oldest() -> int:
                return min(int(p.stem) for p in (spool / "video").glob("*.seg"))

            await wait_for(lambda: oldest() > numbers[-1], 10, "the first segments to be deleted")
            assert sample(registry, "orchestrator_relay_spool_fragments") < 20


async def test_an_encoder_post_over_the_memory_budget_is_answered_503(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    async with loopback_ingest(tmp_path / "archive") as ingest, \
            relay_in_process(relay_profile(ingest.port), registry, memory_budget=64 * 1024) as running:  # fmt: skip
        big = boxes.box(b"mdat", bytes(100_000))  # declared before it is read: refused at its size field
        moof = ffmpeg_body(1)[0]
        moof = moof[: int.from_bytes(moof[:4], "big")]
        answer = await post(relay_url(running), header(), moof, big)
        assert answer.status_code == 503
        assert "memory budget" in answer.text
        assert (await post(relay_url(running), header(), *ffmpeg_body(1))).status_code == 200


async def test_two_relays_export_the_timing_the_divergence_rule_compares(tmp_path: Path) -> None:
    """A primary and a backup relay, each behind its own encoder, pushing to the same ingest: with
    the encoders in step their phases and media offsets agree (within a sample, and well within
    half a fragment); the backup re-stamped 1 s off shows a phase 1 s away, more than a sample
    (the rule of deploy/prometheus/orchestrator-relay-rules.yml, tested there with promtool)."""
    relay_encoder = {"backend": "relay", "listen": "127.0.0.1:0"}
    registries = {"primary": CollectorRegistry(), "backup": CollectorRegistry()}

    def value(group_name: str, name: str, track: str) -> float:
        found = registries[group_name].get_sample_value(
            name, {"presentation": "relay", "stream": "video", "group": group_name, "track": track}
        )
        assert found is not None, (group_name, name, track)
        return found

    async with loopback_ingest(tmp_path / "archive") as ingest:
        groups = {name: group(endpoint(ingest.port, name="ingest-a"), encoder=relay_encoder) for name in registries}
        profile = build_profile(name="relay", streams=STREAMS, groups=groups)
        async with relay_in_process(profile, registries["primary"], group="primary") as primary, \
                relay_in_process(profile, registries["backup"], group="backup") as backup:  # fmt: skip
            for running in (primary, backup):
                assert (await post(relay_url(running), header(), *ffmpeg_body(3))).status_code == 200
            for track in ("1", "2"):
                phases = [value(g, "orchestrator_relay_fragment_phase_ticks", track) for g in registries]
                assert phases[0] == phases[1]
                tolerance = value("primary", "orchestrator_relay_sample_duration_ticks", track)
                assert tolerance == FRAGMENT // 4
                offsets = [value(g, "orchestrator_relay_media_offset_seconds", track) for g in registries]
                assert abs(offsets[0] - offsets[1]) < 1.0  # half a fragment
            # The backup's encoder restarts 1 s off the primary's timeline.
            shifted = [fragment(1, k * FRAGMENT + SECOND, mfhd=2 * k + 1) for k in range(3, 5)]
            assert (await post(relay_url(backup), header(creator="shifted"), *shifted)).status_code == 200
            spread = abs(value("backup", "orchestrator_relay_fragment_phase_ticks", "1")
                         - value("primary", "orchestrator_relay_fragment_phase_ticks", "1"))  # fmt: skip
            assert spread == SECOND
            assert spread > value("backup", "orchestrator_relay_sample_duration_ticks", "1")


async def test_after_a_restart_the_spool_is_sent_again_and_the_encoders_resend_is_dropped(tmp_path: Path) -> None:
    """The relay cancelled outright while its endpoint is down (no graceful stop; the real SIGKILL
    is tests/relay/test_relay_e2e.py); restarted on the same spool, it sends what it had read, and
    the encoder's reconnect, resending its last fragments, adds only what is new."""
    spool = tmp_path / "spool"
    async with loopback_ingest(tmp_path / "archive", proxy=True) as ingest:
        assert ingest.proxy is not None
        assert ingest.proxy_port is not None
        ingest.proxy.set_fault(Fault.DOWN)
        encoder = {"backend": "relay", "listen": "127.0.0.1:0", "spool": str(spool), "fsync": "none"}
        profile = build_profile(name="relay", streams=STREAMS, groups={
            "primary": group(endpoint(ingest.proxy_port, name="ingest-a"), encoder=encoder),
            "backup": group(endpoint(ingest.port))})  # fmt: skip
        options = RelayOptions(status="off", handle_signals=False, publisher_settings=TEST_SETTINGS)
        async with trio.open_nursery() as nursery:
            first: RelayRunning = await nursery.start(
                lambda task_status: run_relay(profile, options, registry=CollectorRegistry(),
                                              task_status=task_status))  # fmt: skip
            assert (await post(relay_url(first), header(), *ffmpeg_body(3))).status_code == 200
            nursery.cancel_scope.cancel()
        assert not tracks(ingest.app.point.status())  # the endpoint never had any of it

        registry = CollectorRegistry()
        async with relay_in_process(profile, registry) as second:
            assert sample(registry, "orchestrator_relay_recovered_fragments_total") == 6
            ingest.proxy.heal()
            # The encoder reconnects and resends its last two fragments of each track, then goes on.
            assert (await post(relay_url(second), header(), *ffmpeg_body(3, first=1))).status_code == 200
            assert sample(registry, "orchestrator_relay_fragments_total", outcome="duplicate") == 4
            assert sample(registry, "orchestrator_relay_fragments_total", outcome="forwarded") == 2
            await wait_for(lambda: tracks(ingest.app.point.status()).get("audio", {}).get("fragments_archived") == 4,
                           20, "the ingest to archive all 4 fragments of each track")  # fmt: skip
            archived = tracks(ingest.app.point.status())
            assert {name: (t["fragments_archived"], t["rejected"]) for name, t in archived.items()} == {
                "video": (4, 0), "audio": (4, 0)}  # fmt: skip
