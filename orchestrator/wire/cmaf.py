"""CMAF ingest (DASH-IF Live Media Ingest, Interface-1) as a wire format.

Theory of operation
-------------------
CMAF ingest carries each *track* on a path of its own (the spec's "CMAF track": one track per
``ftyp`` + ``moov``), and since v1.1 each CMAF *segment* as one HTTP request (POST or PUT):

* **the CMAF header** of a track (:func:`track_header`): ``ftyp`` (major brand ``cmfc``,
  compatible ``iso6``, ``cmfc``, ``cmf2``: ISO/IEC 23000-19 7.2) and a ``moov`` with that one
  ``trak``, whose sample entry ends with a ``btrt`` (ISO/IEC 14496-12 8.5.2.2, ingest spec
  "Requirements for formatting media tracks" 6) giving the profile's bitrate. It is sent on its
  own request before the track's first segment and again after any failure (ingest spec
  Interface-1 1, 2, 6). The header of a stream (:meth:`CmafFormat.header`) is that of its one
  track: a CMAF "stream" is one track.
* **a media segment** per fragment (:func:`write_segment`): ``styp`` (major brand ``cmfs``,
  compatible ``cmfs``, ``cmff``, and ``lmsg`` on a track's last segment: ingest spec 18), a
  ``prft`` (ISO/IEC 14496-12 8.16.5) when the track's timescale is known, then ``moof``
  (``mfhd``, ``traf`` with ``tfhd``, ``tfdt``, ``trun``) and ``mdat``: the generic boxes of
  :mod:`orchestrator.fmp4.boxes`, no Smooth ``tfxd``. ``mfhd.sequence_number`` is the shared
  fragment index, as for Smooth.
* **times from 1970.** CMAF ingest counts media time from the Unix epoch (the spec's MPD has
  ``availabilityStartTime`` 1970-01-01, ingest spec 16), our shared clock from the profile's
  epoch. A fragment starting ``start`` ticks after the profile epoch has ``tfdt = start +
  epoch_ticks``, where ``epoch_ticks`` (:func:`epoch_ticks`) is the profile epoch in ticks since
  1970 in the track's timescale: an exact integer (the epoch must fall on a tick, else
  ValueError), the same in every group and after every restart. The ``prft`` says which
  wall-clock instant ``tfdt`` stands for: the shared clock's, ``epoch + start / timescale``
  (what an encoder locked to the clock was given as input), so it too is the same in every group.
* **no second encode.** The encoders write Smooth fragments once
  (:mod:`orchestrator.wire.smooth`); :class:`Segmenter` re-boxes them for CMAF: it reads the
  samples back (:func:`orchestrator.fmp4.boxes.parse_fragment`) and writes the CMAF segment from
  the same sample bytes, and it writes each track's CMAF header from the stream's Smooth header
  (:func:`orchestrator.wire.smooth.describe`: the names and bitrates are in its manifest).
* **the requests** (:class:`RequestPlan` ``per="segment"``, no probe; the header travels on a
  request of its own, so no segment request carries it). Two path schemes
  (:data:`PATH_SCHEMES`), appended to the endpoint's base URL:

  * ``"streams"``: ``/Streams(<stream>-<track>)`` for the header and every segment, the spec's
    (deprecated) ``Streams(stream_name)`` keyword (Interface-1 9), one name per CMAF track:
    what Unified Origin takes on ``<channel>.isml``;
  * ``"template"``: ``/<stream>/<track>/init.m4s`` for the header and
    ``/<stream>/<track>/<index>.m4s`` for segment ``index``: the paths of a DASH
    ``SegmentTemplate`` with ``initialization="$RepresentationID$/init.m4s"`` and
    ``media="$RepresentationID$/$Number$.m4s"``, ``RepresentationID`` being ``<stream>/<track>``
    and ``$Number$`` the shared fragment index (so both groups name every segment alike). We do
    not post the MPD (yet): a receiver that maps such paths itself (MediaPackage v2, a rewrite
    rule) takes them as they are.

Pure: no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from orchestrator.errors import BoxError, MediaError
from orchestrator.fmp4 import boxes
from orchestrator.fmp4.boxes import MovieFragmentTemplate, Sample, TrackHeader, TrackRun
from orchestrator.fmp4.reader import Header, ManifestBox
from orchestrator.fmp4.stream import EncodedFragment, StreamHeader
from orchestrator.tracks import TrackDescription
from orchestrator.wire import smooth
from orchestrator.wire.format import FragmentTiming, RequestPlan

NS_PER_SECOND = 1_000_000_000
NTP_UNIX_OFFSET = 2_208_988_800  # seconds from 1900-01-01 (NTP era 0) to 1970-01-01 (RFC 5905)

HEADER_BRANDS = (b"iso6", b"cmfc", b"cmf2")
SEGMENT_BRANDS = (b"cmfs", b"cmff")
LAST_SEGMENT_BRAND = b"lmsg"

PathScheme = Literal["streams", "template"]


@dataclass(frozen=True)
class Paths:
    """One path scheme: the request plan (segments) and the path of a track's CMAF header."""

    plan: RequestPlan
    header_path: str  # {stream}, {track}

    def header_url(self, base: str, stream_id: str, track: str) -> str:
        """The URL the CMAF header of ``track`` is sent to."""
        return base + self.header_path.format(stream=stream_id, track=track)

    def segment_url(self, base: str, stream_id: str, track: str, index: int) -> str:
        """The URL of segment ``index`` of ``track``."""
        return self.plan.url(base, stream_id, track, index)


def _plan(path: str) -> RequestPlan:
    return RequestPlan(per="segment", probe_first=False, header_on_every_request=False, path=path, header_alone=True)


PATH_SCHEMES: dict[str, Paths] = {
    "streams": Paths(_plan("/Streams({stream}-{track})"), "/Streams({stream}-{track})"),
    "template": Paths(_plan("/{stream}/{track}/{index}.m4s"), "/{stream}/{track}/init.m4s"),
}
"""The path schemes a profile may choose (``cmaf_paths``); see the module docstring."""


# --- time -----------------------------------------------------------------------------------


def epoch_ticks(epoch_ns: int, timescale: int) -> int:
    """The profile epoch (``epoch_ns`` after 1970) in ticks of ``timescale``. Raises ValueError
    if the epoch does not fall on a tick (no CMAF time could then be exact)."""
    ticks, remainder = divmod(epoch_ns * timescale, NS_PER_SECOND)
    if remainder:
        raise ValueError(f"the epoch ({epoch_ns} ns after 1970) does not fall on a tick of timescale {timescale}")
    return ticks


def ntp_timestamp(unix_ns: int) -> int:
    """A 64-bit NTP timestamp (RFC 5905: 32 bits of seconds since 1900, 32 of fraction) for
    ``unix_ns`` nanoseconds since 1970; the fraction is rounded down."""
    seconds, ns = divmod(unix_ns, NS_PER_SECOND)
    return ((seconds + NTP_UNIX_OFFSET) << 32) | ((ns << 32) // NS_PER_SECOND)


# --- header ---------------------------------------------------------------------------------


def write_ftyp() -> bytes:
    """``ftyp`` of a CMAF header (ISO/IEC 14496-12 4.3; ISO/IEC 23000-19 7.2: CMAF track brands)."""
    return boxes.write_ftyp(b"cmfc", 0, HEADER_BRANDS)


def write_btrt(bitrate: int) -> bytes:
    """``btrt`` (ISO/IEC 14496-12 8.5.2.2): bufferSizeDB unknown (0), max and average bitrate
    the profile's target (a constant-rate target: the encoder's own peak is not known here)."""
    return boxes.box(b"btrt", struct.pack(">III", 0, bitrate, bitrate))


def with_btrt(sample_entry: bytes, bitrate: int) -> bytes:
    """``sample_entry`` with a ``btrt`` as its last child box (its size field grown to match);
    unchanged if it already has one."""
    if len(sample_entry) < 8 or struct.unpack_from(">I", sample_entry)[0] != len(sample_entry):
        raise ValueError("the sample entry is not one complete box")
    if b"btrt" in sample_entry:  # cheap, and a false positive only costs the btrt
        return sample_entry
    btrt = write_btrt(bitrate)
    return struct.pack(">I", len(sample_entry) + len(btrt)) + sample_entry[4:] + btrt


def cmaf_track(track: TrackDescription) -> TrackHeader:
    """The ``moov``'s view of ``track``, its sample entry carrying the ``btrt``."""
    return TrackHeader(track.track_id, track.kind.handler, track.timescale, with_btrt(track.sample_entry,
                       track.bitrate), track.width, track.height, track.language)  # fmt: skip


def track_header(stream_id: str, track: TrackDescription) -> StreamHeader:
    """The CMAF header of ``track``: ``ftyp`` + ``moov`` with its one ``trak``."""
    header = cmaf_track(track)
    return StreamHeader(stream_id, (header,), write_ftyp() + boxes.write_moov([header]))


# --- segments -------------------------------------------------------------------------------


def write_styp(last: bool = False) -> bytes:
    """``styp`` (ISO/IEC 14496-12 8.16.2): a CMAF segment holding one CMAF fragment; ``lmsg``
    added on a track's last segment (ingest spec Interface-1 18)."""
    brands = (*SEGMENT_BRANDS, LAST_SEGMENT_BRAND) if last else SEGMENT_BRANDS
    return boxes.box(b"styp", b"cmfs", struct.pack(">I", 0), *brands)


def mark_last(segment: bytes) -> bytes:
    """``segment`` (as :func:`write_segment` wrote it) with ``lmsg`` added to its ``styp``."""
    plain = write_styp()
    if not segment.startswith(plain):
        raise ValueError("the segment does not open with the plain CMAF styp")
    return write_styp(last=True) + segment[len(plain) :]


def write_prft(track_id: int, unix_ns: int, media_time: int) -> bytes:
    """``prft`` (ISO/IEC 14496-12 8.16.5), version 1 (64-bit media_time), flags 0: the wall-clock
    instant ``unix_ns`` stands for ``media_time`` of ``track_id``."""
    return boxes.full_box(b"prft", 1, 0, struct.pack(">IQQ", track_id, ntp_timestamp(unix_ns), media_time))


def write_segment(index: int, run: TrackRun, *, timescale: int | None = None, last: bool = False) -> bytes:
    """The CMAF segment of fragment ``index`` carrying ``run`` (its ``base_time`` in ticks since
    1970): ``styp``, ``prft`` if ``timescale`` is given, ``moof`` + ``mdat``."""
    prft = b""
    if timescale is not None:
        prft = write_prft(run.track_id, run.base_time * NS_PER_SECOND // timescale, run.base_time)
    return write_styp(last) + prft + boxes.write_movie_fragment(index, [run])


class SegmentTemplate(MovieFragmentTemplate):
    """:class:`~orchestrator.fmp4.boxes.MovieFragmentTemplate` for a CMAF segment without
    ``prft``: render() is byte for byte ``CmafFormat().fragment(index, [TrackRun(track_id,
    base_time, samples, index)])``."""

    _STYP = write_styp()

    def render(self, index: int, track_id: int, base_time: int) -> bytes:
        return self._STYP + super().render(index, track_id, base_time)


@dataclass(frozen=True)
class Segment:
    """A CMAF segment read back: what the receiver needs of its boxes."""

    last: bool  # styp carries lmsg
    fragment: bytes  # the moof + mdat
    prft: bytes | None


def split_segment(data: bytes) -> Segment:
    """The boxes of one CMAF segment: ``styp`` (optional), ``prft`` (optional, before ``moof``),
    then exactly one ``moof`` and one ``mdat``. Raises BoxError for anything else."""
    found = list(boxes.parse_boxes(data))
    types = [b.type for b in found]
    last = False
    prft = None
    position = 0
    if types[:1] == [b"styp"]:
        styp = found[0].payload
        if len(styp) < 8 or (len(styp) - 8) % 4:
            raise BoxError("styp is truncated")
        brands = {styp[i : i + 4] for i in range(8, len(styp), 4)} | {styp[:4]}
        last = LAST_SEGMENT_BRAND in brands
        position = 1
    if types[position : position + 1] == [b"prft"]:
        prft = data[found[position].offset : found[position].offset + found[position].size]
        position += 1
    if types[position:] != [b"moof", b"mdat"]:
        shown = " ".join(t.decode("latin-1") for t in types)
        raise BoxError(f"a CMAF segment is [styp] [prft] moof mdat, not {shown or 'empty'}")
    return Segment(last, data[found[position].offset :], prft)


# --- re-boxing what the encoders wrote -----------------------------------------------------


class Segmenter:
    """Re-boxes one stream's Smooth header and fragments for CMAF (see the module docstring):
    ``track_headers`` once per header, ``segment`` once per fragment (its result can be shared
    by every CMAF endpoint of the stream). Pure."""

    def __init__(self, epoch_ns: int) -> None:
        self.epoch_ns = epoch_ns
        self._offsets: dict[int, int] = {}

    def offset(self, timescale: int) -> int:
        """Ticks from 1970 to the profile epoch in ``timescale`` (:func:`epoch_ticks`)."""
        ticks = self._offsets.get(timescale)
        if ticks is None:
            ticks = self._offsets[timescale] = epoch_ticks(self.epoch_ns, timescale)
        return ticks

    def track_headers(self, header: StreamHeader) -> dict[int, tuple[TrackDescription, StreamHeader]]:
        """track ID -> (its description, its CMAF header), from the stream's Smooth header.
        Raises MediaError if the header does not describe its tracks."""
        reader = smooth.reader(require_manifest=True)
        reader.feed(header.data)
        event = reader.next_event()
        if not isinstance(event, Header):
            raise MediaError(f"stream {header.stream_id}: the encoder's header is not a complete Smooth header")
        return {t.track_id: (t, track_header(header.stream_id, t)) for t in smooth.describe(event)}

    def segment(self, fragment: EncodedFragment, *, last: bool = False) -> bytes:
        """``fragment`` (one track's Smooth ``moof`` + ``mdat``) as a CMAF segment: the same
        samples, ``tfdt`` counted from 1970, a ``prft``. Raises BoxError if it does not parse."""
        parsed = boxes.parse_fragment(fragment.data)
        if len(parsed.trafs) != 1 or parsed.trafs[0].track_id != fragment.track_id:
            raise BoxError(f"fragment {fragment.index} of track {fragment.track_id} must carry that track alone")
        start = fragment.start + self.offset(fragment.timescale)
        run = TrackRun(fragment.track_id, start, parsed.trafs[0].samples, fragment.index)
        return write_segment(fragment.index, run, timescale=fragment.timescale, last=last)


# --- the receiver's rules ---------------------------------------------------------------------


@dataclass(frozen=True)
class CmafReceiverRules:
    """What a CMAF publishing point checks of one track's ``moof`` + ``mdat`` (the receiver sees a
    segment's boxes after :func:`split_segment`): no manifest box (the path names the track), the
    index from ``mfhd``, the time from ``tfdt`` (which every traf must carry: ingest spec,
    formatting media tracks 2). The archive's init segment is the CMAF header's ``ftyp`` and the
    track's ``moov``."""

    manifest: ManifestBox | None = None
    require_manifest: bool = False

    def track_names(self, header: Header) -> dict[int, str]:
        return {}  # the archive names files track<ID>.mp4, in the track's own directory

    def timing(self, traf: boxes.ParsedTraf, sequence_number: int) -> FragmentTiming:
        return FragmentTiming(sequence_number, traf.base_time, traf.duration)

    def problem(self, traf: boxes.ParsedTraf) -> str | None:
        return None if traf.base_time is not None else "traf has no tfdt"

    def init_segment(self, track: TrackHeader) -> bytes:
        return write_ftyp() + boxes.write_moov([track])

    def single_track_fragment(self, parsed: boxes.ParsedFragment, traf: boxes.ParsedTraf,
                              timing: FragmentTiming) -> bytes:  # fmt: skip
        assert timing.time is not None  # problem() refused a traf without tfdt
        return boxes.write_movie_fragment(timing.index, [TrackRun(traf.track_id, timing.time, traf.samples,
                                                                  timing.index)])  # fmt: skip


RECEIVER = CmafReceiverRules()


# --- the format -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CmafFormat:
    """CMAF ingest as a :class:`~orchestrator.wire.format.WireFormat`. Its ``fragment`` takes
    ``base_time`` as given (ticks since 1970 for the wire) and writes no ``prft`` (the seam
    does not carry the timescale); :class:`Segmenter` is what the publisher's path uses."""

    paths: Paths = field(default_factory=lambda: PATH_SCHEMES["streams"])
    name: str = "cmaf"
    receiver: CmafReceiverRules = RECEIVER

    @property
    def plan(self) -> RequestPlan:
        return self.paths.plan

    def header(self, stream_id: str, tracks: Sequence[TrackDescription]) -> StreamHeader:
        """The CMAF header of a one-track stream. Raises ValueError for several tracks: each
        CMAF track has a header (and a path) of its own (:func:`track_header`)."""
        if len(tracks) != 1:
            raise ValueError(f"a CMAF header describes one track, not {len(tracks)}: use track_header per track")
        return track_header(stream_id, tracks[0])

    def fragment(self, index: int, runs: Sequence[TrackRun], *, last: bool = False) -> bytes:
        if len(runs) != 1:
            raise ValueError(f"a CMAF segment carries one track, not {len(runs)}")
        return write_segment(index, runs[0], last=last)

    def fragment_template(self, samples: Sequence[Sample]) -> SegmentTemplate:
        return SegmentTemplate(samples)
