"""AWS Signature Version 4, written here from AWS's documentation and nothing else ("Create a
canonical request", "Create a string to sign", "Calculate the signature", in the IAM user guide's
"Signature Version 4 signing process"), so that the tests check orchestrator.push.sigv4 (which
lets botocore sign) against an implementation that shares no code with it. It is itself checked
against AWS's published test-suite vectors (tests/push/test_sigv4.py), and serves as the verifier
of the loopback endpoints that every signed request of a test goes to (:class:`VerifyingEndpoint`).

Only what CMAF ingest requests need: header signing (no presigned query), any method, a path
without a query or with a simple one, non-S3 path rules (each segment URI-encoded as sent).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import trio

ALGORITHM = "AWS4-HMAC-SHA256"
UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")

# AWS's test-suite identity (the "aws-sig-v4-test-suite", as shipped with the AWS SDKs' tests).
SUITE_KEY = "AKIDEXAMPLE"
SUITE_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SUITE_DATE = "20150830T123600Z"


def uri_encode(text: str, *, keep_slash: bool) -> str:
    """Every byte of the UTF-8 text percent-encoded (upper-case hex) except the unreserved
    characters A-Z a-z 0-9 - _ . ~ (and '/' in a path)."""
    out = []
    for byte in text.encode("utf-8"):
        if byte in UNRESERVED or (keep_slash and byte == ord("/")):
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def canonical_uri(path: str) -> str:
    """The path normalised (RFC 3986 dot segments removed, empty segments dropped, as AWS
    services other than S3 do) and URI-encoded as it was sent: a path that arrived
    percent-encoded is encoded a second time (the docs' "encode twice")."""
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    text = "/" + "/".join(segments)
    if path.endswith("/") and segments:
        text += "/"
    return uri_encode(text, keep_slash=True)


def canonical_query(query: str) -> str:
    """Parameters sorted by encoded name, then value; each name and value URI-encoded."""
    pairs = []
    for part in query.split("&") if query else []:
        name, _, value = part.partition("=")
        pairs.append((uri_encode(name, keep_slash=False), uri_encode(value, keep_slash=False)))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def canonical_headers(headers: Sequence[tuple[str, str]], names: Sequence[str]) -> str:
    """``name:value\\n`` for each signed name, lower case and sorted; values trimmed, inner runs of
    spaces made one, repeated headers joined with commas."""
    lines = []
    for name in sorted(names):
        values = [" ".join(v.split()) for n, v in headers if n.lower() == name]
        lines.append(f"{name}:{','.join(values)}\n")
    return "".join(lines)


def canonical_request(method: str, path: str, query: str, headers: Sequence[tuple[str, str]],
                      signed: Sequence[str], payload_hash: str) -> str:  # fmt: skip
    return "\n".join([method, canonical_uri(path), canonical_query(query), canonical_headers(headers, signed),
                      ";".join(sorted(signed)), payload_hash])  # fmt: skip


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    return "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def signature(secret: str, date: str, region: str, service: str, to_sign: str) -> str:
    """The HMAC chain: date, region, service, "aws4_request", then the string to sign."""
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + secret).encode(), date), region), service), "aws4_request")
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def authorization(method: str, path: str, query: str, headers: Sequence[tuple[str, str]], signed: Sequence[str],
                  payload_hash: str, key: str, secret: str, region: str, service: str) -> str:  # fmt: skip
    """The Authorization header for a request whose headers include ``x-amz-date``."""
    amz_date = next(v for n, v in headers if n.lower() == "x-amz-date")
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    canonical = canonical_request(method, path, query, headers, signed, payload_hash)
    sig = signature(secret, amz_date[:8], region, service, string_to_sign(amz_date, scope, canonical))
    return f"{ALGORITHM} Credential={key}/{scope}, SignedHeaders={';'.join(sorted(signed))}, Signature={sig}"


# --- a verifier, as a receiving service would check ------------------------------------------


@dataclass
class Identity:
    secret: str
    token: str | None = None


@dataclass
class Verifier:
    """Checks a received request's signature for ``region`` / ``service`` with the secrets of
    ``identities`` (access key ID -> identity). :meth:`check` returns None or why it fails."""

    region: str
    service: str
    identities: Mapping[str, Identity]
    must_sign: tuple[str, ...] = ("host", "x-amz-date", "x-amz-content-sha256")

    def check(self, method: str, path: str, query: str, headers: Sequence[tuple[str, str]], body: bytes) -> str | None:
        lower = [(n.lower(), v) for n, v in headers]
        given = dict(lower)
        auth = given.get("authorization", "")
        if not auth.startswith(ALGORITHM + " "):
            return "no AWS4-HMAC-SHA256 Authorization header"
        fields = dict(part.strip().split("=", 1) for part in auth[len(ALGORITHM) + 1 :].split(","))
        key, date, region, service, terminator = fields["Credential"].split("/")
        signed = fields["SignedHeaders"].split(";")
        identity = self.identities.get(key)
        if identity is None:
            return f"unknown access key {key}"
        if (region, service, terminator) != (self.region, self.service, "aws4_request"):
            return f"wrong scope {region}/{service}/{terminator}"
        if date != given.get("x-amz-date", "")[:8]:
            return "the scope's date is not x-amz-date's"
        needed = list(self.must_sign) + (["x-amz-security-token"] if "x-amz-security-token" in given else [])
        if missing := [n for n in needed if n not in signed]:
            return f"not signed: {', '.join(missing)}"
        if identity.token is not None and given.get("x-amz-security-token") != identity.token:
            return "wrong or missing session token"
        if given.get("x-amz-content-sha256") != hashlib.sha256(body).hexdigest():
            return "x-amz-content-sha256 is not the SHA-256 of the body received"
        expected = authorization(method, path, query, lower, signed, given["x-amz-content-sha256"], key,
                                 identity.secret, self.region, self.service)  # fmt: skip
        if not hmac.compare_digest(expected, auth):
            return "signature mismatch"
        return None


@dataclass
class VerifyingEndpoint:
    """An ASGI app (serve it with orchestrator.ops.httpserve.serve_asgi: hypercorn, real sockets)
    that verifies every request it receives with ``verifier`` and answers 200 if it holds, else 403.
    ``requests``: (method, path, body length, None or the reason it failed)."""

    verifier: Verifier
    requests: list[tuple[str, str, int, str | None]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in scope["headers"]]
        path = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        path = path.split("?", 1)[0]
        reason = self.verifier.check(scope["method"], path, scope["query_string"].decode("latin-1"), headers, body)
        self.requests.append((scope["method"], path, len(body), reason))
        status = 200 if reason is None else 403
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        self.changed.set()
        self.changed = trio.Event()
