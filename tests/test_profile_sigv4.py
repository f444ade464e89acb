"""An endpoint's ``sigv4`` table (AWS Signature Version 4, for MediaPackage v2's CMAF ingest): what
the profile accepts and refuses, in the user's words, and what ``orchestrator validate`` says
when the keys it names cannot be read. The demo profile with visible edits, as elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.errors import ProfileError
from orchestrator.profile import parse_profile
from orchestrator.push.sigv4 import credential_problems

DEMO = Path(__file__).parent.parent / "profiles" / "demo.toml"
DEMO_TEXT = DEMO.read_text(encoding="utf-8")
NOW_NS = 1_800_000_000 * 10**9
SMOOTH_A = 'url = "http://127.0.0.1:18081/live/demo.isml"'
MP_URL = "https://abcd-1.ingest.efgh.mediapackagev2.eu-west-1.amazonaws.com/in/v1/live-group/1/event-1"
KEY = "groups.primary.endpoints[region-a]"


def cmaf_with(sigv4: str, url: str = MP_URL, extra: str = "") -> str:
    assert SMOOTH_A in DEMO_TEXT
    return DEMO_TEXT.replace(SMOOTH_A, f'url = "{url}"\n  format = "cmaf"\n  sigv4 = {sigv4}{extra}', 1)


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ProfileError) as caught:
        parse_profile(text, "demo.toml", now_ns=NOW_NS)
    return caught.value.problems


def test_a_cmaf_endpoint_signs_for_a_region_with_mediapackagev2_and_the_aws_variables_by_default() -> None:
    profile = parse_profile(cmaf_with('{ region = "eu-west-1" }'), now_ns=NOW_NS)
    sigv4 = profile.groups["primary"].endpoints[0].sigv4
    assert sigv4 is not None
    assert (sigv4.region, sigv4.service, sigv4.env_prefix, sigv4.credentials_file) == (
        "eu-west-1", "mediapackagev2", "", None)  # fmt: skip
    assert sigv4.where() == "environment variables AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    other = parse_profile(cmaf_with('{ region = "us-gov-west-1", service = "execute-api", credentials_file = '
                                    '"/run/secrets/aws", profile = "ingest" }'), now_ns=NOW_NS)  # fmt: skip
    sigv4 = other.groups["primary"].endpoints[0].sigv4
    assert sigv4 is not None
    assert sigv4.where() == "profile [ingest] of /run/secrets/aws"


@pytest.mark.parametrize(("text", "key", "reason"), [
    (DEMO_TEXT.replace(SMOOTH_A, SMOOTH_A + '\n  sigv4 = { region = "eu-west-1" }', 1), f"{KEY}.sigv4",
     'SigV4 signs CMAF ingest requests only; this endpoint is format = "smooth" (one long POST per stream, whose '
     'body is not known when it starts): set format = "cmaf"'),
    (cmaf_with("{ }"), f"{KEY}.sigv4.region", "required key is missing"),
    (cmaf_with('{ region = "Europe" }'), f"{KEY}.sigv4.region",
     '"Europe" is not valid here: write an AWS region code such as "eu-west-1"'),
    (cmaf_with('{ region = "eu-west-1", env_prefix = "MP-1" }'), f"{KEY}.sigv4.env_prefix",
     '"MP-1" is not valid here: write the start of an environment variable name (letters, digits, "_"), such as '
     '"MP_PRIMARY_"'),
    (cmaf_with('{ region = "eu-west-1", service = "MediaPackage" }'), f"{KEY}.sigv4.service",
     '"MediaPackage" is not valid here: write an AWS service name such as "mediapackagev2"'),
    (cmaf_with('{ region = "eu-west-1", env_prefix = "MP_", credentials_file = "/run/aws" }'), f"{KEY}.sigv4",
     "give env_prefix (environment variables) or credentials_file, not both"),
    (cmaf_with('{ region = "eu-west-1", profile = "ingest" }'), f"{KEY}.sigv4",
     "profile names a section of credentials_file; give credentials_file too"),
    (cmaf_with('{ region = "eu-west-1", aws_secret_access_key = "x" }'), f"{KEY}.sigv4.aws_secret_access_key",
     "unknown key"),
    (cmaf_with('{ region = "eu-west-1" }', extra='\n  credentials = { token_env = "TOKEN" }'), f"{KEY}.sigv4",
     "an endpoint takes [credentials] (Basic/Bearer) or sigv4, not both"),
    (cmaf_with('{ region = "eu-west-1" }', url="http://ingest.example.net/in/v1/g/1/c"), KEY,
     "sigv4 over plain http:// to a non-loopback host would send the session token and replayable signed requests "
     "in clear text; use https://"),
])  # fmt: skip
def test_what_the_sigv4_table_refuses_names_the_key_and_says_why(text: str, key: str, reason: str) -> None:
    assert problems(text) == [(key, reason)]


def test_a_did_you_mean_for_a_misspelt_sigv4_key() -> None:
    [(key, reason)] = problems(cmaf_with('{ region = "eu-west-1", credential_file = "/run/aws" }'))
    assert (key, reason) == (f"{KEY}.sigv4.credential_file", "unknown key; did you mean 'credentials_file'?")


def test_plain_http_to_loopback_is_allowed_for_tests_and_local_relays() -> None:
    parse_profile(cmaf_with('{ region = "eu-west-1" }', url="http://127.0.0.1:18081/in/v1/g/1/c"), now_ns=NOW_NS)


def test_credential_problems_name_endpoint_variables_and_file(tmp_path: Path) -> None:
    text = cmaf_with('{ region = "eu-west-1", env_prefix = "MP_" }')
    text = text.replace('url = "http://127.0.0.1:18082/live/demo.isml"',
                        f'url = "{MP_URL.replace("-1.", "-2.")}"\n  format = "cmaf"\n  sigv4 = {{ region = '
                        f'"eu-west-1", credentials_file = "{tmp_path / "nope"}" }}', 1)  # fmt: skip
    profile = parse_profile(text, now_ns=NOW_NS)
    assert credential_problems(profile, {}) == [
        (f"{KEY}.sigv4", "environment variables MP_AWS_ACCESS_KEY_ID and MP_AWS_SECRET_ACCESS_KEY are not set or "
                         "empty"),
        ("groups.primary.endpoints[region-b].sigv4",
         f"cannot read credentials file {tmp_path / 'nope'}: No such file or directory"),
    ]  # fmt: skip
    (tmp_path / "nope").write_text("[default]\naws_access_key_id = AKIA1\naws_secret_access_key = s\n")
    env = {"MP_AWS_ACCESS_KEY_ID": "AKIA2", "MP_AWS_SECRET_ACCESS_KEY": "s"}
    assert credential_problems(profile, env) == []


def validate(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(path)], capture_output=True,
                          text=True, timeout=60, env={**clean, **env}, cwd=path.parent)  # fmt: skip


def test_validate_refuses_sigv4_whose_keys_are_missing_and_passes_once_they_are_there(tmp_path: Path) -> None:
    path = tmp_path / "event.toml"
    path.write_text(cmaf_with('{ region = "eu-west-1" }'))
    refused = validate(path, {})
    assert refused.returncode == 2
    assert (f"{path}: {KEY}.sigv4: environment variables AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set or "
            "empty") in refused.stderr  # fmt: skip
    assert "Traceback" not in refused.stderr
    secret = "sEcReT-tHaT-mUsT-nOt-sHoW"
    accepted = validate(path, {"AWS_ACCESS_KEY_ID": "AKIAVALIDATE", "AWS_SECRET_ACCESS_KEY": secret})
    assert accepted.returncode == 0, accepted.stderr
    assert "ok: presentation 'demo'" in accepted.stdout
    assert secret not in accepted.stdout + accepted.stderr
