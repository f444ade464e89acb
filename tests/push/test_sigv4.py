"""AWS SigV4 on CMAF ingest requests (orchestrator.push.sigv4): the headers botocore computes for
us are checked against an implementation written in the test kit from AWS's documentation
(tests/sigv4kit.py), itself checked against AWS's published test-suite vectors; the credentials'
sources and their rotation; and a publisher pushing CMAF over real loopback sockets to an
endpoint that verifies the signature of every request it receives."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
from pathlib import Path

import httpx
import pytest
import sigv4kit
import trio
from publisherkit import LIMITS, K
from sigv4kit import SUITE_DATE, SUITE_KEY, SUITE_SECRET, Identity, Verifier, VerifyingEndpoint

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.ops.httpserve import serve_asgi
from orchestrator.ops.metrics import Metrics
from orchestrator.profile import Endpoint, SigV4, load_profile
from orchestrator.push.cmafroute import Reboxer, add_cmaf_publishers
from orchestrator.push.fanout import FanOut
from orchestrator.push.handoff import EndpointOutbox, HeaderBoard
from orchestrator.push.lifecycle import PublisherSettings
from orchestrator.push.publisher import Publisher
from orchestrator.push.reconnect import RetryPolicy
from orchestrator.push.sigv4 import (
    AwsCredentials,
    CredentialError,
    CredentialSource,
    RequestSigner,
    Scope,
    from_environment,
    read_file,
    signed_headers,
)

DEMO = Path(__file__).resolve().parents[2] / "profiles" / "demo.toml"
NOW_NS = 1_800_000_000 * 10**9
SETTINGS = PublisherSettings(connect_timeout=2.0, send_timeout=3.0, response_timeout=3.0, idle_timeout=6.0,
                             retry=RetryPolicy(base=0.2, cap=1.0, slow=2.0, jitter=0.0))  # fmt: skip

SUITE_AT = dt.datetime(2015, 8, 30, 12, 36, tzinfo=dt.UTC)
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
# Values that must never be seen outside a request: found in a log or /status, they fail a test.
SECRET = "tEsTsEcReT/kEy+0123456789abcdefghijklmnopq"
TOKEN = "tEsTsEsSiOnToKeN//1234567890+abcdefghijklmnopqrstuvwxyz=="
KEY_ID = "AKIATESTKEYID0000001"
MP_URL = "https://abcd-1.ingest.efgh.mediapackagev2.eu-west-1.amazonaws.com/in/v1/live-group/1/event-1"


# --- the test kit's implementation, against AWS's published vectors ---------------------------


SUITE = [
    # (vector, method, signed header names, extra headers, payload hash, signature) from the
    # "aws-sig-v4-test-suite" (awslabs/aws-c-auth tests/aws-signing-test-suite/v4/<vector>/).
    ("get-vanilla", "GET", ["host", "x-amz-date"], [], EMPTY_SHA256,
     "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
    ("post-sts-header-after (post-vanilla's signature)", "POST", ["host", "x-amz-date"], [], EMPTY_SHA256,
     "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
    ("get-vanilla-with-session-token", "GET", ["host", "x-amz-date", "x-amz-security-token"],
     [("X-Amz-Security-Token", "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267")], EMPTY_SHA256,
     "07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8"),
]  # fmt: skip


@pytest.mark.parametrize(("vector", "method", "signed", "extra", "payload", "expected"), SUITE,
                         ids=[v[0].split()[0] for v in SUITE])  # fmt: skip
def test_the_kits_signer_gives_aws_published_signatures(vector, method, signed, extra, payload, expected) -> None:
    headers = [("Host", "example.amazonaws.com"), ("X-Amz-Date", SUITE_DATE), *extra]
    auth = sigv4kit.authorization(method, "/", "", headers, signed, payload, SUITE_KEY, SUITE_SECRET, "us-east-1",
                                  "service")  # fmt: skip
    assert auth == (f"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
                    f"SignedHeaders={';'.join(signed)}, Signature={expected}")  # fmt: skip


def test_the_kits_canonical_request_is_the_documented_one() -> None:
    # get-vanilla's canonical request, as AWS publishes it (header-canonical-request.txt).
    headers = [("Host", "example.amazonaws.com"), ("X-Amz-Date", SUITE_DATE)]
    canonical = sigv4kit.canonical_request("GET", "/", "", headers, ["host", "x-amz-date"], EMPTY_SHA256)
    assert canonical == ("GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n"
                         + EMPTY_SHA256)  # fmt: skip
    # Our paths: the Streams() keyword's parentheses are reserved characters, encoded once.
    streams = sigv4kit.canonical_uri("/in/v1/g/1/c/Streams(video-video_360p)")
    assert streams == "/in/v1/g/1/c/Streams%28video-video_360p%29"
    assert sigv4kit.canonical_uri("/example space/") == "/example%20space/"  # get-space
    assert sigv4kit.canonical_uri("/%41") == "/%2541"  # sent encoded: encoded again


# --- ours (botocore underneath) against the kit --------------------------------------------------


def kit_authorization(method: str, url: str, headers: list[tuple[str, str]], body: bytes, credentials: AwsCredentials,
                      scope: Scope) -> str:  # fmt: skip
    """The Authorization the kit computes for a request as our connection sends it: Host from
    the URL (port included unless the default), the path as sent."""
    parts = httpx.URL(url)
    host = parts.netloc.decode()
    names = ["host", "x-amz-content-sha256", "x-amz-date"] + (["x-amz-security-token"] if credentials.session_token
                                                               else [])  # fmt: skip
    return sigv4kit.authorization(method, parts.raw_path.decode(), "", [("Host", host), *headers], names,
                                  hashlib.sha256(body).hexdigest(), credentials.access_key_id,
                                  credentials.secret_access_key, scope.region, scope.service)  # fmt: skip


@pytest.mark.parametrize("url", [
    f"{MP_URL}/Streams(video-video_360p)",  # the Streams() scheme, on MediaPackage v2's URL shape
    f"{MP_URL}/video/video_360p/{K}.m4s",  # the template scheme
    "http://127.0.0.1:18081/in/v1/g/1/c/video/video_360p/init.m4s",  # a port: part of the signed Host
])  # fmt: skip
@pytest.mark.parametrize("token", [None, TOKEN])
def test_our_headers_are_exactly_the_documented_algorithms(url, token) -> None:
    credentials = AwsCredentials(KEY_ID, SECRET, token)
    scope = Scope("eu-west-1", "mediapackagev2")
    body = b"\x00\x00\x00\x18stypcmfs" + bytes(range(256)) * 40
    at = dt.datetime(2026, 12, 5, 11, 30, 7, 999_999, tzinfo=dt.UTC)
    headers = signed_headers("POST", url, body, credentials, scope, at)
    names = [name for name, _ in headers]
    assert names == ["X-Amz-Date", "X-Amz-Content-SHA256", *(["X-Amz-Security-Token"] if token else []),
                     "Authorization"]  # fmt: skip
    values = dict(headers)
    assert values["X-Amz-Date"] == "20261205T113007Z"
    assert values["X-Amz-Content-SHA256"] == hashlib.sha256(body).hexdigest()  # the payload is signed, not UNSIGNED
    assert values.get("X-Amz-Security-Token") == token
    kit = kit_authorization("POST", url, headers[:-1], body, credentials, scope)
    assert values["Authorization"] == kit
    assert values["Authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={KEY_ID}/20261205/eu-west-1/mediapackagev2/aws4_request, SignedHeaders=host;"
        f"x-amz-content-sha256;x-amz-date{';x-amz-security-token' if token else ''}, Signature="
    )


def test_our_headers_for_aws_suite_identity_match_the_kit_at_the_suite_time() -> None:
    credentials = AwsCredentials(SUITE_KEY, SUITE_SECRET)
    scope = Scope("us-east-1", "service")
    headers = signed_headers("POST", "https://example.amazonaws.com/", b"", credentials, scope, SUITE_AT)
    assert headers[:2] == [("X-Amz-Date", SUITE_DATE), ("X-Amz-Content-SHA256", EMPTY_SHA256)]
    # post-vanilla with x-amz-content-sha256 also signed: the kit, from the docs, says which signature.
    assert headers[2][1] == kit_authorization("POST", "https://example.amazonaws.com/", headers[:2], b"", credentials,
                                              scope)  # fmt: skip


def test_the_verifier_refuses_a_changed_body_path_secret_or_token() -> None:
    credentials = AwsCredentials(KEY_ID, SECRET, TOKEN)
    url = f"{MP_URL}/video/video_360p/{K}.m4s"
    body = b"segment bytes"
    headers = signed_headers("POST", url, body, credentials, Scope("eu-west-1", "mediapackagev2"),
                             dt.datetime.now(dt.UTC))  # fmt: skip
    sent = [("Host", httpx.URL(url).netloc.decode()), ("Transfer-Encoding", "chunked"), *headers]
    path = httpx.URL(url).raw_path.decode()
    verifier = Verifier("eu-west-1", "mediapackagev2", {KEY_ID: Identity(SECRET, TOKEN)})
    assert verifier.check("POST", path, "", sent, body) is None
    changed = "x-amz-content-sha256 is not the SHA-256 of the body received"
    assert verifier.check("POST", path, "", sent, b"segment bytez") == changed
    forged = [(n, hashlib.sha256(b"other").hexdigest() if n == "X-Amz-Content-SHA256" else v) for n, v in sent]
    assert verifier.check("POST", path, "", forged, b"other") == "signature mismatch"
    assert verifier.check("POST", path.replace(f"{K}", f"{K + 1}"), "", sent, body) == "signature mismatch"
    assert verifier.check("PUT", path, "", sent, body) == "signature mismatch"
    other = Verifier("eu-west-1", "mediapackagev2", {KEY_ID: Identity(SECRET + "x", TOKEN)})
    assert other.check("POST", path, "", sent, body) == "signature mismatch"
    wrong_token = Verifier("eu-west-1", "mediapackagev2", {KEY_ID: Identity(SECRET, "another")})
    assert wrong_token.check("POST", path, "", sent, body) == "wrong or missing session token"
    assert Verifier("us-east-1", "mediapackagev2", {KEY_ID: Identity(SECRET)}).check(
        "POST", path, "", sent, body) == "wrong scope eu-west-1/mediapackagev2/aws4_request"  # fmt: skip


# --- where the keys come from ---------------------------------------------------------------------


def test_keys_from_the_standard_environment_variables_or_behind_a_prefix() -> None:
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "MP_AWS_ACCESS_KEY_ID": "AKIAPREFIXED",
           "MP_AWS_SECRET_ACCESS_KEY": "s2", "MP_AWS_SESSION_TOKEN": TOKEN}  # fmt: skip
    assert from_environment("", env) == AwsCredentials(KEY_ID, SECRET, None)
    assert from_environment("MP_", env) == AwsCredentials("AKIAPREFIXED", "s2", TOKEN)
    with pytest.raises(CredentialError) as caught:
        from_environment("NOPE_", env)
    assert str(caught.value) == ("environment variables NOPE_AWS_ACCESS_KEY_ID and NOPE_AWS_SECRET_ACCESS_KEY are "
                                 "not set or empty")  # fmt: skip
    with pytest.raises(CredentialError, match=r"^environment variable AWS_SECRET_ACCESS_KEY is not set or empty$"):
        from_environment("", {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": ""})


def credentials_file(path: Path, key: str = KEY_ID, secret: str = SECRET, token: str | None = TOKEN,
                     profile: str = "ingest") -> Path:  # fmt: skip
    lines = ["[default]", "aws_access_key_id = AKIAOTHER", "aws_secret_access_key = other", "",
             f"[{profile}]", f"aws_access_key_id = {key}", f"aws_secret_access_key = {secret}"]  # fmt: skip
    if token:
        lines.append(f"aws_session_token = {token}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_keys_from_a_profile_of_a_shared_credentials_file(tmp_path) -> None:
    path = credentials_file(tmp_path / "credentials")
    assert read_file(path, "ingest") == AwsCredentials(KEY_ID, SECRET, TOKEN)
    assert read_file(path, "default") == AwsCredentials("AKIAOTHER", "other", None)
    assert repr(read_file(path, "ingest")) == f"AwsCredentials(access_key_id='{KEY_ID}')"  # no secret in a repr


@pytest.mark.parametrize(("text", "expected"), [
    (None, "cannot read credentials file {path}: No such file or directory"),
    ("[default]\naws_access_key_id = A\naws_secret_access_key = s\n",
     "credentials file {path} has no profile [ingest] (profiles: [default])"),
    ("[ingest]\naws_access_key_id = A\n",
     "credentials file {path}, profile [ingest]: aws_secret_access_key is missing or empty"),
    ("[ingest]\n", "credentials file {path}, profile [ingest]: aws_access_key_id and aws_secret_access_key are "
                   "missing or empty"),
    (f"aws_secret_access_key = {SECRET}\n",
     "credentials file {path} is not in the AWS credentials (INI) format at line 1: MissingSectionHeaderError"),
    (f"[ingest]\naws_access_key_id = A\n{SECRET}\n",
     "credentials file {path} is not in the AWS credentials (INI) format at line 3: ParsingError"),
])  # fmt: skip
def test_a_credentials_file_that_cannot_serve_names_file_profile_key_and_never_a_value(tmp_path, text, expected):
    path = tmp_path / "credentials"
    if text is not None:
        path.write_text(text)
    with pytest.raises(CredentialError) as caught:
        read_file(path, "ingest")
    assert str(caught.value) == expected.format(path=path)
    assert SECRET not in str(caught.value)


def test_a_rotated_credentials_file_is_used_from_the_next_request_and_a_broken_one_is_not(tmp_path, caplog):
    path = credentials_file(tmp_path / "credentials")
    source = CredentialSource(SigV4(region="eu-west-1", credentials_file=path, profile="ingest"))
    assert source.current().access_key_id == KEY_ID
    replacement = credentials_file(tmp_path / "new", key="AKIAROTATED", secret="rotated-secret", token=None)
    os.replace(replacement, path)  # as a rotation agent does: a new file renamed over the old
    assert source.current() == AwsCredentials("AKIAROTATED", "rotated-secret", None)
    path.write_text("[ingest]\naws_access_key_id = AKIAHALF\n")  # written in place, caught half-way
    with caplog.at_level(logging.DEBUG):
        assert source.current() == AwsCredentials("AKIAROTATED", "rotated-secret", None)
        assert source.current().access_key_id == "AKIAROTATED"  # the same broken version: warned once
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == (f"sigv4.credentials.unusable credentials file {path}, profile [ingest]: "
                                    "aws_secret_access_key is missing or empty; signing with the credentials read "
                                    "before")  # fmt: skip
    credentials_file(path, key="AKIAFIXED", secret="fixed", token=None)
    assert source.current().access_key_id == "AKIAFIXED"
    assert "rotated-secret" not in caplog.text
    assert SECRET not in caplog.text


# --- a publisher over loopback, every request verified ------------------------------------------


async def test_every_request_of_a_cmaf_push_verifies_and_a_tampered_body_does_not(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # botocore's DEBUG lines included, were they reachable
    path = credentials_file(tmp_path / "credentials")
    config = SigV4(region="eu-west-1", credentials_file=path, profile="ingest")
    signer = RequestSigner(config)
    verifier = Verifier("eu-west-1", "mediapackagev2", {KEY_ID: Identity(SECRET, TOKEN)})
    endpoint = VerifyingEndpoint(verifier)
    profile = load_profile(DEMO, now_ns=NOW_NS)
    stream = profile.streams[0]
    source = SyntheticStream(profile, stream)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_asgi, endpoint, "127.0.0.1", 0, "verifier")
        base = f"http://127.0.0.1:{port}/in/v1/live-group/1/event-1"
        fanout = FanOut("primary", Metrics())
        board = fanout.add_stream(stream.id)
        board.announce(source.header)
        publishers = []
        for paths in ("streams", "template"):
            target = Endpoint(name=f"mp-{paths}", region="test", url=base, format="cmaf", cmaf_paths=paths,
                              sigv4=config)  # fmt: skip
            publishers += add_cmaf_publishers(fanout, board, [(1, "video_360p")], target,
                                              reboxer=Reboxer(profile.presentation.epoch_ns), limits=LIMITS,
                                              metrics=fanout.metrics, settings=SETTINGS, signer=signer)  # fmt: skip
        done = trio.Event()

        async def publish() -> None:
            async with trio.open_nursery() as inner:
                for publisher in publishers:
                    inner.start_soon(publisher.run)
            done.set()

        nursery.start_soon(publish)
        for k in range(3):
            for fragment in source.fragment(K + k):
                fanout.fragment(fragment)
        with trio.fail_after(30):
            fanout.close()  # each track's last segment once more, with lmsg
            await done.wait()

        # The same signed headers on a request whose body was changed on the way.
        segment_url = f"{base}/video/video_360p/{K + 9}.m4s"
        body = b"a segment's bytes"
        headers = signer("POST", segment_url, body)
        async with httpx.AsyncClient() as client:
            refused = await client.post(segment_url, content=body[:-1] + b"!", headers=dict(headers))
            forged = dict(headers) | {"X-Amz-Content-SHA256": hashlib.sha256(b"forged").hexdigest()}
            refused_forged = await client.post(segment_url, content=b"forged", headers=forged)
            accepted = await client.post(segment_url, content=body, headers=dict(headers))
        nursery.cancel_scope.cancel()

    pushed = endpoint.requests[:-3]
    # Per endpoint: the header alone, three segments, the last again with lmsg; all signed and verified.
    assert len(pushed) == 2 * 5
    assert [reason for *_, reason in pushed] == [None] * len(pushed)
    assert {p for _, p, _, _ in pushed} >= {"/in/v1/live-group/1/event-1/Streams(video-video_360p)",
                                            "/in/v1/live-group/1/event-1/video/video_360p/init.m4s",
                                            f"/in/v1/live-group/1/event-1/video/video_360p/{K + 2}.m4s"}  # fmt: skip
    changed = "x-amz-content-sha256 is not the SHA-256 of the body received"
    assert (refused.status_code, endpoint.requests[-3][3]) == (403, changed)
    assert (refused_forged.status_code, endpoint.requests[-2][3]) == (403, "signature mismatch")
    assert (accepted.status_code, endpoint.requests[-1][3]) == (200, None)
    assert SECRET not in caplog.text
    assert TOKEN not in caplog.text
    assert "publisher.post.started" in caplog.text  # the log was captured at all


def test_a_publisher_signs_only_requests_whose_body_is_known_when_they_start() -> None:
    smooth = Endpoint(name="smooth", region="test", url="http://127.0.0.1:1/live/x.isml")
    with pytest.raises(ValueError, match="request signing needs one request per segment with the header alone"):
        Publisher(group="primary", stream_id="video", endpoint=smooth, header=HeaderBoard("primary", "video"),
                  outbox=EndpointOutbox(LIMITS), metrics=Metrics(), settings=SETTINGS,
                  signer=lambda method, url, body: [])  # fmt: skip


def test_a_credentials_file_under_the_home_directory_as_people_write_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".aws").mkdir()
    credentials_file(tmp_path / ".aws" / "credentials")
    source = CredentialSource(SigV4(region="eu-west-1", credentials_file=Path("~/.aws/credentials"), profile="ingest"))
    assert source.current() == AwsCredentials(KEY_ID, SECRET, TOKEN)
