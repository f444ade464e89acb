"""ffmpeg encoder instances: find ffmpeg, run it, and re-cut its output onto the shared clock.

A thin trio shell around :mod:`orchestrator.encode.ffmpeg_command` (the argv) and
:mod:`orchestrator.encode.recut` (the timing). :func:`run_ffmpeg_encoder` is an instance runner for
:class:`~orchestrator.encode.group.GroupEncoder`, which restarts it when it ends, fails or stalls:

* ffmpeg is started with an argv list (never a shell), in its own session and process group
  (so only the orchestrator stops it, never a Ctrl-C aimed at the terminal's foreground group),
  and its stdout read incrementally by
  :class:`~orchestrator.fmp4.reader.StreamReader`; the first moov gives every stream's header;
* each access unit goes to its track's recutter; each completed fragment is checked (a video
  fragment must open with a keyframe, else it is rejected, logged and counted) and handed to
  the group encoder once per stream that carries the track;
* stderr goes to the log, at most ``STDERR_BURST`` lines per ``STDERR_PERIOD`` seconds, and the
  last lines are kept for the error raised when ffmpeg exits: :class:`FfmpegExited` carries the
  exit code (negative: killed by that signal), which the group encoder logs and exports;
* an instance whose fragments fall more than ``2 x D + 1 s`` behind the shared clock (an
  overloaded host, a source slower than real time) raises, so the restart re-aligns it;
* file source: ffmpeg reports on stderr (``showinfo``) the file packet each fragment's first
  picture came from, and the content offset metric is that picture against the lock's;
* live source: the peers' mappings are read every ``PEER_CHECK`` seconds (:func:`_converge`);
  a group not on the agreed one (lock.converge) ends the instance at the next fragment boundary
  and the restart runs on it; the same reading says per peer whether the mapping agrees
  (lock.peer_agreement), which /status shows per stream; a jump of the source's timestamps
  reported by ffmpeg ends the instance at once, and the restart re-locks.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.clock import NS_PER_SECOND
from orchestrator.encode.ffmpeg_command import (
    LIVE_ANALYZE_US,
    Encode,
    FileInputs,
    build_argv,
    cpu_quota,
    ffmpeg_threads,
    plan_encodes,
    plan_instance,
    priming_frames,
)
from orchestrator.encode.instance import Sink
from orchestrator.encode.lock import (
    LIVE_TIMESCALE,
    LOCK_TOLERANCE,
    PTS_WRAP,
    FileTiming,
    LiveLock,
    choose_live_lock,
    content_offset_ns,
    converge,
    file_timing,
    measured_offset_frames,
    peer_agreement,
)
from orchestrator.encode.recut import Cut, TrackRecutter
from orchestrator.encode.statefile import read_state, write_state
from orchestrator.errors import EncoderError, FileLockError, SourceError
from orchestrator.fmp4 import boxes
from orchestrator.fmp4.reader import NEED_DATA, Fragment, Header, StreamReader
from orchestrator.fmp4.stream import EncodedFragment
from orchestrator.ops.metrics import LIVE_LOCK_ESTABLISHED_METRIC, LIVE_LOCK_METRIC, Metrics
from orchestrator.ops.state import EncoderState, PeerAgreement
from orchestrator.profile import FfmpegEncoder, FileSource, LiveSource, PatternSource, Profile
from orchestrator.wallclock import WallClock
from orchestrator.wire.smooth import build_header, write_fragment

log = logging.getLogger(__name__)

HOW_TO_GET_FFMPEG = (
    "install ffmpeg with libx264 (Debian/Ubuntu: apt-get install ffmpeg), "
    "or pip install 'orchestrator[ffmpeg]' for a static build, or set encoder.path"
)
STDERR_BURST = 20
STDERR_PERIOD = 10.0
STDERR_TAIL = 20
TERMINATE_GRACE = 2.0
READ_SIZE = 256 * 1024


class FfmpegExited(EncoderError):
    """ffmpeg ended. ``exit_code`` is negative when a signal killed it."""

    def __init__(self, exit_code: int, stderr_tail: Sequence[str]) -> None:
        self.exit_code = exit_code
        self.stderr_tail = list(stderr_tail)
        how = f"killed by {_signal_name(-exit_code)}" if exit_code < 0 else f"exited with code {exit_code}"
        last = " | ".join(self.stderr_tail[-5:]) or "(nothing on stderr)"
        super().__init__(f"ffmpeg {how}; last stderr: {last}")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def find_ffmpeg(configured: Path | None) -> str | None:
    """The ffmpeg to run: ``configured`` (which must exist), else ``ffmpeg`` on PATH, else the
    executable shipped by the optional ``imageio-ffmpeg`` wheel; None when there is none."""
    if configured is not None:
        if not (configured.is_file() and os.access(configured, os.X_OK)):
            raise EncoderError(f"{configured} is not an executable file")
        return str(configured)
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg  # type: ignore[import-not-found,import-untyped,unused-ignore]  # optional extra
    except ImportError:
        return None
    try:
        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except RuntimeError:
        return None


@functools.cache
def supports_burn_in(executable: str) -> bool:
    """Whether this ffmpeg can draw text (drawtext needs libfreetype and a font). Asked once, at
    planning time, by drawing on one tiny frame."""
    argv = [executable, "-hide_banner", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
            "color=size=64x64:duration=0.04", "-vf", "drawtext=text=0", "-frames:v", "1",
            "-f", "null", "-"]  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@dataclass(frozen=True)
class FfmpegPlan:
    """What a group's ffmpeg instances need, resolved before going live."""

    executable: str
    config: FfmpegEncoder
    burn_in: bool
    live_url: str | None = None
    file_timing: FileTiming | None = None
    threads: int | None = None  # per instance (ffmpeg_command.ffmpeg_threads)


SHOWINFO = re.compile(r"\[Parsed_showinfo_\d+ @ [^]]+\] \[info\] n:\s*\d+ pts:\s*(-?\d+) .*?pos:\s*(-?\d+)")
"""A line of the ``showinfo`` probe (ffmpeg_command.build_argv): output frame (pts), file position."""


class _StderrLog:
    """ffmpeg's stderr into the log, rate-limited, keeping the last lines for the exit error.
    Lines at ffmpeg's info level (``-loglevel level+info``, asked for when the delivered frames
    are probed) go to the debug log; the probe's frame lines go to ``on_frame``."""

    def __init__(self, group: str, on_frame: Callable[[int, int], None] | None = None) -> None:
        self.group = group
        self.on_frame = on_frame
        self.tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self._window_start = -STDERR_PERIOD
        self._in_window = 0
        self._suppressed = 0

    def line(self, text: str) -> None:
        if "[info] " in text:
            frame = SHOWINFO.search(text)
            if frame is not None and self.on_frame is not None:
                self.on_frame(int(frame[1]), int(frame[2]))
            elif frame is None:
                log.debug("ffmpeg.stderr group=%s line=%r", self.group, text)
            return
        self.tail.append(text)
        now = trio.current_time()
        if now - self._window_start >= STDERR_PERIOD:
            if self._suppressed:
                log.warning("ffmpeg.stderr.suppressed group=%s lines=%d", self.group, self._suppressed)
            self._window_start, self._in_window, self._suppressed = now, 0, 0
        if self._in_window < STDERR_BURST:
            self._in_window += 1
            log.warning("ffmpeg.stderr group=%s line=%r", self.group, text)
        else:
            self._suppressed += 1

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        """Read stderr to its end. Cancellation: stops reading."""
        pending = b""
        while chunk := await stream.receive_some(READ_SIZE):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                text = raw.decode("utf-8", "replace").rstrip("\r")
                if text:
                    self.line(text)
        if pending.strip():
            self.line(pending.decode("utf-8", "replace"))


class _Recut:
    """The instance's output side: header once, then fragments per stream (see module doc)."""

    def __init__(self, profile: Profile, encodes: list[Encode], recutters: list[TrackRecutter], sink: Sink,
                 *, group: str, wall: WallClock, metrics: Metrics | None) -> None:  # fmt: skip
        self.profile = profile
        self.encodes = encodes
        self.recutters = recutters
        self.sink = sink
        self.group = group
        self.wall = wall
        self.metrics = metrics
        self.header_seen = False
        self.loop: Fraction | None = None
        self.live_lock: LiveLock | None = None
        # The measured content offset (file sources): the first video encode's output frames as
        # ffmpeg reported them (showinfo: output frame m -> file byte position -> file frame).
        self.probed: tuple[Encode, int, FileTiming] | None = None  # encode, its anchor, the file
        self._frame_at: dict[int, int] = {}  # file byte position -> file frame
        self._delivered: dict[int, int] = {}  # output frame m -> file frame
        # /status shows each stream's lock and the content offset of its first track. The group
        # encoder (the sink) keeps the per-stream state; a sink without one (tests) shows nothing.
        self.states: dict[str, EncoderState] = getattr(sink, "states", {})
        self.first_tracks = {stream.id: profile.track_ids(stream)[0] for stream in profile.streams}
        self.lock_origin = "pattern"
        self.move_to: LiveLock | None = None  # set by _converge: end at the next fragment boundary
        self.moved = False  # that boundary was reached: nothing more is emitted, the instance ends
        self.peers: tuple[PeerAgreement, ...] = ()  # the live lock against each peer (set_peers)
        d = profile.presentation.fragment_duration
        self.max_lag_ns = 2 * d.numerator * NS_PER_SECOND // d.denominator + NS_PER_SECOND

    def set_peers(self, agreement: tuple[PeerAgreement, ...]) -> None:
        """Whether the live lock agrees with each peer (lock.peer_agreement), and the lock's origin
        as of that reading, for /status: every stream, at once (not at the next fragment)."""
        self.peers = agreement
        for state in self.states.values():
            state.peers = agreement
            if self.live_lock is not None:
                state.lock = self.lock_origin

    def probe(self, encode: Encode, anchor: int, timing: FileTiming) -> None:
        self.probed = (encode, anchor, timing)
        self._frame_at = {pos: j for j, pos in enumerate(timing.frame_positions)}

    def delivered(self, output_frame: int, file_position: int) -> None:
        """ffmpeg's report (stderr) that output frame ``output_frame`` is the picture at ``file_position``."""
        frame = self._frame_at.get(file_position)
        if frame is not None:
            self._delivered[output_frame] = frame
        if len(self._delivered) > 64:  # reports no fragment asked for (an instance's frames before its first)
            del self._delivered[min(self._delivered)]

    def _measured_offset(self, frame: int) -> float | None:
        """Seconds of the file between the picture ffmpeg delivered as shared ``frame`` and the
        one the lock puts there (lock.measured_offset_frames); None when ffmpeg's report of that
        frame is not in (yet): the metric keeps its last value."""
        assert self.probed is not None
        encode, anchor, timing = self.probed
        source = self._delivered.pop(frame - anchor, None)
        if source is None or timing.frame_rate is None:
            return None
        return float(measured_offset_frames(encode.clock, frame, source, timing) / timing.frame_rate)

    def header(self, event: Header) -> None:
        if self.header_seen:
            return
        if len(event.tracks) != len(self.encodes):
            raise EncoderError(f"ffmpeg wrote {len(event.tracks)} tracks, {len(self.encodes)} were asked for")
        pairs = zip(self.encodes, event.tracks, strict=True)
        entries = {encode.track_id: track.sample_entry for encode, track in pairs}  # by presentation-wide ID
        for stream in self.profile.streams:
            sample_entries = [entries[i] for i in self.profile.track_ids(stream)]
            self.sink.header(build_header(self.profile, stream, sample_entries))
        self.header_seen = True

    def fragment(self, event: Fragment) -> None:
        if not self.header_seen:
            raise EncoderError("ffmpeg wrote a fragment before its moov")
        for traf in event.parsed.trafs:
            if not 1 <= traf.track_id <= len(self.encodes):
                raise EncoderError(f"ffmpeg wrote track {traf.track_id}, which was not asked for")
            encode = self.encodes[traf.track_id - 1]
            recutter = self.recutters[traf.track_id - 1]
            for sample in traf.samples:
                if self.moved:
                    return
                cut = recutter.push(sample)
                if cut is not None:
                    self._emit(encode, cut)

    def _emit(self, encode: Encode, cut: Cut) -> None:
        if encode.is_video and not cut.starts_with_keyframe:
            log.error("encoder.fragment.rejected group=%s track=%s index=%d reason=no_keyframe "
                      "detail='ffmpeg did not put a keyframe on the fragment boundary'",
                      self.group, encode.track.name, cut.index)  # fmt: skip
            if self.metrics is not None:
                for stream_id in encode.stream_ids:
                    self.metrics.encoder_rejected.labels(stream_id, self.group, "no_keyframe").inc()
            return
        # One track ID in every stream that carries the track: the same bytes go to each.
        run = boxes.TrackRun(encode.track_id, cut.start, cut.samples, cut.index)
        data = write_fragment(cut.index, [run], self.profile.presentation.tfxd_version)
        for stream_id in encode.stream_ids:
            self.sink.fragment(EncodedFragment(stream_id, encode.track_id, cut.index, cut.start, cut.duration,
                                               encode.clock.timescale, data))  # fmt: skip
        frame = encode.clock.first_frame(cut.index)
        offset: float | None
        if self.live_lock is not None:
            offset = self.live_lock.content_offset_seconds()
        elif self.probed is not None and self.probed[0] is encode:
            offset = self._measured_offset(frame)
        else:
            offset = content_offset_ns(encode.clock, frame, self.loop) / NS_PER_SECOND
        if offset is not None:
            for stream_id in encode.stream_ids:
                if self.metrics is not None:
                    self.metrics.content_offset.labels(stream_id, self.group, encode.track.name).set(offset)
                state = self.states.get(stream_id)
                if state is not None and self.first_tracks.get(stream_id) == encode.track_id:
                    state.lock, state.content_offset = self.lock_origin, offset
        if self.move_to is not None and all(r.index == cut.index + 1 for r in self.recutters):
            # Every track has completed fragment cut.index: a boundary. The restart runs on move_to.
            if self.metrics is not None:
                self.metrics.live_lock_moves.labels(self.group).inc()
            log.warning("encoder.live.moved group=%s after_index=%d offset=%d established_by=%s", self.group,
                        cut.index, self.move_to.offset, self.move_to.by)  # fmt: skip
            self.moved = True
            return
        lag_ns = self.wall.now_ns() - encode.clock.end_ns(cut.index)
        if lag_ns > self.max_lag_ns:
            behind = lag_ns / NS_PER_SECOND
            raise EncoderError(f"ffmpeg is {behind:.1f} s behind the shared clock (track {encode.track.name}, "
                               f"fragment {cut.index}); restarting re-aligns it")  # fmt: skip


async def run_ffmpeg_encoder(
    profile: Profile,
    plan: FfmpegPlan,
    first_index: int,
    sink: Sink,
    *,
    group: str,
    wall: WallClock,
    metrics: Metrics | None = None,
) -> None:
    """Run one ffmpeg instance for ``group`` until it exits (raises :class:`FfmpegExited`),
    misbehaves (raises :class:`EncoderError`) or is cancelled.

    Cancellation: ffmpeg gets SIGTERM, then SIGKILL after ``TERMINATE_GRACE`` seconds, and is
    reaped before this returns; a fragment not yet complete is dropped.
    """
    encodes = plan_encodes(profile)
    source = plan.config.source
    live_offset = lock = None
    origin = "file" if isinstance(source, FileSource) else "pattern"
    agreement: tuple[PeerAgreement, ...] = ()
    if isinstance(source, LiveSource):
        # The mapping first (it reads the source for a moment); then the first frame far enough
        # ahead that ffmpeg has opened the input when the source reaches it.
        lock, live_offset, origin, agreement = await _live_lock(profile, source, plan, group=group, wall=wall,
                                                                metrics=metrics)  # fmt: skip
        now_ns = wall.now_ns() + LIVE_START_MARGIN_NS
    else:
        now_ns = wall.now_ns()
    start = plan_instance(
        encodes,
        now_ns,
        first_index,
        timing=plan.file_timing,
        source_path=str(source.path.resolve()) if isinstance(source, FileSource) else "",
    )
    anchors, first = list(start.anchors), start.first_index
    recutters = [TrackRecutter(e.clock, anchor=a, first_index=first, priming_frames=priming_frames(e))
                 for e, a in zip(encodes, anchors, strict=True)]  # fmt: skip
    # A file source's first video encode is probed: ffmpeg reports which picture each of its
    # fragments opens with, and the content offset metric is measured from that.
    timing = plan.file_timing
    probed = bool(timing is not None and timing.frame_positions and encodes and encodes[0].is_video)
    with tempfile.TemporaryDirectory(prefix="orchestrator-ffmpeg-") as scratch:
        files = None
        if isinstance(source, FileSource):
            assert start.playlists is not None
            files = _write_playlists(Path(scratch), start.playlists)
        argv = build_argv(plan.executable, profile, source, encodes, anchors, preset=plan.config.preset,
                          burn_in=plan.burn_in, live_url=plan.live_url, files=files,
                          live_offset=live_offset, probe_delivered=probed, threads=plan.threads)  # fmt: skip
        await _run(argv, plan, profile, encodes, recutters, sink, first, group=group, wall=wall, metrics=metrics,
                   live_lock=lock, probe_anchor=anchors[0] if probed else None, lock_origin=origin,
                   peers=agreement)  # fmt: skip


LIVE_PROBE_TIMEOUT = 15.0
LIVE_START_MARGIN_NS = 1_500_000_000
"""A live instance's first frame is this far after the mapping was taken: ffmpeg opens the input
(LIVE_ANALYZE_US) in that time, so it starts with the anchor frame rather than a burst of the
frames it missed."""
PEER_TIMEOUT = 2.0


async def _probe_live(executable: str, url: str, *, video: bool, wall: WallClock) -> tuple[int, int]:
    """(pts in 90 kHz ticks, wall ns) of a recent frame of the live source: ffprobe reads the
    input for a moment and the last packet's timestamp is taken as arriving now.
    Cancellation: ffprobe is killed (trio.run_process)."""
    beside = Path(executable).with_name("ffprobe")
    ffprobe = str(beside) if beside.is_file() else (shutil.which("ffprobe") or "ffprobe")
    argv = [ffprobe, "-v", "error", "-analyzeduration", str(LIVE_ANALYZE_US), "-probesize", "2000000",
            "-select_streams", "v:0" if video else "a:0", "-show_entries", "packet=pts_time", "-of", "csv=p=0",
            "-read_intervals", "%+#20", url]  # fmt: skip
    with trio.move_on_after(LIVE_PROBE_TIMEOUT):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        now_ns = wall.now_ns()
        times = [line.strip().rstrip(",") for line in done.stdout.decode().split()]
        times = [t for t in times if t and t != "N/A"]
        if done.returncode == 0 and times:
            return round(Fraction(times[-1]) * LIVE_TIMESCALE), now_ns
        raise EncoderError(f"live source: ffprobe read no timestamp (exit {done.returncode}): "
                           f"{done.stderr.decode(errors='replace').strip()[-200:]}")  # fmt: skip
    raise EncoderError(f"live source: no packet within {LIVE_PROBE_TIMEOUT:g} s")


def parse_peer_locks(text: str, group: str) -> list[LiveLock]:
    """The live locks another process exports on /metrics (every group but ``group``), each with
    its identity (when and by whom it was established) when exported."""
    return [lock for _, lock in parse_peer_groups(text, group)]


def parse_peer_groups(text: str, group: str) -> list[tuple[str, LiveLock]]:
    """:func:`parse_peer_locks` with the name of the group that exports each mapping."""
    offsets: dict[str, int] = {}
    identity: dict[str, tuple[int, str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            owner = sample.labels.get("group")
            if owner is None or owner == group:
                continue
            if family.name == LIVE_LOCK_METRIC and 0 <= sample.value < PTS_WRAP:
                offsets[owner] = int(sample.value)
            elif family.name == LIVE_LOCK_ESTABLISHED_METRIC:
                identity[owner] = (int(sample.value), sample.labels.get("established_by", ""))
    return [(owner, LiveLock(offset, *identity.get(owner, (0, "")))) for owner, offset in offsets.items()]


PeerAnswers = list[tuple[str, list[tuple[str, LiveLock]] | None]]
"""Per configured peer (its URL): None when it did not answer, else the (group, mapping) pairs it exports."""


async def _peer_locks(peers: Sequence[str], group: str) -> tuple[list[LiveLock], list[str], PeerAnswers]:
    """The live locks the other groups export (their /metrics), the peers that did not answer
    (skipped: the caller logs and exports that), and each peer's answer (for lock.peer_agreement).
    Cancellation: the requests are abandoned."""
    answers: PeerAnswers = []
    async with httpx.AsyncClient(timeout=PEER_TIMEOUT) as client:
        for url in peers:
            try:
                response = await client.get(url)
                response.raise_for_status()
                answers.append((url, parse_peer_groups(response.text, group)))
            except (httpx.HTTPError, ValueError) as exc:
                log.debug("encoder.live.peer_failed group=%s peer=%s error=%s", group, url, exc)
                answers.append((url, None))
    found = [lock for _, locks in answers for _, lock in locks or ()]
    return found, [url for url, locks in answers if locks is None], answers


def _saved_lock(profile: Profile, group: str) -> LiveLock | None:
    directory = profile.state.dir
    if directory is None:
        return None
    try:
        data = read_state(directory, f"{profile.presentation.name}.{group}.live")
        if data is None:
            return None
        saved = json.loads(data)
        return LiveLock(int(saved["offset"]), int(saved.get("established_ms", 0)), str(saved.get("by", "")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("encoder.live.state_ignored group=%s error=%s", group, exc)
        return None


def _save_lock(profile: Profile, group: str, lock: LiveLock) -> None:
    if profile.state.dir is None:
        return
    data = {"offset": lock.offset, "established_ms": lock.established_ms, "by": lock.by}
    try:
        write_state(profile.state.dir, f"{profile.presentation.name}.{group}.live", json.dumps(data).encode())
    except OSError as exc:
        log.error("encoder.live.state_write_failed group=%s error=%s", group, exc)


def _export_lock(metrics: Metrics | None, group: str, lock: LiveLock) -> None:
    if metrics is None:
        return
    metrics.live_lock_offset.labels(group).set(lock.offset)
    metrics.live_lock_established.clear()  # one identity per group (a process runs one group per lock)
    metrics.live_lock_established.labels(group, lock.by).set(lock.established_ms)


class _PeerWatch:
    """Which peers answered, for the log (a change is logged once) and the metric."""

    def __init__(self, group: str, peers: Sequence[str], metrics: Metrics | None) -> None:
        self.group, self.metrics = group, metrics
        self.down: set[str] = set()
        self.peers = list(peers)

    def update(self, failed: Sequence[str]) -> None:
        for url in self.peers:
            is_down = url in failed
            if is_down and url not in self.down:
                log.warning("encoder.live.peer_unreachable group=%s peer=%s detail='each group keeps its own "
                            "mapping until the peer answers again'", self.group, url)  # fmt: skip
                self.down.add(url)
            elif not is_down and url in self.down:
                log.info("encoder.live.peer_back group=%s peer=%s", self.group, url)
                self.down.discard(url)
            if self.metrics is not None:
                self.metrics.live_peer_up.labels(self.group, url).set(0 if is_down else 1)


async def _live_lock(profile: Profile, source: LiveSource, plan: FfmpegPlan, *, group: str, wall: WallClock,
                     metrics: Metrics | None) -> tuple[LiveLock, int, str, tuple[PeerAgreement, ...]]:  # fmt: skip
    """Choose the source-timestamp -> clock mapping for this instance (lock.choose_live_lock),
    save it, export it; returns it, its effective (unwrapped) offset, its origin and whether it
    agrees with each peer (lock.peer_agreement, from the same reading)."""
    assert plan.live_url is not None
    video = any(t.kind == "video" for s in profile.streams for t in s.tracks)
    pts, now_ns = await _probe_live(plan.executable, plan.live_url, video=video, wall=wall)
    now_tick = (now_ns - profile.presentation.epoch_ns) * LIVE_TIMESCALE // NS_PER_SECOND
    peers, failed, answers = await _peer_locks(source.peers, group)
    _PeerWatch(group, source.peers, metrics).update(failed)
    lock, origin = choose_live_lock(pts, now_tick, peers, _saved_lock(profile, group),
                                    now_ms=now_ns // 1_000_000, group=group)  # fmt: skip
    effective, residual = lock.effective(pts, now_tick)
    log.info("encoder.live.lock group=%s origin=%s offset=%d established_ms=%d established_by=%s residual_ms=%d "
             "peers_answered=%d peers_unreachable=%d", group, origin, lock.offset, lock.established_ms, lock.by,
             residual * 1000 // LIVE_TIMESCALE, len(source.peers) - len(failed), len(failed))  # fmt: skip
    if origin == "established" and source.peers:
        log.warning("encoder.live.unlocked group=%s reason='no peer has a mapping that fits the source' "
                    "detail='this group establishes its own; running groups converge on the earliest established "
                    "within %g s'", group, PEER_CHECK)  # fmt: skip
    if metrics is not None:
        metrics.live_locks.labels(group, origin).inc()
    _export_lock(metrics, group, lock)
    _save_lock(profile, group, lock)
    return lock, effective, origin, peer_agreement(lock, answers)


PEER_CHECK = 4.0
"""How often a running live instance reads its peers' mappings (lock.converge)."""


async def _converge(output: _Recut, profile: Profile, peers: Sequence[str], *, group: str,
                    metrics: Metrics | None) -> None:  # fmt: skip
    """Every PEER_CHECK seconds, read the peers' mappings; when the agreed one (lock.converge) is
    not ours, save it as ours and ask the output side to end the instance at the next fragment
    boundary (the restart starts on it). Cancellation: stops checking; nothing is left behind."""
    watch = _PeerWatch(group, peers, metrics)
    while True:
        await trio.sleep(PEER_CHECK)
        own = output.live_lock
        if own is None or output.move_to is not None:
            continue
        locks, failed, answers = await _peer_locks(peers, group)
        watch.update(failed)
        output.lock_origin = output.lock_origin.split("/")[0] + ("/peer_unreachable" if watch.down else "")
        output.set_peers(peer_agreement(own, answers))
        target = converge(own, locks)
        if target is None:
            continue
        log.warning("encoder.live.converge group=%s from_offset=%d from_established_by=%s to_offset=%d "
                    "to_established_by=%s to_established_ms=%d shift_ms=%d detail='moving at the next fragment "
                    "boundary; the fragments until then may differ from the peers'", group, own.offset, own.by,
                    target.offset, target.by, target.established_ms,
                    ((target.offset - own.offset + PTS_WRAP // 2) % PTS_WRAP - PTS_WRAP // 2) * 1000
                    // LIVE_TIMESCALE)  # fmt: skip
        _save_lock(profile, group, target)
        output.move_to = target


def _write_playlists(scratch: Path, texts: tuple[str | None, str | None]) -> FileInputs:
    """The ffconcat lists that open the file at the clock position (lock.py), in ``scratch``."""
    paths: list[str | None] = []
    for name, text in zip(("video.ffconcat", "audio.ffconcat"), texts, strict=True):
        if text is None:
            paths.append(None)
            continue
        (scratch / name).write_text(text)
        paths.append(str(scratch / name))
    return FileInputs(paths[0], paths[1])


async def _run(argv: list[str], plan: FfmpegPlan, profile: Profile, encodes: list[Encode],
               recutters: list[TrackRecutter], sink: Sink, first: int, *, group: str, wall: WallClock,
               metrics: Metrics | None, live_lock: LiveLock | None = None,
               probe_anchor: int | None = None, lock_origin: str = "pattern",
               peers: tuple[PeerAgreement, ...] = ()) -> None:  # fmt: skip
    """Start ffmpeg with ``argv`` and re-cut its output until it ends (see run_ffmpeg_encoder)."""
    source = plan.config.source
    secret = plan.live_url if isinstance(source, LiveSource) and source.url_env else None
    shown = [f"<${source.url_env}>" if secret is not None and a == secret else a for a in argv]  # type: ignore[union-attr]
    log.info("ffmpeg.starting group=%s first_index=%d argv=%s", group, first, " ".join(shown))
    output = _Recut(profile, encodes, recutters, sink, group=group, wall=wall, metrics=metrics)
    output.loop = plan.file_timing.loop if plan.file_timing is not None else None
    output.live_lock = live_lock
    output.lock_origin = lock_origin
    output.set_peers(peers)
    if probe_anchor is not None:
        assert plan.file_timing is not None
        output.probe(encodes[0], probe_anchor, plan.file_timing)
    reading = trio.CancelScope()
    jumped: list[int] = []

    def source_jumped(pts: int, _pos: int) -> None:
        jumped.append(pts)
        reading.cancel()

    stderr = _StderrLog(group, source_jumped if isinstance(source, LiveSource) else output.delivered)
    # Its own session (setsid): a terminal's Ctrl-C (SIGINT to the foreground process group) and
    # a SIGHUP reach the orchestrator only, which finishes the fragment in flight and then stops
    # ffmpeg itself; ffmpeg is never killed behind its back.
    process = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    sink.instance_started(process.pid)
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        with reading:
            await _read(process, output, stderr, profile, plan, group=group, metrics=metrics, live_lock=live_lock)
    finally:
        with trio.CancelScope(shield=True):
            code = await _stop(process)
            await process.stdout.aclose()
            await process.stderr.aclose()
        log.info("ffmpeg.exited group=%s pid=%d exit_code=%d", group, process.pid, code)
        if metrics is not None:
            metrics.encoder_last_exit_code.labels(group).set(code)
    if output.moved:
        return  # a planned end: the group restarts the instance, which starts on the agreed mapping
    if jumped:
        raise EncoderError(f"the live source's timestamps jumped by more than {LOCK_TOLERANCE // LIVE_TIMESCALE} s "
                           f"(a frame at pts {jumped[0]} after the shift): restarting re-locks")  # fmt: skip
    raise FfmpegExited(code, stderr.tail)


async def _read(process: trio.Process, output: _Recut, stderr: _StderrLog, profile: Profile, plan: FfmpegPlan, *,
                group: str, metrics: Metrics | None, live_lock: LiveLock | None) -> None:  # fmt: skip
    """Re-cut ffmpeg's stdout and log its stderr until stdout ends (then give ffmpeg a moment to
    exit) or a live move is due; the peer checks of a live source run meanwhile. Cancellation:
    stops reading (ffmpeg is stopped by the caller)."""
    assert process.stdout is not None
    assert process.stderr is not None
    source = plan.config.source
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stderr.pump, process.stderr)
        if live_lock is not None and isinstance(source, LiveSource) and source.peers:
            nursery.start_soon(functools.partial(_converge, output, profile, source.peers, group=group,
                                                 metrics=metrics))  # fmt: skip
        reader = StreamReader()
        while chunk := await process.stdout.receive_some(READ_SIZE):
            reader.feed(bytes(chunk))
            while (event := reader.next_event()) is not NEED_DATA:
                if isinstance(event, Header):
                    output.header(event)
                elif isinstance(event, Fragment):
                    output.fragment(event)
            if output.moved:
                break
        if output.moved:
            nursery.cancel_scope.cancel()  # the stderr pump and the peer checks
        else:  # stdout closed: ffmpeg is ending. Give it a moment to exit by itself.
            with trio.move_on_after(TERMINATE_GRACE):
                await process.wait()


async def _stop(process: trio.Process) -> int:
    """SIGTERM, then SIGKILL after a grace period; returns the exit code. Meanwhile ffmpeg's
    stdout and stderr are read and discarded: an ffmpeg flushing its last fragment into a full
    pipe nobody reads would not exit on SIGTERM."""

    async def discard(stream: trio.abc.ReceiveStream | None) -> None:
        if stream is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while await stream.receive_some(READ_SIZE):
                    pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(discard, process.stdout)
        nursery.start_soon(discard, process.stderr)
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            with trio.move_on_after(TERMINATE_GRACE):
                await process.wait()
        if process.returncode is None:
            log.warning("ffmpeg.kill pid=%d reason='no exit %g s after SIGTERM'", process.pid, TERMINATE_GRACE)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        code = await process.wait()
        nursery.cancel_scope.cancel()
    return code


def plan_ffmpeg(config: FfmpegEncoder, executable: str, *, needs_video: bool = True, needs_audio: bool = True
                ) -> FfmpegPlan:  # fmt: skip
    """Resolve what can be resolved before going live (raises ValueError with a reason)."""
    burn_in = False
    if isinstance(config.source, PatternSource) and config.source.burn_in_clock:
        burn_in = supports_burn_in(executable)
        if not burn_in:
            log.warning("ffmpeg.burn_in.unavailable executable=%s reason='drawtext failed: no libfreetype or no "
                        "font'; the test pattern runs without the clock", executable)  # fmt: skip
    live_url = config.source.resolve() if isinstance(config.source, LiveSource) else None
    timing = None
    if isinstance(config.source, FileSource):
        timing = probe_file(executable, config.source.path, needs_video=needs_video, needs_audio=needs_audio)
    threads = ffmpeg_threads(config.threads, cpu_quota(_read_text(CGROUP_CPU_MAX)), len(os.sched_getaffinity(0)))
    log.info("ffmpeg.threads threads=%d setting=%s", threads, config.threads)
    return FfmpegPlan(executable, config, burn_in, live_url, timing, threads)


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: this container's CPU quota and period


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def check_file_sources(profile: Profile) -> list[tuple[str, str]]:
    """Probe every group's file source as ``up`` would (for ``validate``): (key path, reason) of
    each one that cannot be locked to the clock. Groups without an ffmpeg to probe with are skipped."""
    tracks = [t for s in profile.streams for t in s.tracks]
    needs_video = any(t.kind == "video" for t in tracks)
    needs_audio = any(t.kind == "audio" for t in tracks)
    problems = []
    for name, group in profile.groups.items():
        config = group.encoder
        if not isinstance(config, FfmpegEncoder) or not isinstance(config.source, FileSource):
            continue
        try:
            executable = find_ffmpeg(config.path)
        except EncoderError as exc:
            problems.append((f"groups.{name}.encoder.path", str(exc)))
            continue
        if executable is None:
            continue
        try:
            probe_file(executable, config.source.path, needs_video=needs_video, needs_audio=needs_audio)
        except SourceError as exc:
            problems.append((f"groups.{name}.encoder.{exc.key}", str(exc)))
    return problems


def probe_file(executable: str, path: Path, *, needs_video: bool, needs_audio: bool) -> FileTiming:
    """Probe a file source once (ffprobe beside ``executable``, else on PATH) for its loop timing.

    Raises:
        SourceError: the file is missing, unreadable, or cannot be locked to the clock (why).
    """
    if not path.is_file():
        raise SourceError("source.path", f"source file {path} does not exist")
    beside = Path(executable).with_name("ffprobe")
    ffprobe = str(beside) if beside.is_file() else shutil.which("ffprobe")
    if ffprobe is None:
        raise SourceError("source.path", "ffprobe is needed to lock a file source to the clock; it comes with "
                                         "ffmpeg (apt-get install ffmpeg)")  # fmt: skip
    argv = [ffprobe, "-v", "error", "-count_packets", "-show_streams", "-of", "json", str(path)]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=120, check=False, text=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SourceError("source.path", f"{path}: ffprobe failed: {exc}") from None
    if done.returncode != 0:
        raise SourceError("source.path", f"{path}: ffprobe cannot read it: {done.stderr.strip()[-300:]}")
    # The audio's length is what the decoder plays (one decode of the audio only: fast).
    argv = [ffprobe, "-v", "error", "-select_streams", "a:0", "-show_entries", "frame=nb_samples", "-of", "csv=p=0",
            str(path)]  # fmt: skip
    try:
        frames = subprocess.run(argv, capture_output=True, timeout=600, check=False, text=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SourceError("source.path", f"{path}: ffprobe failed: {exc}") from None
    try:
        samples = sum(int(line) for line in frames.stdout.split() if line.strip())
        timing = file_timing(json.loads(done.stdout), samples, needs_video=needs_video, needs_audio=needs_audio)
    except (FileLockError, ValueError) as exc:
        raise SourceError("source.path", f"{path}: {exc}") from None
    if timing.frame_rate is not None:
        timing = dataclasses.replace(timing, frame_positions=_frame_positions(ffprobe, path))
    log.info("ffmpeg.source.probed path=%s loop_s=%.6f video_frames=%s frame_rate=%s audio_samples=%s",
             path, float(timing.loop), timing.video_frames, timing.frame_rate, timing.audio_samples)  # fmt: skip
    return timing


def _frame_positions(ffprobe: str, path: Path) -> tuple[int, ...]:
    """Byte position of each video frame's packet, in presentation order (a packet read, no
    decode); empty when ffprobe cannot tell (the measured content offset is then not exported)."""
    argv = [ffprobe, "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pts,pos", "-of", "csv=p=0",
            str(path)]  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, timeout=600, check=False, text=True)
        packets = sorted(tuple(int(v) for v in line.split(",")[:2]) for line in done.stdout.split() if line.strip())
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return ()
    positions = tuple(pos for _, pos in packets)
    return positions if done.returncode == 0 and len(set(positions)) == len(positions) else ()
