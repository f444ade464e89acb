"""Profile hardening (issue 13): values that used to slip through ``validate`` or hang it.

Every case goes through the real CLI function in-process (click's runner), so what is checked is
what an operator sees: exit 2 and ``<file>: <key path>: <reason>``, quickly.
"""

from __future__ import annotations

import datetime as dt
import re
import ssl
import time
from pathlib import Path

import httpx
import pytest
import trio
import trustme
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.cli import main
from orchestrator.errors import ProfileError, reason_of
from orchestrator.profile import UINT32_MAX, parse_profile
from orchestrator.supervisor import tls_context

DEMO = Path(__file__).parent.parent / "profiles" / "demo.toml"
DEMO_TEXT = DEMO.read_text(encoding="utf-8")
REGION_A_URL = 'url = "http://127.0.0.1:18081/live/demo.isml"\n'
# A refusal: "<file>: <key path>: <reason>" on every line of the message.
REFUSAL = re.compile(r"^error: \S+\.toml: [A-Za-z0-9_.\[\]-]+: \S.*$")
TIME_BOUND_S = 2.0  # generous: the slow cases took 10 s or more before the fix, the others take milliseconds


def validate(tmp_path: Path, text: str) -> tuple[int, str, float]:
    """Run ``orchestrator validate`` in-process on ``text``: (exit code, output, seconds)."""
    path = tmp_path / "event.toml"
    path.write_text(text, encoding="utf-8")
    started = time.monotonic()
    result = CliRunner().invoke(main, ["validate", str(path)])
    return result.exit_code, result.output, time.monotonic() - started


def edited(old: str, new: str) -> str:
    assert old in DEMO_TEXT, old
    return DEMO_TEXT.replace(old, new, 1)


def refused(tmp_path: Path, text: str, key: str) -> str:
    code, output, seconds = validate(tmp_path, text)
    assert code == 2, output
    assert seconds < TIME_BOUND_S, f"validate took {seconds:.1f} s"
    first = output.strip().splitlines()[0]
    assert first.startswith(f"error: {tmp_path / 'event.toml'}: {key}: "), output
    return first


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("fragment_duration = 2 ", 'fragment_duration = "1e-999999999" ', "presentation.fragment_duration"),
        ("fragment_duration = 2 ", 'fragment_duration = "1e999999999" ', "presentation.fragment_duration"),
        ("fragment_duration = 2 ", "fragment_duration = 1e308 ", "presentation.fragment_duration"),
        ("{ seconds = 120,", '{ seconds = "1e-999999999",', "groups.primary.max_backlog.seconds"),
        ("{ seconds = 120,", '{ seconds = "1e999999999",', "groups.primary.max_backlog.seconds"),
        ('bytes = "256MiB"', 'bytes = "1e999999 GiB"', "groups.primary.max_backlog.bytes"),
        ('bytes = "256MiB"', f"bytes = {'9' * 4000}", "groups.primary.max_backlog.bytes"),
        ("stall_fragments = 3 ", f"stall_fragments = {'9' * 4301} ", "groups.primary.stall_fragments"),
        ("video_timescale = 90000", f"video_timescale = {'1' * 5000}", "presentation.video_timescale"),
    ],
)
def test_numbers_that_exploded_are_refused_at_once(tmp_path: Path, old: str, new: str, key: str) -> None:
    line = refused(tmp_path, edited(old, new), key)
    assert "range" in line or "bytes" in line or "less than or equal" in line, line


def test_a_string_is_not_an_integer(tmp_path: Path) -> None:
    line = refused(tmp_path, edited("stall_fragments = 3 ", 'stall_fragments = "3" '), "groups.primary.stall_fragments")
    assert line.endswith('"3" is not a whole number')
    refused(tmp_path, edited("video_timescale = 90000", "video_timescale = 90000.0"), "presentation.video_timescale")
    refused(tmp_path, edited("stall_fragments = 3 ", "stall_fragments = true "), "groups.primary.stall_fragments")


@pytest.mark.parametrize(
    ("old", "new", "key", "suggestion"),
    [
        ("stall_fragments = 3 ", "stall_fragment = 3 ", "groups.primary.stall_fragment", "stall_fragments"),
        ("video_timescale = 90000", "video_timescal = 90000", "presentation.video_timescal", "video_timescale"),
        ("fragment_duration = 2 ", "fragment_duration = 2\nfragmentduration = 2 ", "presentation.fragmentduration",
         "fragment_duration"),
        (REGION_A_URL, REGION_A_URL + "  ca_fil = 'x.pem'\n", "groups.primary.endpoints[region-a].ca_fil", "ca_file"),
    ],
)  # fmt: skip
def test_unknown_key_says_did_you_mean(tmp_path: Path, old: str, new: str, key: str, suggestion: str) -> None:
    line = refused(tmp_path, edited(old, new), key)
    assert line.endswith(f"unknown key; did you mean {suggestion!r}?"), line


def test_unknown_key_far_from_any_gives_no_suggestion(tmp_path: Path) -> None:
    line = refused(tmp_path, edited("stall_fragments = 3 ", "stall_fragments = 3\nzzqx = 1 "), "groups.primary.zzqx")
    assert line.endswith(": unknown key"), line


@pytest.mark.parametrize("timescale", [UINT32_MAX + 1, 2**40])
def test_timescale_over_32_bits_is_refused(tmp_path: Path, timescale: int) -> None:
    line = refused(tmp_path, edited("video_timescale = 90000", f"video_timescale = {timescale}"),
                   "presentation.video_timescale")  # fmt: skip
    assert line.endswith(f"{timescale} is out of range: it must be at most {UINT32_MAX}")


@pytest.mark.parametrize(
    ("epoch", "reason"),
    [
        ("9999-12-31T23:59:59Z", "is in the future"),
        ("2999-01-01T00:00:00Z", "is in the future"),
        ("0001-01-01T00:00:00Z", "mfhd.sequence_number (32 bits"),
        ("1800-01-01T00:00:00Z", "mfhd.sequence_number (32 bits"),
    ],
)
def test_epoch_that_up_cannot_run_is_refused(tmp_path: Path, epoch: str, reason: str) -> None:
    line = refused(tmp_path, edited("epoch = 2026-01-01T00:00:00Z", f"epoch = {epoch}"), "presentation.epoch")
    assert reason in line, line


def test_epoch_a_minute_ahead_is_refused_and_now_is_accepted() -> None:
    now = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    now_ns = int(now.timestamp()) * 10**9
    ahead = DEMO_TEXT.replace("epoch = 2026-01-01T00:00:00Z", "epoch = 2026-06-01T00:01:00Z")
    with pytest.raises(ProfileError, match=r"presentation\.epoch: .* is in the future"):
        parse_profile(ahead, "demo.toml", now_ns=now_ns)
    exactly_now = DEMO_TEXT.replace("epoch = 2026-01-01T00:00:00Z", "epoch = 2026-06-01T00:00:00Z")
    assert parse_profile(exactly_now, "demo.toml", now_ns=now_ns).presentation.epoch == now


def test_epoch_whose_tfxd_times_overflow_64_bits_is_refused(tmp_path: Path) -> None:
    # 2^64 ticks at 4,000,000,000 ticks per second is 146 years: an epoch 50 years back leaves 96.
    text = edited("video_timescale = 90000", "video_timescale = 4000000000").replace(
        "epoch = 2026-01-01T00:00:00Z", "epoch = 1976-01-01T00:00:00Z")  # fmt: skip
    line = refused(tmp_path, text, "presentation.video_timescale")
    assert "exceed tfxd's 64 bits" in line


@pytest.mark.parametrize("url", ["http://ingest.example.net/live/demo.isml", "http://10.0.0.5:8080/live/demo.isml"])
def test_credentials_over_plain_http_to_a_remote_host_are_refused(tmp_path: Path, url: str) -> None:
    text = edited(REGION_A_URL, f'url = "{url}"\n  credentials = {{ token_env = "INGEST_TOKEN" }}\n')
    line = refused(tmp_path, text, "groups.primary.endpoints[region-a]")
    assert "in clear text; use https://" in line


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:18081/live/demo.isml", "http://localhost:1/live/demo.isml", "https://ingest.example.net/x.isml"],
)
def test_credentials_over_loopback_or_tls_are_accepted(tmp_path: Path, url: str) -> None:
    text = edited(REGION_A_URL, f'url = "{url}"\n  credentials = {{ token_env = "INGEST_TOKEN" }}\n')
    code, output, _ = validate(tmp_path, text)
    assert code == 0, output


def test_ca_file_missing_or_not_pem_is_refused(tmp_path: Path) -> None:
    line = refused(tmp_path, edited(REGION_A_URL, REGION_A_URL + f"  ca_file = '{tmp_path / 'nope.pem'}'\n"),
                   "groups.primary.endpoints[region-a].ca_file")  # fmt: skip
    assert "cannot read CA bundle" in line
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    line = refused(tmp_path, edited(REGION_A_URL, REGION_A_URL + f"  ca_file = '{junk}'\n"),
                   "groups.primary.endpoints[region-a].ca_file")  # fmt: skip
    assert "holds no PEM certificate" in line


# --- ca_file against a real TLS server on loopback ----------------------------------------------


async def _tls_server(ca: trustme.CA, nursery: trio.Nursery) -> int:
    """An HTTPS server on 127.0.0.1 with a certificate issued by ``ca``: answers 200 to anything."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client refused our certificate: expected in the negative case
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_ssl_over_tcp_listeners(0, server_context, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return int(listeners[0].transport_listener.socket.getsockname()[1])


async def _fetch(context: ssl.SSLContext, port: int) -> int | str:
    async with httpx.AsyncClient(verify=context) as client:
        try:
            return (await client.get(f"https://127.0.0.1:{port}/")).status_code
        except httpx.ConnectError as exc:
            # The reason the publisher logs (it logged an empty one before: str(exc) == "").
            return "refused" if "CERTIFICATE_VERIFY_FAILED" in reason_of(exc) else repr(exc)


async def test_ca_file_is_an_extra_bundle_on_top_of_the_default_trust(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default trust stands for the system's (httpx reads SSL_CERT_FILE); the ca_file adds one CA."""
    default_ca, extra_ca, stranger_ca = trustme.CA(), trustme.CA(), trustme.CA()
    default_ca.cert_pem.write_to_path(str(tmp_path / "default.pem"))
    extra_ca.cert_pem.write_to_path(str(tmp_path / "extra.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "default.pem"))
    async with trio.open_nursery() as nursery:
        by_default = await _tls_server(default_ca, nursery)
        by_extra = await _tls_server(extra_ca, nursery)
        by_stranger = await _tls_server(stranger_ca, nursery)
        with_extra = tls_context(tmp_path / "extra.pem")
        without = tls_context(None)
        assert await _fetch(with_extra, by_default) == 200  # the default trust is kept (it was replaced before)
        assert await _fetch(with_extra, by_extra) == 200  # and the extra CA added
        assert await _fetch(with_extra, by_stranger) == "refused"  # verification stays on
        assert await _fetch(without, by_default) == 200
        assert await _fetch(without, by_extra) == "refused"
        nursery.cancel_scope.cancel()


# --- fuzz: mutated profiles ------------------------------------------------------------------

_LINES = DEMO_TEXT.splitlines()
_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["0", "-1", "1e-999999999", "1e999999999", '"1e-999999999"', '"1e999999999"', "inf", "nan",
                     '"3"', '"30000/1001"', '"1/0"', "true", "[]", "{}", '""', '"x"', "1.5", "2.0",
                     "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "2026-01-01T00:00:00", '"256MiB"',
                     '"1e99 GiB"', "4294967296", "1" * 4400, '"' + "1" * 500 + '"']),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20).map(repr),
)  # fmt: skip


@st.composite
def mutated_profiles(draw: st.DrawFn) -> str:
    """The demo profile with a few lines' values replaced, keys renamed or lines dropped or doubled."""
    lines = list(_LINES)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        key, sep, _value = lines[i].partition("=")
        action = draw(st.sampled_from(["value", "key", "drop", "double"]))
        if action == "value" and sep:
            lines[i] = f"{key}= {draw(_VALUES)}"
        elif action == "key" and sep:
            lines[i] = f"{key.strip()}{draw(st.sampled_from(['_', 's', 'x', '']))}{sep}{_value}"[1:]
        elif action == "drop":
            del lines[i]
        else:
            lines.insert(i, lines[i])
    return "\n".join(lines) + "\n"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=mutated_profiles())
def test_validate_over_mutated_profiles_exits_0_or_2_with_key_path_quickly(tmp_path: Path, text: str) -> None:
    code, output, seconds = validate(tmp_path, text)
    assert seconds < TIME_BOUND_S, f"validate took {seconds:.1f} s"
    assert code in (0, 2), output
    if code == 0:
        assert "ok: presentation" in output
    else:
        lines = output.strip().splitlines()
        assert lines, "exit 2 without a message"
        assert lines[0].startswith(f"error: {tmp_path / 'event.toml'}: "), output
        # Each problem names a key path, except a file that is not TOML at all.
        if "not valid TOML" not in lines[0]:
            assert all(REFUSAL.match(line) or line.startswith(f"{tmp_path / 'event.toml'}: ") for line in lines), output
