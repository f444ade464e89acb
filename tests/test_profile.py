"""The event profile: the demo loads; every mistake names the file, the key path and the reason.

Each bad profile is the demo profile with one visible edit, so the test shows what is wrong.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pytest
from rig import DEMO_BACKUP_ENDPOINTS as BACKUP_ENDPOINTS

from orchestrator.clock import TrackClock
from orchestrator.errors import ProfileError
from orchestrator.profile import AudioTrack, Credentials, VideoTrack, json_schema, load_profile, parse_profile
from orchestrator.wire import smooth

DEMO = Path(__file__).parent.parent / "profiles" / "demo.toml"
DEMO_TEXT = DEMO.read_text(encoding="utf-8")
DEMO_EPOCH_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z

REGION_A_URL = 'url = "http://127.0.0.1:18081/live/demo.isml"\n'


def edited(old: str, new: str) -> str:
    """The demo profile with the first ``old`` replaced by ``new``."""
    assert old in DEMO_TEXT, old
    return DEMO_TEXT.replace(old, new, 1)


def problem(old: str, new: str) -> ProfileError:
    with pytest.raises(ProfileError) as caught:
        parse_profile(edited(old, new), "demo.toml")
    return caught.value


def test_demo_profile_loads() -> None:
    profile = load_profile(DEMO)
    p = profile.presentation
    assert (p.name, p.fragment_duration, p.video_timescale, p.tfxd_version) == ("demo", Fraction(2), 90000, 1)
    assert p.epoch_ns == DEMO_EPOCH_NS
    assert [s.id for s in profile.streams] == ["video", "audio"]
    video = profile.stream("video").tracks[0]
    audio = profile.stream("audio").tracks[0]
    assert isinstance(video, VideoTrack)
    assert isinstance(audio, AudioTrack)
    assert (video.name, video.bitrate, video.width, video.height) == ("video_360p", 800_000, 640, 360)
    assert video.frame_rate == Fraction(30000, 1001)
    assert (audio.sample_rate, audio.channels, audio.language) == (48000, 2, "eng")
    assert sorted(profile.groups) == ["backup", "primary"]
    for group in profile.groups.values():
        assert [e.name for e in group.endpoints] == ["region-a", "region-b"]
        assert (
            smooth.PLAN.url(group.endpoints[0].url, "video") == "http://127.0.0.1:18081/live/demo.isml/Streams(video)"
        )
        assert group.endpoints[0].is_loopback
    assert profile.metrics.listen == "127.0.0.1:9464"
    assert profile.track_clock(video) == TrackClock(DEMO_EPOCH_NS, Fraction(2), 90000, Fraction(1001, 30000))
    assert profile.track_clock(audio) == TrackClock(DEMO_EPOCH_NS, Fraction(2), 48000, Fraction(1024, 48000))
    with pytest.raises(KeyError):
        profile.stream("nope")


def test_wrong_type() -> None:
    error = problem("bitrate = 800_000", 'bitrate = "fast"')
    [(key, reason)] = error.problems
    assert key == "streams[video].tracks[video_360p].bitrate"
    assert reason == '"fast" is not a bitrate; write bits per second, e.g. 800000, "800k" or "2.5M"'
    assert str(error).startswith("demo.toml: streams[video].tracks[video_360p].bitrate: ")


def test_unknown_key() -> None:
    error = problem('language = "eng"\n', 'language = "eng"\n  foo = 1\n')
    assert str(error) == "demo.toml: streams[audio].tracks[audio_eng].foo: unknown key"


def test_fragment_duration_out_of_range() -> None:
    error = problem("fragment_duration = 2 ", "fragment_duration = 10 ")
    assert str(error) == (
        "demo.toml: presentation.fragment_duration: fragment duration 10 s is outside 2 to 6 s (ingest spec, 3.7)"
    )


@pytest.mark.parametrize("value", ["inf", '"inf"', "nan", '"2/0"', "true"])
def test_fragment_duration_not_a_number(value: str) -> None:
    # TOML's inf once escaped as a bare OverflowError instead of a ProfileError.
    error = problem("fragment_duration = 2 ", f"fragment_duration = {value} ")
    [(key, _reason)] = error.problems
    assert key == "presentation.fragment_duration"


def test_exact_fragment_durations_are_accepted() -> None:
    cases = [("2.5", Fraction(5, 2)), ('"2.002"', Fraction(1001, 500)), ('"1001/500"', Fraction(1001, 500))]
    for text, expected in cases:
        profile = parse_profile(edited("fragment_duration = 2 ", f"fragment_duration = {text} "))
        assert profile.presentation.fragment_duration == expected


def test_group_without_endpoints_key() -> None:
    error = problem(BACKUP_ENDPOINTS, "")
    assert str(error) == "demo.toml: groups.backup.endpoints: required key is missing"


def test_group_with_empty_endpoints() -> None:
    error = problem(BACKUP_ENDPOINTS, "endpoints = []\n")
    [(key, reason)] = error.problems
    assert key == "groups.backup.endpoints"
    assert reason.startswith("needs at least one entry")


def test_missing_backup_group() -> None:
    backup = next(line for line in DEMO_TEXT.splitlines() if line.startswith("encoder = ")) + "\n"
    error = problem("[groups.backup]\n" + backup + BACKUP_ENDPOINTS, "")
    assert str(error) == "demo.toml: groups: must include primary and backup; missing: backup"


def test_password_inline_is_an_unknown_key() -> None:
    error = problem(REGION_A_URL, REGION_A_URL + '  password = "hunter2"\n')
    assert str(error) == "demo.toml: groups.primary.endpoints[region-a].password: unknown key"


def test_password_inline_in_credentials_is_an_unknown_key() -> None:
    error = problem(REGION_A_URL, REGION_A_URL + '  credentials = { username = "bob", password = "hunter2" }\n')
    assert str(error) == (
        "demo.toml: groups.primary.endpoints[region-a].credentials.password: unknown key; did you mean 'password_env'?"
    )


def test_credentials_need_exactly_one_secret_source() -> None:
    error = problem(REGION_A_URL, REGION_A_URL + '  credentials = { username = "bob" }\n')
    assert str(error) == (
        "demo.toml: groups.primary.endpoints[region-a].credentials: "
        "give exactly one of password_env, password_file, token_env, token_file"
    )


def test_credentials_by_reference_are_accepted() -> None:
    profile = parse_profile(edited(REGION_A_URL, REGION_A_URL + '  credentials = { token_env = "INGEST_TOKEN" }\n'))
    assert profile.groups["primary"].endpoints[0].credentials == Credentials(token_env="INGEST_TOKEN")


@pytest.mark.parametrize(
    "url",
    ["http://bob:hunter2@127.0.0.1:18081/live/demo.isml", "ftp://bob:hunter2@127.0.0.1/live/demo.isml",
     "http://bob:hunter2@/live/demo.isml"],
)  # fmt: skip
def test_url_with_credentials(url: str) -> None:
    error = problem("http://127.0.0.1:18081/live/demo.isml", url)
    [(key, reason)] = error.problems
    assert key == "groups.primary.endpoints[region-a].url"
    assert reason.startswith("credentials in the URL are not allowed")
    assert "hunter2" not in str(error)  # the message goes to logs: it must not repeat the password


@pytest.mark.parametrize(
    ("url", "reason"),
    [("ftp://127.0.0.1/live/demo.isml", "is not an http:// or https:// URL"),
     ("http://127.0.0.1:18081/live/demo", "must be a publishing point ending in .isml"),
     ("http://127.0.0.1:18081/live/demo.isml?x=1", "takes no query or fragment"),
     ("http://127.0.0.1:99999/live/demo.isml", "has an invalid port")],
)  # fmt: skip
def test_bad_publishing_point_urls(url: str, reason: str) -> None:
    error = problem("http://127.0.0.1:18081/live/demo.isml", url)
    [(key, got)] = error.problems
    assert key == "groups.primary.endpoints[region-a].url"
    assert reason in got


def test_float_frame_rate() -> None:
    error = problem('frame_rate = "30000/1001"', "frame_rate = 29.97")
    assert str(error) == (
        "demo.toml: streams[video].tracks[video_360p].frame_rate: "
        'frame rate must be an integer or a ratio such as "30000/1001", '
        "not 29.97"
    )


def test_decimal_string_frame_rate() -> None:
    error = problem('frame_rate = "30000/1001"', 'frame_rate = "29.97"')
    [(key, _reason)] = error.problems
    assert key == "streams[video].tracks[video_360p].frame_rate"


def test_epoch_without_time_zone() -> None:
    error = problem("epoch = 2026-01-01T00:00:00Z", "epoch = 2026-01-01T00:00:00")
    assert str(error) == "demo.toml: presentation.epoch: epoch needs a time zone, e.g. 2026-01-01T00:00:00Z"


def test_epoch_with_an_offset_is_the_same_instant() -> None:
    profile = parse_profile(edited("epoch = 2026-01-01T00:00:00Z", "epoch = 2026-01-01T01:00:00+01:00"))
    assert profile.presentation.epoch_ns == DEMO_EPOCH_NS


def test_several_problems_are_all_reported() -> None:
    text = edited("bitrate = 800_000", 'bitrate = "fast"').replace("sample_rate = 48000", "sample_rate = 4")
    with pytest.raises(ProfileError) as caught:
        parse_profile(text, "demo.toml")
    keys = [key for key, _ in caught.value.problems]
    assert keys == ["streams[video].tracks[video_360p].bitrate", "streams[audio].tracks[audio_eng].sample_rate"]
    assert len(str(caught.value).splitlines()) == 2


def test_invalid_toml_names_the_file() -> None:
    error = problem('name = "demo"', 'name = "demo')
    assert str(error).startswith("demo.toml: not valid TOML: ")
    assert "line 7" in str(error)


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ProfileError) as caught:
        load_profile(missing)
    assert str(caught.value).startswith(f"{missing}: cannot read the profile: ")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ProfileError, match=f"^{re.escape(str(binary))}: cannot read the profile"):
        load_profile(binary)


def test_load_profile_errors_name_the_path(tmp_path: Path) -> None:
    path = tmp_path / "event.toml"
    path.write_text(DEMO_TEXT.replace("fragment_duration = 2 ", "fragment_duration = 10 "), encoding="utf-8")
    with pytest.raises(ProfileError, match=f"^{re.escape(str(path))}: presentation.fragment_duration: "):
        load_profile(path)


# --- credentials are read late, and never echoed -----------------------------------------------------


def test_authorization_from_environment() -> None:
    creds = Credentials(username="bob", password_env="ORCH_TEST_PASSWORD")
    assert creds.authorization({"ORCH_TEST_PASSWORD": "hunter2"}) == ("bob", "hunter2")
    token = Credentials(token_env="ORCH_TEST_TOKEN")
    assert token.authorization({"ORCH_TEST_TOKEN": "t0ken"}) == "t0ken"


def test_authorization_reads_the_real_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_TEST_TOKEN", "from-env")
    assert Credentials(token_env="ORCH_TEST_TOKEN").authorization() == "from-env"
    monkeypatch.delenv("ORCH_TEST_TOKEN")
    with pytest.raises(ValueError, match="ORCH_TEST_TOKEN"):
        Credentials(token_env="ORCH_TEST_TOKEN").authorization()


@pytest.mark.parametrize("environ", [{}, {"ORCH_TEST_PASSWORD": ""}])
def test_missing_environment_variable_is_named(environ: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"^environment variable ORCH_TEST_PASSWORD is not set or empty$"):
        Credentials(username="bob", password_env="ORCH_TEST_PASSWORD").authorization(environ)


def test_authorization_from_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("hunter2\n", encoding="utf-8")
    assert Credentials(username="bob", password_file=secret).authorization({}) == ("bob", "hunter2")


def test_unreadable_secret_file_is_named_not_quoted(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match="cannot read secret file") as caught:
        Credentials(token_file=missing).authorization({})
    assert str(missing) in str(caught.value)
    # Not UTF-8: Python's own message would quote a byte of the secret; ours names the file only.
    binary = tmp_path / "binary"
    binary.write_bytes(b"hunter2\xff")
    with pytest.raises(ValueError, match="is not UTF-8") as caught:
        Credentials(token_file=binary).authorization({})
    assert str(binary) in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert "0xff" not in str(caught.value)


def test_secret_file_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"^cannot read secret file {re.escape(str(tmp_path))}: "):
        Credentials(username="bob", password_file=tmp_path).authorization({})


@pytest.mark.parametrize(
    ("fields", "reason"),
    [({}, "exactly one"), ({"token_env": "A", "token_file": "b"}, "exactly one"),
     ({"password_env": "A"}, "needs a username"), ({"username": "bob", "token_env": "A"}, "takes no username")],
)  # fmt: skip
def test_credentials_validation(fields: dict[str, str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        Credentials.model_validate(fields)


# --- schema for editors --------------------------------------------------------------------------------


def test_json_schema() -> None:
    schema = json_schema()
    assert isinstance(schema, dict)
    assert {"presentation", "streams", "groups"} <= set(schema["properties"])
    assert set(schema["required"]) == {"presentation", "streams", "groups"}
    text = json.dumps(schema)  # plain JSON, nothing Python-only in it
    assert "30000/1001" in text  # the frame-rate description reaches the editor


def test_empty_secret_file_is_an_error_like_an_empty_variable(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=f"^secret file {re.escape(str(empty))} is empty$"):
        Credentials(token_file=empty).authorization({})


def test_track_ids_are_presentation_wide_so_a_redundant_track_keeps_its_id() -> None:
    audio = '  [[streams.tracks]]\n  kind = "audio"\n  name = "audio_eng"\n  bitrate = 128_000\n  sample_rate = 48000\n'
    text = edited('[[streams]]\nid = "audio"', '[[streams]]\nid = "lo"\n' + audio + '\n[[streams]]\nid = "audio"')
    profile = parse_profile(text.replace('  channels = 2\n  language = "eng"\n', ""), "demo.toml")
    assert [profile.track_ids(s) for s in profile.streams] == [[1], [2], [2]]
    assert profile.track("audio", 2) == profile.track("lo", 2)
    with pytest.raises(KeyError):
        profile.track("audio", 1)


def test_one_track_name_for_two_different_tracks_is_an_error() -> None:
    error = problem('name = "audio_eng"\n  bitrate = 128_000', 'name = "video_360p"\n  bitrate = 128_000')
    assert str(error) == (
        "demo.toml: streams: track 'video_360p' differs between streams video and audio; "
        "a track carried by several streams must be identical in each"
    )
