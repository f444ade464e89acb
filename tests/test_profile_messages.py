"""Profile messages in the user's words (issue 23): units where people write units (a bitrate as
"800k", as a size is "256MiB"), the bad value repeated with what would do, list entries named by
their ``name`` (or a stream's ``id``), and the "<file>: <key path>: <reason>" shape with exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.errors import ProfileError
from orchestrator.profile import json_schema, parse_profile

DEMO_TEXT = (Path(__file__).parent.parent / "profiles" / "demo.toml").read_text(encoding="utf-8")
VIDEO = "streams[video].tracks[video_360p]"
AUDIO = "streams[audio].tracks[audio_eng]"
EXAMPLE = 'write bits per second, e.g. 800000, "800k" or "2.5M"'


def edited(*pairs: tuple[str, str]) -> str:
    text = DEMO_TEXT
    for old, new in pairs:
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


def problems(*pairs: tuple[str, str]) -> list[str]:
    with pytest.raises(ProfileError) as caught:
        parse_profile(edited(*pairs), "demo.toml")
    return str(caught.value).splitlines()


@pytest.mark.parametrize(
    ("written", "bits"),
    [("800_000", 800_000), ('"800k"', 800_000), ('"800K"', 800_000), ('"2.5M"', 2_500_000),
     ('"800 kbps"', 800_000), ('"2.5Mbps"', 2_500_000), ('"128 kb/s"', 128_000), ('"1G"', 10**9)],
)  # fmt: skip
def test_a_bitrate_takes_units(written: str, bits: int) -> None:
    profile = parse_profile(edited(("bitrate = 800_000", f"bitrate = {written}")))
    assert profile.streams[0].tracks[0].bitrate == bits


@pytest.mark.parametrize(
    ("written", "reason"),
    [
        ('"fast"', f'"fast" is not a bitrate; {EXAMPLE}'),
        ('"800m"', f'"800m" is not a bitrate; {EXAMPLE}'),  # m is milli: surely not what was meant
        ('"1.0005k"', f'"1.0005k" is not a whole number of bits per second; {EXAMPLE}'),
        ("8e5", f"800000.0 is not a bitrate; {EXAMPLE}"),
        ("true", f"true is not a bitrate; {EXAMPLE}"),
        ('"0k"', '"0k" is out of range: it must be more than 0'),
        ('"5G"', '"5G" is out of range: it must be at most 4294967295'),
    ],
)
def test_a_bad_bitrate_is_repeated_with_an_example(written: str, reason: str) -> None:
    assert problems(("bitrate = 800_000", f"bitrate = {written}")) == [f"demo.toml: {VIDEO}.bitrate: {reason}"]


def test_a_duration_takes_seconds_with_or_without_the_unit() -> None:
    profile = parse_profile(edited(("fragment_duration = 2 ", 'fragment_duration = "2s" '),
                                   ("{ seconds = 120,", '{ seconds = "90 s",')))  # fmt: skip
    assert (profile.presentation.fragment_duration, profile.groups["primary"].max_backlog.seconds) == (2, 90)
    assert problems(("fragment_duration = 2 ", 'fragment_duration = "2ms" ')) == [
        'demo.toml: presentation.fragment_duration: duration "2ms" is not a number; write 2, 2.5, "2s" or "2002/1000"'
    ]


def test_the_same_units_in_the_json_schema() -> None:
    bitrate = json_schema()["$defs"]["VideoTrack"]["properties"]["bitrate"]
    assert [choice["type"] for choice in bitrate["anyOf"]] == ["integer", "string"]
    assert "800k" in bitrate["description"]


@pytest.mark.parametrize(
    ("old", "new", "line"),
    [
        ("width = 640", "width = 10", f"{VIDEO}.width: 10 is out of range: it must be at least 16"),
        ("height = 360", 'height = "360"', f'{VIDEO}.height: "360" is not a whole number'),
        ('language = "eng"', 'language = "english"',
         f'{AUDIO}.language: "english" is not valid here: '
         'write a three-letter ISO 639-2/T language code such as "eng"'),
        ('name = "video_360p"', 'name = "video 360p"',
         "streams[video].tracks[0].name: \"video 360p\" is not valid here: write letters, digits, '_', '.' and '-', "
         "starting with a letter or digit"),
        ('kind = "audio"', 'kind = "subtitles"',
         f"{AUDIO}: kind = \"subtitles\" is not one of 'video', 'audio'"),
        ('preset = "veryfast"', 'preset = "quick"',
         "groups.primary.encoder.preset: \"quick\" is not one of 'ultrafast', 'superfast', 'veryfast', 'faster', "
         "'fast', 'medium' or 'slow'"),
        ("tfxd_version = 1", "tfxd_version = 3", "presentation.tfxd_version: 3 is not one of 1 or 2"),
        ('bytes = "256MiB"', 'bytes = "256 parsecs"',
         'groups.primary.max_backlog.bytes: "256 parsecs" is not a size; write bytes as a whole number or with a '
         'unit, e.g. "256MiB" or "1GB"'),
        ("epoch = 2026-01-01T00:00:00Z", 'epoch = "new year"',
         'presentation.epoch: "new year" is not a date and time; '
         "write an RFC 3339 instant such as 2026-01-01T00:00:00Z"),
        ('[metrics]\nlisten = "127.0.0.1:9464"', "[metrics]\nenabled = 1",
         "metrics.enabled: 1 is not true or false"),
        ('source = { kind = "testpattern" }', 'source = { kind = "file", path = 5 }',
         "groups.primary.encoder.source.path: 5 is not a path; write it in double quotes"),
        ('source = { kind = "testpattern" }', 'source = { kind = "testpattern", burn_in_clock = "yes" }',
         'groups.primary.encoder.source.burn_in_clock: "yes" is not true or false'),
        ('  region = "us-east"\n', '  region = 5\n',
         'groups.primary.endpoints[region-b].region: 5 is not text; write it in double quotes'),
    ],
)  # fmt: skip
def test_each_reason_repeats_the_value_and_says_what_would_do(old: str, new: str, line: str) -> None:
    assert problems((old, new)) == [f"demo.toml: {line}"]


def test_entries_are_named_by_name_else_by_index() -> None:
    # By name: a track, a stream (its id), an endpoint.
    assert problems(('frame_rate = "30000/1001"', 'frame_rate = "fast"'))[0].startswith(
        f"demo.toml: {VIDEO}.frame_rate: "
    )
    assert problems(('  url = "http://127.0.0.1:18082/live/demo.isml"\n', '  url = "ftp://x"\n'))[0].startswith(
        "demo.toml: groups.primary.endpoints[region-b].url: "
    )
    # Two endpoints of one name: the name does not tell them apart, so the index does.
    same = problems(('  name = "region-b"\n', '  name = "region-a"\n'), ('  region = "us-east"\n', "  region = 5\n"))
    assert same == ["demo.toml: groups.primary.endpoints[1].region: 5 is not text; write it in double quotes"]
    # No name (or one that is all digits, which would read as an index): the index.
    assert problems(('  name = "audio_eng"\n', ""), ("channels = 2", 'channels = "2"')) == [
        "demo.toml: streams[audio].tracks[0].name: required key is missing",
        'demo.toml: streams[audio].tracks[0].channels: "2" is not a whole number',
    ]
    assert problems(('  name = "audio_eng"\n', '  name = "7"\n'), ("channels = 2", "channels = 9")) == [
        "demo.toml: streams[audio].tracks[0].channels: 9 is out of range: it must be at most 8"]  # fmt: skip


def test_after_validation_too_endpoints_are_named(tmp_path: Path) -> None:
    """Keys found wrong by ``up`` (not by the schema) name the endpoint the same way."""
    path = tmp_path / "event.toml"
    path.write_text(edited(("http://127.0.0.1:18082/live/demo.isml", "https://ingest.example.net/live/demo.isml")))
    result = CliRunner().invoke(main, ["up", str(path), "--local-ingest", str(tmp_path / "archive")])
    assert result.exit_code == 2
    assert (f"error: {path}: groups.primary.endpoints[region-b].url: --local-ingest serves loopback endpoints "
            "only; https://ingest.example.net/live/demo.isml is not on this host") in result.output  # fmt: skip


def test_validate_accepts_units_and_refuses_with_the_file_the_key_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "event.toml"
    path.write_text(edited(("bitrate = 800_000", 'bitrate = "800k"'), ("bitrate = 128_000", 'bitrate = "128k"')))
    ok = CliRunner().invoke(main, ["validate", str(path)])
    assert ok.exit_code == 0, ok.output
    path.write_text(edited(("bitrate = 800_000", 'bitrate = "800 kbit"')))
    bad = CliRunner().invoke(main, ["validate", str(path)])
    assert bad.exit_code == 2
    assert bad.output == f'error: {path}: {VIDEO}.bitrate: "800 kbit" is not a bitrate; {EXAMPLE}\n'
