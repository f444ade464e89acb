"""The synthetic encoder: real, decodable H.264/AAC fragments without an encoder at run time.

Theory of operation
-------------------
The package carries tiny pre-encoded clips (``orchestrator/media``): 50 frames of intra-only
H.264 (every frame an IDR, so any run of frames decodes on its own) and one second of AAC-LC
per supported sample rate and channel count. Frame n of a track on the shared clock carries
clip sample ``n mod len(clip)``, so the bytes of fragment k depend on k alone: the primary and
the backup group produce byte-identical fragments, which is what redundant ingest expects.

Timing comes entirely from :mod:`orchestrator.clock`: sample durations, the fragment's start
time (tfdt, tfxd) and its index (mfhd, tfxd v2). The bytes come from the wire format
(:mod:`orchestrator.wire.smooth`, configured by the profile): its header for the stream's track
descriptions, its fragments for the samples. This module is pure; the trio task that releases
one fragment per clock period lives in :mod:`orchestrator.encode.group`.

Cost: all streams' fragments fall due at the same instant, so building one must be cheap (at
1,000 streams, 100 µs each is 0.1 s before the last one leaves). A fragment's samples repeat
with the clip and the clock's frame pattern, so :class:`FragmentTemplates` keeps, per track
configuration and position in that pattern, the fragment written once by the wire format;
:meth:`SyntheticStream.fragment` copies it with index, track ID and start time patched in
(:class:`~orchestrator.fmp4.boxes.MovieFragmentTemplate`), byte for byte what
:meth:`SyntheticStream.written_fragment` writes box by box (``bench/fragment_build.py``).

The clips were made once with ffmpeg 5.1 (kept small on purpose)::

    ffmpeg -f lavfi -i testsrc2=size=192x108:rate=25 -frames:v 50 -c:v libx264 -profile:v baseline \
      -g 1 -bf 0 -crf 38 -pix_fmt yuv420p -x264-params info=0 -an -bitexact \
      -movflags frag_keyframe+empty_moov+default_base_moof -f mp4 video.mp4
    ffmpeg -f lavfi -i sine=frequency=<sr/1024*10>:sample_rate=<sr> -t 1 -ac <ch> -c:a aac -b:a 64k \
      -bitexact -movflags frag_keyframe+empty_moov+default_base_moof -frag_duration 1000000 \
      -f mp4 audio_<sr>_<ch>.mp4      # sr in 44100 48000, ch in 1 2

The sample entry (``avc1``/``mp4a`` with its codec configuration) is copied from the clip, so the
moov tells the truth about the bitstream (192x108 video, whatever the profile's nominal size).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from orchestrator.clock import TrackClock
from orchestrator.errors import EncoderError
from orchestrator.fmp4 import boxes
from orchestrator.fmp4.reader import NEED_DATA, Fragment, Header, StreamReader
from orchestrator.fmp4.stream import EncodedFragment, StreamHeader
from orchestrator.profile import AudioTrack, Profile, Stream, VideoTrack
from orchestrator.wire import smooth
from orchestrator.wire.format import WireFormat

SUPPORTED_AUDIO = frozenset({(44100, 1), (44100, 2), (48000, 1), (48000, 2)})


@dataclass(frozen=True)
class Clip:
    """A pre-encoded clip: its sample entry box and its samples' bytes, in decode order."""

    sample_entry: bytes
    samples: tuple[bytes, ...]


def parse_clip(data: bytes) -> Clip:
    """Read a single-track fragmented MP4 (as ffmpeg writes it) into a Clip."""
    reader = StreamReader()
    reader.feed(data)
    entry: bytes | None = None
    samples: list[bytes] = []
    while (event := reader.next_event()) is not NEED_DATA:
        if isinstance(event, Header):
            entry = event.tracks[0].sample_entry
        elif isinstance(event, Fragment):
            for traf in event.parsed.trafs:
                samples.extend(s.data for s in traf.samples)
    if entry is None or not samples or reader.buffered:
        raise EncoderError("synthetic clip is not a complete fragmented MP4")
    return Clip(entry, tuple(samples))


@functools.cache
def load_clip(name: str) -> Clip:
    """Load one of the packaged clips (``video.mp4``, ``audio_48000_2.mp4`` ...)."""
    try:
        data = resources.files("orchestrator.encode.media").joinpath(name).read_bytes()
    except FileNotFoundError:
        raise EncoderError(f"synthetic clip {name} is not packaged") from None
    return parse_clip(data)


def clip_name(track: VideoTrack | AudioTrack) -> str:
    """The packaged clip a track is made of (``video.mp4``, ``audio_48000_2.mp4`` ...)."""
    if isinstance(track, VideoTrack):
        return "video.mp4"
    if (track.sample_rate, track.channels) not in SUPPORTED_AUDIO:
        raise EncoderError(
            f"track {track.name}: the synthetic encoder has AAC clips for 44100/48000 Hz, 1 or 2 channels; "
            f"got {track.sample_rate} Hz, {track.channels} channels"
        )
    return f"audio_{track.sample_rate}_{track.channels}.mp4"


def clip_for(track: VideoTrack | AudioTrack) -> Clip:
    return load_clip(clip_name(track))


class FragmentTemplates:
    """Fragment templates (:class:`~orchestrator.fmp4.boxes.MovieFragmentTemplate`) shared by every
    synthetic stream of the process, least recently used dropped first beyond ``max_bytes``.

    Fragment k of a track holds the frames ``first_frame(k)`` to ``first_frame(k + 1) - 1``. Frame
    n carries clip sample ``n mod len(clip)`` and lasts ``frame_time(n + 1) - frame_time(n)``
    ticks, which depends on n modulo the clock's duration period p only. So the samples of a
    fragment, hence its bytes but for index, track ID and start time, are fixed by the track's
    configuration (clip, timescale, frame duration, wire format), the first frame modulo
    lcm(len(clip), p) and the frame count: that is the key. A profile of 25 fps video at 90 kHz
    in 2 s fragments needs one template whatever its number of streams; 29.97 fps video or
    44.1 kHz audio needs at most two per clip sample (the first frame wanders through the clip,
    fragments alternate between two frame counts). All streams of a process fall due at the
    same instant, so one template is built per key and used by every stream before the next
    key is needed: a small bound suffices.
    """

    def __init__(self, max_bytes: int = 8 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.built = 0  # templates written, for tests and the benchmark
        self._by_key: OrderedDict[tuple[str, int, int], boxes.MovieFragmentTemplate] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: tuple[str, int, int], samples: Callable[[], list[boxes.Sample]],
            wire: WireFormat) -> boxes.MovieFragmentTemplate:  # fmt: skip
        """The template for ``key``, written by ``wire`` from ``samples()`` the first time it is
        asked for (``key`` names the format: see :class:`SyntheticStream`)."""
        template = self._by_key.get(key)
        if template is not None:
            self._by_key.move_to_end(key)
            return template
        template = self._by_key[key] = wire.fragment_template(samples())
        self.built += 1
        self.bytes += template.size
        while self.bytes > self.max_bytes and len(self._by_key) > 1:
            _, dropped = self._by_key.popitem(last=False)
            self.bytes -= dropped.size
        return template


SHARED_TEMPLATES = FragmentTemplates()
"""The process's templates: every SyntheticStream uses these unless given others."""


@dataclass(frozen=True)
class _Track:
    track_id: int
    clip: Clip
    clock: TrackClock
    config: str  # what, besides the key's numbers, the template's bytes depend on
    period: int  # lcm(len(clip), duration period): frames after which samples and durations repeat


class SyntheticStream:
    """Builds the header and fragment k of one stream from the clips and the shared clock."""

    def __init__(self, profile: Profile, stream: Stream, templates: FragmentTemplates | None = None) -> None:
        self.stream = stream
        self.wire = smooth.for_profile(profile)
        self.clips = [clip_for(track) for track in stream.tracks]
        self.clocks: list[TrackClock] = [profile.track_clock(track) for track in stream.tracks]
        descriptions = profile.describe(stream, [c.sample_entry for c in self.clips])
        self.header: StreamHeader = self.wire.header(stream.id, descriptions)
        self.track_ids = profile.track_ids(stream)
        self.templates = SHARED_TEMPLATES if templates is None else templates
        self._tracks: list[_Track] = []
        for track_id, track, clip, clock in zip(self.track_ids, stream.tracks, self.clips, self.clocks, strict=True):
            config = f"{clip_name(track)} {clock.timescale} {clock.frame_duration} {self.wire}"
            period = math.lcm(len(clip.samples), clock.duration_period())
            self._tracks.append(_Track(track_id, clip, clock, config, period))

    def fragment(self, k: int) -> list[EncodedFragment]:
        """Fragment k of every track of the stream, in track order (from the templates)."""
        out = []
        for track in self._tracks:
            clock = track.clock
            first = clock.first_frame(k)
            count = clock.first_frame(k + 1) - first
            start = clock.frame_time(first)
            template = self.templates.get((track.config, first % track.period, count),
                                          functools.partial(self._samples, track, k), self.wire)  # fmt: skip
            data = template.render(k, track.track_id, start)
            out.append(EncodedFragment(self.stream.id, track.track_id, k, start, template.duration,
                                       clock.timescale, data))  # fmt: skip
        return out

    def written_fragment(self, k: int) -> list[EncodedFragment]:
        """Fragment k as :meth:`fragment` makes it, written box by box by the wire format
        without templates: the reference the templates are tested against, and the benchmark's
        baseline."""
        out = []
        for track in self._tracks:
            start = track.clock.start(k)
            run = boxes.TrackRun(track.track_id, start, self._samples(track, k), k)
            data = self.wire.fragment(k, [run])
            out.append(EncodedFragment(self.stream.id, track.track_id, k, start, run.duration,
                                       track.clock.timescale, data))  # fmt: skip
        return out

    @staticmethod
    def _samples(track: _Track, k: int) -> list[boxes.Sample]:
        clip, first = track.clip.samples, track.clock.first_frame(k)
        return [boxes.Sample(clip[(first + i) % len(clip)], duration, is_sync=True)
                for i, duration in enumerate(track.clock.sample_durations(k))]  # fmt: skip


class SharedFragments:
    """Fragment k of a stream, built once for every group of one process.

    The synthetic fragments depend on (stream, k) alone, so the primary and the backup group of
    one ``up`` would build byte-identical copies. Built once and shared, a fragment pushed to
    every endpoint of both groups is one object (memory: see docs/scale.md, "Memory"), and
    the encoding cost is paid once. Keeps the fragments of the last ``keep`` indices only.
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._by_key: dict[tuple[str, int], list[EncodedFragment]] = {}
        self._newest = -1

    def fragment(self, source: SyntheticStream, k: int) -> list[EncodedFragment]:
        key = (source.stream.id, k)
        built = self._by_key.get(key)
        if built is None:
            built = self._by_key[key] = source.fragment(k)
            if k > self._newest:
                self._newest = k
                for old in [key for key in self._by_key if key[1] <= k - self.keep]:
                    del self._by_key[old]
        return built
