"""The ffmpeg argv, the encode plan, the ffmpeg profile keys and the shell's small pieces."""

from __future__ import annotations

import logging
import signal
import stat
from fractions import Fraction
from pathlib import Path

import pytest
import trio

from orchestrator.encode.ffmpeg import STDERR_BURST, STDERR_PERIOD, FfmpegExited, _StderrLog, find_ffmpeg
from orchestrator.encode.ffmpeg_command import (
    FileInputs,
    build_argv,
    cpu_quota,
    ffmpeg_threads,
    keyframe_expression,
    plan_encodes,
)
from orchestrator.errors import EncoderError, ProfileError
from orchestrator.profile import FileSource, LiveSource, PatternSource, load_profile, parse_profile
from orchestrator.testing import profiles


def ladder(extra: str = ""):
    """The presentation of tests/test_ffmpeg.py; ``extra`` replaces the primary's encoder options."""
    text = profiles.profile_text(**profiles.ladder(1))
    if extra:
        text = text.replace('backend = "ffmpeg", preset = "ultrafast" }', f'backend = "ffmpeg"{extra} }}', 1)
    return parse_profile(text, "ladder.toml")


def test_identical_tracks_are_encoded_once_for_every_stream_that_carries_them():
    encodes = plan_encodes(ladder())
    assert [(e.track.name, e.destinations) for e in encodes] == [
        ("video_360p", (("hi", 1),)),
        ("video_180p", (("lo", 2),)),
        ("audio_eng", (("lo", 3), ("audio", 3))),  # one track of the presentation: one ID everywhere
    ]


def test_keyframe_expression_reduces_the_anchor_modulo_the_ratio_denominator():
    clock = plan_encodes(ladder())[0].clock  # F/D = 1001/60000
    assert keyframe_expression(clock, 60000 * 7 + 42) == "expr:gt(floor((n+42)*1001/60000),floor((n+42-1)*1001/60000))"


def test_argv_for_the_test_pattern():
    profile = ladder()
    encodes = plan_encodes(profile)
    source = profile.groups["primary"].encoder.source
    argv = build_argv("/opt/ffmpeg", profile, source, encodes, [100, 100, 200], preset="veryfast", burn_in=False)
    assert argv[0] == "/opt/ffmpeg"
    assert all(isinstance(a, str) for a in argv)
    # Every pixel and every sample a function of the shared frame / sample number (lock.py):
    # the box is at shared frame 100, the tone at shared sample 200 * 1024 = 204800.
    assert argv[argv.index("-i") + 1] == (
        "smptehdbars=size=640x360:rate=30000/1001[bars];color=c=white:size=45x45:rate=30000/1001[box];"
        "[bars][box]overlay=x='(main_w-overlay_w)*abs(mod(n+100,120)-60)/60':y=(main_h-overlay_h)/2:shortest=1"
    )
    assert "aevalsrc='0.5*sin(2*PI*1000*mod(n+12800,48000)/48000)*lt(mod(n+12800,48000),4800)'" \
           ":sample_rate=48000:channel_layout=mono" in argv  # fmt: skip
    graph = argv[argv.index("-filter_complex") + 1]
    assert graph == (
        "[0:v:0]split=2[vsrc0][vsrc1];"
        "[vsrc0]fps=30000/1001:start_time=0,scale=640:360,format=yuv420p[v0];"
        "[vsrc1]fps=30000/1001:start_time=0,scale=320:180,format=yuv420p[v1];"
        "[1:a:0]asplit=1[asrc0];"
        "[asrc0]aresample=48000,aformat=sample_fmts=fltp:channel_layouts=stereo[a0]"
    )
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-map"] == ["[v0]", "[v1]", "[a0]"]
    assert argv[argv.index("-b:v:1") + 1] == "150000"
    assert argv[argv.index("-b:a:0") + 1] == "96000"
    assert argv[argv.index("-bf") + 1] == "0"
    assert argv[argv.index("-force_key_frames:v:0") + 1] == keyframe_expression(encodes[0].clock, 100)
    assert argv[-1] == "pipe:1"
    assert "drawtext" not in graph
    with_counter = build_argv("ffmpeg", profile, source, encodes, [100, 100, 200], preset="veryfast", burn_in=True)
    assert with_counter[with_counter.index("-i") + 1].endswith(
        ",drawtext=text='%{eif\\:n+100\\:d}':fontsize=h/12:fontcolor=white:box=1:boxcolor=black@0.6:"
        "boxborderw=6:x=(w-tw)/2:y=h/20")  # fmt: skip


def test_burn_in_shows_the_shared_clock_time_of_the_anchor_frame():
    profile = ladder()
    encodes = plan_encodes(profile)
    clock = encodes[0].clock
    anchor = clock.first_frame(1000)  # frame 59941: 2000.0314 s after midnight UTC, 2026-01-01
    argv = build_argv("ffmpeg", profile, PatternSource(kind="testpattern"), encodes, [anchor, anchor, 0],
                      preset="veryfast", burn_in=True)  # fmt: skip
    graph = argv[argv.index("-filter_complex") + 1]
    assert graph.startswith("[0:v:0]drawtext=text='%{pts\\:hms\\:2000.031} UTC':")


def test_file_and_live_sources():
    profile = ladder()
    encodes = plan_encodes(profile)
    files = FileInputs("/tmp/v.ffconcat", "/tmp/a.ffconcat")
    argv = build_argv("ffmpeg", profile, FileSource(kind="file", path=Path("in.mp4")), encodes, [300, 300, 200],
                      preset="fast", burn_in=True, files=files)  # fmt: skip
    # The file is read through the clock-locked ffconcat lists (lock.py), not -stream_loop.
    assert argv[6:20] == ["-copyts", "-re", "-f", "concat", "-safe", "0", "-i", "/tmp/v.ffconcat",
                          "-re", "-f", "concat", "-safe", "0", "-i", "/tmp/a.ffconcat"][:14]  # fmt: skip
    assert "-stream_loop" not in argv
    graph = argv[argv.index("-filter_complex") + 1]
    assert "[vsrc0]fps=30000/1001:start_time=0,scale=640:360" in graph
    assert "[1:a:0]asplit=1[asrc0];[asrc0]atrim=start=0.000000000,asetpts=PTS-STARTPTS,aresample=48000," in graph
    live = LiveSource(kind="live", url="srt://127.0.0.1:9000?mode=caller")
    argv = build_argv("ffmpeg", profile, live, encodes, [300, 300, 200], preset="fast", burn_in=True,
                      live_url=live.resolve(), live_offset=2_541_394_470_267)  # fmt: skip
    # The source's own timestamps, shifted onto the shared clock (lock.LiveLock), never arrival time.
    assert argv[argv.index("-i") - 3 : argv.index("-i") + 2] == [
        "-copyts", "-analyzeduration", "1000000", "-i", "srt://127.0.0.1:9000?mode=caller"]  # fmt: skip
    assert "-use_wallclock_as_timestamps" not in argv
    graph = argv[argv.index("-filter_complex") + 1]
    # ... and one more branch that reports (showinfo, at info level) a frame whose timestamp jumps by more than
    # the lock's 10 s: the instance ends and re-locks at once.
    assert graph.startswith("[0:v:0]setpts=PTS+2541394470267/90000/TB,split=3[vsrc0][vsrc1][jump];"
                            "[jump]select='gt(abs(pts-prev_pts)*TB,10)',showinfo,nullsink;")  # fmt: skip
    assert argv[argv.index("-loglevel") + 1] == "level+info"
    assert "[vsrc0]fps=30000/1001:start_time=10.010000000,scale=640:360" in graph  # frame 300 = 10.01 s
    assert "[asrc0]asetpts=PTS+2541394470267/90000/TB,atrim=start=4.266666667,aresample=async=1000," in graph


def test_tracks_with_different_anchors_share_one_file_input_each_shifted_to_its_own_first_frame():
    """A 15 fps rendition starts at its own first frame: the input opens at the earliest track's
    position and the later one is shifted (setpts) before its frame-rate conversion."""
    text = profiles.profile_text(**profiles.ladder(1)).replace(
        'frame_rate = "30000/1001"\n\n[[streams]]\nid = "lo"', 'frame_rate = "30000/1001"\n\n[[streams]]\nid = "lo"', 1
    )
    text = text.replace(
        'width = 320\n  height = 180\n  frame_rate = "30000/1001"', 'width = 320\n  height = 180\n  frame_rate = "15"'
    )
    profile = parse_profile(text, "ladder.toml")
    encodes = plan_encodes(profile)
    # 29.97 fps frame 30 is at 1.001 s; 15 fps frame 16 at 1.0667 s: 0.0657 s later.
    argv = build_argv("ffmpeg", profile, FileSource(kind="file", path=Path("in.mp4")), encodes, [30, 16, 47],
                      preset="fast", burn_in=False, files=FileInputs("v", "a"))  # fmt: skip
    graph = argv[argv.index("-filter_complex") + 1]
    assert "[vsrc0]fps=30000/1001:start_time=0," in graph
    assert "[vsrc1]setpts=PTS-0.065666667/TB,fps=15/1:start_time=0," in graph


def test_profile_keys_for_ffmpeg():
    encoder = ladder(', preset = "fast", source = { kind = "file", path = "clip.mp4" }').groups["primary"].encoder
    assert encoder.backend == "ffmpeg"
    assert encoder.preset == "fast"
    assert encoder.source == FileSource(kind="file", path=Path("clip.mp4"))
    assert ladder().groups["backup"].encoder.source == PatternSource(kind="testpattern")
    with pytest.raises(ProfileError) as error:
        ladder(', preset = "placebo"')
    assert str(error.value).startswith("ladder.toml: groups.primary.encoder.preset: ")


def test_a_live_url_with_a_secret_must_come_from_the_environment():
    with pytest.raises(ProfileError) as error:
        ladder(', source = { kind = "live", url = "srt://h:9000?passphrase=hunter22hunter22" }')
    assert "environment variable" in str(error.value)
    assert "hunter22" not in str(error.value).split("input_value")[0]
    source = ladder(', source = { kind = "live", url_env = "CAMERA_URL" }').groups["primary"].encoder.source
    assert isinstance(source, LiveSource)
    assert source.resolve({"CAMERA_URL": "srt://h:9000?passphrase=x"}) == "srt://h:9000?passphrase=x"
    with pytest.raises(ValueError, match="CAMERA_URL is not set"):
        source.resolve({})


def test_find_ffmpeg_takes_the_configured_path_or_says_why_not(tmp_path):
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\n")
    with pytest.raises(EncoderError, match="is not an executable file"):
        find_ffmpeg(fake)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    assert find_ffmpeg(fake) == str(fake)
    with pytest.raises(EncoderError, match="is not an executable file"):
        find_ffmpeg(tmp_path / "missing")


def test_find_ffmpeg_returns_none_when_there_is_none(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "imageio_ffmpeg", None)  # the extra is not installed
    assert find_ffmpeg(None) is None


def test_exit_error_names_the_signal_and_the_last_stderr_lines():
    error = FfmpegExited(-signal.SIGKILL, ["a", "b"])
    assert error.exit_code == -9
    assert str(error) == "ffmpeg killed by SIGKILL; last stderr: a | b"
    assert str(FfmpegExited(1, [])) == "ffmpeg exited with code 1; last stderr: (nothing on stderr)"


def test_demo_profile_runs_ffmpeg_with_the_synthetic_fallback():
    demo = load_profile(Path(__file__).resolve().parents[2] / "profiles" / "demo.toml")
    for group in demo.groups.values():
        assert group.encoder.backend == "ffmpeg"
        assert group.encoder.fallback == "synthetic"


async def test_stderr_is_logged_at_most_a_burst_per_period_and_the_tail_kept(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="orchestrator.encode.ffmpeg")
    log = _StderrLog("primary")
    for i in range(STDERR_BURST + 30):
        log.line(f"line {i}")
    logged = [r.getMessage() for r in caplog.records if "ffmpeg.stderr " in r.getMessage()]
    assert len(logged) == STDERR_BURST
    assert list(log.tail)[-1] == f"line {STDERR_BURST + 29}"
    await trio.sleep(STDERR_PERIOD)
    log.line("after the period")
    messages = [r.getMessage() for r in caplog.records]
    assert "ffmpeg.stderr.suppressed group=primary lines=30" in messages
    assert messages[-1] == "ffmpeg.stderr group=primary line='after the period'"


class _Collecting:
    def __init__(self):
        self.fragments = []

    def header(self, header):
        pass

    def fragment(self, fragment):
        self.fragments.append(fragment)


@pytest.mark.parametrize("keyframe", [True, False])
def test_a_video_fragment_that_does_not_open_with_a_keyframe_is_rejected_counted_and_not_sent(keyframe, caplog):
    """The ffmpeg shell's check (the recutter only flags the cut): a rejected fragment reaches no
    stream, is logged as ``reason=no_keyframe`` and counted per stream that carries the track."""
    from orchestrator.encode.ffmpeg import _Recut
    from orchestrator.encode.recut import Cut
    from orchestrator.fmp4.boxes import Sample
    from orchestrator.ops.metrics import Metrics

    profile = ladder()
    encodes = plan_encodes(profile)
    video = encodes[1]  # video_180p, carried by stream "lo"
    assert video.is_video
    assert video.stream_ids == ("lo",)
    sink, metrics = _Collecting(), Metrics()
    frames = tuple(Sample(b"x", 3003, is_sync=(i == 0 and keyframe)) for i in range(60))
    index = 10
    cut = Cut(index, video.clock.start(index), frames, starts_with_keyframe=keyframe)

    # Wall time at the fragment's end: not behind the clock.
    class AtFragmentEnd:
        def now_ns(self):
            return video.clock.end_ns(index)

    recut = _Recut(profile, encodes, [], sink, group="primary", wall=AtFragmentEnd(), metrics=metrics)
    with caplog.at_level(logging.ERROR):
        recut._emit(video, cut)
    rejected = metrics.registry.get_sample_value(
        "orchestrator_encoder_rejected_fragments_total", {"stream": "lo", "group": "primary", "reason": "no_keyframe"}
    )
    if keyframe:
        assert [(f.stream_id, f.index) for f in sink.fragments] == [("lo", index)]
        assert not rejected
    else:
        assert sink.fragments == []
        assert rejected == 1
        assert any("reason=no_keyframe" in r.getMessage() for r in caplog.records)


async def test_a_probed_file_source_reports_each_fragments_first_picture_and_the_log_reads_it():
    profile = ladder()
    encodes = plan_encodes(profile)
    argv = build_argv("ffmpeg", profile, FileSource(kind="file", path=Path("clip.mp4")), encodes, [100, 100, 200],
                      preset="veryfast", burn_in=False, files=FileInputs("v.ffconcat", "a.ffconcat"),
                      probe_delivered=True)  # fmt: skip
    assert argv[argv.index("-loglevel") + 1] == "level+info"
    graph = argv[argv.index("-filter_complex") + 1]
    select = keyframe_expression(encodes[0].clock, 100).removeprefix("expr:")
    assert f"split=2[vfps0][probe];[probe]select='{select}',showinfo,nullsink;[vfps0]scale=640:360" in graph
    seen = []
    log = _StderrLog("primary", lambda m, pos: seen.append((m, pos)))
    log.line("[Parsed_showinfo_5 @ 0x55d0c0a1b2c0] [info] n:   3 pts:    250 pts_time:8.34167 duration:1 "
             "pos:   123456 fmt:yuv420p sar:1/1 s:640x360 i:P iskey:1 type:I checksum:CA8E6229")  # fmt: skip
    log.line("[info] Stream mapping:")
    log.line("[h264 @ 0x1] [warning] something")
    assert seen == [(250, 123456)]
    assert list(log.tail) == ["[h264 @ 0x1] [warning] something"]  # info lines are not ffmpeg's last words


# --- ffmpeg threads bounded to the CPUs the process may use (issue 19: a 1-CPU pod on a big node) --


@pytest.mark.parametrize(
    ("cpu_max", "quota"),
    [("200000 100000\n", Fraction(2)), ("150000 100000", Fraction(3, 2)), ("max 100000\n", None), (None, None),
     ("", None), ("garbage", None), ("100000 0", None)],
)  # fmt: skip
def test_the_cgroup_quota_is_read_from_cpu_max(cpu_max, quota):
    assert cpu_quota(cpu_max) == quota


@pytest.mark.parametrize(
    ("setting", "quota", "usable", "threads"),
    [
        ("auto", Fraction(1), 64, 1),  # a 1-CPU pod on a 64-core node: 1, not 64
        ("auto", Fraction(3, 2), 64, 2),  # rounded up
        ("auto", Fraction(1, 2), 64, 1),  # never 0
        ("auto", Fraction(8), 4, 4),  # never more than the CPUs it may run on
        ("auto", None, 6, 6),  # no quota: the CPUs of its affinity mask
        (3, Fraction(1), 64, 3),  # the profile's number wins
    ],
)
def test_ffmpeg_threads_follow_the_quota_not_the_node(setting, quota, usable, threads):
    assert ffmpeg_threads(setting, quota, usable) == threads


def test_the_thread_bound_reaches_the_argv_before_the_output():
    profile = ladder()
    encodes = plan_encodes(profile)
    source = profile.groups["primary"].encoder.source
    argv = build_argv("ffmpeg", profile, source, encodes, [100, 100, 200], preset="veryfast", burn_in=False, threads=2)
    assert argv[argv.index("-threads") + 1] == "2"
    assert argv[argv.index("-filter_complex_threads") + 1] == "2"
    assert argv.index("-threads") > argv.index("-c:v")  # an output option: applies to the encoders
    assert argv.index("-threads") < len(argv) - 1
    unbounded = build_argv("ffmpeg", profile, source, encodes, [100, 100, 200], preset="veryfast", burn_in=False)
    assert "-threads" not in unbounded
    assert "-filter_complex_threads" not in unbounded


def test_the_profile_takes_a_thread_count_or_auto():
    assert ladder().groups["primary"].encoder.threads == "auto"
    assert ladder(", threads = 2").groups["primary"].encoder.threads == 2
    with pytest.raises(ProfileError, match=r"groups\.primary\.encoder"):
        ladder(", threads = 0")
