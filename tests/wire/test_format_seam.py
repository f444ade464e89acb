"""The wire-format seam: a second format plugs in as one object behind the interface.

``ToySegments`` is a skeleton per-segment format (the shape of CMAF ingest: one request per
segment and track, per-track URLs, no manifest box, no tfxd, the time read from tfdt). The same
scenarios run for it and for Smooth, parametrised: header and fragments from track
descriptions, the template path, the request plan, and the receiver's code path
(:class:`~orchestrator.ingest.receiver.PublishingPoint` with the format's rules).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.errors import MediaError
from orchestrator.fmp4 import boxes
from orchestrator.fmp4.boxes import MovieFragmentTemplate, Sample, TrackHeader, TrackRun
from orchestrator.fmp4.reader import NEED_DATA, Header, ManifestBox
from orchestrator.fmp4.stream import StreamHeader
from orchestrator.ingest.receiver import Decision, PublishingPoint, StreamPath
from orchestrator.profile import Endpoint, load_profile
from orchestrator.tracks import AUDIO, VIDEO, TrackDescription
from orchestrator.wire import smooth
from orchestrator.wire.format import FragmentTiming, RequestPlan, WireFormat

DEMO = Path(__file__).resolve().parents[2] / "profiles" / "demo.toml"
TOY_FTYP = boxes.write_ftyp(b"toy1", 0, (b"toy1", b"iso6"))


@dataclass(frozen=True)
class ToyReceiverRules:
    manifest: ManifestBox | None = None
    require_manifest: bool = False

    def track_names(self, header: Header) -> dict[int, str]:
        return {}  # no manifest: the archive names files track<ID>.mp4

    def timing(self, traf: boxes.ParsedTraf, sequence_number: int) -> FragmentTiming:
        return FragmentTiming(sequence_number, traf.base_time, traf.duration)

    def problem(self, traf: boxes.ParsedTraf) -> str | None:
        return None if traf.base_time is not None else "traf has no tfdt"

    def init_segment(self, track: TrackHeader) -> bytes:
        return TOY_FTYP + boxes.write_moov([track])

    def single_track_fragment(self, parsed: boxes.ParsedFragment, traf: boxes.ParsedTraf,
                              timing: FragmentTiming) -> bytes:  # fmt: skip
        assert timing.time is not None
        return boxes.write_movie_fragment(timing.index, [TrackRun(traf.track_id, timing.time, traf.samples,
                                                                  timing.index)])  # fmt: skip


TOY_PLAN = RequestPlan(
    per="segment", probe_first=False, header_on_every_request=True, path="/{stream}/{track}/{index}.m4s"
)


@dataclass(frozen=True)
class ToySegments:
    """The whole second format: the interface, built on the shared ISO BMFF only."""

    name: str = "toy-segments"
    plan: RequestPlan = TOY_PLAN
    receiver: ToyReceiverRules = field(default_factory=ToyReceiverRules)

    def header(self, stream_id: str, tracks: Sequence[TrackDescription]) -> StreamHeader:
        headers = tuple(TrackHeader(t.track_id, t.kind.handler, t.timescale, t.sample_entry, t.width, t.height,
                                    t.language) for t in tracks)  # fmt: skip
        return StreamHeader(stream_id, headers, TOY_FTYP + boxes.write_moov(headers))

    def fragment(self, index: int, runs: Sequence[TrackRun]) -> bytes:
        return boxes.write_movie_fragment(index, runs)

    def fragment_template(self, samples: Sequence[Sample]) -> MovieFragmentTemplate:
        return MovieFragmentTemplate(samples)


TOY = ToySegments()
SMOOTH = smooth.SmoothFormat(tfxd_version=2)
FORMATS: list[WireFormat] = [SMOOTH, TOY]  # mypy: both implement the interface

AVC1 = boxes.box(b"avc1", bytes(78))
MP4A = boxes.box(b"mp4a", bytes(28))
TRACKS = (
    TrackDescription(1, "video", VIDEO, 90000, 1_000_000, AVC1, width=192, height=108),
    TrackDescription(2, "audio_eng", AUDIO, 48000, 128_000, MP4A, language="eng", sample_rate=48000, channels=2),
)
DURATION = {1: 180_000, 2: 96_256}  # ticks per fragment: 2 s of video at 90 kHz, 94 AAC frames at 48 kHz
PATH = StreamPath(("live", "demo"), "main")


def samples(track_id: int, k: int) -> list[Sample]:
    return [Sample(bytes([track_id, k]) * 10, DURATION[track_id] // 2), Sample(b"x" * 5, DURATION[track_id] // 2)]


def fragments(wire: WireFormat, k: int) -> list[tuple[TrackDescription, bytes]]:
    return [(t, wire.fragment(k, [TrackRun(t.track_id, k * DURATION[t.track_id], samples(t.track_id, k), k)]))
            for t in TRACKS]  # fmt: skip


def bodies(wire: WireFormat, header: StreamHeader, ks: range) -> list[bytes]:
    """The request bodies the plan calls for: one per stream, or one per segment."""
    segments = [data for k in ks for _, data in fragments(wire, k)]
    if wire.plan.per == "stream":
        return [header.data + b"".join(segments)]
    return [header.data + segment if wire.plan.header_on_every_request else segment for segment in segments]


def post(point: PublishingPoint, body: bytes) -> list[Decision]:
    request = point.open_post(PATH, "primary", 0.0)
    request.feed(body)
    out = []
    while (decision := request.next_decision()) is not NEED_DATA:
        out.append(decision)
        if decision.outcome == "archived":
            request.written(decision)
    request.end_of_body()
    request.close(1.0, "ok")
    return out


@pytest.mark.parametrize("wire", FORMATS, ids=lambda w: w.name)
def test_header_and_fragments_read_back_through_the_receiver(wire: WireFormat) -> None:
    header = wire.header("main", TRACKS)
    assert [(t.track_id, t.handler, t.timescale) for t in header.tracks] == [(1, b"vide", 90000), (2, b"soun", 48000)]
    point = PublishingPoint(rules=wire.receiver)
    decisions = [d for body in bodies(wire, header, range(3)) for d in post(point, body)]
    got = [(d.fragment.track_id, d.fragment.index, d.fragment.time, d.fragment.duration, d.outcome) for d in decisions]
    assert got == [(track_id, k, k * DURATION[track_id], DURATION[track_id], "archived")
                   for k in range(3) for track_id in (1, 2)]  # fmt: skip
    # The archive holds exactly what was sent, after the format's init segment per track.
    archive: dict[str, bytes] = {}
    for d in decisions:
        for w in d.writes:
            archive[w.path[-1]] = (b"" if w.new_file else archive.get(w.path[-1], b"")) + w.data
    names = {"smooth": ("video.mp4", "audio_eng.mp4"), "toy-segments": ("track1.mp4", "track2.mp4")}[wire.name]
    for name, (track, _) in zip(names, fragments(wire, 0), strict=True):
        init = wire.receiver.init_segment(header.tracks[track.track_id - 1])
        assert archive[name] == init + b"".join(dict((t.track_id, f) for t, f in fragments(wire, k))[track.track_id]
                                                for k in range(3))  # fmt: skip
    # Sent again (the other group, or a resend), every fragment is a duplicate.
    again = [d.outcome for body in bodies(wire, header, range(3)) for d in post(point, body)]
    assert again == ["duplicate"] * 6
    status = point.status()["publishing_points"]["live/demo"]["streams"]["main"]["tracks"]
    assert [(t["fragments_archived"], t["duplicates_dropped"], t["gaps"]) for t in status.values()] == [(3, 3, 0)] * 2


@pytest.mark.parametrize("wire", FORMATS, ids=lambda w: w.name)
def test_the_template_renders_the_formats_fragment(wire: WireFormat) -> None:
    template = wire.fragment_template(samples(1, 7))
    for index, track_id, base_time in ((7, 1, 7 * 180_000), (2**32 - 1, 9, 2**40)):
        assert template.render(index, track_id, base_time) == wire.fragment(
            index, [TrackRun(track_id, base_time, samples(1, 7), index)])  # fmt: skip


def test_a_per_segment_plan_has_a_url_per_track_and_segment() -> None:
    base = "https://ingest.example.net/live/event"
    assert TOY.plan.url(base, "main", "video", 42) == "https://ingest.example.net/live/event/main/video/42.m4s"
    assert TOY.plan.url(base, "main", "audio_eng", 43) == "https://ingest.example.net/live/event/main/audio_eng/43.m4s"
    assert (TOY.plan.per, TOY.plan.probe_first, TOY.plan.header_on_every_request) == ("segment", False, True)
    with pytest.raises(ValueError, match="needs the track and index"):
        TOY.plan.url(base, "main")


def test_smooth_plans_one_long_post_per_stream_with_a_probe() -> None:
    endpoint = Endpoint(name="a", url="http://127.0.0.1:18081/live/demo.isml", region="r")
    assert SMOOTH.plan.url(endpoint.url, "video") == "http://127.0.0.1:18081/live/demo.isml/Streams(video)"
    assert (SMOOTH.plan.per, SMOOTH.plan.probe_first, SMOOTH.plan.header_on_every_request) == ("stream", True, True)
    with pytest.raises(ValueError, match="one URL per stream"):
        SMOOTH.plan.url(endpoint.url, "video", "video")
    # The receiver reads the same URL back.
    assert smooth.parse_path("/live/demo.isml/Streams(video)") == ("live/demo", "video")


@pytest.mark.parametrize(
    ("per", "path", "message"),
    [
        ("stream", "/Streams({stream})/{track}", "no {track}"),
        ("segment", "/{stream}/{index}.m4s", "needs {track}"),
        ("stream", "/Streams(x)", "does not name the stream"),
    ],
)
def test_request_plans_that_cannot_work_are_refused(per, path, message) -> None:
    with pytest.raises(ValueError, match=message):
        RequestPlan(per=per, probe_first=False, header_on_every_request=True, path=path)


def test_the_receivers_format_checks_decide_what_is_rejected() -> None:
    """A Smooth fragment without tfxd is rejected by Smooth's rules; the toy format, which reads
    tfdt, takes the same bytes: the check is the format's, the code path the receiver's."""
    header = TOY.header("main", TRACKS[:1])
    toy_fragment = TOY.fragment(5, [TrackRun(1, 900_000, samples(1, 5), 5)])
    smooth_header = SMOOTH.header("main", TRACKS[:1])
    assert [(d.outcome, d.reason) for d in post(PublishingPoint(), smooth_header.data + toy_fragment)] == [
        ("rejected", "track 1: traf has no tfxd")]  # fmt: skip
    [decision] = post(PublishingPoint(rules=TOY.receiver), header.data + toy_fragment)
    assert (decision.outcome, decision.fragment.index, decision.fragment.time) == ("archived", 5, 900_000)


def test_a_relay_describes_a_smooth_header_it_received_and_writes_the_same_bytes() -> None:
    """What an encoder sent is all a relay has: the descriptions read back from the header are
    the ones it was written from, and writing them again gives the very same bytes."""
    written = SMOOTH.header("main", TRACKS)
    reader = smooth.reader(require_manifest=True)
    reader.feed(written.data)
    received = reader.next_event()
    assert isinstance(received, Header)
    assert smooth.describe(received) == TRACKS
    assert SMOOTH.header("main", smooth.describe(received)).data == written.data


def test_describing_a_header_whose_manifest_misses_a_track_is_a_clear_error() -> None:
    one = smooth.header("main", TRACKS[:1])  # the manifest of the video track only...
    data = one.data[: -len(boxes.write_moov(one.tracks))] + boxes.write_moov([*one.tracks, TrackHeader(
        2, b"soun", 48000, MP4A)])  # ...and a moov with the audio track too  # fmt: skip
    reader = smooth.reader(require_manifest=True)
    reader.feed(data)
    received = reader.next_event()
    assert isinstance(received, Header)
    with pytest.raises(MediaError, match="track 2: the Live Server Manifest does not describe it"):
        smooth.describe(received)


def test_the_synthetic_encoders_headers_describe_back_to_the_profiles_tracks() -> None:
    profile = load_profile(DEMO, now_ns=1_800_000_000 * 10**9)
    for stream in profile.streams:
        source = SyntheticStream(profile, stream)
        reader = smooth.reader(require_manifest=True)
        reader.feed(source.header.data)
        received = reader.next_event()
        assert isinstance(received, Header)
        assert smooth.describe(received) == profile.describe(stream, [c.sample_entry for c in source.clips])
