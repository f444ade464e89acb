"""The profile builder: its defaults parse, each override lands where the profile reads it, and
the TOML is what an operator would write."""

from __future__ import annotations

import datetime as dt
from fractions import Fraction

import pytest

from orchestrator.profile import parse_profile
from orchestrator.testing.profiles import (
    EPOCH,
    Raw,
    audio,
    build_profile,
    endpoint,
    ffmpeg,
    group,
    ladder,
    profile_text,
    two_groups,
    video,
    write_profile,
)


def test_the_defaults_are_a_plain_two_group_loopback_profile():
    profile = build_profile(groups=two_groups(8080))
    p = profile.presentation
    assert (p.name, p.fragment_duration, p.epoch) == ("rig", Fraction(2), EPOCH)
    assert [(s.id, [t.kind for t in s.tracks]) for s in profile.streams] == [("video", ["video"]), ("audio", ["audio"])]
    assert list(profile.groups) == ["primary", "backup"]
    for g in profile.groups.values():
        assert g.encoder.backend == "synthetic"
        assert [(e.name, e.region, e.url) for e in g.endpoints] == [
            ("ingest", "here", "http://127.0.0.1:8080/live/rig.isml")
        ]
    assert profile.metrics.enabled is False
    assert profile.state.dir is None


def test_overrides_land_where_the_profile_reads_them(tmp_path):
    profile = build_profile(
        name="x", fragment_duration=4, epoch=dt.datetime(2025, 6, 1, tzinfo=dt.UTC),
        presentation={"tfxd_version": 2}, metrics={"listen": "127.0.0.1:0"}, state_dir=tmp_path / "state",
        streams={"av": [video("v", frame_rate=25, width=320, height=180), audio("a", sample_rate=44100, channels=1)]},
        groups={"primary": group(endpoint(1, name="a", region="r1"), endpoint(url="https://ingest.example/x.isml",
                                                                               name="b", region="r2"),
                                 encoder=ffmpeg(source=Raw('{ kind = "testpattern" }')), stall_fragments=2,
                                 max_backlog={"seconds": 30, "bytes": "64MiB"}),
                "backup": group(endpoint(2))},
    )  # fmt: skip
    p = profile.presentation
    assert (p.name, p.fragment_duration, p.epoch.year, p.tfxd_version) == ("x", Fraction(4), 2025, 2)
    (stream,) = profile.streams
    assert [(t.name, t.kind) for t in stream.tracks] == [("v", "video"), ("a", "audio")]
    assert stream.tracks[0].frame_rate == Fraction(25)
    assert stream.tracks[1].sample_rate == 44100
    primary = profile.groups["primary"]
    assert (primary.encoder.backend, primary.encoder.preset, primary.encoder.source.kind) == (
        "ffmpeg",
        "ultrafast",
        "testpattern",
    )
    assert primary.stall_fragments == 2
    assert primary.max_backlog.seconds == 30
    assert [e.url for e in primary.endpoints] == ["http://127.0.0.1:1/live/x.isml", "https://ingest.example/x.isml"]
    assert (profile.metrics.enabled, profile.metrics.listen) == (True, "127.0.0.1:0")
    assert profile.state.dir == tmp_path / "state"


def test_the_text_reads_like_a_profile_and_write_profile_writes_it(tmp_path):
    text = profile_text(groups=two_groups(9))
    assert text.startswith('[presentation]\nname = "rig"\nfragment_duration = 2\nepoch = 2026-01-01T00:00:00Z\n')
    assert '\n[groups.backup]\nencoder = { backend = "synthetic" }\n  [[groups.backup.endpoints]]\n' in text
    path = write_profile(tmp_path / "p.toml", groups=two_groups(9))
    assert path.read_text() == text
    assert parse_profile(text) == build_profile(groups=two_groups(9))


def test_the_ladder_is_three_streams_on_ffmpeg():
    profile = build_profile(**ladder(5))
    assert [s.id for s in profile.streams] == ["hi", "lo", "audio"]
    assert {g.encoder.backend for g in profile.groups.values()} == {"ffmpeg"}
    assert profile.groups["backup"].stall_fragments == 2


def test_an_endpoint_needs_a_port_or_a_url_not_both():
    with pytest.raises(ValueError, match="port or a url"):
        endpoint()
    with pytest.raises(ValueError, match="port or a url"):
        endpoint(1, url="http://127.0.0.1:1/x.isml")
