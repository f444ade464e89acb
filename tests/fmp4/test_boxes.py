"""Fragmented-MP4 boxes, both directions: exact bytes out, the same values back in.

The expected bytes are written out field by field from the specifications (ISO/IEC 14496-12,
MS-SSTR), never produced by the code under test. ffprobe is the independent reader.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import BoxError
from orchestrator.fmp4.boxes import (
    Box,
    Sample,
    TrackDefaults,
    TrackHeader,
    TrackRun,
    box,
    full_box,
    parse_boxes,
    parse_moov,
    read_box_header,
    write_moov,
)
from orchestrator.wire.smooth import (
    FragmentTemplate,
    ParsedFragment,
    ParsedTraf,
    Tfxd,
    parse_fragment,
    parse_live_server_manifest,
    parse_tfxd,
    write_fragment,
    write_ftyp,
    write_live_server_manifest,
    write_tfxd,
)

Clip = tuple[TrackHeader, tuple[Sample, ...]]  # the conftest fixtures video_clip / audio_clip


def h(text: str) -> bytes:
    """Bytes from hex digits; spaces are ignored."""
    return bytes.fromhex(text)


LSM_UUID = h("a5d40b30 e81411dd ba2f0800 200c9a66")  # MS-SSTR 2.2.7.2 / ingest spec 3: Live Server Manifest
TFXD_UUID = h("6d1d9b05 42d544e6 80e2141d aff757b2")  # MS-SSTR 2.2.4.4: TrackFragmentExtendedHeaderBox
UNITY_MATRIX = h(  # ISO/IEC 14496-12, 8.2.2.3: { 0x00010000,0,0, 0,0x00010000,0, 0,0,0x40000000 }
    "00010000 00000000 00000000  00000000 00010000 00000000  00000000 00000000 40000000"
)


def only_box(data: bytes) -> Box:
    boxes = list(parse_boxes(data))
    assert len(boxes) == 1
    return boxes[0]


# --- generic framing (ISO/IEC 14496-12, 4.2) ------------------------------------------------------


def test_box_and_full_box_bytes() -> None:
    assert box(b"free") == h("00000008") + b"free"
    assert box(b"free", b"ab", b"c") == h("0000000b") + b"free" + b"abc"
    # FullBox: version 8 bits, flags 24 bits, then the payload.
    assert full_box(b"test", 1, 0x020304, b"x") == h("0000000d") + b"test" + h("01020304") + b"x"


def test_parse_boxes_reads_sizes_offsets_and_largesize() -> None:
    data = (
        h("0000000a") + b"free" + b"ab"
        # size == 1: a 64-bit largesize follows the type (4.2); 16-byte header, 8-byte payload.
        + h("00000001") + b"mdat" + h("0000000000000018") + b"payload!"
    )  # fmt: skip
    assert list(parse_boxes(data, base_offset=100)) == [
        Box(b"free", b"ab", 100, 10, 8),
        Box(b"mdat", b"payload!", 110, 24, 16),
    ]
    assert read_box_header(data, 10) == (b"mdat", 24, 16)


def test_read_box_header_needs_data() -> None:
    assert read_box_header(h("000000"), 0) is None
    assert read_box_header(h("00000001") + b"mdat" + h("00000000"), 0) is None  # largesize incomplete


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (h("00000010") + b"free" + b"1234", "truncated"),  # says 16 bytes, has 12
        (h("00000008") + b"free" + h("0000"), "truncated box header"),  # 2 stray bytes after a box
        (h("00000007") + b"free", "smaller than its header"),
        (h("00000001") + b"mdat" + h("000000000000000f"), "smaller than its header"),  # largesize 15 < 16
        (h("00000000") + b"mdat", "size 0"),  # "to end of file" has no end in a live stream
        (h("10000001") + b"mdat", "over the limit of 268435456"),  # 256 MiB + 1
    ],
    ids=["truncated-box", "truncated-header", "size-below-header", "largesize-below-header", "size-0", "oversize"],
)
def test_malformed_box_framing(data: bytes, message: str) -> None:
    with pytest.raises(BoxError, match=message):
        list(parse_boxes(data))


# --- header boxes ---------------------------------------------------------------------------------


def test_ftyp_bytes() -> None:
    expected = (
        h("0000001c") + b"ftyp"  # ISO/IEC 14496-12, 4.3: 28 bytes
        + b"isml"  # major_brand
        + h("00000001")  # minor_version
        + b"piff" + b"iso6" + b"isml"  # compatible_brands
    )  # fmt: skip
    assert write_ftyp() == expected
    parsed = only_box(expected)
    assert (parsed.type, parsed.payload[:4], parsed.payload[8:]) == (b"ftyp", b"isml", b"piffiso6isml")


def test_live_server_manifest_bytes() -> None:
    smil = '<smil><meta content="é"/></smil>'  # é is two bytes in UTF-8: 33 bytes in all
    expected = (
        h("0000003d") + b"uuid"  # 8 + 16 + 4 + 33 = 61
        + LSM_UUID  # extended type
        + h("00000000")  # FullBox: version 0, flags 0
        + b'<smil><meta content="\xc3\xa9"/></smil>'  # the SMIL document, UTF-8
    )  # fmt: skip
    assert write_live_server_manifest(smil) == expected
    assert parse_live_server_manifest(only_box(expected).payload) == smil


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (TFXD_UUID + h("00000000"), "not a Live Server Manifest"),
        (LSM_UUID + h("0000"), "truncated"),
        (LSM_UUID + h("00000000") + b"\xff", "not UTF-8"),
    ],
)
def test_malformed_live_server_manifest(payload: bytes, message: str) -> None:
    with pytest.raises(BoxError, match=message):
        parse_live_server_manifest(payload)


def test_moov_bytes_for_one_video_track() -> None:
    entry = h("00000010") + b"avc1" + h("0001020304050607")  # a stand-in sample entry, copied verbatim
    track = TrackHeader(1, b"vide", 90000, entry, width=640, height=360)
    expected = b"".join([
        h("00000201"), b"moov",  # 8 + 108 + 357 + 40 = 513
        # mvhd, 8.2.2, version 0: times 0, timescale 1000, duration 0, rate 1.0, volume 1.0,
        # reserved 2+8, matrix, pre_defined 24, next_track_ID 2.
        h("0000006c"), b"mvhd", h("00000000"),
        h("00000000 00000000 000003e8 00000000"), h("00010000"), h("0100"), h("0000"), bytes(8),
        UNITY_MATRIX, bytes(24), h("00000002"),
        h("00000165"), b"trak",  # 8 + 92 + 257 = 357
        # tkhd, 8.3.2, version 0, flags 3 (enabled, in_movie): times 0, track_ID 1, reserved, duration 0,
        # reserved 8, layer 0, alternate_group 0, volume 0 (video), reserved, matrix, 640x360 16.16.
        h("0000005c"), b"tkhd", h("00000003"),
        h("00000000 00000000 00000001 00000000 00000000"), bytes(8), h("0000 0000 0000 0000"),
        UNITY_MATRIX, h("02800000"), h("01680000"),
        h("00000101"), b"mdia",  # 8 + 32 + 45 + 172 = 257
        # mdhd, 8.4.2, version 0: times 0, timescale 90000, duration 0, language "und" packed as
        # 5-bit letters minus 0x60: u=21, n=14, d=4 -> 21<<10 | 14<<5 | 4 = 0x55c4; pre_defined 0.
        h("00000020"), b"mdhd", h("00000000"), h("00000000 00000000 00015f90 00000000"), h("55c4"), h("0000"),
        # hdlr, 8.4.3: pre_defined 0, handler_type vide, reserved 12, name (null-terminated).
        h("0000002d"), b"hdlr", h("00000000"), h("00000000"), b"vide", bytes(12), b"VideoHandler\x00",
        h("000000ac"), b"minf",  # 8 + 20 + 36 + 108 = 172
        # vmhd, 12.1.2: flags 1, graphicsmode 0, opcolor 0,0,0.
        h("00000014"), b"vmhd", h("00000001"), bytes(8),
        # dinf/dref, 8.7.1-8.7.2: one "url " entry with flags 1 (media in the same file).
        h("00000024"), b"dinf", h("0000001c"), b"dref", h("00000000"), h("00000001"),
        h("0000000c"), b"url ", h("00000001"),
        h("0000006c"), b"stbl",  # 8 + 32 + 16 + 16 + 20 + 16 = 108
        h("00000020"), b"stsd", h("00000000"), h("00000001"), entry,  # 8.5.2: one entry
        h("00000010"), b"stts", h("00000000"), h("00000000"),  # 8.6.1.2: no samples in moov
        h("00000010"), b"stsc", h("00000000"), h("00000000"),  # 8.7.4
        h("00000014"), b"stsz", h("00000000"), h("00000000"), h("00000000"),  # 8.7.3: size 0, count 0
        h("00000010"), b"stco", h("00000000"), h("00000000"),  # 8.7.5
        h("00000028"), b"mvex",
        # trex, 8.8.3: track_ID 1, default_sample_description_index 1, default duration/size/flags 0.
        h("00000020"), b"trex", h("00000000"), h("00000001 00000001 00000000 00000000 00000000"),
    ])  # fmt: skip
    assert write_moov([track]) == expected
    assert parse_moov(expected[8:]) == [track]
    assert track.codec == "avc1"


def test_moov_round_trip_with_real_sample_entries(video_clip: Clip, audio_clip: Clip) -> None:
    video = TrackHeader(1, b"vide", 90000, video_clip[0].sample_entry, width=192, height=108)
    audio = TrackHeader(2, b"soun", 48000, audio_clip[0].sample_entry, language="eng")
    moov = write_moov([video, audio])
    assert parse_moov(only_box(moov).payload) == [video, audio]
    assert (video.codec, audio.codec) == ("avc1", "mp4a")
    # The audio-specific boxes, exactly: smhd (12.2.2, balance 0), the handler, and the language
    # "eng" = 5<<10 | 14<<5 | 7 = 0x15c7 after a 48000 (0xbb80) timescale in mdhd.
    assert h("00000010") + b"smhd" + h("00000000") + h("00000000") in moov
    assert b"soun" + bytes(12) + b"SoundHandler\x00" in moov
    assert h("0000bb80 00000000 15c7 0000") in moov
    # tkhd of the audio track: track_ID 2 ... volume 1.0 (0x0100) ... width and height 0.
    assert h("00000002 00000000 00000000") + bytes(8) + h("0000 0000 0100 0000") + UNITY_MATRIX + bytes(8) in moov


def test_parse_moov_of_ffmpeg_output(video_clip: Clip, audio_clip: Clip) -> None:
    assert video_clip[0].track_id == 1
    assert (video_clip[0].handler, video_clip[0].timescale) == (b"vide", 12800)
    assert (video_clip[0].width, video_clip[0].height, video_clip[0].codec) == (192, 108, "avc1")
    assert (audio_clip[0].handler, audio_clip[0].timescale) == (b"soun", 48000)
    assert (audio_clip[0].codec, audio_clip[0].language) == ("mp4a", "und")


def test_moov_errors() -> None:
    with pytest.raises(ValueError, match="at least one track"):
        write_moov([])
    with pytest.raises(ValueError, match="language"):
        write_moov([TrackHeader(1, b"soun", 48000, h("00000008") + b"mp4a", language="EN")])
    with pytest.raises(BoxError, match="no tracks"):
        parse_moov(b"")
    good = write_moov([TrackHeader(1, b"vide", 90000, h("00000008") + b"avc1")])
    with pytest.raises(BoxError, match="no mdhd"):
        parse_moov(good[8:].replace(b"mdhd", b"xxxx"))


# --- tfxd (MS-SSTR 2.2.4.4) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tfxd", "expected"),
    [
        # Version 0: 32-bit fragment_absolute_time and fragment_duration. 8 + 16 + 4 + 8 = 36.
        (Tfxd(0, 0x01020304, 3000),
         h("00000024") + b"uuid" + TFXD_UUID + h("00000000") + h("01020304") + h("00000bb8")),
        # Version 1: the same in 64 bits. 8 + 16 + 4 + 16 = 44. 180180 = 0x2bfd4.
        (Tfxd(1, 2**40 + 5, 180180),
         h("0000002c") + b"uuid" + TFXD_UUID + h("01000000") + h("0000010000000005") + h("000000000002bfd4")),
        # Version 2 (our assumed layout): version 1 fields, then a 64-bit fragment_index. 52 bytes.
        (Tfxd(2, 0x0102030405060708, 0x1111, 0xFFFFFFFF00000001),
         h("00000034") + b"uuid" + TFXD_UUID + h("02000000")
         + h("0102030405060708") + h("0000000000001111") + h("ffffffff00000001")),
    ],
    ids=["v0", "v1", "v2"],
)  # fmt: skip
def test_tfxd_bytes(tfxd: Tfxd, expected: bytes) -> None:
    assert write_tfxd(tfxd) == expected
    assert parse_tfxd(only_box(expected).payload) == tfxd


def test_tfxd_errors() -> None:
    with pytest.raises(ValueError, match="fragment index"):
        write_tfxd(Tfxd(2, 0, 0))
    with pytest.raises(ValueError, match="unknown tfxd version 3"):
        write_tfxd(Tfxd(3, 0, 0))
    with pytest.raises(BoxError, match="tfxd version 3 is unknown"):
        parse_tfxd(TFXD_UUID + h("03000000") + bytes(24))
    with pytest.raises(BoxError, match="tfxd version 1 is truncated"):
        parse_tfxd(TFXD_UUID + h("01000000") + bytes(15))
    with pytest.raises(BoxError, match="not a tfxd"):
        parse_tfxd(LSM_UUID + h("01000000") + bytes(16))
    with pytest.raises(BoxError, match="too short"):
        parse_tfxd(TFXD_UUID + h("01"))


# --- fragments (ISO/IEC 14496-12, 8.8) ------------------------------------------------------------


def test_fragment_bytes_two_samples() -> None:
    samples = [Sample(b"ABC", 3003, is_sync=True), Sample(b"DEFGH", 3004, is_sync=False)]
    data = write_fragment(7, [TrackRun(1, 0x123456789, samples, fragment_index=7)], tfxd_version=1)
    expected = b"".join([
        h("0000009c"), b"moof",  # 8.8.4: 8 + 16 + 132 = 156
        h("00000010"), b"mfhd", h("00000000"), h("00000007"),  # 8.8.5: sequence_number = fragment index 7
        h("00000084"), b"traf",  # 8.8.6: 8 + 16 + 20 + 44 + 44 = 132
        h("00000010"), b"tfhd", h("00020000"), h("00000001"),  # 8.8.7: default-base-is-moof; track_ID 1
        h("00000014"), b"tfdt", h("01000000"), h("0000000123456789"),  # 8.8.12: v1, 64-bit decode time
        # trun, 8.8.8: version 0, flags 0x000701 = data-offset | sample-duration | -size | -flags,
        # sample_count 2, data_offset 164 = the moof's 156 bytes + the mdat's 8-byte header.
        h("0000002c"), b"trun", h("00000701"), h("00000002"), h("000000a4"),
        # sample 1: duration 3003, size 3, flags 0x02000000 (8.8.3.1: depends_on 2 = I-frame, sync)
        h("00000bbb"), h("00000003"), h("02000000"),
        # sample 2: duration 3004, size 5, flags 0x01010000 (depends_on 1, sample_is_non_sync_sample)
        h("00000bbc"), h("00000005"), h("01010000"),
        # tfxd v1 (MS-SSTR 2.2.4.4): absolute time = tfdt, duration 3003 + 3004 = 6007 = 0x1777.
        h("0000002c"), b"uuid", TFXD_UUID, h("01000000"), h("0000000123456789"), h("0000000000001777"),
        h("00000010"), b"mdat", b"ABC", b"DEFGH",  # 8.1.1: the samples' bytes, in order
    ])  # fmt: skip
    assert data == expected
    assert parse_fragment(expected) == ParsedFragment(
        7, (ParsedTraf(1, 0x123456789, tuple(samples), Tfxd(1, 0x123456789, 6007)),), expected
    )


def test_fragment_bytes_composition_offset_and_tfxd_v2() -> None:
    samples = [Sample(b"Z", 1024, is_sync=True, composition_offset=-3003)]
    data = write_fragment(0, [TrackRun(2, 0, samples, fragment_index=0)], tfxd_version=2)
    expected = b"".join([
        h("0000009c"), b"moof",  # 8 + 16 + 132
        h("00000010"), b"mfhd", h("00000000"), h("00000000"),
        h("00000084"), b"traf",  # 8 + 16 + 20 + 36 + 52
        h("00000010"), b"tfhd", h("00020000"), h("00000002"),
        h("00000014"), b"tfdt", h("01000000"), h("0000000000000000"),
        # trun version 1 (signed composition offsets), flags 0x000f01 adds composition-time-offset;
        # one sample: duration 1024, size 1, sync, offset -3003 = 0xfffff445 (two's complement).
        h("00000024"), b"trun", h("01000f01"), h("00000001"), h("000000a4"),
        h("00000400"), h("00000001"), h("02000000"), h("fffff445"),
        # tfxd v2: time 0, duration 1024, fragment_index 0.
        h("00000034"), b"uuid", TFXD_UUID, h("02000000"), bytes(8), h("0000000000000400"), bytes(8),
        h("00000009"), b"mdat", b"Z",
    ])  # fmt: skip
    assert data == expected
    parsed = parse_fragment(expected)
    assert parsed.trafs == (ParsedTraf(2, 0, tuple(samples), Tfxd(2, 0, 1024, 0)),)


def test_fragment_with_two_track_runs_shares_one_mdat() -> None:
    video = [Sample(b"v" * 10, 3003), Sample(b"w" * 20, 3003, is_sync=False)]
    audio = [Sample(b"a" * 7, 1024), Sample(b"b" * 9, 1024), Sample(b"c", 1024)]
    runs = [TrackRun(1, 90000, video, 5), TrackRun(2, 48000, audio, 5)]
    data = write_fragment(5, runs)
    mdat = list(parse_boxes(data))[1]
    assert mdat.payload == b"v" * 10 + b"w" * 20 + b"a" * 7 + b"b" * 9 + b"c"  # run after run
    parsed = parse_fragment(data)
    assert parsed.sequence_number == 5
    assert parsed.trafs == (
        ParsedTraf(1, 90000, tuple(video), Tfxd(1, 90000, 6006)),
        ParsedTraf(2, 48000, tuple(audio), Tfxd(1, 48000, 3072)),
    )
    assert [t.duration for t in parsed.trafs] == [6006, 3072]


def test_mfhd_sequence_number_limits() -> None:
    data = write_fragment(0xFFFFFFFF, [TrackRun(1, 0, [Sample(b"x", 1)], 0xFFFFFFFF)])
    assert data[8:24] == h("00000010") + b"mfhd" + h("00000000") + h("ffffffff")
    assert parse_fragment(data).sequence_number == 0xFFFFFFFF
    with pytest.raises(ValueError, match="does not fit"):
        write_fragment(2**32, [TrackRun(1, 0, [Sample(b"x", 1)], 2**32)])
    with pytest.raises(ValueError, match="does not fit"):
        write_fragment(-1, [TrackRun(1, 0, [Sample(b"x", 1)], 0)])
    with pytest.raises(ValueError, match="at least one track run"):
        write_fragment(0, [])


def fragment_with(moof_children: bytes, mdat_payload: bytes) -> bytes:
    return box(b"moof", full_box(b"mfhd", 0, 0, h("00000001")), moof_children) + box(b"mdat", mdat_payload)


def test_parse_fragment_with_defaults_and_implicit_offsets() -> None:
    # ffmpeg-style fields we never write. tfhd flags 0x000018: default-sample-duration 1024 and
    # default-sample-size 2 (8.8.7), no base offset, so the base is the moof's first byte. The
    # first trun gives only data_offset = 100 (moof 8 + mfhd 16 + traf 68, plus the mdat header 8);
    # the second gives nothing and continues where the first ended (8.8.8).
    tfhd = full_box(b"tfhd", 0, 0x000018, h("00000003"), h("00000400"), h("00000002"))  # 24 bytes
    trun1 = full_box(b"trun", 0, 0x000001, h("00000001"), h("00000064"))  # 20 bytes
    trun2 = full_box(b"trun", 0, 0x000000, h("00000001"))  # 16 bytes
    data = fragment_with(box(b"traf", tfhd, trun1, trun2), b"xxyy")
    assert data[100:] == b"xxyy"
    parsed = parse_fragment(data)
    assert parsed.trafs == (ParsedTraf(3, None, (Sample(b"xx", 1024), Sample(b"yy", 1024)), None),)


def test_parse_fragment_first_sample_flags_over_default_flags() -> None:
    # tfhd flags 0x000020: default-sample-flags 0x00010000 (not a sync sample). trun flags 0x000205:
    # data_offset, first-sample-flags 0 (sync) and a size per sample, so the first sample takes
    # the first-sample flags and the others the default; durations come from trex (8.8.3).
    tfhd = full_box(b"tfhd", 0, 0x000020, h("00000001"), h("00010000"))  # 20 bytes
    trun = full_box(b"trun", 0, 0x000205, h("00000003"), h("00000060"), h("00000000"),
                    h("00000001"), h("00000002"), h("00000003"))  # fmt: skip  # 36 bytes
    data = fragment_with(box(b"traf", tfhd, trun), b"abbccc")
    assert data[96:] == b"abbccc"  # moof 8 + mfhd 16 + traf 8 + 20 + 36, mdat header 8
    parsed = parse_fragment(data, defaults={1: TrackDefaults(sample_duration=512)})
    samples = parsed.trafs[0].samples
    assert samples == (Sample(b"a", 512, True), Sample(b"bb", 512, False), Sample(b"ccc", 512, False))


def test_parse_fragment_per_sample_columns() -> None:
    # trun version 0, flags 0x000f01: duration, size, flags and an unsigned composition offset per
    # sample, interleaved in that order in the table (8.8.8).
    trun = full_box(b"trun", 0, 0x000F01, h("00000002"), h("0000006c"),
                    h("00000010 00000001 00010000 00000007"),
                    h("00000020 00000002 00000000 7fffffff"))  # fmt: skip  # 52 bytes
    tfhd = full_box(b"tfhd", 0, 0, h("00000001"))  # 16 bytes
    data = fragment_with(box(b"traf", tfhd, trun), b"xyz")
    assert data[108:] == b"xyz"  # moof 8 + mfhd 16 + traf 8 + 16 + 52, mdat header 8
    assert parse_fragment(data).trafs[0].samples == (Sample(b"x", 16, False, 7), Sample(b"yz", 32, True, 0x7FFFFFFF))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (box(b"moof") + box(b"free"), "exactly one moof followed by one mdat"),
        (box(b"moof", full_box(b"mfhd", 0, 0, h("00000001"))) + box(b"mdat"), "no traf"),
        (box(b"moof", full_box(b"mfhd", 0, 0)) + box(b"mdat"), "mfhd is truncated"),
        (fragment_with(box(b"traf", full_box(b"tfhd", 0, 0)), b""), "tfhd is truncated"),
        (fragment_with(box(b"traf", full_box(b"tfhd", 0, 1, h("00000001"))), b""), "tfhd is truncated"),
        (fragment_with(box(b"traf", full_box(b"tfhd", 0, 0, h("00000001")),
                            full_box(b"trun", 0, 0x000301, h("00000002"))), b""), "trun is truncated"),
    ],
    ids=["not-moof-mdat", "no-traf", "mfhd", "tfhd-no-track-id", "tfhd-no-base-offset", "trun"],
)  # fmt: skip
def test_malformed_fragments(data: bytes, message: str) -> None:
    with pytest.raises(BoxError, match=message):
        parse_fragment(data)


def test_trun_sample_outside_mdat() -> None:
    good = write_fragment(1, [TrackRun(1, 0, [Sample(b"ABC", 10), Sample(b"DE", 10)], 1)])
    moof = good[: -(8 + 5)]
    assert parse_fragment(moof + box(b"mdat", b"ABCDE")).trafs[0].samples[1].data == b"DE"
    with pytest.raises(BoxError, match=r"sample 1 .* outside the mdat"):
        parse_fragment(moof + box(b"mdat", b"ABCD"))  # one byte short
    # A data_offset pointing back into the moof is outside the mdat too.
    patched = moof.replace(h("00000002") + (len(moof) + 8).to_bytes(4, "big"), h("00000002 00000000"))
    assert patched != moof
    with pytest.raises(BoxError, match=r"sample 0 .* outside the mdat"):
        parse_fragment(patched + box(b"mdat", b"ABCDE"))


def test_trun_sample_count_is_bounded_by_the_bytes_behind_it() -> None:
    # A count of 2**32-1 with per-sample entries for only two samples: refused before allocating.
    good = write_fragment(1, [TrackRun(1, 0, [Sample(b"ABC", 10), Sample(b"DE", 10)], 1)])
    moof = good[: -(8 + 5)]
    huge = moof.replace(h("00000002") + (len(moof) + 8).to_bytes(4, "big"),
                        h("ffffffff") + (len(moof) + 8).to_bytes(4, "big"))  # fmt: skip
    assert huge != moof
    with pytest.raises(BoxError, match=r"declares 4294967295 samples but holds entries for 2"):
        parse_fragment(huge + box(b"mdat", b"ABCDE"))
    # No per-sample entries (all from defaults): the count cannot exceed the mdat's bytes.
    traf = box(b"traf", full_box(b"tfhd", 0, 0x020010,  # default-base-is-moof, default-sample-size
                             h("00000001 00000001")),
               full_box(b"trun", 0, 0, h("7fffffff")))  # fmt: skip
    fragment = box(b"moof", full_box(b"mfhd", 0, 0, h("00000001")), traf) + box(b"mdat", b"AB")
    with pytest.raises(BoxError, match="more than the mdat has bytes"):
        parse_fragment(fragment)


def test_tfxd_version_0_refuses_times_over_32_bits() -> None:
    with pytest.raises(ValueError, match="32-bit"):
        write_tfxd(Tfxd(0, 2**32, 1))


# --- fragment templates: write_fragment's bytes with four fields patched --------------------------


def test_fragment_template_renders_the_exact_bytes_of_the_two_sample_fragment() -> None:
    """The field-by-field bytes of test_fragment_bytes_two_samples, from a template."""
    samples = [Sample(b"ABC", 3003, is_sync=True), Sample(b"DEFGH", 3004, is_sync=False)]
    template = FragmentTemplate(samples, tfxd_version=1)
    assert (template.duration, template.size) == (6007, 156 + 16)
    data = template.render(7, 1, 0x123456789)
    assert data[20:24] == h("00000007")  # mfhd sequence_number
    assert data[44:48] == h("00000001")  # tfhd track_ID
    assert data[60:68] == h("0000000123456789")  # tfdt
    assert data[140:156] == h("0000000123456789") + h("0000000000001777")  # tfxd time, duration: the moof ends
    assert data == write_fragment(7, [TrackRun(1, 0x123456789, samples, 7)], tfxd_version=1)


@pytest.mark.parametrize("tfxd_version", [0, 1, 2])
@pytest.mark.parametrize("composition_offsets", [False, True])
def test_fragment_template_equals_write_fragment(tfxd_version: int, composition_offsets: bool) -> None:
    samples = [Sample(bytes([i]) * (i + 1), 1000 + i % 3, is_sync=i % 4 == 0,
                      composition_offset=(i - 2) * 100 if composition_offsets else 0)
               for i in range(30)]  # fmt: skip
    template = FragmentTemplate(samples, tfxd_version)
    limit = 0xFFFFFFFF if tfxd_version == 0 else 0xFFFFFFFFFFFFFFFF
    for index, track_id, base_time in [(0, 1, 0), (1, 7, 90000), (0xFFFFFFFF, 0xFFFFFFFF, limit - template.duration),
                                       (123456, 2, 2**32 - template.duration)]:  # fmt: skip
        expected = write_fragment(index, [TrackRun(track_id, base_time, samples, index)], tfxd_version)
        assert template.render(index, track_id, base_time) == expected
    # Rendering leaves the template as it was: the same call gives the same bytes again.
    assert template.render(0, 1, 0) == write_fragment(0, [TrackRun(1, 0, samples, 0)], tfxd_version)


def test_fragment_template_refuses_what_write_fragment_refuses() -> None:
    samples = [Sample(b"x", 10)]
    with pytest.raises(ValueError, match="does not fit"):
        FragmentTemplate(samples).render(2**32, 1, 0)
    with pytest.raises(ValueError, match="does not fit"):
        FragmentTemplate(samples).render(-1, 1, 0)
    for refuse in (lambda: FragmentTemplate(samples, tfxd_version=0).render(0, 1, 2**32),
                   lambda: write_fragment(0, [TrackRun(1, 2**32, samples, 0)], tfxd_version=0)):  # fmt: skip
        with pytest.raises(ValueError, match="32-bit"):
            refuse()
    with pytest.raises(ValueError, match="unknown tfxd version"):
        FragmentTemplate(samples, tfxd_version=3)


# --- an independent reader: ffprobe -------------------------------------------------------------------

FFPROBE = shutil.which("ffprobe")
needs_ffprobe = pytest.mark.skipif(FFPROBE is None, reason="ffprobe not found (apt-get install ffmpeg)")

VIDEO_FRAME = 3003  # ticks at 90 kHz: 29.97 fps
AUDIO_FRAME = 1024  # ticks at 48 kHz: one AAC frame


def ffprobe(path: Path, *args: str) -> dict[str, Any]:
    assert FFPROBE is not None
    result = subprocess.run(
        [FFPROBE, "-v", "error", *args, "-of", "json", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def init_segment(video_clip: Clip, audio_clip: Clip) -> bytes:
    tracks = [
        TrackHeader(1, b"vide", 90000, video_clip[0].sample_entry, width=192, height=108),
        TrackHeader(2, b"soun", 48000, audio_clip[0].sample_entry, language="eng"),
    ]
    return write_ftyp() + write_live_server_manifest("<smil/>") + write_moov(tracks)


def restamped(clip: Clip, first: int, count: int, duration: int) -> list[Sample]:
    """Samples first .. first+count-1 of a clip, each given the same duration in the new timescale."""
    return [Sample(sample.data, duration) for sample in clip[1][first : first + count]]


@needs_ffprobe
def test_ffprobe_reads_codecs_size_and_duration(tmp_path: Path, video_clip: Clip, audio_clip: Clip) -> None:
    data = init_segment(video_clip, audio_clip)
    for k in range(3):  # three fragments, each carrying both tracks: 10 video frames, 16 AAC frames
        runs = [
            TrackRun(1, k * 10 * VIDEO_FRAME, restamped(video_clip, k * 10, 10, VIDEO_FRAME), k),
            TrackRun(2, k * 16 * AUDIO_FRAME, restamped(audio_clip, k * 16, 16, AUDIO_FRAME), k),
        ]
        data += write_fragment(k, runs)
    path = tmp_path / "stream.ismv"
    path.write_bytes(data)

    info = ffprobe(path, "-show_entries", "stream=codec_name,width,height,duration:format=duration")
    video, audio = info["streams"]
    assert (video["codec_name"], video["width"], video["height"]) == ("h264", 192, 108)
    assert audio["codec_name"] == "aac"
    video_seconds = Fraction(30 * VIDEO_FRAME, 90000)  # 1.001 s
    audio_seconds = Fraction(48 * AUDIO_FRAME, 48000)  # 1.024 s
    assert abs(Fraction(video["duration"]) - video_seconds) < Fraction(VIDEO_FRAME, 90000)
    assert abs(Fraction(audio["duration"]) - audio_seconds) < Fraction(AUDIO_FRAME, 48000)
    assert abs(Fraction(info["format"]["duration"]) - audio_seconds) < Fraction(AUDIO_FRAME, 48000)


@needs_ffprobe
def test_ffprobe_packet_times_are_tfdt_plus_durations(tmp_path: Path, video_clip: Clip, audio_clip: Clip) -> None:
    # Smooth-style: one moof per track per fragment; decode times since 1970 in each timescale
    # (well past 32 bits, so tfdt v1 matters). Every sample is written as sync: ffmpeg takes the
    # key flag of H.264 from the bitstream (these are all IDR frames) and marks all audio as key,
    # so it cannot check our non-sync flag; test_fragment_bytes_two_samples does, byte for byte.
    video_start, audio_start = 1_767_225_600 * 90000, 1_767_225_600 * 48000
    data = init_segment(video_clip, audio_clip)
    expected: dict[int, list[tuple[int, bool]]] = {0: [], 1: []}
    for k in range(3):
        video = restamped(video_clip, k * 10, 10, VIDEO_FRAME)
        audio = restamped(audio_clip, k * 16, 16, AUDIO_FRAME)
        video_tfdt = video_start + k * 10 * VIDEO_FRAME
        audio_tfdt = audio_start + k * 16 * AUDIO_FRAME
        data += write_fragment(k, [TrackRun(1, video_tfdt, video, k)])
        data += write_fragment(k, [TrackRun(2, audio_tfdt, audio, k)])
        expected[0] += [(video_tfdt + i * VIDEO_FRAME, s.is_sync) for i, s in enumerate(video)]
        expected[1] += [(audio_tfdt + i * AUDIO_FRAME, s.is_sync) for i, s in enumerate(audio)]
    path = tmp_path / "stream.ismv"
    path.write_bytes(data)

    info = ffprobe(path, "-show_entries", "stream=index,time_base:packet=stream_index,pts,dts,flags")
    assert [s["time_base"] for s in info["streams"]] == ["1/90000", "1/48000"]
    got: dict[int, list[tuple[int, bool]]] = {0: [], 1: []}
    for packet in info["packets"]:
        assert packet["pts"] == packet["dts"]
        got[packet["stream_index"]].append((packet["pts"], "K" in packet["flags"]))
    assert got == expected
