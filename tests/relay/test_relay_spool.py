"""The spool's pure core (orchestrator/relay/spool.py): records as exact bytes both ways, torn and
damaged records, what is kept and released, and the recovery order; and its file shell
(orchestrator/relay/spoolfiles.py) on a real directory: rotation, deletion, a torn tail cut off."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest

from orchestrator.fmp4.stream import EncodedFragment
from orchestrator.relay.spool import (
    MAGIC,
    FragmentRecord,
    HeaderRecord,
    StreamSpool,
    decode,
    encode_fragment,
    encode_header,
    key_of,
    recover,
)
from orchestrator.relay.spoolfiles import SpoolFiles, sync_all


def frag(seq: int, track: int = 1, size: int = 100, start: int | None = None) -> EncodedFragment:
    begin = seq * 20_000_000 if start is None else start
    return EncodedFragment("video", track, seq, begin, 20_000_000, 10_000_000, bytes([seq % 256]) * size)


def test_records_are_exact_bytes_both_ways() -> None:
    header = encode_header(b"HEADER")
    assert header == MAGIC + bytes([1]) + struct.pack(">II", 6, zlib.crc32(b"HEADER")) + b"HEADER"
    fragment = EncodedFragment("video", 2, 7, -213_333, 19_786_667, 10_000_000, b"moofmdat", continuous=False)
    payload = struct.pack(">IqqQIB", 2, 7, -213_333, 19_786_667, 10_000_000, 0) + b"moofmdat"
    assert (
        encode_fragment(fragment)
        == MAGIC + bytes([2]) + struct.pack(">II", len(payload), zlib.crc32(payload)) + payload
    )
    decoded = decode(header + encode_fragment(fragment), "video")
    assert decoded.problem is None
    assert decoded.good_length == len(header) + len(encode_fragment(fragment))
    assert decoded.records == [HeaderRecord(b"HEADER"), FragmentRecord(fragment)]


@pytest.mark.parametrize("cut", [1, 5, 13, 20, 40])
def test_a_torn_tail_is_cut_at_the_last_whole_record(cut: int) -> None:
    whole = encode_header(b"H") + encode_fragment(frag(0))
    torn = whole + encode_fragment(frag(1))[:cut]
    decoded = decode(torn, "video")
    assert decoded.good_length == len(whole)
    assert [type(r) for r in decoded.records] == [HeaderRecord, FragmentRecord]
    assert decoded.problem is not None
    assert "torn" in decoded.problem


def test_a_damaged_record_ends_the_reading_there() -> None:
    first = encode_header(b"H") + encode_fragment(frag(0))
    damaged = bytearray(encode_fragment(frag(1)))
    damaged[-1] ^= 0xFF
    decoded = decode(first + bytes(damaged) + encode_fragment(frag(2)), "video")
    assert decoded.good_length == len(first)
    assert decoded.problem is not None
    assert "crc" in decoded.problem
    garbage = decode(first + b"NOPE" + bytes(20), "video")
    assert (garbage.good_length, garbage.problem) == (len(first), f"no record at byte {len(first)}")


def fill(spool: StreamSpool, fragments: list[EncodedFragment], record: int = 100) -> None:
    """Walk the core as the file shell does, ``record`` bytes a record."""
    for fragment in fragments:
        placement = spool.place(record)
        if placement.new:
            spool.opened(placement.number)
            if placement.header_first:
                spool.wrote_header(10, spool.header or b"")
        spool.wrote_fragment(record, fragment)


def test_segments_rotate_and_each_new_one_starts_with_the_header() -> None:
    spool = StreamSpool(segment_bytes=250)
    first = spool.place(10)
    assert (first.number, first.new, first.header_first) == (0, True, False)
    spool.opened(0)
    spool.wrote_header(10, b"H")
    fill(spool, [frag(k) for k in range(5)])
    # 10 + 100 + 100 in segment 0; then 10 (header) + 100 + 100 in 1; then 10 + 100 in 2
    assert [(s.number, s.size, s.first_seq, s.last_seq) for s in spool.segments] == [
        (0, 210, 0, 1), (1, 210, 2, 3), (2, 110, 4, 4)]  # fmt: skip
    assert (spool.bytes, spool.fragments, spool.next_seq) == (530, 5, 5)


def test_a_segment_is_released_when_no_outbox_holds_any_of_it() -> None:
    spool = StreamSpool(segment_bytes=250)
    spool.opened(0)
    spool.wrote_header(10, b"H")
    fragments = [frag(k) for k in range(5)]
    fill(spool, fragments)
    # Endpoint a holds fragment 1 still (its forward buffer), b holds 3, c holds nothing.
    low = spool.low_water([key_of(fragments[1]), key_of(fragments[3]), None])
    assert low == 1
    assert spool.release(low) == []  # segment 0 holds fragment 1
    low = spool.low_water([key_of(fragments[2]), key_of(fragments[3]), None])
    assert low == 2
    assert spool.release(low) == [0]
    assert spool.fragments == 3
    # Every outbox empty: everything is below the low-water mark, but the segment being written stays.
    assert spool.low_water([None, None]) == 5
    assert spool.release(5) == [1]
    assert [s.number for s in spool.segments] == [2]
    # A fragment the spool no longer knows (released, or never spooled) holds nothing back.
    assert spool.low_water([key_of(fragments[0]), key_of(frag(99))]) == 5


def test_recovery_is_segments_by_number_then_records_in_order() -> None:
    seg0 = encode_header(b"H1") + encode_fragment(frag(0)) + encode_fragment(frag(1))
    seg1 = encode_header(b"H1") + encode_fragment(frag(2)) + encode_header(b"H2") + encode_fragment(frag(3, start=0))
    records, decoded = recover([(7, seg1), (3, seg0)], "video")
    assert [d[0] for d in decoded] == [3, 7]
    shape = [("H", r.data) if isinstance(r, HeaderRecord) else ("F", r.fragment.index) for r in records]
    assert shape == [("H", b"H1"), ("F", 0), ("F", 1), ("H", b"H1"), ("F", 2), ("H", b"H2"), ("F", 3)]
    spool = StreamSpool()
    for number, result in decoded:
        spool.recovered(number, result.good_length, result.records)
    assert (spool.next_seq, spool.fragments, spool.header, spool.bytes) == (4, 4, b"H2", len(seg0) + len(seg1))


def test_spool_files_rotate_release_and_recover(tmp_path: Path) -> None:
    files = SpoolFiles(tmp_path, fsync=True, segment_bytes=4096)
    files.append_header("video", b"HEADER")
    fragments = [frag(k, size=1500) for k in range(8)]
    for fragment in fragments:
        files.append_fragment("video", fragment)
    segments = sorted(p.name for p in (tmp_path / "video").iterdir())
    assert segments == [f"{n:012d}.seg" for n in range(4)]  # two 1.5 kB fragments a 4 kB segment
    # Each segment alone holds the header and its fragments.
    for name in segments:
        records = decode((tmp_path / "video" / name).read_bytes(), "video").records
        assert records[0] == HeaderRecord(b"HEADER")
    assert files.release("video", [key_of(fragments[4])]) == 2
    assert sorted(p.name for p in (tmp_path / "video").iterdir()) == segments[2:]
    files.close()

    again = SpoolFiles(tmp_path)
    records = again.recover("video")
    assert [r.fragment for r in records if isinstance(r, FragmentRecord)] == fragments[4:]
    assert again.spool("video").header == b"HEADER"
    # Appending goes on after what was recovered.
    again.append_fragment("video", frag(8, size=1500))
    again.close()
    third = SpoolFiles(tmp_path)
    assert [r.fragment.index for r in third.recover("video") if isinstance(r, FragmentRecord)] == [4, 5, 6, 7, 8]
    third.close()


def test_a_torn_tail_on_disk_is_cut_off_at_recovery(tmp_path: Path) -> None:
    files = SpoolFiles(tmp_path, fsync=False)
    files.append_header("video", b"HEADER")
    for k in range(3):
        files.append_fragment("video", frag(k))
    files.close()
    segment = tmp_path / "video" / "000000000000.seg"
    whole = segment.stat().st_size
    with segment.open("ab") as out:  # the process died in the middle of a write
        out.write(encode_fragment(frag(3))[:30])
    recovered = SpoolFiles(tmp_path)
    assert [r.fragment.index for r in recovered.recover("video") if isinstance(r, FragmentRecord)] == [0, 1, 2]
    assert segment.stat().st_size == whole
    recovered.append_fragment("video", frag(3))
    recovered.close()
    assert [r.fragment.index for r in SpoolFiles(tmp_path).recover("video") if isinstance(r, FragmentRecord)] == [
        0, 1, 2, 3]  # fmt: skip


def test_fsyncs_are_left_pending_for_a_worker_thread(tmp_path: Path) -> None:
    """With fsync on, each record leaves a duplicated descriptor to fsync (and the directory, for a
    new segment); the caller runs them off the event loop. With fsync off, nothing."""
    synced = SpoolFiles(tmp_path / "on", fsync=True, segment_bytes=4096)
    synced.append_fragment("video", frag(0))
    pending = synced.take_syncs("video")
    assert len(pending) == 2  # the new segment's directory entry, then the record
    assert synced.take_syncs("video") == []
    sync_all(pending)
    for fd in pending:
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)  # closed
    synced.append_fragment("video", frag(1))
    assert len(synced.take_syncs("video")) == 1
    synced.close()
    unsynced = SpoolFiles(tmp_path / "off", fsync=False)
    unsynced.append_fragment("video", frag(0))
    assert unsynced.take_syncs("video") == []
    unsynced.close()
