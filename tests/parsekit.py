"""Independent readers of what we send: mp4box.js over our MP4 bytes, and a tap that records the
HTTP requests a real server received.

* :func:`mp4box` runs ``tools/mp4box/boxtree.mjs`` (mp4box.js, GPAC's ISO BMFF parser in
  JavaScript, pinned by ``tools/mp4box/package-lock.json``) over some MP4 byte strings in one
  ``node`` process and returns, per input, the box tree mp4box.js read (:class:`Box`), the tracks
  it found and the samples it extracted (a track file: header then segments). The script exits
  non-zero when mp4box.js reports a parse error or warning, or when the boxes do not cover the
  input exactly: :func:`mp4box` then fails the test with its message. ``needs_mp4box`` skips a
  test where node or the npm package is missing (a failure under ``CI=true``, tests/ci_skips.py).
* :func:`pymp4_boxes` and :func:`pymp4_find`: the same bytes read by pymp4 (Python, construct).
* :class:`Tap`: a TCP relay on loopback that records every byte a client sent through it, and
  :meth:`Tap.requests` reads them back as HTTP/1.1 requests with h11 (keep-alive and chunked
  bodies included): the bodies exactly as the server behind it received them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "mp4box"
SCRIPT = TOOL / "boxtree.mjs"
INSTALL = "npm ci --prefix tools/mp4box (Node.js 20 and npm: apt-get install nodejs npm)"
NEEDS = f"needs mp4box.js: {INSTALL}"


def mp4box_available() -> bool:
    return shutil.which("node") is not None and (TOOL / "node_modules" / "mp4box" / "package.json").is_file()


needs_mp4box = pytest.mark.skipif(not mp4box_available(), reason=NEEDS)


@dataclass(frozen=True)
class Box:
    """One box as mp4box.js read it: its type, size, the fields it parsed, its child boxes (a
    sample description's entries included)."""

    type: str
    size: int
    fields: dict[str, Any]
    boxes: tuple[Box, ...] = ()

    @classmethod
    def of(cls, node: dict[str, Any]) -> Box:
        children = tuple(cls.of(child) for child in node.get("boxes", ()))
        fields = {k: v for k, v in node.items() if k not in ("type", "size", "boxes")}
        return cls(node["type"], node["size"], fields, children)

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    @property
    def types(self) -> list[str]:
        return [box.type for box in self.boxes]

    def all(self, box_type: str) -> list[Box]:
        """Every descendant of type ``box_type``, depth first."""
        found = []
        for box in self.boxes:
            if box.type == box_type:
                found.append(box)
            found.extend(box.all(box_type))
        return found

    def one(self, box_type: str) -> Box:
        """The one descendant of type ``box_type`` (fails the test if there are none or several)."""
        found = self.all(box_type)
        assert len(found) == 1, f"mp4box.js found {len(found)} {box_type} in {self.type}, not 1"
        return found[0]


@dataclass(frozen=True)
class Parsed:
    """One input as mp4box.js read it."""

    size: int
    boxes: tuple[Box, ...]
    tracks: list[dict[str, Any]]
    samples: dict[int, list[dict[str, Any]]]  # track ID -> samples (a track file only)

    @property
    def types(self) -> list[str]:
        return [box.type for box in self.boxes]


def mp4box(*inputs: bytes) -> list[Parsed]:
    """Each of ``inputs`` read by mp4box.js (see the module docstring), in one node process."""
    with tempfile.TemporaryDirectory(prefix="mp4box-") as directory:
        paths = []
        for n, data in enumerate(inputs):
            path = Path(directory) / f"{n}.mp4"
            path.write_bytes(data)
            paths.append(str(path))
        result = subprocess.run(["node", str(SCRIPT), *paths], capture_output=True, text=True, timeout=120,
                                check=False)  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"mp4box.js refused our bytes (exit {result.returncode}): {result.stderr.strip()}")
    files = json.loads(result.stdout)["files"]
    return [Parsed(f["size"], tuple(Box.of(b) for b in f["boxes"]), f["tracks"],
                   {int(k): v for k, v in f["samples"].items()}) for f in files]  # fmt: skip


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def as_double(value: int) -> int:
    """``value`` as mp4box.js holds a 64-bit field: rounded to the nearest double (exact below 2^53)."""
    return int(float(value))


def pymp4_boxes(data: bytes) -> list[Any]:
    """Every top-level box of ``data`` as pymp4 reads it (raising if it cannot)."""
    from pymp4.parser import Box as Pymp4Box  # a test dependency; imported where used

    stream = io.BytesIO(data)
    out = []
    while stream.tell() < len(data):
        out.append(Pymp4Box.parse_stream(stream))
    return out


def pymp4_find(box: Any, box_type: bytes) -> Any:
    """The first descendant of ``box`` (a pymp4 box) of type ``box_type``, depth first, or None."""
    for child in getattr(box, "children", None) or []:
        if child.type == box_type:
            return child
        found = pymp4_find(child, box_type)
        if found is not None:
            return found
    return None


# --- the tap ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Tap:
    """A loopback TCP relay to ``upstream`` that records what each client connection sent."""

    upstream: tuple[str, int]
    sent: list[bytearray] = field(default_factory=list)
    _listener: socket.socket = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sockets: list[socket.socket] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            record = bytearray()
            with self._lock:
                self.sent.append(record)
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, record), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bytearray | None) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if record is not None:
                    with self._lock:
                        record += data
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def requests(self) -> list[Request]:
        """Every complete request the clients sent, connection by connection, read by h11."""
        with self._lock:
            streams = [bytes(record) for record in self.sent]
        return [request for data in streams for request in read_requests(data)]


def read_requests(data: bytes) -> Iterator[Request]:
    """The complete HTTP/1.1 requests in ``data``, what a client sent on one connection."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(data)
    connection.receive_data(b"")  # the end of what was sent: an unfinished request is dropped
    head: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError:  # the client's connection ended inside a request
            return
        if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return
        if isinstance(event, h11.Request):
            head, body = event, bytearray()
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
            yield Request(head.method.decode(), head.target.decode(), headers, bytes(body))
            connection.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            connection.send(h11.EndOfMessage())
            if connection.our_state is h11.MUST_CLOSE:  # the request said Connection: close
                return
            connection.start_next_cycle()
