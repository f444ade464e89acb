"""The ffmpeg command line for one encoder instance: an argv list, never a shell string.

Theory of operation
-------------------
One ffmpeg process serves a whole group. The profile's tracks are first reduced to *encodes*
(:func:`plan_encodes`): a track that appears in several streams with identical settings (the
redundant audio of spec section 11, or audio bundled with the lowest video rendition and also
sent alone) is encoded once and its fragments go to every stream that carries it.

The source is decoded once and split in a filter graph: each video encode gets its own frame
rate (``fps``, constant frame rate) and size; each audio encode its own sample rate and channel
layout. Everything goes to a single fragmented MP4 on stdout, a fragment at every video keyframe
(``frag_keyframe``: our fragment boundaries) and at most ``FFMPEG_FRAGMENT_US`` of media between
them, so :mod:`orchestrator.encode.recut` has fragment k's last access units as soon as k+1's
keyframe is encoded (the audio's last frames at most 250 ms later) and cuts the real fragments
itself, at a few ffmpeg fragments per second instead of one per access unit.

Video is H.264 without B-frames (decode order = presentation order: nothing to re-time) and with
a keyframe forced, as an IDR, exactly on every shared-clock fragment boundary. ffmpeg's
``force_key_frames`` expression sees the output frame number ``n``, which the recutter maps to
shared frame ``anchor + n``; frame N opens a fragment iff ``floor(N*p/q) > floor((N-1)*p/q)``
with p/q = F/D (:func:`orchestrator.encode.recut.keyframe_boundary`). Shifting N by q adds exactly p to
both floors, so the anchor enters the expression modulo q and the numbers stay small.

The test pattern burns in the shared-clock time of each frame (``drawtext``, UTC time of day to
the millisecond): primary and backup show the same time on the same fragment and frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from orchestrator.clock import TrackClock
from orchestrator.encode.lock import (
    LIVE_TIMESCALE,
    LOCK_TOLERANCE,
    FileTiming,
    file_entries,
    live_clock_shift,
    pattern_box_x,
    tone_expression,
)
from orchestrator.encode.recut import anchor_frame, keyframe_boundary, start_index
from orchestrator.profile import AudioTrack, FileSource, LiveSource, PatternSource, Profile, VideoTrack

AAC_PRIMING_FRAMES = 1
"""ffmpeg's native AAC encoder delays its output by 1024 samples: one frame, dropped by the
recutter (tests/test_ffmpeg.py asks the installed ffmpeg and checks this)."""

SECONDS_PER_DAY = 86400
FFMPEG_FRAGMENT_US = 250_000
"""The longest fragment ffmpeg writes between two keyframes (its output, before the re-cut)."""
LIVE_ANALYZE_US = 1_000_000
"""How long ffmpeg looks at a live input before reading it (its default: 5 s)."""


@dataclass(frozen=True)
class Encode:
    """One track as ffmpeg encodes it: its presentation-wide track ID and every stream that carries it."""

    track: VideoTrack | AudioTrack
    clock: TrackClock
    track_id: int
    stream_ids: tuple[str, ...]

    @property
    def is_video(self) -> bool:
        return isinstance(self.track, VideoTrack)

    @property
    def destinations(self) -> tuple[tuple[str, int], ...]:
        return tuple((stream_id, self.track_id) for stream_id in self.stream_ids)


def plan_encodes(profile: Profile) -> list[Encode]:
    """The distinct encodes of the presentation (one per track ID): video first, then audio,
    in profile order."""
    found: dict[int, tuple[VideoTrack | AudioTrack, list[str]]] = {}
    for stream in profile.streams:
        for track_id, track in zip(profile.track_ids(stream), stream.tracks, strict=True):
            found.setdefault(track_id, (track, []))[1].append(stream.id)
    encodes = [Encode(track, profile.track_clock(track), track_id, tuple(streams))
               for track_id, (track, streams) in found.items()]  # fmt: skip
    return [e for e in encodes if e.is_video] + [e for e in encodes if not e.is_video]


def keyframe_expression(clock: TrackClock, anchor: int) -> str:
    """``force_key_frames`` expression: true on output frame n iff shared frame anchor+n opens a fragment."""
    ratio = keyframe_boundary(clock)
    p, q = ratio.numerator, ratio.denominator
    a = anchor % q
    return f"expr:gt(floor((n+{a})*{p}/{q}),floor((n+{a}-1)*{p}/{q}))"


def _rate(value: Fraction) -> str:
    return f"{value.numerator}/{value.denominator}"


def _clock_text(clock: TrackClock, anchor: int) -> str:
    """drawtext filter showing the shared-clock UTC time of day of each frame (ms)."""
    wall_ns = clock.wall_ns(clock.frame_time(anchor))
    of_day_ms = (wall_ns // 1_000_000) % (SECONDS_PER_DAY * 1000)
    offset = f"{of_day_ms // 1000}.{of_day_ms % 1000:03d}"
    # Filter-graph escaping: ':' inside the option value is escaped, the value is quoted.
    text = f"%{{pts\\:hms\\:{offset}}} UTC"
    return (f"drawtext=text='{text}':fontsize=h/10:fontcolor=white:box=1:boxcolor=black@0.6:"
            "boxborderw=8:x=(w-tw)/2:y=h-th-h/20")  # fmt: skip


def _start(encodes: Sequence[tuple[Encode, int]]) -> Fraction:
    """The shared-clock time (s, exact) of the earliest first frame among ``encodes``."""
    return min(a * e.clock.frame_duration for e, a in encodes)


def _lead(encode: Encode, anchor: int, start: Fraction) -> Fraction:
    """How far (s) this encode's first frame is after the input's start (>= 0 for files; may be
    a fraction of a frame below 0 for the pattern, whose input follows the biggest video track)."""
    return anchor * encode.clock.frame_duration - start


def _seconds(value: Fraction) -> str:
    return f"{float(value):.9f}"


@dataclass(frozen=True)
class FileInputs:
    """The ffconcat lists (paths) a locked file source is read through: one for the video
    tracks, one for the audio tracks (each starts at its own clock position)."""

    video: str | None
    audio: str | None


def file_playlists(source_path: str, timing: FileTiming, encodes: Sequence[Encode], anchors: Sequence[int]
                   ) -> tuple[str | None, str | None]:  # fmt: skip
    """The ffconcat texts for the video and the audio input of a locked file (see
    :mod:`orchestrator.encode.lock`): each opens the file at the clock position of its earliest
    track's anchor frame."""
    pairs = list(zip(encodes, anchors, strict=True))
    video = [(e, a) for e, a in pairs if e.is_video]
    audio = [(e, a) for e, a in pairs if not e.is_video]
    texts: list[str | None] = []
    for group in (video, audio):
        texts.append(file_entries(source_path, _start(group) % timing.loop, timing.loop) if group else None)
    return texts[0], texts[1]


@dataclass(frozen=True)
class InstancePlan:
    """Where an instance starts: each encode's anchor (the shared frame its first output frame
    is), the first fragment it emits, and for a file source the ffconcat texts (video, audio)."""

    anchors: tuple[int, ...]
    first_index: int
    playlists: tuple[str | None, str | None] | None


def plan_instance(encodes: Sequence[Encode], now_ns: int, requested: int, *, timing: FileTiming | None = None,
                  source_path: str = "") -> InstancePlan:  # fmt: skip
    """The pure start of an instance at wall-clock ``now_ns`` asked to start at fragment
    ``requested`` (the group's continuity): every encode's anchor is its first frame at or after
    now, the first fragment the one every track can fill from its first frame, and the playlists
    open the file at the clock position of the anchors (never at the first fragment's: frames
    between the anchor and the first fragment are encoded and discarded by the recutter)."""
    anchors = tuple(anchor_frame(e.clock, now_ns) for e in encodes)
    first = start_index([e.clock for e in encodes], anchors, requested)
    playlists = None if timing is None else file_playlists(source_path, timing, encodes, anchors)
    return InstancePlan(anchors, first, playlists)


def _inputs(source: PatternSource | FileSource | LiveSource, video: Sequence[tuple[Encode, int]],
            audio: Sequence[tuple[Encode, int]], url: str | None, files: FileInputs | None,
            burn_in: bool) -> list[str]:  # fmt: skip
    if isinstance(source, PatternSource):
        args: list[str] = []
        if video:
            biggest, anchor = max(video, key=lambda p: p[0].track.width * p[0].track.height)  # type: ignore[union-attr]
            track = biggest.track
            assert isinstance(track, VideoTrack)
            size, rate = f"{track.width}x{track.height}", _rate(track.frame_rate)
            # A still card (colour bars are the same every frame) and a box whose position is an
            # expression of the shared frame: every pixel is a function of n + anchor.
            box = f"color=c=white:size={max(8, track.height // 8)}x{max(8, track.height // 8)}:rate={rate}"
            graph = (f"smptehdbars=size={size}:rate={rate}[bars];{box}[box];"
                     f"[bars][box]overlay=x='{pattern_box_x(anchor)}':y=(main_h-overlay_h)/2:shortest=1")  # fmt: skip
            if burn_in:
                graph += "," + _frame_counter(anchor)
            args += ["-re", "-f", "lavfi", "-i", graph]
        if audio:
            encode, anchor = min(audio, key=lambda p: p[1] * p[0].clock.frame_duration)
            sample_rate: int = encode.track.sample_rate  # type: ignore[union-attr]
            first_sample = anchor * encode.clock.frame_duration * sample_rate
            assert first_sample.denominator == 1
            expression = tone_expression(int(first_sample), sample_rate, source.tone_hz)
            args += ["-re", "-f", "lavfi", "-i",
                     f"aevalsrc='{expression}':sample_rate={sample_rate}:channel_layout=mono"]  # fmt: skip
        return args
    if isinstance(source, FileSource):
        assert files is not None
        # -copyts keeps the concat demuxer's timestamps: 0 is the in-point, exactly.
        args = ["-copyts"]
        for playlist in (files.video, files.audio):
            if playlist is not None:
                args += ["-re", "-f", "concat", "-safe", "0", "-i", playlist]
        return args
    assert url is not None
    # Live input: the source's own timestamps (-copyts), mapped onto the shared clock in the
    # graph (lock.LiveLock), never the arrival time: every group maps a frame to the same tick.
    return ["-copyts", "-analyzeduration", str(LIVE_ANALYZE_US), "-i", url]


def _frame_counter(anchor: int) -> str:
    """drawtext filter showing the shared-clock frame number of each frame."""
    return (f"drawtext=text='%{{eif\\:n+{anchor}\\:d}}':fontsize=h/12:fontcolor=white:box=1:"
            "boxcolor=black@0.6:boxborderw=6:x=(w-tw)/2:y=h/20")  # fmt: skip


def cpu_quota(cpu_max: str | None) -> Fraction | None:
    """The CPUs a cgroup v2 ``cpu.max`` allows (``"200000 100000"``: 2), None for no quota
    (``"max 100000"``), no file, or text that is not a quota."""
    if cpu_max is None:
        return None
    parts = cpu_max.split()
    if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isdigit() or int(parts[1]) == 0:
        return None
    return Fraction(int(parts[0]), int(parts[1]))


def ffmpeg_threads(setting: int | str, quota: Fraction | None, usable_cpus: int) -> int:
    """Threads for one ffmpeg instance. x264 and the filter graph size their pools to the cores
    the machine has, which in a container are the node's (dozens), not the CPU limit: the CFS
    quota then throttles them all together and the live encoder falls behind the clock. ``auto``
    is the quota rounded up (at least 1), else the CPUs this process may run on."""
    if setting != "auto":
        return int(setting)
    if quota is not None:
        return max(1, min(usable_cpus, -(-quota.numerator // quota.denominator)))
    return max(1, usable_cpus)


def build_argv(
    executable: str | Path,
    profile: Profile,
    source: PatternSource | FileSource | LiveSource,
    encodes: Sequence[Encode],
    anchors: Sequence[int],
    *,
    preset: str,
    burn_in: bool,
    live_url: str | None = None,
    files: FileInputs | None = None,
    live_offset: int | None = None,
    probe_delivered: bool = False,
    threads: int | None = None,
) -> list[str]:
    """The whole argv. ``anchors[i]`` is the shared frame that encode i's first output frame is;
    ``files`` the ffconcat lists a file source is read through (:func:`file_playlists`);
    ``live_offset`` the effective offset of a live source's lock (:class:`LiveLock.effective`);
    ``probe_delivered``: the first video encode's fragment-opening frames pass a ``showinfo``
    (on stderr, at info level: the frame's ``pts`` is its output frame, ``pos`` the byte position
    of the file packet it was decoded from), so the content offset is measured, not restated.
    ``threads`` bounds the encoders' and the filter graph's threads (:func:`ffmpeg_threads`)."""
    video = [(e, a) for e, a in zip(encodes, anchors, strict=True) if e.is_video]
    audio = [(e, a) for e, a in zip(encodes, anchors, strict=True) if not e.is_video]
    video_input = "0:v:0"
    audio_input = "1:a:0" if not isinstance(source, LiveSource) and video else "0:a:0"
    if isinstance(source, PatternSource) and video:
        biggest = max(video, key=lambda p: p[0].track.width * p[0].track.height)  # type: ignore[union-attr]
        video_start = biggest[1] * biggest[0].clock.frame_duration
    elif video:
        video_start = _start(video)
    audio_start = _start(audio) if audio else Fraction(0)

    graph: list[str] = []
    if video:
        first = video[0][0].clock
        pre = _clock_text(first, video[0][1]) + "," if isinstance(source, PatternSource) and burn_in else ""
        if isinstance(source, LiveSource):
            assert live_offset is not None
            pre = f"setpts={live_clock_shift(live_offset)},"
        labels = "".join(f"[vsrc{i}]" for i in range(len(video)))
        if isinstance(source, LiveSource):
            # A jump of the source's timestamps (the sender restarted) is reported at once on
            # stderr (a showinfo behind a select of the frames that jump), so the instance ends
            # and re-locks instead of waiting for the stall watchdog.
            jump = LOCK_TOLERANCE // LIVE_TIMESCALE
            graph.append(f"[{video_input}]{pre}split={len(video) + 1}{labels}[jump];"
                         f"[jump]select='gt(abs(pts-prev_pts)*TB,{jump})',showinfo,nullsink")  # fmt: skip
        else:
            graph.append(f"[{video_input}]{pre}split={len(video)}{labels}")
        for i, (e, a) in enumerate(video):
            t = e.track
            assert isinstance(t, VideoTrack)
            lead = _lead(e, a, video_start)
            if isinstance(source, LiveSource):
                # The input is on the shared clock (seconds since the epoch): fps slots are
                # shared frames; the first is the anchor.
                rate = f"fps={_rate(t.frame_rate)}:start_time={_seconds(a * e.clock.frame_duration)}"
            else:
                # Output frame m is the input at m*F after this encode's first frame: fps slots
                # counted from 0, after shifting this encode's first frame to 0.
                shift = f"setpts=PTS-{_seconds(lead)}/TB," if lead else ""
                rate = f"{shift}fps={_rate(t.frame_rate)}:start_time=0"
            if probe_delivered and i == 0:
                select = keyframe_expression(e.clock, a).removeprefix("expr:")
                graph.append(f"[vsrc{i}]{rate},split=2[vfps{i}][probe];[probe]select='{select}',showinfo,nullsink")
                graph.append(f"[vfps{i}]scale={t.width}:{t.height},format=yuv420p[v{i}]")
            else:
                graph.append(f"[vsrc{i}]{rate},scale={t.width}:{t.height},format=yuv420p[v{i}]")
    if audio:
        labels = "".join(f"[asrc{i}]" for i in range(len(audio)))
        graph.append(f"[{audio_input}]asplit={len(audio)}{labels}")
        for i, (e, a) in enumerate(audio):
            t = e.track
            assert isinstance(t, AudioTrack)
            if isinstance(source, LiveSource):
                assert live_offset is not None
                # On the shared clock, cut at this encode's first frame; aresample keeps the
                # samples on their timestamps across gaps in the source.
                resample = (f"asetpts={live_clock_shift(live_offset)},"
                            f"atrim=start={_seconds(a * e.clock.frame_duration)},aresample=async=1000,")  # fmt: skip
            elif isinstance(source, FileSource):
                # Samples before this encode's first frame (the in-point's pre-roll) are cut exactly.
                resample = f"atrim=start={_seconds(_lead(e, a, audio_start))},asetpts=PTS-STARTPTS,"
            else:
                resample = ""
            graph.append(f"[asrc{i}]{resample}aresample={t.sample_rate},"
                         f"aformat=sample_fmts=fltp:channel_layouts={'mono' if t.channels == 1 else 'stereo'}"
                         f"[a{i}]")  # fmt: skip

    level = "level+info" if probe_delivered or (isinstance(source, LiveSource) and video) else "level+warning"
    argv = [str(executable), "-hide_banner", "-nostdin", "-nostats", "-loglevel", level]
    argv += _inputs(source, video, audio, live_url, files, burn_in)
    if threads is not None:
        argv += ["-filter_complex_threads", str(threads)]
    argv += ["-filter_complex", ";".join(graph)]
    for i in range(len(video)):
        argv += ["-map", f"[v{i}]"]
    for i in range(len(audio)):
        argv += ["-map", f"[a{i}]"]
    if video:
        argv += ["-c:v", "libx264", "-preset", preset, "-tune", "zerolatency", "-bf", "0", "-forced-idr", "1",
                 "-x264-params", "scenecut=0:open-gop=0"]  # fmt: skip
    for i, (e, anchor) in enumerate(video):
        t = e.track
        assert isinstance(t, VideoTrack)
        per_fragment = e.clock.frame_count(0) + 1
        argv += [f"-b:v:{i}", str(t.bitrate), f"-maxrate:v:{i}", str(t.bitrate), f"-bufsize:v:{i}", str(t.bitrate),
                 f"-g:v:{i}", str(2 * per_fragment),
                 f"-force_key_frames:v:{i}", keyframe_expression(e.clock, anchor)]  # fmt: skip
    if audio:
        argv += ["-c:a", "aac"]
    if threads is not None:
        argv += ["-threads", str(threads)]
    for i, (e, _) in enumerate(audio):
        argv += [f"-b:a:{i}", str(e.track.bitrate)]
    # ffmpeg's own fragments: one at every video keyframe (our fragment boundaries: the last frame
    # of fragment k goes out as soon as k+1's keyframe is encoded) and at most FFMPEG_FRAGMENT_US
    # of media in between (the audio's last frames of k, and a bound on the delay). One small
    # fragment per access unit (-frag_duration 1) cost the orchestrator 14 % of ffmpeg's CPU in
    # parsing (bench/encoder_cpu.py).
    argv += ["-f", "mp4", "-movflags", "empty_moov+default_base_moof+skip_trailer+frag_keyframe",
             "-frag_duration", str(FFMPEG_FRAGMENT_US),
             "-flush_packets", "1", "pipe:1"]  # fmt: skip
    return argv


def priming_frames(encode: Encode) -> int:
    return 0 if encode.is_video else AAC_PRIMING_FRAMES
