"""Incremental reader of a fragmented-MP4 live stream: feed bytes, take events.

Theory of operation
-------------------
Modelled on h11: :meth:`StreamReader.feed` appends bytes as they arrive from a socket or a
pipe, and :meth:`StreamReader.next_event` returns the next complete event, or ``NEED_DATA`` when
the buffered bytes do not yet hold one. No I/O happens here.

A stream is a header followed by fragments::

    ftyp  [uuid(the format's manifest)]  moov  (moof mdat)*  [mfra]

The reader is the same for every wire format. A format that opens its header with a manifest
box (Smooth's Live Server Manifest) describes it with a :class:`ManifestBox` (its ``uuid``
extended type, its name for messages, how to decode its text) and passes it in; the reader then
keeps that box in :attr:`Header.manifest`, refuses a second one and, with ``require_manifest``,
a ``moov`` that comes first.

Events, in order:
  * :class:`Header` once the ``moov`` is complete (with the ``ftyp`` and manifest before it);
  * :class:`Fragment` for each complete ``moof`` + ``mdat`` pair, parsed;
  * :class:`OtherBox` for any other top-level box after the header (``free``, ``sidx``,
    ``mfra`` ...), passed on so the caller may log or ignore it.

Anything out of order (a fragment before the header, a ``moof`` not followed by ``mdat``, a header
without the manifest when one is required) raises :class:`~orchestrator.errors.MediaError`; a
malformed box raises :class:`~orchestrator.errors.BoxError`. After an error the reader is
unusable: the caller drops the stream (or the POST) it was reading.

A box is only ever handed out whole, so memory is bounded by the largest box
(``fmp4.MAX_BOX_SIZE``); a box of the header (``ftyp``, the manifest, ``moov``) may not exceed
``MAX_HEADER_BOX_SIZE``, nor a ``moof`` ``MAX_MOOF_SIZE``, and those limits are checked as soon
as the box's size field arrives (a 100 MiB moof before its 100 MiB mdat peaked the process at
+789 MiB: issue 20). A fragment is taken from the buffer in one copy, ``moof`` and ``mdat``
together, once both are whole.

:attr:`StreamReader.reserved` says how many bytes the reader holds or is about to hold, for a
caller that keeps a memory budget: the declared size of the box it is receiving, and for a
fragment its declared ``moof`` + ``mdat`` while it arrives, and once it is whole what taking
and deciding it really costs: ``FRAGMENT_COST_ONE_TRAF`` or ``FRAGMENT_COST`` times that (the
buffer, the fragment's own copy, the samples parsed out of it, and a per-track rebuild:
measured in tests/ingest/test_fragment_cost.py).

Every offset in an error message counts from the start of the stream.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator.errors import BoxError, MediaError, over_limit
from orchestrator.fmp4.boxes import (
    ParsedFragment,
    TrackDefaults,
    TrackHeader,
    parse_fragment,
    parse_moov,
    parse_trex,
    read_box_header,
)

# The header boxes are small (a moov with a few sample entries is a few kilobytes); a 40 MB
# manifest of empty elements cost 1.1 GiB to parse before this limit (issue 13).
MAX_HEADER_BOX_SIZE = 1024 * 1024
# A moof describes samples, it does not hold them: 10,000 samples (boxes.MAX_SAMPLES_PER_FRAGMENT)
# of 16-byte trun entries are 160 KB. Anything near the limit is hostile or broken.
MAX_MOOF_SIZE = 2 * 1024 * 1024
# What a whole fragment of n bytes (moof + mdat) costs in memory while it is taken from the
# buffer and decided, in units of n (measured with tracemalloc, tests/ingest/test_fragment_cost.py):
# one traf, 2.1 (the buffer with its over-allocation, then the fragment's copy and its parsed
# samples); several trafs, 3.5 (each track's share rebuilt for its own file as well).
FRAGMENT_COST_ONE_TRAF = 3
FRAGMENT_COST = 4


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA
"""Returned by :meth:`StreamReader.next_event` when more bytes must be fed first."""


@dataclass(frozen=True)
class ManifestBox:
    """A wire format's manifest box in the header: a ``uuid`` box with extended type ``uuid``,
    called ``name`` in messages, whose payload (after the 8-byte box header) ``decode`` turns
    into text (raising BoxError)."""

    uuid: bytes
    name: str
    decode: Callable[[bytes], str]


@dataclass(frozen=True)
class Header:
    """The stream header: the exact bytes of ftyp, manifest and moov, and what they say."""

    ftyp: bytes
    manifest: bytes | None
    moov: bytes
    tracks: tuple[TrackHeader, ...]
    manifest_text: str | None  # the manifest decoded (Smooth: the SMIL document)
    defaults: dict[int, TrackDefaults] = field(repr=False)

    @property
    def data(self) -> bytes:
        """The header as it goes on the wire, boxes in order."""
        return self.ftyp + (self.manifest or b"") + self.moov


@dataclass(frozen=True)
class Fragment:
    """A complete ``moof`` + ``mdat``; ``offset`` is where it started in the stream."""

    parsed: ParsedFragment
    offset: int

    @property
    def data(self) -> bytes:
        return self.parsed.data


@dataclass(frozen=True)
class OtherBox:
    """A top-level box that is neither header nor fragment."""

    type: bytes
    data: bytes
    offset: int


Event = Header | Fragment | OtherBox


class StreamReader:
    """Reads one fragmented-MP4 stream incrementally. See the module docstring."""

    def __init__(self, *, manifest: ManifestBox | None = None, require_manifest: bool = False) -> None:
        if require_manifest and manifest is None:
            raise ValueError("require_manifest needs the manifest box described")
        self._buffer = bytearray()
        self._consumed = 0  # stream offset of self._buffer[0]
        self._manifest_box = manifest
        self._require_manifest = require_manifest
        self._ftyp: bytes | None = None
        self._manifest: bytes | None = None
        self.header: Header | None = None
        self._moof_cost: tuple[int, int] = (-1, FRAGMENT_COST)  # (stream offset of a whole moof, its cost factor)

    @property
    def bytes_received(self) -> int:
        return self._consumed + len(self._buffer)

    @property
    def reserved(self) -> int:
        """Bytes held, or about to be held: at least the declared size of the box being received
        (a fragment's: moof + mdat, once the mdat's size is known), and once a whole fragment is
        buffered, what taking and deciding it costs: ``FRAGMENT_COST_ONE_TRAF`` or
        ``FRAGMENT_COST`` times its size. A caller decides each whole fragment before it reads
        more (the ingest server does, without an await in between), so of all its POSTs only one
        at a time is at that peak, and a fragment still arriving counts once. Raises BoxError for
        a size that cannot be right, as :meth:`next_event` would."""
        header = read_box_header(self._buffer, 0, self._consumed)
        if header is None:
            return len(self._buffer)
        box_type, size, _ = header
        if self.header is None:
            self._check_header_box(box_type, size)
        if self.header is None or box_type != b"moof":
            return max(len(self._buffer), size)
        self._check_moof(size)
        mdat = read_box_header(self._buffer, size, self._consumed) if len(self._buffer) >= size else None
        declared = max(len(self._buffer), size + (mdat[1] if mdat else 0))
        whole = mdat is not None and len(self._buffer) >= size + mdat[1]
        return self._cost_factor(size) * declared if whole else declared

    def _cost_factor(self, moof_size: int) -> int:
        """FRAGMENT_COST_ONE_TRAF once the moof at the buffer's start is whole and has one traf,
        else FRAGMENT_COST. Counted once per moof (``reserved`` is read for every chunk)."""
        if len(self._buffer) < moof_size:
            return FRAGMENT_COST
        if self._moof_cost[0] != self._consumed:
            header_size = read_box_header(self._buffer, 0)[2]  # type: ignore[index]  # whole, checked above
            trafs, at = 0, header_size
            while at + 8 <= moof_size:
                child_size, child_type = struct.unpack_from(">I4s", self._buffer, at)
                trafs += child_type == b"traf"
                if child_size < 8:
                    break  # a malformed moof: the parser will say what is wrong with it
                at += child_size
            self._moof_cost = (self._consumed, FRAGMENT_COST_ONE_TRAF if trafs == 1 else FRAGMENT_COST)
        return self._moof_cost[1]

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole event."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_event(self) -> Event | NeedData:
        while True:
            taken = self._take_box()
            if taken is None:
                return NEED_DATA
            box_type, data, offset = taken
            event = self._handle(box_type, data, offset)
            if event is not None:
                return event

    def _check_header_box(self, box_type: bytes, size: int) -> None:
        if size > MAX_HEADER_BOX_SIZE:
            raise over_limit(BoxError(f"{_name(box_type)} at offset {self._consumed} declares {size} bytes, over "
                                      f"the limit of {MAX_HEADER_BOX_SIZE} for a box of the header "
                                      f"(max_header_box_size)"), "max_header_box_size")  # fmt: skip

    def _check_moof(self, size: int) -> None:
        if size > MAX_MOOF_SIZE:
            raise over_limit(BoxError(f"moof at offset {self._consumed} declares {size} bytes, over the limit of "
                                      f"{MAX_MOOF_SIZE} for a moof (max_moof_size)"), "max_moof_size")  # fmt: skip

    def _take_box(self) -> tuple[bytes, bytes, int] | None:
        """The next whole box (type, bytes, offset), a ``moof`` together with its ``mdat``; None
        if more bytes are needed."""
        header = read_box_header(self._buffer, 0, self._consumed)
        if header is None:
            return None
        box_type, size, _ = header
        if self.header is None:
            self._check_header_box(box_type, size)
        if self.header is not None and box_type == b"moof":
            self._check_moof(size)
            if len(self._buffer) < size:
                return None
            mdat = read_box_header(self._buffer, size, self._consumed)
            if mdat is None:
                return None
            if mdat[0] != b"mdat":
                raise MediaError(f"moof at offset {self._consumed} is followed by {_name(mdat[0])}, not mdat")
            size += mdat[1]
        if len(self._buffer) < size:
            return None
        with memoryview(self._buffer) as view:  # one copy, not a slice and then a copy of it
            data = bytes(view[:size])
        del self._buffer[:size]
        offset = self._consumed
        self._consumed += size
        return box_type, data, offset

    def _handle(self, box_type: bytes, data: bytes, offset: int) -> Event | None:
        if self.header is None:
            return self._handle_header_box(box_type, data, offset)
        if box_type == b"moof":  # with its mdat (_take_box)
            try:
                parsed = parse_fragment(data, offset, self.header.defaults)
            except BoxError as exc:
                raise over_limit(BoxError(f"fragment at offset {offset}: {exc}"), None, exc) from None
            return Fragment(parsed, offset)
        if box_type in (b"ftyp", b"moov"):
            raise MediaError(f"{_name(box_type)} at offset {offset}: a second header in one stream")
        if box_type == b"mdat":
            raise MediaError(f"mdat at offset {offset} without a moof before it")
        return OtherBox(box_type, data, offset)

    def _handle_header_box(self, box_type: bytes, data: bytes, offset: int) -> Header | None:
        if self._ftyp is None:
            if box_type != b"ftyp":
                raise MediaError(f"stream starts with {_name(box_type)}, expected ftyp")
            self._ftyp = data
            return None
        spec = self._manifest_box
        if spec is not None and box_type == b"uuid" and _payload(data)[:16] == spec.uuid:
            if self._manifest is not None:
                raise MediaError(f"two {spec.name} boxes in one header")
            self._manifest = data
            return None
        if box_type == b"moov":
            if spec is not None and self._require_manifest and self._manifest is None:
                raise MediaError(f"moov arrived before the {spec.name} box (ftyp, manifest, moov)")
            moov = _payload(data)
            try:
                tracks = parse_moov(moov)
                defaults = parse_trex(moov)
                text = spec.decode(_payload(self._manifest)) if spec is not None and self._manifest else None
            except BoxError as exc:
                raise over_limit(BoxError(f"moov at offset {offset}: {exc}"), None, exc) from None
            self.header = Header(self._ftyp, self._manifest, data, tuple(tracks), text, defaults)
            return self.header
        if box_type in (b"free", b"skip") or box_type == b"uuid":
            # free/skip are padding; another uuid box here is one the format does not use (for
            # Smooth, the deprecated StreamManifestBox: ingest spec 3.2, SHOULD NOT be sent, and
            # silently ignored if it is).
            return None
        raise MediaError(f"{_name(box_type)} at offset {offset} inside the header (expected manifest or moov)")


def _payload(data: bytes) -> bytes:
    """A whole box's payload, after its 8- or 16-byte (64-bit size) header."""
    header = read_box_header(data, 0)
    assert header is not None  # only whole boxes get here
    return data[header[2] :]


def _name(box_type: bytes) -> str:
    """A box type for a message: as text if it is printable, else as Python writes the bytes (a
    type with a newline or other control byte must not break a one-line message or log line)."""
    text = box_type.decode("latin-1")
    return text if text.isprintable() else repr(box_type)
