"""The counting sink's scanner: exact events for exact bytes, however the bytes are split."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.profile import load_profile
from orchestrator.testing.bodyscan import FragmentSeen, RequestEnded, RequestScanner, RequestStarted, ScanError

DEMO = Path(__file__).resolve().parents[2] / "profiles" / "demo.toml"
K = 14_080_000


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


@pytest.fixture(scope="module")
def stream():
    profile = load_profile(DEMO)
    source = SyntheticStream(profile, profile.streams[0])
    fragments = [source.fragment(k)[0] for k in range(K, K + 3)]
    return source.header.data, fragments


def requests(header, fragments) -> bytes:
    probe = (b"POST /live/demo.isml/Streams(video) HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
             b"Connection: close\r\n\r\n")  # fmt: skip
    post = (b"POST /live/demo.isml/Streams(video) HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"X-Encoder-Group: backup\r\n\r\n" + chunked(header, *(f.data for f in fragments)))  # fmt: skip
    return probe + post


def expected(header, fragments):
    target = "/live/demo.isml/Streams(video)"
    return [
        RequestStarted("POST", target, 0, True, None),
        RequestEnded(0),
        RequestStarted("POST", target, None, False, "backup"),
        *(FragmentSeen(f.index, f.start, len(f.data)) for f in fragments),
        RequestEnded(len(header) + sum(len(f.data) for f in fragments)),
    ]


@pytest.mark.parametrize("piece", [1, 7, 100, 4096, 1 << 30])
def test_events_whatever_the_split(stream, piece):
    header, fragments = stream
    data = requests(header, fragments)
    scanner = RequestScanner()
    events = []
    for i in range(0, len(data), piece):
        events.extend(scanner.feed(data[i : i + piece]))
    assert events == expected(header, fragments)


def test_content_length_body_is_scanned_too(stream):
    header, fragments = stream
    body = header + fragments[0].data
    data = b"POST /x HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    assert RequestScanner().feed(data) == [
        RequestStarted("POST", "/x", len(body), False, None),
        FragmentSeen(K, fragments[0].start, len(fragments[0].data)),
        RequestEnded(len(body)),
    ]


@pytest.mark.parametrize("bad", [
    b"NONSENSE\r\n\r\n",
    b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n\x00\x00\x00\x04moof\r\n",
])  # fmt: skip
def test_malformed_input_is_an_error(bad):
    with pytest.raises(ScanError):
        RequestScanner().feed(bad)
