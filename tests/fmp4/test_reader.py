"""The incremental stream reader, walked step by step without any I/O (the h11 way)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.errors import BoxError, MediaError
from orchestrator.fmp4.boxes import Sample, TrackHeader, TrackRun, box, write_moov
from orchestrator.fmp4.reader import NEED_DATA, Event, Fragment, Header, OtherBox, StreamReader
from orchestrator.wire import smooth
from orchestrator.wire.smooth import write_fragment, write_ftyp, write_live_server_manifest

MEDIA = Path(__file__).resolve().parents[2] / "orchestrator" / "encode" / "media"
SMIL = '<smil xmlns="http://www.w3.org/2001/SMIL20/Language"><body><switch/></body></smil>'
TRACKS = [
    TrackHeader(1, b"vide", 90000, box(b"avc1", bytes(8))),
    TrackHeader(2, b"soun", 48000, box(b"mp4a", bytes(8)), language="eng"),
]
FTYP = write_ftyp()
MANIFEST = write_live_server_manifest(SMIL)
MOOV = write_moov(TRACKS)
HEADER = FTYP + MANIFEST + MOOV


def fragment(k: int) -> bytes:
    video = [Sample(bytes([k]) * 100, 3003), Sample(bytes([k + 1]) * 50, 3003, is_sync=False)]
    audio = [Sample(b"a" * 30, 1024)]
    return write_fragment(k, [TrackRun(1, k * 6006, video, k), TrackRun(2, k * 1024, audio, k)])


FRAGMENTS = [fragment(k) for k in range(3)]
MFRA = box(b"mfra", box(b"mfro", bytes(8)))
STREAM = HEADER + b"".join(FRAGMENTS) + MFRA


def events_of(chunks: list[bytes], reader: StreamReader | None = None) -> list[Event]:
    """Feed the chunks one by one, taking every event after each."""
    reader = reader or smooth.reader()
    events: list[Event] = []
    for chunk in chunks:
        reader.feed(chunk)
        while (event := reader.next_event()) is not NEED_DATA:
            events.append(event)
    return events


def test_whole_stream_events() -> None:
    reader = smooth.reader(require_manifest=True)
    events = events_of([STREAM], reader)
    assert [type(e) for e in events] == [Header, Fragment, Fragment, Fragment, OtherBox]
    header = events[0]
    assert isinstance(header, Header)
    assert header.data == HEADER  # the exact bytes, boxes in order
    assert (header.ftyp, header.manifest, header.moov) == (FTYP, MANIFEST, MOOV)
    assert header.tracks == tuple(TRACKS)
    assert header.manifest_text == SMIL
    assert reader.header is header
    offset = len(HEADER)
    for k, event in enumerate(events[1:4]):
        assert isinstance(event, Fragment)
        assert (event.offset, event.data, event.parsed.sequence_number) == (offset, FRAGMENTS[k], k)
        assert [t.track_id for t in event.parsed.trafs] == [1, 2]
        assert event.parsed.trafs[0].base_time == k * 6006
        offset += len(FRAGMENTS[k])
    # An mfra after the fragments is handed on, untouched, as an OtherBox.
    assert events[4] == OtherBox(b"mfra", MFRA, offset)
    assert reader.bytes_received == len(STREAM)
    assert reader.buffered == 0


def test_one_byte_at_a_time_gives_the_same_events() -> None:
    whole = events_of([STREAM])
    assert events_of([STREAM[i : i + 1] for i in range(len(STREAM))]) == whole


@settings(max_examples=50, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=30))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    chunks = [STREAM[a:b] for a, b in itertools.pairwise(bounds)]
    assert events_of(chunks) == events_of([STREAM])


def test_need_data_until_each_event_is_complete() -> None:
    reader = smooth.reader()
    assert reader.next_event() is NEED_DATA
    reader.feed(HEADER[:-1])
    assert reader.next_event() is NEED_DATA
    assert reader.header is None
    reader.feed(HEADER[-1:])
    assert isinstance(reader.next_event(), Header)
    assert reader.next_event() is NEED_DATA

    moof_size = int.from_bytes(FRAGMENTS[0][:4], "big")
    reader.feed(FRAGMENTS[0][:moof_size])  # the whole moof but no mdat: still not a fragment
    assert reader.next_event() is NEED_DATA
    assert reader.buffered == moof_size
    reader.feed(FRAGMENTS[0][moof_size:-1])
    assert reader.next_event() is NEED_DATA
    reader.feed(FRAGMENTS[0][-1:])
    event = reader.next_event()
    assert isinstance(event, Fragment)
    assert event.data == FRAGMENTS[0]
    assert reader.next_event() is NEED_DATA
    assert reader.buffered == 0
    assert reader.bytes_received == len(HEADER) + len(FRAGMENTS[0])


def test_free_box_inside_the_header_is_skipped() -> None:
    events = events_of([FTYP + box(b"free", b"pad") + MANIFEST + MOOV + FRAGMENTS[0]])
    assert [type(e) for e in events] == [Header, Fragment]
    assert events[0].data == HEADER


def test_deprecated_stream_manifest_box_in_the_header_is_ignored() -> None:
    # Ingest spec 3.2: the StreamManifestBox SHOULD NOT be sent and is silently ignored.
    stream_manifest = box(b"uuid", bytes(range(16)), b"\0\0\0\0<smil/>")
    events = events_of([FTYP + MANIFEST + stream_manifest + MOOV + FRAGMENTS[0]], smooth.reader(require_manifest=True))
    assert [type(e) for e in events] == [Header, Fragment]
    assert events[0].data == HEADER


def test_manifest_is_optional_unless_required() -> None:
    [header] = events_of([FTYP + MOOV])
    assert isinstance(header, Header)
    assert (header.manifest, header.manifest_text, header.data) == (None, None, FTYP + MOOV)


def media_error(data: bytes, *, require_manifest: bool = False) -> MediaError:
    """The MediaError (an ordering problem: not a malformed box) that reading ``data`` raises."""
    reader = smooth.reader(require_manifest=require_manifest)
    with pytest.raises(MediaError) as caught:
        events_of([data], reader)
    assert type(caught.value) is MediaError
    return caught.value


def test_fragment_before_the_header() -> None:
    assert "stream starts with moof, expected ftyp" in str(media_error(FRAGMENTS[0]))
    assert "moof at offset 28 inside the header" in str(media_error(FTYP + FRAGMENTS[0]))


def test_moof_followed_by_something_other_than_mdat() -> None:
    moof_size = int.from_bytes(FRAGMENTS[0][:4], "big")
    data = HEADER + FRAGMENTS[0][:moof_size] + box(b"free")
    assert f"moof at offset {len(HEADER)} is followed by free, not mdat" in str(media_error(data))


def test_mdat_without_moof() -> None:
    assert f"mdat at offset {len(HEADER)} without a moof" in str(media_error(HEADER + box(b"mdat", b"x")))


def test_second_header_in_one_stream() -> None:
    assert "ftyp at offset" in str(media_error(HEADER + FRAGMENTS[0] + FTYP))
    assert "a second header" in str(media_error(HEADER + MOOV))
    assert "two Live Server Manifest boxes" in str(media_error(FTYP + MANIFEST + MANIFEST + MOOV))


def test_moov_before_manifest_when_the_manifest_is_required() -> None:
    message = str(media_error(FTYP + MOOV + MANIFEST, require_manifest=True))
    assert "moov arrived before the Live Server Manifest" in message


def test_malformed_box_raises_box_error() -> None:
    reader = smooth.reader()
    reader.feed(HEADER + bytes(4) + b"moof")  # size 0
    assert isinstance(reader.next_event(), Header)
    with pytest.raises(BoxError, match="size 0"):
        reader.next_event()


@pytest.mark.parametrize("name", ["video.mp4", "audio_44100_1.mp4", "audio_48000_2.mp4"])
def test_ffmpeg_output_whole_and_byte_by_byte(name: str) -> None:
    data = (MEDIA / name).read_bytes()
    events = events_of([data])
    assert events_of([data[i : i + 1] for i in range(len(data))]) == events
    header, *fragments, mfra = events
    assert isinstance(header, Header)
    assert header.manifest is None  # ffmpeg's own mp4 muxer writes no Live Server Manifest
    assert all(isinstance(f, Fragment) for f in fragments)
    assert isinstance(mfra, OtherBox)
    assert mfra.type == b"mfra"
    assert mfra.offset + len(mfra.data) == len(data)


def test_ffmpeg_video_clip_has_50_sync_samples() -> None:
    # Made with -frames:v 50 -g 1 at 25 fps, timescale 12800: 512 ticks a frame, every frame an IDR.
    events = events_of([(MEDIA / "video.mp4").read_bytes()])
    header = events[0]
    assert isinstance(header, Header)
    [track] = header.tracks
    assert (track.handler, track.timescale, track.codec, track.width, track.height) == (
        b"vide", 12800, "avc1", 192, 108)  # fmt: skip
    samples = [s for e in events if isinstance(e, Fragment) for t in e.parsed.trafs for s in t.samples]
    assert len(samples) == 50
    assert all(s.is_sync for s in samples)
    assert {s.duration for s in samples} == {512}
    # Each sample is an H.264 access unit in AVCC framing: 4-byte NAL lengths that add up.
    for sample in samples:
        pos = 0
        while pos < len(sample.data):
            pos += 4 + int.from_bytes(sample.data[pos : pos + 4], "big")
        assert pos == len(sample.data)


def test_manifest_with_a_64_bit_box_size_is_recognised() -> None:
    import struct

    payload = MANIFEST[8:]
    large = struct.pack(">I4sQ", 1, b"uuid", 16 + len(payload)) + payload
    [header, _] = events_of([FTYP + large + MOOV + FRAGMENTS[0]], smooth.reader(require_manifest=True))
    assert isinstance(header, Header)
    assert header.manifest_text == SMIL
    assert header.manifest == large


def test_a_box_type_with_a_control_byte_stays_on_one_line() -> None:
    """Found by tests/ingest/test_fuzz.py: a mutated ftyp type with a newline in it."""
    reader = StreamReader()
    reader.feed(b"\x00\x00\x00\x10\ntyp" + bytes(8))
    with pytest.raises(MediaError, match=r"^stream starts with b'\\ntyp', expected ftyp$"):
        reader.next_event()
