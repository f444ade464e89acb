"""CMAF ingest as a wire format: exact bytes and integers, read back by our parser, by pymp4 and
mp4box.js (two ISO BMFF parsers we did not write) and decoded by ffprobe."""

from __future__ import annotations

import itertools
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from parsekit import as_double, mp4box, needs_mp4box, pymp4_boxes, pymp4_find, sha256

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.errors import BoxError, MediaError
from orchestrator.fmp4 import boxes
from orchestrator.fmp4.boxes import Sample, TrackRun
from orchestrator.fmp4.stream import StreamHeader
from orchestrator.profile import load_profile
from orchestrator.tracks import AUDIO, VIDEO, TrackDescription
from orchestrator.wire import cmaf

pytest.importorskip("pymp4.parser", reason="pymp4 is a test dependency: pip install -e '.[test]'")

DEMO = Path(__file__).resolve().parents[2] / "profiles" / "demo.toml"
NOW_NS = 1_800_000_000 * 10**9
EPOCH_S = 1_767_225_600  # the demo profile's epoch, 2026-01-01T00:00:00Z, in seconds since 1970
AVC1 = boxes.box(b"avc1", bytes(78))


# --- exact bytes ------------------------------------------------------------------------------


def test_header_and_segment_type_boxes_are_exact() -> None:
    assert cmaf.write_ftyp() == b"\x00\x00\x00\x1cftypcmfc\x00\x00\x00\x00iso6cmfccmf2"
    assert cmaf.write_styp() == b"\x00\x00\x00\x18stypcmfs\x00\x00\x00\x00cmfscmff"
    assert cmaf.write_styp(last=True) == b"\x00\x00\x00\x1cstypcmfs\x00\x00\x00\x00cmfscmfflmsg"
    assert cmaf.write_btrt(800_000) == b"\x00\x00\x00\x14btrt" + struct.pack(">III", 0, 800_000, 800_000)


def test_btrt_closes_the_sample_entry_and_its_size_grows() -> None:
    entry = cmaf.with_btrt(AVC1, 1_000_000)
    assert entry == struct.pack(">I", 86 + 20) + b"avc1" + bytes(78) + cmaf.write_btrt(1_000_000)
    assert cmaf.with_btrt(entry, 5) == entry  # already there: unchanged
    with pytest.raises(ValueError, match="not one complete box"):
        cmaf.with_btrt(AVC1[:-1], 5)


def test_prft_carries_an_ntp_timestamp_and_the_media_time() -> None:
    assert cmaf.ntp_timestamp(0) == 2_208_988_800 << 32
    assert cmaf.ntp_timestamp(1_500_000_000) == ((2_208_988_801 << 32) | 2**31)
    assert cmaf.ntp_timestamp(EPOCH_S * 10**9 + 1) == ((EPOCH_S + 2_208_988_800) << 32) | 4  # 2**32/1e9, floored
    prft = cmaf.write_prft(7, EPOCH_S * 10**9, EPOCH_S * 90_000)
    ntp = struct.pack(">Q", (EPOCH_S + 2_208_988_800) << 32)
    media_time = struct.pack(">Q", EPOCH_S * 90_000)
    assert prft == b"\x00\x00\x00\x20prft\x01\x00\x00\x00" + struct.pack(">I", 7) + ntp + media_time


def test_times_are_counted_from_1970_in_exact_ticks() -> None:
    assert cmaf.epoch_ticks(EPOCH_S * 10**9, 90_000) == 159_050_304_000_000
    assert cmaf.epoch_ticks(EPOCH_S * 10**9 + 500_000_000, 48_000) == EPOCH_S * 48_000 + 24_000
    with pytest.raises(ValueError, match="does not fall on a tick of timescale 90000"):
        cmaf.epoch_ticks(EPOCH_S * 10**9 + 1, 90_000)


def test_a_segment_is_styp_prft_moof_mdat() -> None:
    samples = [Sample(b"\x01" * 10, 1500), Sample(b"\x02" * 5, 1500, is_sync=False)]
    run = TrackRun(1, EPOCH_S * 90_000 + 180_000, samples, 3)
    data = cmaf.write_segment(3, run, timescale=90_000, last=True)
    moof_mdat = boxes.write_movie_fragment(3, [run])
    assert data == cmaf.write_styp(last=True) + cmaf.write_prft(1, (EPOCH_S + 2) * 10**9, run.base_time) + moof_mdat
    segment = cmaf.split_segment(data)
    assert (segment.last, segment.fragment, segment.prft) == (True, moof_mdat, data[28:60])
    parsed = boxes.parse_fragment(segment.fragment)
    assert (parsed.sequence_number, parsed.trafs[0].base_time, parsed.trafs[0].samples) == (3, run.base_time,
                                                                                            tuple(samples))  # fmt: skip
    # Without prft and styp the boxes still make a segment; other orders do not.
    assert cmaf.split_segment(moof_mdat) == cmaf.Segment(False, moof_mdat, None)
    with pytest.raises(BoxError, match=r"\[styp\] \[prft\] moof mdat, not moof mdat styp"):
        cmaf.split_segment(moof_mdat + cmaf.write_styp())
    with pytest.raises(BoxError, match="not empty"):
        cmaf.split_segment(b"")


def test_the_template_renders_the_formats_fragment() -> None:
    wire = cmaf.CmafFormat()
    samples = [Sample(b"\x01" * 10, 1500), Sample(b"\x02" * 5, 1500, is_sync=False)]
    template = wire.fragment_template(samples)
    for index, track_id, base_time in ((7, 1, EPOCH_S * 90_000), (2**32 - 1, 9, 2**40)):
        assert template.render(index, track_id, base_time) == wire.fragment(
            index, [TrackRun(track_id, base_time, samples, index)])  # fmt: skip
    with pytest.raises(ValueError, match="carries one track, not 2"):
        wire.fragment(1, [TrackRun(1, 0, samples, 1), TrackRun(2, 0, samples, 1)])


def test_a_cmaf_header_describes_one_track() -> None:
    video = TrackDescription(1, "video", VIDEO, 90000, 1_000_000, AVC1, width=192, height=108)
    audio = TrackDescription(2, "audio", AUDIO, 48000, 128_000, boxes.box(b"mp4a", bytes(28)), language="eng",
                             sample_rate=48000, channels=2)  # fmt: skip
    header = cmaf.CmafFormat().header("main", [video])
    track = boxes.TrackHeader(1, b"vide", 90000, cmaf.with_btrt(AVC1, 1_000_000), 192, 108)
    assert header == StreamHeader("main", (track,), cmaf.write_ftyp() + boxes.write_moov([track]))
    with pytest.raises(ValueError, match="describes one track, not 2"):
        cmaf.CmafFormat().header("main", [video, audio])


# --- paths ------------------------------------------------------------------------------------


def test_both_path_schemes_name_the_header_and_every_segment() -> None:
    base = "https://ingest.example.net/live/event.isml"
    streams = cmaf.PATH_SCHEMES["streams"]
    assert streams.header_url(base, "main", "video") == base + "/Streams(main-video)"
    assert streams.segment_url(base, "main", "video", 42) == base + "/Streams(main-video)"
    base = "https://abc-1.ingest.xyz.mediapackagev2.eu-west-1.amazonaws.com/in/v1/group/1/channel"
    template = cmaf.PATH_SCHEMES["template"]
    assert template.header_url(base, "main", "video") == base + "/main/video/init.m4s"
    assert template.segment_url(base, "main", "audio_eng", 42) == base + "/main/audio_eng/42.m4s"
    for paths in cmaf.PATH_SCHEMES.values():
        assert (paths.plan.per, paths.plan.probe_first, paths.plan.header_on_every_request) == ("segment", False,
                                                                                                False)  # fmt: skip


# --- the encoders' fragments, re-boxed: read by pymp4, decoded by ffprobe ----------------------


def cmaf_track_files(epoch_ns: int, count: int) -> dict[str, tuple[bytes, list]]:
    """stream id -> (CMAF header + ``count`` segments, the Smooth fragments they came from)."""
    profile = load_profile(DEMO, now_ns=NOW_NS)
    segmenter = cmaf.Segmenter(epoch_ns)
    out = {}
    for stream in profile.streams:
        source = SyntheticStream(profile, stream)
        [(_, header)] = segmenter.track_headers(source.header).values()
        fragments = [f for k in range(count) for f in source.fragment(k)]
        data = header.data + b"".join(segmenter.segment(f, last=n == count - 1) for n, f in enumerate(fragments))
        out[stream.id] = (data, fragments)
    return out


def test_segments_keep_the_samples_and_count_time_from_1970() -> None:
    profile = load_profile(DEMO, now_ns=NOW_NS)
    assert profile.presentation.epoch_ns == EPOCH_S * 10**9
    segmenter = cmaf.Segmenter(profile.presentation.epoch_ns)
    for stream in profile.streams:
        source = SyntheticStream(profile, stream)
        for k in (0, 1, 10**6):
            [fragment] = source.fragment(k)
            smooth_traf = boxes.parse_fragment(fragment.data).trafs[0]
            segment = cmaf.split_segment(segmenter.segment(fragment))
            parsed = boxes.parse_fragment(segment.fragment)
            [traf] = parsed.trafs
            assert parsed.sequence_number == k
            assert traf.base_time == fragment.start + EPOCH_S * fragment.timescale  # exact integers
            assert traf.samples == smooth_traf.samples
            assert segment.prft == cmaf.write_prft(fragment.track_id,
                                                   EPOCH_S * 10**9 + fragment.start * 10**9 // fragment.timescale,
                                                   traf.base_time)  # fmt: skip
            assert not segment.last


def test_pymp4_reads_every_header_and_segment() -> None:
    files = cmaf_track_files(EPOCH_S * 10**9, 3)
    for stream_id, (data, fragments) in files.items():
        parsed = pymp4_boxes(data)
        assert [b.type for b in parsed] == [b"ftyp", b"moov"] + [b"styp", b"prft", b"moof", b"mdat"] * 3
        ftyp, moov = parsed[:2]
        assert (ftyp.major_brand, list(ftyp.compatible_brands)) == (b"cmfc", [b"iso6", b"cmfc", b"cmf2"])
        assert len([c for c in moov.children if c.type == b"trak"]) == 1
        timescale = pymp4_find(moov, b"mdhd").timescale
        [entry] = pymp4_find(moov, b"stsd").entries
        bitrate = {"video": 800_000, "audio": 128_000}[stream_id]
        if stream_id == "video":  # pymp4 reads an avc1's child boxes, not an mp4a's
            [btrt] = [b for b in entry.sample_info if b.type == b"btrt"]
            assert (btrt.maxBitrate, btrt.avgBirate) == (bitrate, bitrate)
        # Every sample entry carries one btrt: ours, or the encoder's own (the AAC clip's, from ffmpeg).
        [track] = boxes.parse_moov(data[28 + 8 : 28 + moov.end - moov.offset])
        assert track.sample_entry.count(b"btrt") == 1
        assert track.sample_entry[-16:-12] == b"btrt"
        for n, fragment in enumerate(fragments):
            styp, _, moof, mdat = parsed[2 + 4 * n : 6 + 4 * n]
            assert (styp.major_brand, list(styp.compatible_brands)) == (
                b"cmfs", [b"cmfs", b"cmff", b"lmsg"] if n == 2 else [b"cmfs", b"cmff"])  # fmt: skip
            assert pymp4_find(moof, b"mfhd").sequence_number == fragment.index
            assert pymp4_find(moof, b"tfhd").track_ID == fragment.track_id
            assert pymp4_find(moof, b"tfdt").baseMediaDecodeTime == fragment.start + EPOCH_S * timescale
            trun = pymp4_find(moof, b"trun")
            assert sum(s.sample_duration for s in trun.sample_info) == fragment.duration
            assert sum(s.sample_size for s in trun.sample_info) == len(mdat.data)


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe is not installed (apt-get install ffmpeg)")
def test_ffprobe_decodes_header_and_segments_from_1970(tmp_path: Path) -> None:
    files = cmaf_track_files(EPOCH_S * 10**9, 3)
    for stream_id, (data, fragments) in files.items():
        path = tmp_path / f"{stream_id}.mp4"
        path.write_bytes(data)
        result = subprocess.run(
            ["ffprobe", "-v", "error", "-count_frames", "-show_entries", "stream=codec_name,start_time,nb_read_frames",
             "-of", "default=noprint_wrappers=1", str(path)],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        fields = dict(line.split("=", 1) for line in result.stdout.split())
        samples = sum(len(boxes.parse_fragment(f.data).trafs[0].samples) for f in fragments)
        assert fields == {"codec_name": {"video": "h264", "audio": "aac"}[stream_id],
                          "start_time": f"{EPOCH_S}.000000", "nb_read_frames": str(samples)}  # fmt: skip
        assert result.stderr == ""


def test_the_segmenter_refuses_what_it_cannot_rebox() -> None:
    profile = load_profile(DEMO, now_ns=NOW_NS)
    source = SyntheticStream(profile, profile.streams[0])
    with pytest.raises(ValueError, match="does not fall on a tick"):
        cmaf.Segmenter(EPOCH_S * 10**9 + 1).segment(source.fragment(0)[0])
    [fragment] = source.fragment(0)
    two = boxes.write_movie_fragment(0, [TrackRun(1, 0, [Sample(b"a", 1)], 0), TrackRun(2, 0, [Sample(b"b", 1)], 0)])
    with pytest.raises(BoxError, match="must carry that track alone"):
        cmaf.Segmenter(0).segment(type(fragment)("video", 1, 0, 0, 1, 90000, two))
    with pytest.raises(MediaError, match="not a complete Smooth header"):
        cmaf.Segmenter(0).track_headers(StreamHeader("video", source.header.tracks, source.header.data[:-1]))


def test_marking_the_last_segment_adds_lmsg_to_its_styp() -> None:
    run = TrackRun(1, 0, [Sample(b"\x01" * 10, 1500)], 3)
    assert cmaf.mark_last(cmaf.write_segment(3, run, timescale=90_000)) == cmaf.write_segment(3, run, timescale=90_000,
                                                                                              last=True)  # fmt: skip
    with pytest.raises(ValueError, match="plain CMAF styp"):
        cmaf.mark_last(boxes.write_movie_fragment(3, [run]))


# --- the same bytes read by mp4box.js (GPAC's parser in JavaScript) -----------------------------


@needs_mp4box
def test_mp4box_js_reads_every_header_and_segment_as_we_meant_them() -> None:
    """Each CMAF header and segment on its own, then the track file they make, read by mp4box.js:
    every field we set, as an exact integer, and every sample's bytes where the trun says."""
    files = cmaf_track_files(EPOCH_S * 10**9, 3)
    for stream_id, (data, fragments) in files.items():
        timescale = fragments[0].timescale
        header_size = data.index(b"styp") - 4
        segments = _split_segments(data[header_size:])
        assert len(segments) == len(fragments)
        header, *parsed_segments, whole = mp4box(data[:header_size], *segments, data)

        # The header: ftyp with the CMAF brands, a moov with one trak whose sample entry ends with a btrt.
        assert header.types == ["ftyp", "moov"]
        ftyp, moov = header.boxes
        assert (ftyp["major_brand"], ftyp["minor_version"], ftyp["compatible_brands"]) == (
            "cmfc", 0, ["iso6", "cmfc", "cmf2"])  # fmt: skip
        assert moov.types.count("trak") == 1
        assert moov.one("tkhd")["track_id"] == moov.one("trex")["track_id"] == fragments[0].track_id
        assert moov.one("mdhd")["timescale"] == timescale
        assert moov.one("hdlr")["handler"] == {"video": "vide", "audio": "soun"}[stream_id]
        [entry] = moov.one("stsd").boxes
        assert entry.type == {"video": "avc1", "audio": "mp4a"}[stream_id]
        assert entry.types.count("btrt") == 1
        assert entry.types[-1] == "btrt"
        if stream_id == "video":  # ours; the AAC clip's entry carries ffmpeg's own btrt
            assert (entry.boxes[-1]["maxBitrate"], entry.boxes[-1]["avgBitrate"]) == (800_000, 800_000)
        assert moov.one("mvhd")["next_track_id"] == fragments[0].track_id + 1
        assert (header.tracks[0]["id"], header.tracks[0]["codec"]) == (
            fragments[0].track_id, {"video": "avc1.42c00b", "audio": "mp4a.40.2"}[stream_id])  # fmt: skip

        # Each segment: styp (lmsg on the last), prft, moof (mfhd, traf: tfhd, tfdt, trun), mdat.
        for n, (segment, fragment) in enumerate(zip(parsed_segments, fragments, strict=True)):
            samples = boxes.parse_fragment(fragment.data).trafs[0].samples
            tfdt_value = fragment.start + EPOCH_S * timescale
            assert segment.types == ["styp", "prft", "moof", "mdat"]
            styp, prft, moof, mdat = segment.boxes
            assert (styp["major_brand"], styp["compatible_brands"]) == (
                "cmfs", ["cmfs", "cmff", "lmsg"] if n == len(fragments) - 1 else ["cmfs", "cmff"])  # fmt: skip
            wall_ns = EPOCH_S * 10**9 + fragment.start * 10**9 // timescale
            assert (prft["version"], prft["ref_track_id"], prft["media_time"], prft["ntp_timestamp"]) == (
                1, fragment.track_id, tfdt_value, as_double(cmaf.ntp_timestamp(wall_ns)))  # fmt: skip
            assert moof.types == ["mfhd", "traf"]
            assert moof.one("mfhd")["sequence_number"] == fragment.index
            traf = moof.one("traf")
            assert traf.types == ["tfhd", "tfdt", "trun"]
            tfhd = traf.one("tfhd")
            assert (tfhd["track_id"], tfhd["flags"]) == (fragment.track_id, 0x020000)  # default-base-is-moof
            assert traf.one("tfdt")["baseMediaDecodeTime"] == tfdt_value
            trun = traf.one("trun")
            assert trun["sample_count"] == len(samples)
            assert trun["sample_duration"] == [s.duration for s in samples]
            assert sum(trun["sample_duration"]) == fragment.duration
            assert trun["sample_size"] == [len(s.data) for s in samples]
            assert trun["data_offset"] == moof.size + 8  # the first sample opens the mdat's payload
            assert mdat.size == 8 + sum(len(s.data) for s in samples)

        # The track file: mp4box.js's samples are ours, byte for byte, at the times we meant.
        assert whole.types == ["ftyp", "moov"] + ["styp", "prft", "moof", "mdat"] * len(fragments)
        ours = [(f, s) for f in fragments for s in boxes.parse_fragment(f.data).trafs[0].samples]
        theirs = whole.samples[fragments[0].track_id]
        assert len(theirs) == len(ours)
        dts = fragments[0].start + EPOCH_S * timescale
        for (_, sample), read in zip(ours, theirs, strict=True):
            assert (read["dts"], read["cts"], read["duration"], read["size"], read["is_sync"], read["sha256"]) == (
                dts, dts + sample.composition_offset, sample.duration, len(sample.data), sample.is_sync,
                sha256(sample.data))  # fmt: skip
            dts += sample.duration


def _split_segments(data: bytes) -> list[bytes]:
    """CMAF segments laid end to end, each cut at its styp (our own box walk, only to cut)."""
    starts = [b.offset for b in boxes.parse_boxes(data) if b.type == b"styp"] + [len(data)]
    return [data[a:b] for a, b in itertools.pairwise(starts)]


@needs_mp4box
def test_mp4box_js_refuses_bytes_that_are_not_whole_boxes() -> None:
    """The proof above is only as strict as the tool: a byte too many, a byte too few, or a box
    size that lies each fail it."""
    segment = cmaf.write_segment(3, TrackRun(1, 2**40, [Sample(b"\x01" * 10, 1500)], 3), timescale=90_000)
    assert mp4box(segment)[0].types == ["styp", "prft", "moof", "mdat"]
    traf = segment.index(b"traf") - 4
    lying = segment[:traf] + struct.pack(">I", struct.unpack_from(">I", segment, traf)[0] + 4) + segment[traf + 4 :]
    size, traf_size = len(segment), struct.unpack_from(">I", segment, traf)[0]
    lie = f"'traf' has a size {traf_size + 4} greater than its container size {traf_size}"
    for bad, message in ((segment + b"\x00", f"cover {size} of the {size + 1} bytes"),
                         (segment[:-1], f"cover {size} of the {size - 1} bytes"), (lying, lie)):  # fmt: skip
        with pytest.raises(pytest.fail.Exception, match=message):
            mp4box(bad)
