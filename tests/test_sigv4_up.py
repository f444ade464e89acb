"""`up` (both groups, synthetic encoder) pushing CMAF with SigV4 to a loopback endpoint that verifies
every request with the test kit's verifier (written from AWS's documentation, tests/sigv4kit.py):
every request verifies; credentials rotated in their file are used from the next request on (a
wrong identity is refused 403, named in the log and /status, then the right one verifies again);
and neither the secret key nor the session token is ever in the log (DEBUG included), /status or
/metrics."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import httpx
import pytest
import trio
from rig import build_profile, endpoint, free_port, group, up_in_process, wait_for
from sigv4kit import Identity, Verifier, VerifyingEndpoint

from orchestrator.errors import ProfileError
from orchestrator.ops.httpserve import serve_asgi
from orchestrator.relay.server import RelayOptions, run_relay
from orchestrator.supervisor import UpOptions, run_up

pytestmark = pytest.mark.integration

KEY_ID = "AKIAUPTESTKEY0000001"
SECRET = "uPtEsTsEcReT/kEy+0123456789abcdefghijklm"
TOKEN = "uPtEsTsEsSiOnToKeN//1234567890+abcdefghijklmnopqrstuv=="
WRONG_SECRET = "wRoNgSeCrEt/0123456789abcdefghijklmnopqrs"


def write_credentials(path: Path, key: str, secret: str, token: str | None) -> None:
    lines = ["[ingest]", f"aws_access_key_id = {key}", f"aws_secret_access_key = {secret}"]
    if token:
        lines.append(f"aws_session_token = {token}")
    temporary = path.with_suffix(".new")
    temporary.write_text("\n".join(lines) + "\n")
    os.replace(temporary, path)


async def test_up_signs_every_cmaf_request_rotates_keys_and_never_shows_a_secret(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    credentials = tmp_path / "credentials"
    write_credentials(credentials, KEY_ID, SECRET, TOKEN)
    verifier = Verifier("eu-west-1", "mediapackagev2", {KEY_ID: Identity(SECRET, TOKEN)})
    receiver = VerifyingEndpoint(verifier)
    metrics_port = free_port()
    sigv4 = {"region": "eu-west-1", "credentials_file": str(credentials), "profile": "ingest"}

    def segments(reason_ok: bool) -> int:
        return sum(path.endswith(".m4s") and not path.endswith("init.m4s") and (reason is None) == reason_ok
                   for _, path, _, reason in receiver.requests)  # fmt: skip

    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_asgi, receiver, "127.0.0.1", 0, "verifier")
        url = f"http://127.0.0.1:{port}/in/v1/live-group/1/event-1"
        point = endpoint(url=url, name="mediapackage-1", format="cmaf", cmaf_paths="template", sigv4=sigv4)
        profile = build_profile(name="signed", groups={g: group(point) for g in ("primary", "backup")},
                                metrics={"enabled": True, "listen": f"127.0.0.1:{metrics_port}"},
                                extra="[monitor]\nenabled = false\n")  # fmt: skip
        async with up_in_process(profile), httpx.AsyncClient(base_url=f"http://127.0.0.1:{metrics_port}") as client:
            # Both groups, both tracks, two segments each at least: all verified.
            await wait_for(lambda: segments(True) >= 8, 40, "8 verified segments")
            assert segments(False) == 0, receiver.requests

            # Rotated to an identity the endpoint does not know: refused, named, retried slowly.
            write_credentials(credentials, "AKIAWRONGKEY00000002", WRONG_SECRET, None)
            await wait_for(lambda: segments(False) >= 1, 40, "a refused segment")
            unknown = [reason for *_, reason in receiver.requests if reason is not None]
            assert set(unknown) == {"unknown access key AKIAWRONGKEY00000002"}

            async def status_names_the_refusal() -> bool:
                response = await client.get("/status")
                return "credentials missing or refused" in response.text and "unauthorised" in response.text

            await wait_for(status_names_the_refusal, 20, "/status naming the refusal")
            status = (await client.get("/status")).text
            metrics = (await client.get("/metrics")).text

            # Rotated back: the next requests verify again.
            verified = segments(True)
            write_credentials(credentials, KEY_ID, SECRET, TOKEN)
            await wait_for(lambda: segments(True) >= verified + 4, 40, "verified segments after the rotation back")
        nursery.cancel_scope.cancel()

    assert "publisher.unauthorized" in caplog.text
    assert "check the endpoint's sigv4 keys (profile [ingest] of" in caplog.text
    assert "sigv4.credentials.reread" in caplog.text
    for secret in (SECRET, TOKEN, WRONG_SECRET):
        assert secret not in caplog.text
        assert secret not in status
        assert secret not in metrics


async def test_up_and_relay_refuse_to_start_without_the_keys_naming_the_endpoint_and_variables() -> None:
    sigv4 = {"region": "eu-west-1", "env_prefix": "ORCH_TEST_UNSET_"}
    point = endpoint(url="http://127.0.0.1:9/in/v1/g/1/c", name="mp", format="cmaf", sigv4=sigv4)
    expected = (r"groups\.primary\.endpoints\[mp\]\.sigv4: environment variables ORCH_TEST_UNSET_AWS_ACCESS_KEY_ID "
                r"and ORCH_TEST_UNSET_AWS_SECRET_ACCESS_KEY are not set or empty")  # fmt: skip
    profile = build_profile(groups={"primary": group(point), "backup": group(point)})
    with pytest.raises(ProfileError, match=expected):
        await run_up(profile, UpOptions(status="off", handle_signals=False))
    relayed = build_profile(groups={"primary": group(point, encoder={"backend": "relay", "listen": "127.0.0.1:0"}),
                                    "backup": group(point)})  # fmt: skip
    with pytest.raises(ProfileError, match=expected):
        await run_relay(relayed, RelayOptions(handle_signals=False, status="off"))
