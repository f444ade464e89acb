"""Counting fragments in an HTTP/1.1 request stream, without I/O: the core of the counting sink.

Theory of operation
-------------------
:class:`RequestScanner` is fed the bytes a client sends on one connection and returns events,
h11-style: :class:`RequestStarted` (method, target, the headers a sink needs), then, for a body
sent with ``Transfer-Encoding: chunked`` or ``Content-Length``, one :class:`FragmentSeen` per
``moof`` + ``mdat`` pair in it, and :class:`RequestEnded` when the body is complete (after which
the next request on the connection may start). Nothing is archived or checked beyond what
counting needs: this is a benchmark sink, cheap on purpose; the real ingest server is
:mod:`orchestrator.ingest.server`.

The body is scanned as top-level ISO BMFF boxes (ISO/IEC 14496-12, 4.2: 32-bit size and type,
size 1 = 64-bit size follows). A ``moof`` is buffered (it is small) and its ``mfhd`` sequence
number (8.8.5) and first ``traf``'s ``tfdt`` base media decode time (8.8.12) read out; every other
box's payload (the ``mdat`` above all) is only counted past, never copied. A fragment is *seen*
when the last byte of the ``mdat`` after a ``moof`` arrives.

Errors (a malformed request line, chunk size or box) raise :class:`ScanError`; the shell drops
the connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from orchestrator.errors import ScanError

MAX_HEAD = 16 * 1024
MAX_MOOF = 1024 * 1024


@dataclass(frozen=True)
class RequestStarted:
    method: str
    target: str
    content_length: int | None  # None with chunked transfer encoding
    connection_close: bool
    encoder_group: str | None


@dataclass(frozen=True)
class FragmentSeen:
    sequence_number: int
    base_media_decode_time: int | None
    size: int  # moof + mdat bytes


@dataclass(frozen=True)
class RequestEnded:
    body_bytes: int


Event = RequestStarted | FragmentSeen | RequestEnded


class _BoxScanner:
    """Top-level boxes of a body, fed in pieces."""

    def __init__(self) -> None:
        self._head = bytearray()  # the box header being assembled
        self._remaining = 0  # payload bytes left of the current box
        self._type = b""
        self._size = 0
        self._moof: bytearray | None = None
        self._pending: tuple[int, int | None, int] | None = None  # the last moof's (seq, tfdt, size)

    def feed(self, data: memoryview, out: list[Event]) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._remaining == 0 and self._type == b"":
                need = 8 - len(self._head) if len(self._head) < 8 else 16 - len(self._head)
                take = min(need, n - i)
                self._head += data[i : i + take]
                i += take
                if not self._start_box():
                    continue
                if self._remaining == 0:
                    self._end_box(out)
                continue
            take = min(self._remaining, n - i)
            if self._moof is not None:
                self._moof += data[i : i + take]
            i += take
            self._remaining -= take
            if self._remaining == 0:
                self._end_box(out)

    def _start_box(self) -> bool:
        head = self._head
        if len(head) < 8:
            return False
        size, box_type = struct.unpack_from(">I4s", head)
        header = 8
        if size == 1:
            if len(head) < 16:
                return False
            (size,) = struct.unpack_from(">Q", head, 8)
            header = 16
        if size < header:
            raise ScanError(f"box {box_type!r} of size {size} (0 = to the end of the body is not supported)")
        self._type, self._size, self._remaining = box_type, size, size - header
        self._head = bytearray()
        if box_type == b"moof":
            if size > MAX_MOOF:
                raise ScanError(f"moof of {size} bytes")
            self._moof = bytearray()
        return True

    def _end_box(self, out: list[Event]) -> None:
        if self._type == b"moof" and self._moof is not None:
            self._pending = (*_read_moof(bytes(self._moof)), self._size)
            self._moof = None
        elif self._type == b"mdat" and self._pending is not None:
            sequence, tfdt, moof_size = self._pending
            out.append(FragmentSeen(sequence, tfdt, moof_size + self._size))
            self._pending = None
        self._type = b""

    @property
    def at_box_boundary(self) -> bool:
        return self._type == b"" and not self._head


def _children(payload: bytes, offset: int = 0) -> list[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of the boxes in ``payload[offset:]``."""
    boxes, i = [], offset
    while i + 8 <= len(payload):
        size, box_type = struct.unpack_from(">I4s", payload, i)
        if size < 8 or i + size > len(payload):
            raise ScanError(f"box {box_type!r} of size {size} overruns its parent")
        boxes.append((box_type, i + 8, i + size))
        i += size
    return boxes


def _read_moof(moof: bytes) -> tuple[int, int | None]:
    sequence, tfdt = None, None
    for box_type, start, end in _children(moof):
        if box_type == b"mfhd" and end - start >= 8:
            (sequence,) = struct.unpack_from(">I", moof, start + 4)  # after version + flags
        elif box_type == b"traf" and tfdt is None:
            for child, c_start, c_end in _children(moof[:end], start):
                if child == b"tfdt" and c_end - c_start >= 8:
                    version = moof[c_start]
                    fmt = ">Q" if version == 1 else ">I"
                    (tfdt,) = struct.unpack_from(fmt, moof, c_start + 4)
    if sequence is None:
        raise ScanError("moof without mfhd")
    return sequence, tfdt


class RequestScanner:
    """One connection's requests, bytes in, events out. See the module docstring."""

    def __init__(self) -> None:
        self._buffer = bytearray()  # unparsed head or chunk-size line bytes
        self._state = "head"  # head | length | chunk_size | chunk_data | chunk_crlf | trailer
        self._left = 0  # bytes left of a Content-Length body or of the current chunk
        self._body_bytes = 0
        self._boxes = _BoxScanner()

    def feed(self, data: bytes | memoryview) -> list[Event]:
        out: list[Event] = []
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n:
            state = self._state
            if state in ("length", "chunk_data"):
                take = min(self._left, n - i)
                self._body(view[i : i + take], out)
                i += take
                self._left -= take
                if self._left == 0:
                    if state == "length":
                        self._end(out)
                    else:
                        self._state = "chunk_crlf"
                continue
            # line-oriented states: collect up to the next line end
            if state == "head":
                self._buffer += view[i:n]
                i = n
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_HEAD:
                        raise ScanError("request head too long")
                    break
                head, rest = bytes(self._buffer[:end]), bytes(self._buffer[end + 4 :])
                self._buffer = bytearray()
                self._start(head, out)
                if rest:  # the rest of what was fed: scan it now
                    out.extend(self.feed(rest))
                return out
            newline = bytes(view[i : min(n, i + 64)]).find(b"\n")
            if newline < 0:
                self._buffer += view[i:n]
                if len(self._buffer) > 64:
                    raise ScanError("chunk size line too long")
                break
            self._buffer += view[i : i + newline + 1]
            i += newline + 1
            line = bytes(self._buffer).rstrip(b"\r\n")
            self._buffer = bytearray()
            self._line(line, out)
        return out

    def _line(self, line: bytes, out: list[Event]) -> None:
        if self._state == "chunk_crlf":
            if line:
                raise ScanError("chunk not followed by CRLF")
            self._state = "chunk_size"
        elif self._state == "chunk_size":
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                raise ScanError(f"bad chunk size line {line[:20]!r}") from None
            if size == 0:
                self._state = "trailer"
            else:
                self._state, self._left = "chunk_data", size
        elif self._state == "trailer" and not line:
            self._end(out)

    def _start(self, head: bytes, out: list[Event]) -> None:
        lines = head.split(b"\r\n")
        try:
            method, target, _version = lines[0].decode("latin-1").split(" ")
        except ValueError:
            raise ScanError(f"bad request line {lines[0][:60]!r}") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = None if chunked else int(headers.get("content-length", "0") or 0)
        close = headers.get("connection", "").lower() == "close"
        out.append(RequestStarted(method, target, length, close, headers.get("x-encoder-group")))
        self._body_bytes = 0
        self._boxes = _BoxScanner()
        if chunked:
            self._state = "chunk_size"
        elif length:
            self._state, self._left = "length", length
        else:
            self._end(out)

    def _body(self, data: memoryview, out: list[Event]) -> None:
        self._body_bytes += len(data)
        self._boxes.feed(data, out)

    def _end(self, out: list[Event]) -> None:
        out.append(RequestEnded(self._body_bytes))
        self._state = "head"
