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
``MAX_HEADER_BOX_SIZE``, and that limit is checked as soon as the box's size field arrives.
:attr:`StreamReader.reserved` says how many bytes the reader holds or is about to hold (the
declared size of the box it is receiving), for a caller that keeps a memory budget.

Every offset in an error message counts from the start of the stream.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator.errors import BoxError, MediaError
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
        self._pending_moof: tuple[bytes, int] | None = None

    @property
    def bytes_received(self) -> int:
        return self._consumed + len(self._buffer)

    @property
    def reserved(self) -> int:
        """Bytes held, or about to be held: at least the declared size of the box being received."""
        pending = len(self._pending_moof[0]) if self._pending_moof else 0
        header = read_box_header(self._buffer, 0, self._consumed)
        return pending + max(len(self._buffer), header[1] if header else 0)

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole event."""
        pending = len(self._pending_moof[0]) if self._pending_moof else 0
        return len(self._buffer) + pending

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

    def _take_box(self) -> tuple[bytes, bytes, int] | None:
        header = read_box_header(self._buffer, 0, self._consumed)
        if header is None:
            return None
        box_type, size, _ = header
        if self.header is None and size > MAX_HEADER_BOX_SIZE:
            raise BoxError(f"{_name(box_type)} at offset {self._consumed} declares {size} bytes, over the limit of "
                           f"{MAX_HEADER_BOX_SIZE} for a box of the header")  # fmt: skip
        if len(self._buffer) < size:
            return None
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        offset = self._consumed
        self._consumed += size
        return box_type, data, offset

    def _handle(self, box_type: bytes, data: bytes, offset: int) -> Event | None:
        if self.header is None:
            return self._handle_header_box(box_type, data, offset)
        if self._pending_moof is not None:
            moof, moof_offset = self._pending_moof
            self._pending_moof = None
            if box_type != b"mdat":
                raise MediaError(f"moof at offset {moof_offset} is followed by {_name(box_type)}, not mdat")
            try:
                parsed = parse_fragment(moof + data, moof_offset, self.header.defaults)
            except BoxError as exc:
                raise BoxError(f"fragment at offset {moof_offset}: {exc}") from None
            return Fragment(parsed, moof_offset)
        if box_type == b"moof":
            self._pending_moof = (data, offset)
            return None
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
                raise BoxError(f"moov at offset {offset}: {exc}") from None
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
    return box_type.decode("latin-1")
