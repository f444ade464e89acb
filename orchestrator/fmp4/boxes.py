"""ISO BMFF boxes for fragmented MP4, shared by every wire format: writers and parsers, bytes in, bytes out.

Theory of operation
-------------------
A live fragmented-MP4 stream is a *header* (``ftyp``, optional format-specific boxes, ``moov``)
followed by *fragments* (``moof`` + ``mdat``). This module knows the byte layout of the ISO/IEC
14496-12 boxes involved and nothing about sockets, processes, time or any one ingest protocol;
exact bytes are the contract with the ingest services, so every field is under our control and
under test. What a wire format adds (Smooth's ``isml`` brand, Live Server Manifest and ``tfxd``)
lives in :mod:`orchestrator.wire`, which builds on the hooks here: :func:`write_ftyp` takes the
brands, :func:`write_movie_fragment` and :class:`MovieFragmentTemplate` take a *traf tail* (the
format's boxes closing each ``traf``), and :func:`parse_fragment` hands back every ``uuid`` box
of a ``traf`` (:attr:`ParsedTraf.extensions`) for the format to read.

Writing: :func:`write_ftyp`, :func:`write_moov` and :func:`write_movie_fragment` return complete
boxes. Each fragment carries the shared fragment index in ``mfhd.sequence_number`` (32 bits).

Parsing: :func:`parse_boxes` splits a byte string into boxes; :func:`parse_moov` and
:func:`parse_fragment` read back what the writers produce (and what ffmpeg produces), raising
:class:`~orchestrator.errors.BoxError` on anything malformed. The incremental, feed-bytes reader
lives in :mod:`orchestrator.fmp4.reader`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from orchestrator.errors import BoxError, over_limit

# ISO/IEC 14496-12, 8.8.3.1: sample_flags. depends_on=2 (an I-frame), or depends_on=1 with the
# sample_is_non_sync_sample bit for frames that need earlier ones.
SYNC_SAMPLE_FLAGS = 0x02000000
NON_SYNC_SAMPLE_FLAGS = 0x01010000

# ISO/IEC 14496-12, 8.8.7 (tfhd) and 8.8.8 (trun) flags.
TFHD_BASE_DATA_OFFSET = 0x000001
TFHD_SAMPLE_DESCRIPTION_INDEX = 0x000002
TFHD_DEFAULT_SAMPLE_DURATION = 0x000008
TFHD_DEFAULT_SAMPLE_SIZE = 0x000010
TFHD_DEFAULT_SAMPLE_FLAGS = 0x000020
TFHD_DEFAULT_BASE_IS_MOOF = 0x020000
TRUN_DATA_OFFSET = 0x000001
TRUN_FIRST_SAMPLE_FLAGS = 0x000004
TRUN_SAMPLE_DURATION = 0x000100
TRUN_SAMPLE_SIZE = 0x000200
TRUN_SAMPLE_FLAGS = 0x000400
TRUN_SAMPLE_COMPOSITION_TIME_OFFSET = 0x000800

# A box larger than this is taken as a corrupt size field rather than buffered.
MAX_BOX_SIZE = 256 * 1024 * 1024
# Work per fragment is bounded by the bytes that carry it (issue 13: a thousand truns over the same
# mdat bytes, or a trun of zero-size samples, made a 1 MiB POST allocate 1 GiB). A fragment may
# hold at most MAX_TRUNS_PER_TRAF truns per traf and MAX_SAMPLES_PER_FRAGMENT samples in all (6 s
# of 120 fps video is 720), at most one sample per mdat byte, and its samples may not reference
# more bytes in all than the mdat holds (no two samples share bytes).
MAX_TRUNS_PER_TRAF = 16
MAX_SAMPLES_PER_FRAGMENT = 10_000

_UNITY_MATRIX = struct.pack(">9I", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000)


# --- generic box framing (ISO/IEC 14496-12, 4.2) -------------------------------------------


def box(box_type: bytes, *payload: bytes) -> bytes:
    """A plain box: 32-bit size, four-character type, payload."""
    body = b"".join(payload)
    size = 8 + len(body)
    if size > 0xFFFFFFFF:
        return struct.pack(">I4sQ", 1, box_type, size + 8) + body
    return struct.pack(">I4s", size, box_type) + body


def full_box(box_type: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    """A FullBox: a box whose payload starts with an 8-bit version and 24-bit flags."""
    return box(box_type, struct.pack(">I", (version << 24) | flags), *payload)


def uuid_box(extended_type: bytes, *payload: bytes) -> bytes:
    """A ``uuid`` box with the given 16-byte extended type."""
    return box(b"uuid", extended_type, *payload)


@dataclass(frozen=True)
class Box:
    """One box as found in a byte string: its type, payload, and where it sat."""

    type: bytes
    payload: bytes
    offset: int
    size: int
    header_size: int

    @property
    def user_type(self) -> bytes | None:
        """The 16-byte extended type of a ``uuid`` box, else None."""
        return self.payload[:16] if self.type == b"uuid" else None


def read_box_header(data: bytes | bytearray, offset: int, base: int = 0) -> tuple[bytes, int, int] | None:
    """Read the header of the box at ``offset``: (type, total size, header size), or None if
    more bytes are needed to know. Raises BoxError for a size that cannot be right, naming the
    offset as ``base + offset`` (``base``: where ``data`` starts in the stream)."""
    at = base + offset
    if len(data) - offset < 8:
        return None
    size, box_type = struct.unpack_from(">I4s", data, offset)
    header_size = 8
    if size == 1:
        if len(data) - offset < 16:
            return None
        (size,) = struct.unpack_from(">Q", data, offset + 8)
        header_size = 16
    elif size == 0:
        raise BoxError(f"box {box_type!r} at offset {at} has size 0 (to end of file), not allowed live")
    if size < header_size:
        raise BoxError(f"box {box_type!r} at offset {at} declares size {size}, smaller than its header")
    if size > MAX_BOX_SIZE:
        raise over_limit(BoxError(f"box {box_type!r} at offset {at} declares size {size}, over the limit of "
                                  f"{MAX_BOX_SIZE}"), "max_box_size")  # fmt: skip
    return box_type, size, header_size


def parse_boxes(data: bytes, base_offset: int = 0) -> Iterator[Box]:
    """Split ``data`` (a whole number of boxes) into boxes. Raises BoxError if it is not."""
    offset = 0
    while offset < len(data):
        header = read_box_header(data, offset, base_offset)
        if header is None:
            raise BoxError(f"truncated box header at offset {base_offset + offset}")
        box_type, size, header_size = header
        if offset + size > len(data):
            raise BoxError(f"box {box_type!r} at offset {base_offset + offset} is truncated")
        yield Box(box_type, data[offset + header_size : offset + size], base_offset + offset, size, header_size)
        offset += size


def _children(payload: bytes) -> dict[bytes, list[Box]]:
    found: dict[bytes, list[Box]] = {}
    for child in parse_boxes(payload):
        found.setdefault(child.type, []).append(child)
    return found


def _one(children: dict[bytes, list[Box]], box_type: bytes, parent: str) -> Box:
    boxes = children.get(box_type)
    if not boxes:
        raise BoxError(f"{parent} has no {box_type.decode('latin-1')} box")
    return boxes[0]


def version_flags(payload: bytes, box_name: str) -> tuple[int, int]:
    """(version, flags) of a FullBox payload; BoxError if it is too short for them."""
    if len(payload) < 4:
        raise BoxError(f"{box_name} is too short for a FullBox header")
    word = struct.unpack_from(">I", payload)[0]
    return word >> 24, word & 0xFFFFFF


# --- header boxes ---------------------------------------------------------------------------


def write_ftyp(major_brand: bytes, minor_version: int, compatible_brands: Sequence[bytes]) -> bytes:
    """``ftyp`` (ISO/IEC 14496-12, 4.3): the brands are the wire format's choice."""
    return box(b"ftyp", major_brand, struct.pack(">I", minor_version), *compatible_brands)


@dataclass(frozen=True)
class TrackHeader:
    """What ``moov`` says about one track.

    ``sample_entry`` is the complete sample entry box (``avc1``, ``mp4a``, ...) as it goes into
    ``stsd``: it carries the codec configuration and is copied verbatim from the encoder.
    """

    track_id: int
    handler: bytes  # b"vide", b"soun", b"meta", b"text"
    timescale: int
    sample_entry: bytes
    width: int = 0
    height: int = 0
    language: str = "und"

    @property
    def codec(self) -> str:
        return self.sample_entry[4:8].decode("latin-1")


def _language_code(language: str) -> int:
    # ISO/IEC 14496-12, 8.4.2.3: ISO-639-2/T code packed as three 5-bit letters (value - 0x60).
    if len(language) != 3 or not language.isascii() or not language.islower():
        raise ValueError(f"language must be a 3-letter lowercase ISO-639-2 code, got {language!r}")
    return ((ord(language[0]) - 0x60) << 10) | ((ord(language[1]) - 0x60) << 5) | (ord(language[2]) - 0x60)


def _language_name(code: int) -> str:
    """The ISO-639-2/T code packed in mdhd, or "und" for a value that packs no three letters
    (0, as some muxers write, would otherwise read back as "```")."""
    name = "".join(chr(((code >> shift) & 0x1F) + 0x60) for shift in (10, 5, 0))
    return name if name.isalpha() and name.islower() else "und"


def _write_trak(track: TrackHeader) -> bytes:
    is_video = track.handler == b"vide"
    is_audio = track.handler == b"soun"
    # ISO/IEC 14496-12, 8.3.2: tkhd version 0, flags enabled|in_movie.
    tkhd = full_box(
        b"tkhd", 0, 0x000003,
        struct.pack(">IIIII", 0, 0, track.track_id, 0, 0),
        bytes(8),
        struct.pack(">hhhH", 0, 0, 0x0100 if is_audio else 0, 0),
        _UNITY_MATRIX,
        struct.pack(">II", track.width << 16, track.height << 16),
    )  # fmt: skip
    # ISO/IEC 14496-12, 8.4.2: mdhd version 0; duration 0 (live, unknown).
    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, track.timescale, 0,
                                               _language_code(track.language), 0))  # fmt: skip
    handler_name = {b"vide": b"VideoHandler", b"soun": b"SoundHandler"}.get(track.handler, b"DataHandler")
    # ISO/IEC 14496-12, 8.4.3: hdlr.
    hdlr = full_box(b"hdlr", 0, 0, struct.pack(">I4s12x", 0, track.handler), handler_name + b"\0")
    if is_video:
        media_header = full_box(b"vmhd", 0, 1, bytes(8))  # 12.1.2
    elif is_audio:
        media_header = full_box(b"smhd", 0, 0, bytes(4))  # 12.2.2
    else:
        media_header = full_box(b"nmhd", 0, 0)  # 8.4.5.2
    dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))
    stbl = box(
        b"stbl",
        full_box(b"stsd", 0, 0, struct.pack(">I", 1), track.sample_entry),
        full_box(b"stts", 0, 0, struct.pack(">I", 0)),
        full_box(b"stsc", 0, 0, struct.pack(">I", 0)),
        full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0)),
        full_box(b"stco", 0, 0, struct.pack(">I", 0)),
    )
    return box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, box(b"minf", media_header, dinf, stbl)))


def write_moov(tracks: Sequence[TrackHeader]) -> bytes:
    """``moov`` with ``mvhd``, one ``trak`` per track and ``mvex``/``trex`` (ISO/IEC 14496-12,
    8.2, 8.3, 8.8.1, 8.8.3), describing a fragmented presentation of unknown duration."""
    if not tracks:
        raise ValueError("a moov needs at least one track")
    # 8.2.2: next_track_ID all ones means "search for an unused one" when max + 1 does not fit.
    next_track_id = min(max(t.track_id for t in tracks) + 1, 0xFFFFFFFF)
    # 8.2.2: mvhd version 0, timescale 1000, duration 0, rate 1.0, volume 1.0.
    mvhd = full_box(
        b"mvhd", 0, 0,
        struct.pack(">IIIIIH", 0, 0, 1000, 0, 0x00010000, 0x0100),
        bytes(10), _UNITY_MATRIX, bytes(24),
        struct.pack(">I", next_track_id),
    )  # fmt: skip
    trex = [full_box(b"trex", 0, 0, struct.pack(">IIIII", t.track_id, 1, 0, 0, 0)) for t in tracks]
    return box(b"moov", mvhd, *(_write_trak(t) for t in tracks), box(b"mvex", *trex))


def parse_moov(payload: bytes) -> list[TrackHeader]:
    """The tracks described by a ``moov`` box's payload."""
    children = _children(payload)
    tracks: list[TrackHeader] = []
    for trak in children.get(b"trak", []):
        trak_children = _children(trak.payload)
        tkhd = _one(trak_children, b"tkhd", "trak").payload
        version, _ = version_flags(tkhd, "tkhd")
        id_offset = 4 + (16 if version == 1 else 8)
        if len(tkhd) < id_offset + 4:
            raise BoxError("tkhd is truncated")
        (track_id,) = struct.unpack_from(">I", tkhd, id_offset)
        if track_id == 0:
            raise BoxError("tkhd track_ID is 0, which ISO/IEC 14496-12 8.3.2 does not allow")
        if any(t.track_id == track_id for t in tracks):
            raise BoxError(f"moov declares track {track_id} twice")
        width = struct.unpack_from(">I", tkhd, len(tkhd) - 8)[0] >> 16
        height = struct.unpack_from(">I", tkhd, len(tkhd) - 4)[0] >> 16
        mdia = _children(_one(trak_children, b"mdia", "trak").payload)
        mdhd = _one(mdia, b"mdhd", "mdia").payload
        version, _ = version_flags(mdhd, "mdhd")
        ts_offset = 4 + (16 if version == 1 else 8)
        lang_offset = ts_offset + 4 + (8 if version == 1 else 4)
        if len(mdhd) < lang_offset + 2:
            raise BoxError("mdhd is truncated")
        (timescale,) = struct.unpack_from(">I", mdhd, ts_offset)
        (language,) = struct.unpack_from(">H", mdhd, lang_offset)
        hdlr = _one(mdia, b"hdlr", "mdia").payload
        if len(hdlr) < 12:
            raise BoxError("hdlr is truncated")
        handler = hdlr[8:12]
        minf = _children(_one(mdia, b"minf", "mdia").payload)
        stbl = _children(_one(minf, b"stbl", "minf").payload)
        stsd = _one(stbl, b"stsd", "stbl").payload
        entries = list(parse_boxes(stsd[8:]))
        if not entries:
            raise BoxError(f"track {track_id} has no sample entry")
        entry = entries[0]
        sample_entry = stsd[8 + entry.offset : 8 + entry.offset + entry.size]
        tracks.append(TrackHeader(track_id, handler, timescale, sample_entry, width, height,
                                  _language_name(language)))  # fmt: skip
    if not tracks:
        raise BoxError("moov has no tracks")
    return tracks


# --- fragments ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)  # slots: built once per sample of every fragment read
class Sample:
    """One access unit: its bytes, duration in track ticks, and whether it starts a GOP."""

    data: bytes
    duration: int
    is_sync: bool = True
    composition_offset: int = 0


@dataclass(frozen=True)
class TrackRun:
    """Everything one ``traf`` carries: the samples of one track for one fragment."""

    track_id: int
    base_time: int  # tfdt baseMediaDecodeTime (and Smooth's tfxd fragment_absolute_time), in track ticks
    samples: Sequence[Sample]
    fragment_index: int

    @property
    def duration(self) -> int:
        return sum(s.duration for s in self.samples)


TrafTail = Callable[[int, int, int], bytes]
"""A wire format's boxes closing each ``traf``, from (base_time, duration, fragment_index): for
Smooth, the ``tfxd``. Its length may depend on the samples only, never on those three numbers."""


def _write_traf(run: TrackRun, data_offset: int, traf_tail: TrafTail | None) -> bytes:
    tfhd = full_box(b"tfhd", 0, TFHD_DEFAULT_BASE_IS_MOOF, struct.pack(">I", run.track_id))  # 8.8.7
    tfdt = full_box(b"tfdt", 1, 0, struct.pack(">Q", run.base_time))  # 8.8.12
    with_cto = any(s.composition_offset for s in run.samples)
    flags = TRUN_DATA_OFFSET | TRUN_SAMPLE_DURATION | TRUN_SAMPLE_SIZE | TRUN_SAMPLE_FLAGS
    entry = ">III"
    if with_cto:
        flags |= TRUN_SAMPLE_COMPOSITION_TIME_OFFSET
        entry = ">IIIi"
    entries = []
    for s in run.samples:
        values = [s.duration, len(s.data), SYNC_SAMPLE_FLAGS if s.is_sync else NON_SYNC_SAMPLE_FLAGS]
        if with_cto:
            values.append(s.composition_offset)
        entries.append(struct.pack(entry, *values))
    # 8.8.8: trun version 1 so that composition offsets may be negative.
    trun = full_box(b"trun", 1 if with_cto else 0, flags,
                    struct.pack(">Ii", len(run.samples), data_offset), *entries)  # fmt: skip
    tail = traf_tail(run.base_time, run.duration, run.fragment_index) if traf_tail is not None else b""
    return box(b"traf", tfhd, tfdt, trun, tail)


def write_movie_fragment(sequence_number: int, runs: Sequence[TrackRun], traf_tail: TrafTail | None = None) -> bytes:
    """``moof`` + ``mdat`` for one fragment (ISO/IEC 14496-12, 8.8.4 and 8.1.1).

    ``sequence_number`` is the shared fragment index (it must fit mfhd's 32 bits). Each ``traf``
    is tfhd, tfdt, trun and the wire format's ``traf_tail``. Each run's sample data follows the
    previous run's in the single ``mdat``; offsets are relative to the start of the ``moof``
    (default-base-is-moof).
    """
    if not 0 <= sequence_number <= 0xFFFFFFFF:
        raise ValueError(f"fragment index {sequence_number} does not fit mfhd.sequence_number")
    if not runs:
        raise ValueError("a fragment needs at least one track run")
    mfhd = full_box(b"mfhd", 0, 0, struct.pack(">I", sequence_number))  # 8.8.5

    def build(moof_size: int) -> bytes:
        offset = moof_size + 8
        trafs = []
        for run in runs:
            trafs.append(_write_traf(run, offset, traf_tail))
            offset += sum(len(s.data) for s in run.samples)
        return box(b"moof", mfhd, *trafs)

    moof = build(build(0).__len__())
    mdat = box(b"mdat", *(s.data for run in runs for s in run.samples))
    return moof + mdat


# Where write_movie_fragment puts the per-fragment fields of a one-track fragment, in bytes from
# the start of the moof: moof header (8), mfhd (8 + 4 + sequence_number), traf header (8), tfhd
# (8 + 4 + track_ID), tfdt (8 + 4 + baseMediaDecodeTime); the traf tail ends the traf (and moof).
_MFHD_SEQUENCE_AT = 8 + 12
_TFHD_TRACK_ID_AT = 8 + 16 + 8 + 12
_TFDT_TIME_AT = 8 + 16 + 8 + 16 + 12


class MovieFragmentTemplate:
    """A one-track fragment whose samples are fixed: :func:`write_movie_fragment`'s bytes, with
    the fields that change from one fragment to the next patched in by :meth:`render`.

    A fragment's bytes depend on its samples (sizes, durations, flags, data) and on three numbers:
    the sequence number (mfhd, and the traf tail's fragment index), the track ID (tfhd) and the
    start time (tfdt, and the traf tail's). Everything else, the data offset included (it depends
    on the moof's size only), is the same for every fragment with the same samples. The template
    is written once by :func:`write_movie_fragment` itself and :meth:`render` overwrites those
    fields, and the traf tail, in a copy of the moof, so the result is byte-identical to
    ``write_movie_fragment(index, [TrackRun(track_id, base_time, samples, index)], traf_tail)``
    at a fraction of the cost (no box is built, no sample entry packed).
    """

    def __init__(self, samples: Sequence[Sample], traf_tail: TrafTail | None = None) -> None:
        data = write_movie_fragment(0, [TrackRun(0, 0, samples, 0)], traf_tail)
        (moof_size,) = struct.unpack_from(">I", data)
        self.duration = sum(s.duration for s in samples)
        self.size = len(data)
        self._moof = data[:moof_size]
        self._mdat = data[moof_size:]
        self._traf_tail = traf_tail
        # The tail is the traf's last bytes, and the traf the moof's last box.
        self._tail_at = moof_size - (len(traf_tail(0, self.duration, 0)) if traf_tail is not None else 0)

    def render(self, index: int, track_id: int, base_time: int) -> bytes:
        """The fragment with sequence number (and traf tail fragment index) ``index``, track
        ``track_id``, starting at ``base_time``. Raises ValueError as write_movie_fragment does."""
        if not 0 <= index <= 0xFFFFFFFF:
            raise ValueError(f"fragment index {index} does not fit mfhd.sequence_number")
        moof = bytearray(self._moof)
        struct.pack_into(">I", moof, _MFHD_SEQUENCE_AT, index)
        struct.pack_into(">I", moof, _TFHD_TRACK_ID_AT, track_id)
        struct.pack_into(">Q", moof, _TFDT_TIME_AT, base_time)
        if self._traf_tail is not None:
            tail = self._traf_tail(base_time, self.duration, index)
            if len(tail) != len(moof) - self._tail_at:
                raise ValueError(f"the traf tail changed size ({len(moof) - self._tail_at} -> {len(tail)} bytes)")
            moof[self._tail_at :] = tail
        return b"".join((moof, self._mdat))


@dataclass(frozen=True)
class ParsedTraf:
    """One ``traf`` read back. ``extensions``: its ``uuid`` boxes, in order, for the wire format
    to read (Smooth's ``tfxd``)."""

    track_id: int
    base_time: int | None
    samples: tuple[Sample, ...]
    extensions: tuple[Box, ...] = ()

    @property
    def duration(self) -> int:
        return sum(s.duration for s in self.samples)


@dataclass(frozen=True)
class ParsedFragment:
    """A ``moof`` + ``mdat`` read back: the fragment index and each track's samples."""

    sequence_number: int
    trafs: tuple[ParsedTraf, ...]
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class TrackDefaults:
    """``trex`` defaults for a track, used when tfhd/trun leave a field out."""

    sample_duration: int = 0
    sample_size: int = 0
    sample_flags: int = 0


def parse_trex(moov_payload: bytes) -> dict[int, TrackDefaults]:
    children = _children(moov_payload)
    defaults: dict[int, TrackDefaults] = {}
    for mvex in children.get(b"mvex", []):
        for trex in _children(mvex.payload).get(b"trex", []):
            if len(trex.payload) < 24:
                raise BoxError("trex is truncated")
            track_id, _, duration, size, flags = struct.unpack_from(">IIIII", trex.payload, 4)
            defaults[track_id] = TrackDefaults(duration, size, flags)
    return defaults


def _is_sync(flags: int) -> bool:
    return not flags & 0x00010000


def parse_fragment(
    data: bytes, moof_offset: int = 0, defaults: dict[int, TrackDefaults] | None = None
) -> ParsedFragment:
    """Parse ``moof`` followed by its ``mdat`` (``data`` holds exactly the two boxes).

    ``moof_offset`` is where the moof sits in the whole stream; it is needed only for a tfhd that
    gives an absolute base_data_offset.
    """
    # The mdat is not copied out (its payload is most of the fragment): only its bounds are read.
    moof_header = read_box_header(data, 0)
    mdat_header = read_box_header(data, moof_header[1]) if moof_header and moof_header[1] <= len(data) else None
    if (moof_header is None or mdat_header is None or moof_header[0] != b"moof" or mdat_header[0] != b"mdat"
            or moof_header[1] + mdat_header[1] != len(data)):  # fmt: skip
        raise BoxError("a fragment must be exactly one moof followed by one mdat")
    mdat_start = moof_header[1] + mdat_header[2]
    mdat_end = len(data)
    children = _children(data[moof_header[2] : moof_header[1]])
    mfhd = _one(children, b"mfhd", "moof").payload
    if len(mfhd) < 8:
        raise BoxError("mfhd is truncated")
    (sequence_number,) = struct.unpack_from(">I", mfhd, 4)
    trafs: list[ParsedTraf] = []
    next_base = 0  # the implicit base offset for a traf with neither flag: end of previous data
    # Samples this fragment may still declare: one per mdat byte at most, and the overall cap.
    sample_budget = [min(MAX_SAMPLES_PER_FRAGMENT, max(1, mdat_end - mdat_start))]
    referenced = 0  # sample bytes referenced so far, over all trafs
    for traf in children.get(b"traf", []):
        traf_children = _children(traf.payload)
        tfhd = _one(traf_children, b"tfhd", "traf").payload
        _, tf_flags = version_flags(tfhd, "tfhd")
        try:
            (track_id,) = struct.unpack_from(">I", tfhd, 4)
            pos = 8
            td = (defaults or {}).get(track_id, TrackDefaults())
            default_duration, default_size = td.sample_duration, td.sample_size
            default_flags = td.sample_flags
            if tf_flags & TFHD_BASE_DATA_OFFSET:
                (absolute,) = struct.unpack_from(">Q", tfhd, pos)
                base = absolute - moof_offset
                pos += 8
            elif tf_flags & TFHD_DEFAULT_BASE_IS_MOOF or not trafs:
                base = 0
            else:
                base = next_base
            if tf_flags & TFHD_SAMPLE_DESCRIPTION_INDEX:
                pos += 4
            if tf_flags & TFHD_DEFAULT_SAMPLE_DURATION:
                (default_duration,) = struct.unpack_from(">I", tfhd, pos)
                pos += 4
            if tf_flags & TFHD_DEFAULT_SAMPLE_SIZE:
                (default_size,) = struct.unpack_from(">I", tfhd, pos)
                pos += 4
            if tf_flags & TFHD_DEFAULT_SAMPLE_FLAGS:
                (default_flags,) = struct.unpack_from(">I", tfhd, pos)
                pos += 4
        except struct.error:
            raise BoxError("tfhd is truncated") from None
        base_time = None
        if b"tfdt" in traf_children:
            tfdt = traf_children[b"tfdt"][0].payload
            version, _ = version_flags(tfdt, "tfdt")
            layout = ">Q" if version == 1 else ">I"
            if len(tfdt) < 4 + struct.calcsize(layout):
                raise BoxError("tfdt is truncated")
            (base_time,) = struct.unpack_from(layout, tfdt, 4)
        samples: list[Sample] = []
        data_end = base
        truns = traf_children.get(b"trun", [])
        if len(truns) > MAX_TRUNS_PER_TRAF:
            raise over_limit(BoxError(f"traf of track {track_id} has {len(truns)} truns, over the limit of "
                                      f"{MAX_TRUNS_PER_TRAF}"), "max_truns_per_traf")  # fmt: skip
        for trun_box in truns:
            run_samples, data_end = _parse_trun(
                trun_box.payload, data, base, data_end,
                (default_duration, default_size, default_flags), (mdat_start, mdat_end), sample_budget)  # fmt: skip
            samples.extend(run_samples)
            referenced += sum(len(sample.data) for sample in run_samples)
            if referenced > mdat_end - mdat_start:
                raise BoxError(f"the samples reference {referenced} bytes, more than the mdat's "
                               f"{mdat_end - mdat_start}: samples may not share bytes")  # fmt: skip
        next_base = data_end
        trafs.append(ParsedTraf(track_id, base_time, tuple(samples), tuple(traf_children.get(b"uuid", ()))))
    if not trafs:
        raise BoxError("moof has no traf")
    return ParsedFragment(sequence_number, tuple(trafs), data)


def _parse_trun(
    trun: bytes,
    data: bytes,
    base: int,
    previous_end: int,
    defaults: tuple[int, int, int],
    mdat_span: tuple[int, int],
    sample_budget: list[int],
) -> tuple[list[Sample], int]:
    version, flags = version_flags(trun, "trun")
    default_duration, default_size, default_flags = defaults
    try:
        (count,) = struct.unpack_from(">I", trun, 4)
        pos = 8
        if flags & TRUN_DATA_OFFSET:
            (data_offset,) = struct.unpack_from(">i", trun, pos)
            position = base + data_offset
            pos += 4
        else:
            position = previous_end
        first_flags = None
        if flags & TRUN_FIRST_SAMPLE_FLAGS:
            (first_flags,) = struct.unpack_from(">I", trun, pos)
            pos += 4
        # Bound the count by the bytes that back it before building anything: a hostile or
        # corrupt count must not make us allocate billions of samples.
        per_sample = TRUN_SAMPLE_DURATION | TRUN_SAMPLE_SIZE | TRUN_SAMPLE_FLAGS | TRUN_SAMPLE_COMPOSITION_TIME_OFFSET
        entry_size = 4 * bin(flags & per_sample).count("1")
        if entry_size and count * entry_size > len(trun) - pos:
            raise BoxError(f"trun declares {count} samples but holds entries for {(len(trun) - pos) // entry_size}")
        if count > max(1, mdat_span[1] - mdat_span[0]):
            raise BoxError(f"trun declares {count} samples, more than the mdat has bytes")
        if count > sample_budget[0]:
            limit = min(MAX_SAMPLES_PER_FRAGMENT, max(1, mdat_span[1] - mdat_span[0]))
            raise over_limit(BoxError(f"the fragment declares more than {limit} samples, over the limit (one per "
                                      f"mdat byte, {MAX_SAMPLES_PER_FRAGMENT} in all)"),
                             "max_samples_per_fragment")  # fmt: skip
        sample_budget[0] -= count
        # The whole sample table in one unpack (its size was checked above), then one column per
        # field the flags carry, in table order; the default where they carry none.
        fields = [(bit, code) for bit, code in ((TRUN_SAMPLE_DURATION, "I"), (TRUN_SAMPLE_SIZE, "I"),
                  (TRUN_SAMPLE_FLAGS, "I"), (TRUN_SAMPLE_COMPOSITION_TIME_OFFSET, "i" if version == 1 else "I"))
                  if flags & bit]  # fmt: skip
        width = len(fields)
        table = struct.unpack_from(">" + "".join(code for _, code in fields) * count, trun, pos) if width else ()
        columns = {bit: table[n::width] for n, (bit, _) in enumerate(fields)}
        durations = columns.get(TRUN_SAMPLE_DURATION) or [default_duration] * count
        sizes = columns.get(TRUN_SAMPLE_SIZE) or [default_size] * count
        offsets = columns.get(TRUN_SAMPLE_COMPOSITION_TIME_OFFSET) or [0] * count
        sample_flags: Sequence[int] | None = columns.get(TRUN_SAMPLE_FLAGS)
        if sample_flags is None:
            sample_flags = [default_flags] * count
            if first_flags is not None and count:
                sample_flags = [first_flags, *sample_flags[1:]]
        low, high = mdat_span
        samples = []
        for i in range(count):
            size, cto = sizes[i], offsets[i]
            if cto > 0x7FFFFFFF:  # only version 0 is unsigned; no writer can carry it on as signed
                raise BoxError(f"trun sample {i} has composition offset {cto}, over the limit of {0x7FFFFFFF}")
            if position < low or position + size > high:
                raise BoxError(f"trun sample {i} ({size} bytes at {position}) lies outside the mdat")
            samples.append(Sample(data[position : position + size], durations[i], _is_sync(sample_flags[i]), cto))
            position += size
    except struct.error:
        raise BoxError("trun is truncated") from None
    return samples, position
