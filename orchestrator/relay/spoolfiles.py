"""The relay's durable spool on disk: the thin file shell around :mod:`orchestrator.relay.spool`.

Layout: ``<spool>/<stream id>/<number, 12 digits>.seg``, append-only segment files (the stream
id is a profile stream id, a safe file name). Each record is one ``os.write`` to a file opened
``O_APPEND``, before the fragment goes to any outbox.

**fsync policy** (the relay group's ``fsync`` key):

* ``"fragment"`` (the default): ``fsync`` after every record, and of the stream's directory
  after a segment is created or deleted, before the fragment is forwarded. A fragment the relay
  forwarded is on stable storage: it survives a killed process and a crashed host. It costs one
  fsync per fragment and track (500 a second for 1,000 two-track streams of 2 s fragments).
* ``"none"``: no fsync. A write is in the kernel's page cache when it returns, which a killed
  process (SIGKILL, the OOM killer) does not lose; a crashed host or a power cut may.

Writes are synchronous, from the relay's one thread: small, in order, and never interrupted by
cancellation (the same choice as the ingest archive). A write that fails (a full disk) raises
OSError; the caller logs and counts it and still forwards the fragment (held in memory only).

Recovery reads every segment of every stream, cuts a torn tail off the newest segment of a
stream, and deletes nothing until the endpoints' outboxes say they have the fragments.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.fmp4.stream import EncodedFragment
from orchestrator.relay.spool import (
    DEFAULT_SEGMENT_BYTES,
    Key,
    Record,
    StreamSpool,
    encode_fragment,
    encode_header,
    recover,
)

log = logging.getLogger(__name__)

SUFFIX = ".seg"


@dataclass
class _Open:
    number: int
    fd: int


class SpoolFiles:
    """The spool of every stream of one relay, under ``root``."""

    def __init__(self, root: Path, *, fsync: bool = True, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        self.root = root
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.streams: dict[str, StreamSpool] = {}
        self._open: dict[str, _Open] = {}
        root.mkdir(parents=True, exist_ok=True)

    def _dir(self, stream_id: str) -> Path:
        return self.root / stream_id

    def _path(self, stream_id: str, number: int) -> Path:
        return self._dir(stream_id) / f"{number:012d}{SUFFIX}"

    def spool(self, stream_id: str) -> StreamSpool:
        spool = self.streams.get(stream_id)
        if spool is None:
            spool = self.streams[stream_id] = StreamSpool(self.segment_bytes)
        return spool

    # --- recovery --------------------------------------------------------------------------

    def recover(self, stream_id: str) -> list[Record]:
        """Everything spooled for ``stream_id`` by an earlier run, in recovery order. A torn
        record at the end of a segment is cut off (logged); the stream's spool is rebuilt."""
        directory = self._dir(stream_id)
        if not directory.is_dir():
            return []
        files = sorted(p for p in directory.iterdir() if p.suffix == SUFFIX and p.stem.isdigit())
        segments = [(int(p.stem), p.read_bytes()) for p in files]
        records, decoded = recover(segments, stream_id)
        spool = self.spool(stream_id)
        for number, result in decoded:
            spool.recovered(number, result.good_length, result.records)
            if result.problem is not None:
                log.warning("relay.spool.cut stream=%s segment=%d problem=%r kept_bytes=%d", stream_id, number,
                            result.problem, result.good_length)  # fmt: skip
                os.truncate(self._path(stream_id, number), result.good_length)
        if records:
            log.info("relay.spool.recovered stream=%s segments=%d fragments=%d bytes=%d", stream_id, len(decoded),
                     spool.fragments, spool.bytes)  # fmt: skip
        return records

    # --- writing ---------------------------------------------------------------------------

    def append_header(self, stream_id: str, data: bytes) -> None:
        spool = self.spool(stream_id)
        if spool.header == data:
            return
        record = encode_header(data)
        self._write(stream_id, spool, record)
        spool.wrote_header(len(record), data)
        self._sync(stream_id)

    def append_fragment(self, stream_id: str, fragment: EncodedFragment) -> int:
        """Spool ``fragment`` (on disk, per the fsync policy, when this returns); its sequence number."""
        spool = self.spool(stream_id)
        record = encode_fragment(fragment)
        self._write(stream_id, spool, record)
        seq = spool.wrote_fragment(len(record), fragment)
        self._sync(stream_id)
        return seq

    def _write(self, stream_id: str, spool: StreamSpool, record: bytes) -> None:
        placement = spool.place(len(record))
        current = self._open.get(stream_id)
        if placement.new or current is None or current.number != placement.number:
            if current is not None:
                os.close(current.fd)
                del self._open[stream_id]
            self._dir(stream_id).mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(self._path(stream_id, placement.number), flags, 0o600)
            self._open[stream_id] = current = _Open(placement.number, fd)
            if placement.new:
                spool.opened(placement.number)
                if placement.header_first and spool.header is not None:
                    header = encode_header(spool.header)
                    _write_all(fd, header)
                    spool.wrote_header(len(header), spool.header)
                self._sync_dir(stream_id)
        _write_all(current.fd, record)

    def _sync(self, stream_id: str) -> None:
        if self.fsync:
            os.fsync(self._open[stream_id].fd)

    def _sync_dir(self, stream_id: str) -> None:
        if not self.fsync:
            return
        fd = os.open(self._dir(stream_id), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- releasing -------------------------------------------------------------------------

    def release(self, stream_id: str, oldest_held: list[Key | None]) -> int:
        """Delete the segments no endpoint needs any more; returns how many were deleted."""
        spool = self.streams.get(stream_id)
        if spool is None:
            return 0
        gone = spool.release(spool.low_water(oldest_held))
        for number in gone:
            with contextlib.suppress(FileNotFoundError):
                self._path(stream_id, number).unlink()
        if gone:
            self._sync_dir(stream_id)
        return len(gone)

    def close(self) -> None:
        for current in self._open.values():
            os.close(current.fd)
        self._open.clear()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
