"""The relay's durable spool, without I/O: the record format, what to keep, what to drop, and the
order of recovery.

Theory of operation
-------------------
Smooth ingest gives an encoder no acknowledgement per fragment: what the relay read is, for the
encoder, sent. With a spool, every fragment the relay reads is written to disk *before* it is
handed to the endpoints' outboxes, and stays there until every endpoint has it, so a relay
killed at any moment (SIGKILL, OOM, a crashed host with ``fsync = "fragment"``) restarts with
everything it had read.

**Records.** Each stream has its own append-only *segment files*, numbered. A segment is a
sequence of records, each ``magic (4) | kind (1) | length (4) | crc32 (4) | payload``:
kind 1 is the stream header (the exact ``ftyp`` + manifest + ``moov`` bytes), kind 2 a fragment
(its track, index, signed start, duration, timescale, continuity flag, then its exact bytes).
Every segment starts with the header record in force, so any segment can be read alone and the
older ones deleted freely.

**What to keep** (:class:`StreamSpool`). Every fragment appended gets the stream's next
sequence number. An endpoint *has* a fragment once its outbox holds it no longer: written and
past the forward buffer (what a reconnect would send again), or dropped by the backlog bound
(it will never have it: "within the backlog bound"). The shell tells the core, per endpoint,
the oldest fragment its outbox still holds (by (track, start)); the *low-water mark* is the
smallest sequence number among them (or the next number when an outbox holds nothing). A
segment is deleted when every fragment in it is below the low-water mark, and never the segment
being written. Segments are rotated at ``segment_bytes``, so the disk holds at most about one
segment more than what some endpoint still needs; what an endpoint still needs is bounded by its
backlog bound.

**Recovery order** (:func:`recover`). Segments in number order, records in file order: header
records are announced (the same bytes again change nothing), fragments pushed to every endpoint
again, oldest first, and fed to the intake's timeline so that the encoder's own resend after
the restart is dropped as a duplicate. Endpoints that had some of them drop them as duplicates
(receivers de-duplicate by (stream, track, time)); resending costs bandwidth, never a gap. A
torn record at the end of the newest segment (the process died mid-write) is cut off; a damaged
record elsewhere ends the reading of its segment and is reported.

The fsync policy is the shell's (:mod:`orchestrator.relay.spoolfiles`).
"""

from __future__ import annotations

import struct
import zlib
from collections import deque
from dataclasses import dataclass, field

from orchestrator.fmp4.stream import EncodedFragment

MAGIC = b"ORSp"
KIND_HEADER = 1
KIND_FRAGMENT = 2
_RECORD = struct.Struct(">4sBII")  # magic, kind, payload length, crc32 of the payload
_FRAGMENT = struct.Struct(">IqqQIB")  # track, index, start (signed), duration, timescale, continuous
MAX_RECORD = 256 * 1024 * 1024  # a fragment larger than this is not a fragment (the reader's box limit is lower)
DEFAULT_SEGMENT_BYTES = 8 * 1024 * 1024

Key = tuple[int, int]  # (track, start): a fragment, in every outbox's copy of it (CMAF re-boxes included)


def key_of(fragment: EncodedFragment) -> Key:
    return (fragment.track_id, fragment.start)


def encode_header(data: bytes) -> bytes:
    """A header record holding the stream header's exact bytes."""
    return _RECORD.pack(MAGIC, KIND_HEADER, len(data), zlib.crc32(data)) + data


def encode_fragment(fragment: EncodedFragment) -> bytes:
    """A fragment record (see the module docstring)."""
    payload = _FRAGMENT.pack(fragment.track_id, fragment.index, fragment.start, fragment.duration, fragment.timescale,
                             fragment.continuous) + fragment.data  # fmt: skip
    return _RECORD.pack(MAGIC, KIND_FRAGMENT, len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True)
class HeaderRecord:
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class FragmentRecord:
    fragment: EncodedFragment


Record = HeaderRecord | FragmentRecord


@dataclass(frozen=True)
class Decoded:
    """A segment's records; ``good_length``: the bytes that hold whole, valid records;
    ``problem``: why reading stopped before the end (None: the whole segment was read)."""

    records: list[Record]
    good_length: int
    problem: str | None


def decode(data: bytes, stream_id: str) -> Decoded:
    """Read a segment's records, stopping at the first torn or damaged one."""
    records: list[Record] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _RECORD.size:
            return Decoded(records, offset, f"a torn record at byte {offset}")
        magic, kind, length, crc = _RECORD.unpack_from(data, offset)
        if magic != MAGIC or kind not in (KIND_HEADER, KIND_FRAGMENT) or length > MAX_RECORD:
            return Decoded(records, offset, f"no record at byte {offset}")
        start = offset + _RECORD.size
        payload = data[start : start + length]
        if len(payload) < length:
            return Decoded(records, offset, f"a torn record at byte {offset}")
        if zlib.crc32(payload) != crc:
            return Decoded(records, offset, f"a damaged record at byte {offset} (crc)")
        if kind == KIND_HEADER:
            records.append(HeaderRecord(payload))
        else:
            if length < _FRAGMENT.size:
                return Decoded(records, offset, f"a fragment record too short at byte {offset}")
            track, index, begin, duration, timescale, continuous = _FRAGMENT.unpack_from(payload)
            fragment = EncodedFragment(stream_id, track, index, begin, duration, timescale,
                                       payload[_FRAGMENT.size :], bool(continuous))  # fmt: skip
            records.append(FragmentRecord(fragment))
        offset = start + length
    return Decoded(records, offset, None)


@dataclass
class Segment:
    number: int
    size: int = 0
    first_seq: int | None = None  # sequence numbers of the fragments in it
    last_seq: int | None = None


@dataclass(frozen=True)
class Placement:
    """Where the next record goes: segment ``number``; ``new``: open it first, and write the
    header record (``header_first``) before the record itself."""

    number: int
    new: bool
    header_first: bool


class StreamSpool:
    """One stream's segments and the fragments they hold (see the module docstring)."""

    def __init__(self, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        if segment_bytes <= 0:
            raise ValueError("segment_bytes must be positive")
        self.segment_bytes = segment_bytes
        self.segments: deque[Segment] = deque()
        self.next_seq = 0
        self._held: dict[Key, int] = {}  # spooled fragment -> its sequence number
        self._order: deque[tuple[int, Key]] = deque()  # (seq, key), oldest first
        self.header: bytes | None = None  # the header record in force (written first in a new segment)
        self.bytes = 0  # on disk, over the segments

    # --- writing ---------------------------------------------------------------------------

    def place(self, record_size: int) -> Placement:
        """Where a record of ``record_size`` bytes goes. Rotates when the current segment is full
        (a record is never split); the first segment starts with it."""
        current = self.segments[-1] if self.segments else None
        if current is not None and (current.size == 0 or current.size + record_size <= self.segment_bytes):
            return Placement(current.number, False, False)
        number = current.number + 1 if current is not None else 0
        return Placement(number, True, self.header is not None)

    def opened(self, number: int) -> None:
        self.segments.append(Segment(number))

    def wrote_header(self, size: int, data: bytes) -> None:
        self.header = data
        self.segments[-1].size += size
        self.bytes += size

    def wrote_fragment(self, size: int, fragment: EncodedFragment) -> int:
        """The fragment record is in the current segment; returns its sequence number."""
        seq = self.next_seq
        self.next_seq += 1
        segment = self.segments[-1]
        segment.size += size
        self.bytes += size
        segment.first_seq = seq if segment.first_seq is None else segment.first_seq
        segment.last_seq = seq
        key = key_of(fragment)
        self._held[key] = seq
        self._order.append((seq, key))
        return seq

    # --- releasing -------------------------------------------------------------------------

    def low_water(self, oldest_held: list[Key | None]) -> int:
        """The lowest sequence number some endpoint still needs, given each endpoint's oldest
        fragment held (None: it holds nothing). A fragment the spool does not know (older than
        everything spooled, or never spooled) does not hold anything back."""
        low = self.next_seq
        for key in oldest_held:
            if key is not None and (seq := self._held.get(key)) is not None:
                low = min(low, seq)
        return low

    def release(self, low_water: int) -> list[int]:
        """Forget every segment whose fragments are all below ``low_water``, except the newest
        (being written); returns their numbers, for the shell to delete, oldest first."""
        gone = []
        while len(self.segments) > 1:
            oldest = self.segments[0]
            if oldest.last_seq is not None and oldest.last_seq >= low_water:
                break
            self.segments.popleft()
            self.bytes -= oldest.size
            gone.append(oldest.number)
        floor = self.segments[0].first_seq if self.segments and self.segments[0].first_seq is not None else None
        while self._order and (floor is None or self._order[0][0] < floor) and self._order[0][0] < low_water:
            _, key = self._order.popleft()
            self._held.pop(key, None)
        return gone

    @property
    def fragments(self) -> int:
        """Fragments on disk."""
        first = next((s.first_seq for s in self.segments if s.first_seq is not None), None)
        return 0 if first is None else self.next_seq - first

    # --- recovering ------------------------------------------------------------------------

    def recovered(self, number: int, size: int, records: list[Record]) -> None:
        """A segment read back at start-up (in number order), ``size`` bytes of whole records."""
        self.opened(number)
        self.segments[-1].size = size
        self.bytes += size
        for record in records:
            if isinstance(record, HeaderRecord):
                self.header = record.data
            else:
                self.wrote_fragment(0, record.fragment)


def recover(segments: list[tuple[int, bytes]], stream_id: str) -> tuple[list[Record], list[tuple[int, Decoded]]]:
    """Every record of a stream's segments, in recovery order (segments by number, records in
    file order), and each segment's :class:`Decoded` (its good length and problem)."""
    records: list[Record] = []
    decoded = []
    for number, data in sorted(segments, key=lambda s: s[0]):
        result = decode(data, stream_id)
        records.extend(result.records)
        decoded.append((number, result))
    return records, decoded
