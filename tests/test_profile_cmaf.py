"""The profile's wire format per endpoint: ``format = "smooth" | "cmaf"`` and the CMAF path scheme.

Each profile is the demo profile with visible edits (as in tests/test_profile.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import ProfileError
from orchestrator.profile import parse_profile

DEMO_TEXT = (Path(__file__).parent.parent / "profiles" / "demo.toml").read_text(encoding="utf-8")
REGION_A = '  name = "region-a"\n'
NOW_NS = 1_800_000_000 * 10**9


def edited(*edits: tuple[str, str]) -> str:
    text = DEMO_TEXT
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


def problems(*edits: tuple[str, str]) -> list[tuple[str, str]]:
    with pytest.raises(ProfileError) as caught:
        parse_profile(edited(*edits), "demo.toml", now_ns=NOW_NS)
    assert str(caught.value).startswith("demo.toml: ")
    return caught.value.problems


def test_endpoints_are_smooth_unless_they_say_otherwise() -> None:
    profile = parse_profile(DEMO_TEXT, now_ns=NOW_NS)
    assert {(e.format, e.cmaf_paths) for g in profile.groups.values() for e in g.endpoints} == {("smooth", "streams")}


def test_a_cmaf_endpoint_takes_any_base_url_and_a_path_scheme() -> None:
    url = "https://abc-1.ingest.xyz.mediapackagev2.eu-west-1.amazonaws.com/in/v1/group/1/channel"
    text = edited(('url = "http://127.0.0.1:18081/live/demo.isml"',
                   f'url = "{url}/"\n  format = "cmaf"\n  cmaf_paths = "template"'))  # fmt: skip
    profile = parse_profile(text, now_ns=NOW_NS)
    first, second = profile.groups["primary"].endpoints
    assert (first.format, first.cmaf_paths, first.url) == ("cmaf", "template", url)
    assert (second.format, second.url) == ("smooth", "http://127.0.0.1:18082/live/demo.isml")


def test_a_smooth_endpoint_still_needs_a_publishing_point() -> None:
    [(key, reason)] = problems(('url = "http://127.0.0.1:18081/live/demo.isml"',
                                'url = "http://127.0.0.1:18081/in/v1/group/1/channel"'))  # fmt: skip
    assert key == "groups.primary.endpoints[region-a].url"
    assert "must be a publishing point ending in .isml" in reason


@pytest.mark.parametrize(
    ("line", "key", "reason"),
    [('format = "hls"', "format", "'smooth' or 'cmaf'"),
     ('format = "cmaf"\n  cmaf_paths = "mpd"', "cmaf_paths", "'streams' or 'template'"),
     ('format = "CMAF"', "format", "'smooth' or 'cmaf'")],
)  # fmt: skip
def test_a_malformed_format_names_its_key(line: str, key: str, reason: str) -> None:
    # Only the format is reported: the URL (not .isml) is not judged against a format that is not one.
    [(got_key, got)] = problems(('url = "http://127.0.0.1:18081/live/demo.isml"',
                                 f'url = "http://127.0.0.1:18081/live/demo"\n  {line}'))  # fmt: skip
    assert got_key == f"groups.primary.endpoints[region-a].{key}"
    assert reason in got


def test_cmaf_times_need_an_epoch_on_a_tick() -> None:
    epoch = ("epoch = 2026-01-01T00:00:00Z", "epoch = 2026-01-01T00:00:00.000001Z")
    cmaf = (REGION_A, REGION_A + '  format = "cmaf"\n')
    assert parse_profile(edited(epoch), now_ns=NOW_NS).presentation.epoch_ns % 10**9 == 1000  # Smooth: fine
    assert problems(epoch, cmaf) == [
        ("presentation.epoch", "2026-01-01T00:00:00.000001+00:00 does not fall on a tick of timescale 48000, so CMAF "
                               "times (ticks since 1970) could not be exact"),
        ("presentation.epoch", "2026-01-01T00:00:00.000001+00:00 does not fall on a tick of timescale 90000, so CMAF "
                               "times (ticks since 1970) could not be exact"),
    ]  # fmt: skip


def test_streams_paths_must_name_every_track_once() -> None:
    # video + video-360p and video-video + 360p would both post to Streams(video-video-360p).
    clash = (('name = "video_360p"', 'name = "video-360p"'), ('id = "audio"', 'id = "video-video"'),
             ('name = "audio_eng"', 'name = "360p"'))  # fmt: skip
    parse_profile(edited(*clash), now_ns=NOW_NS)  # Smooth: one URL per stream, no clash
    parse_profile(edited(*clash, (REGION_A, REGION_A + '  format = "cmaf"\n  cmaf_paths = "template"\n')),
                  now_ns=NOW_NS)  # fmt: skip
    [(key, reason)] = problems(*clash, (REGION_A, REGION_A + '  format = "cmaf"\n'))
    assert key == "groups.primary.endpoints[region-a].cmaf_paths"
    assert reason == (
        'two tracks would share the path Streams(video-video-360p); rename one or use cmaf_paths = "template"'
    )


def test_local_ingest_takes_cmaf_on_template_paths_only(tmp_path: Path) -> None:
    import subprocess
    import sys

    profile = tmp_path / "cmaf.toml"
    profile.write_text(edited((REGION_A, REGION_A + '  format = "cmaf"\n')))
    result = subprocess.run([sys.executable, "-m", "orchestrator", "up", str(profile), "--local-ingest",
                             str(tmp_path / "archive"), "--duration", "1"], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert ('groups.primary.endpoints[region-a].cmaf_paths: the local publishing point takes CMAF on cmaf_paths = '
            '"template" only') in result.stderr  # fmt: skip
