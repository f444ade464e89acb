"""The independent readers' kit itself (tests/parsekit.py): the tap hands back each request a
server received, whole, over keep-alive and chunked bodies; a request cut short is not one."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from parsekit import Request, Tap, read_requests


class _Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_the_tap_records_each_request_a_server_received() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tap = Tap(("127.0.0.1", server.server_address[1]))
    try:
        with httpx.Client() as client:  # one connection, two requests
            for n, body in enumerate((b"\x00" * 100_000, b"abc")):
                response = client.post(f"http://127.0.0.1:{tap.port}/live/{n}.m4s", content=body,
                                       headers={"X-Encoder-Group": "primary"})  # fmt: skip
                assert response.status_code == 200
    finally:
        tap.close()
        server.shutdown()
        server.server_close()
    requests = tap.requests()
    assert [(r.method, r.target, r.body, r.headers["x-encoder-group"]) for r in requests] == [
        ("POST", "/live/0.m4s", b"\x00" * 100_000, "primary"), ("POST", "/live/1.m4s", b"abc", "primary")]  # fmt: skip
    assert len(tap.sent) == 1


def test_chunked_bodies_are_joined_and_a_request_cut_short_is_dropped() -> None:
    data = (b"PUT /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n1\r\nf\r\n0\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nab")  # fmt: skip
    assert list(read_requests(data)) == [Request("PUT", "/a", {"host": "x", "transfer-encoding": "chunked"}, b"def")]
    closing = b"POST /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1\r\n\r\ng"
    assert [r.body for r in read_requests(closing + closing)] == [b"g"]  # nothing after Connection: close
