"""Smooth Streaming live ingest (MS-SSTR, the fragmented-MP4 live ingest specification) as a wire format.

Theory of operation
-------------------
Everything here is what Smooth adds to the ISO BMFF of :mod:`orchestrator.fmp4`:

* **the header**: ``ftyp`` with major brand ``isml``, the Live Server Manifest box (a ``uuid``
  box holding a SMIL 2.0 document that lists the tracks, MS-SSTR 2.2.7.2 / ingest spec 3), then
  the generic ``moov``. The manifest must be byte-identical on every POST of a stream, from every
  encoder group (spec 7.5.c and 8.3), so it is a pure function of the track descriptions and
  carries nothing that varies by host, process or version;
* **the fragment**: the generic ``moof`` + ``mdat`` with a ``tfxd`` closing every ``traf``
  (the traf tail). ``tfxd`` versions (MS-SSTR 2.2.4.4 documents 0 and 1):

  * version 0: 32-bit fragment_absolute_time, 32-bit fragment_duration;
  * version 1: the same fields in 64 bits (our default);
  * version 2: **an assumption of ours**. The ingest specification asks for a "version 2" tfxd
    with a fragment index but no public layout could be found; we lay it out as the version-1
    fields followed by a 64-bit fragment_index. It is written only when a profile opts in.

* **the requests**: one long-running chunked POST per stream and endpoint to
  ``<publishing point>/Streams(<stream id>)``, each preceded by an empty-body probe sent with
  ``Connection: close`` (spec 4), each opening with the header (:data:`PLAN`);
* **the receiver's rules**: the header must carry the Live Server Manifest before ``moov``,
  whose ``trackName`` params name the tracks; every ``traf`` must carry a ``tfxd`` (3.3), whose
  time and (version 2) index place the fragment; the archive's init segments use the ``isml``
  ftyp and one track's share of a fragment is rewritten with its ``tfxd`` (:class:`SmoothReceiverRules`).

:class:`SmoothFormat` (``SmoothFormat(tfxd_version)``; :func:`for_profile`) is the
:class:`~orchestrator.wire.format.WireFormat` for the rest of the code. Pure: no I/O.
"""

from __future__ import annotations

import functools
import re
import struct
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import quoteattr

from orchestrator.errors import BoxError, MediaError, over_limit
from orchestrator.fmp4 import boxes
from orchestrator.fmp4.boxes import MovieFragmentTemplate, Sample, TrackRun
from orchestrator.fmp4.reader import Header, ManifestBox, StreamReader
from orchestrator.fmp4.stream import StreamHeader
from orchestrator.tracks import TrackDescription, kind_of_handler
from orchestrator.wire.format import FragmentTiming, RequestPlan

if TYPE_CHECKING:
    from orchestrator.profile import Profile, Stream

LIVE_SERVER_MANIFEST_UUID = uuid.UUID("a5d40b30-e814-11dd-ba2f-0800200c9a66").bytes
TFXD_UUID = uuid.UUID("6d1d9b05-42d5-44e6-80e2-141daff757b2").bytes
MAX_MANIFEST_ELEMENTS = 1000

PLAN = RequestPlan(per="stream", probe_first=True, header_on_every_request=True, path="/Streams({stream})")
"""MS-SSTR 9.2 / ingest spec 4: ``{publishing point}/Streams({stream id})``, probe, one long POST."""

# MS-SSTR 9.2 / ingest spec 4: {publishing point path}.isml/Streams({identifier}).
_STREAM_URL = re.compile(r"/(?P<point>.+)\.isml/streams\((?P<stream>.*)\)", re.IGNORECASE | re.DOTALL)


def parse_path(path: str) -> tuple[str, str] | None:
    """(publishing point path without ``.isml``, stream id) of an ingest request path, or None."""
    match = _STREAM_URL.fullmatch(path)
    return None if match is None else (match["point"], match["stream"])


# --- header boxes -----------------------------------------------------------------------------


def write_ftyp() -> bytes:
    """``ftyp`` (ISO/IEC 14496-12, 4.3): major brand isml, as Smooth ingest encoders write it."""
    return boxes.write_ftyp(b"isml", 1, (b"piff", b"iso6", b"isml"))


def write_live_server_manifest(smil: str) -> bytes:
    """The Live Server Manifest box (MS-SSTR 2.2.7.2 / ingest section 3): a uuid box, a
    FullBox header of zeros, then the SMIL document in UTF-8."""
    return boxes.uuid_box(LIVE_SERVER_MANIFEST_UUID, struct.pack(">I", 0), smil.encode("utf-8"))


def parse_live_server_manifest(payload: bytes) -> str:
    """The SMIL text of a Live Server Manifest box's payload (after the 8-byte box header)."""
    if payload[:16] != LIVE_SERVER_MANIFEST_UUID:
        raise BoxError("uuid box is not a Live Server Manifest box")
    if len(payload) < 20:
        raise BoxError("Live Server Manifest box is truncated")
    try:
        return payload[20:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BoxError(f"Live Server Manifest is not UTF-8: {exc}") from None


MANIFEST = ManifestBox(LIVE_SERVER_MANIFEST_UUID, "Live Server Manifest", parse_live_server_manifest)
"""The Live Server Manifest as the generic reader sees it."""


def reader(*, require_manifest: bool = False) -> StreamReader:
    """A :class:`~orchestrator.fmp4.reader.StreamReader` that knows the Live Server Manifest."""
    return StreamReader(manifest=MANIFEST, require_manifest=require_manifest)


# --- the Live Server Manifest document --------------------------------------------------------

_FOURCC = {"avc1": "H264", "avc3": "H264", "mp4a": "AACL", "hvc1": "HEVC", "hev1": "HEVC"}


@dataclass(frozen=True)
class ManifestTrack:
    """What the manifest says about one track."""

    kind: str  # the element: "video" | "audio"
    track_id: int
    name: str
    bitrate: int
    timescale: int
    codec: str  # sample entry type: "avc1", "mp4a", ...
    language: str = "und"
    width: int = 0
    height: int = 0
    sample_rate: int = 0
    channels: int = 0


def _param(name: str, value: str | int) -> str:
    return f'    <param name={quoteattr(name)} value={quoteattr(str(value))} valuetype="data" />\n'


def live_server_manifest(tracks: Sequence[ManifestTrack]) -> str:
    """The SMIL text for one stream. Nothing in it names the stream: a track carried by several
    streams (redundant audio, spec section 11) gets the very same entry in each."""
    lines = [
        '<?xml version="1.0" encoding="utf-8"?>\n',
        '<smil xmlns="http://www.w3.org/2001/SMIL20/Language">\n',
        "<head>\n",
        '  <meta name="creator" content="orchestrator" />\n',
        "</head>\n",
        "<body>\n",
        "<switch>\n",
    ]
    for track in tracks:
        attributes = f"src={quoteattr(track.name)} systemBitrate={quoteattr(str(track.bitrate))}"
        if track.kind == "audio":
            attributes += f" systemLanguage={quoteattr(track.language)}"
        lines.append(f"  <{track.kind} {attributes}>\n")
        lines.append(_param("systemBitrate", track.bitrate))
        lines.append(_param("trackID", track.track_id))
        lines.append(_param("trackName", track.name))
        lines.append(_param("timescale", track.timescale))
        lines.append(_param("FourCC", _FOURCC.get(track.codec, track.codec.upper())))
        if track.kind == "video":
            lines.append(_param("MaxWidth", track.width))
            lines.append(_param("MaxHeight", track.height))
        else:
            lines.append(_param("SamplingRate", track.sample_rate))
            lines.append(_param("Channels", track.channels))
            lines.append(_param("BitsPerSample", 16))
        lines.append(f"  </{track.kind}>\n")
    lines += ["</switch>\n", "</body>\n", "</smil>\n"]
    return "".join(lines)


def _manifest_tracks(smil: str | None) -> dict[int, dict[str, str]]:
    """trackID -> the track element's ``<param>`` values (names lower-cased), for every element
    with a trackID and a trackName param (the last such element of an ID wins). A manifest that
    is not XML has no tracks. Raises MediaError for one of more than ``MAX_MANIFEST_ELEMENTS``
    elements, counted while parsing."""
    if not smil:
        return {}
    parser: ElementTree.XMLPullParser[ElementTree.Element] = ElementTree.XMLPullParser(events=("start",))
    root: ElementTree.Element | None = None
    elements = 0
    try:
        for start in range(0, len(smil), 16384):
            parser.feed(smil[start : start + 16384])
            events: Iterator[Any] = parser.read_events()  # ("start", element) only, as asked
            for _name, element in events:
                root = element if root is None else root
                elements += 1
                if elements > MAX_MANIFEST_ELEMENTS:
                    raise over_limit(MediaError(f"the Live Server Manifest has more than {MAX_MANIFEST_ELEMENTS} "
                                                "elements, the limit (max_manifest_elements)"),
                                     "max_manifest_elements")  # fmt: skip
        parser.close()
    except ElementTree.ParseError:
        return {}
    if root is None:
        return {}
    found: dict[int, dict[str, str]] = {}
    for element in root.iter():
        params = {
            (child.get("name") or "").lower(): child.get("value") or ""
            for child in element
            if child.tag.rsplit("}", 1)[-1] == "param"
        }
        track_id, name = params.get("trackid", ""), params.get("trackname", "")
        # At most 10 digits: a trackID is 32 bits, and int() of 5,000 digits raises.
        if track_id.isascii() and track_id.isdigit() and len(track_id) <= 10 and name:
            found[int(track_id)] = params
    return found


def track_names(smil: str | None) -> dict[int, str]:
    """trackID -> trackName, from the ``<param>`` children of the Live Server Manifest's track
    elements (MS-SSTR 2.2.7.3). A manifest that is not XML names no tracks. Raises MediaError
    for one of more than ``MAX_MANIFEST_ELEMENTS`` elements, counted while parsing."""
    return {track_id: params["trackname"] for track_id, params in _manifest_tracks(smil).items()}


def describe(header: Header) -> tuple[TrackDescription, ...]:
    """The track descriptions a Smooth header was written from: what a relay, which has no
    profile, knows of a stream an encoder sent (``moov`` for the codec configuration, timescale,
    size and language; the manifest for names, bitrates and audio parameters). Writing
    :func:`header` from them gives the same bytes back for a header this module wrote. Raises
    MediaError for a track the manifest does not describe or a handler no kind uses."""
    manifest = _manifest_tracks(header.manifest_text)

    def number(params: dict[str, str], key: str, track_id: int) -> int:
        value = params.get(key, "0")
        if not (value.isascii() and value.isdigit() and len(value) <= 10):
            raise MediaError(f"track {track_id}: the manifest's {key} {value[:20]!r} is not a number")
        return int(value)

    out = []
    for track in header.tracks:
        kind = kind_of_handler(track.handler)
        params = manifest.get(track.track_id)
        if kind is None:
            raise MediaError(f"track {track.track_id}: handler {track.handler!r} is no track kind")
        if params is None:
            raise MediaError(f"track {track.track_id}: the Live Server Manifest does not describe it")
        out.append(TrackDescription(
            track.track_id, params["trackname"], kind, track.timescale, number(params, "systembitrate", track.track_id),
            track.sample_entry, track.width, track.height, track.language,
            number(params, "samplingrate", track.track_id), number(params, "channels", track.track_id),
        ))  # fmt: skip
    return tuple(out)


def header(stream_id: str, tracks: Sequence[TrackDescription]) -> StreamHeader:
    """The header of a stream of ``tracks``: ``ftyp`` + Live Server Manifest + ``moov``."""
    headers: list[boxes.TrackHeader] = []
    manifest_tracks: list[ManifestTrack] = []
    for t in tracks:
        if t.kind.manifest_type not in ("video", "audio"):
            raise ValueError(f"track {t.name}: Smooth headers carry video and audio tracks; {t.kind.name} tracks "
                             "are not written yet")  # fmt: skip
        headers.append(boxes.TrackHeader(t.track_id, t.kind.handler, t.timescale, t.sample_entry, t.width, t.height,
                                         t.language))  # fmt: skip
        manifest_tracks.append(ManifestTrack(t.kind.manifest_type, t.track_id, t.name, t.bitrate, t.timescale, t.codec,
                                             t.language, t.width, t.height, t.sample_rate, t.channels))  # fmt: skip
    smil = live_server_manifest(manifest_tracks)
    data = write_ftyp() + write_live_server_manifest(smil) + boxes.write_moov(headers)
    return StreamHeader(stream_id, tuple(headers), data)


def build_header(profile: Profile, stream: Stream, sample_entries: Sequence[bytes]) -> StreamHeader:
    """The Smooth header of ``stream``, given one sample entry box per track (in profile order)."""
    return header(stream.id, profile.describe(stream, sample_entries))


# --- tfxd and fragments -----------------------------------------------------------------------


@dataclass(frozen=True)
class Tfxd:
    """TrackFragmentExtendedHeaderBox (MS-SSTR 2.2.4.4; version 2 is our assumption, above)."""

    version: int
    absolute_time: int
    duration: int
    fragment_index: int | None = None


# The fields after version and flags, per tfxd version (version 2's layout is our assumption).
_TFXD_LAYOUTS = {0: ">II", 1: ">QQ", 2: ">QQQ"}
# Everything of a tfxd box before its fields (size, "uuid", extended type, version and flags),
# per version: the same for every fragment.
_TFXD_PREFIX = {
    version: struct.pack(">I4s", 8 + 16 + 4 + struct.calcsize(layout), b"uuid") + TFXD_UUID
    + struct.pack(">I", version << 24)
    for version, layout in _TFXD_LAYOUTS.items()
}  # fmt: skip


def write_tfxd(tfxd: Tfxd) -> bytes:
    return _TFXD_PREFIX.get(tfxd.version, b"") + _tfxd_fields(tfxd)


def _tfxd_fields(tfxd: Tfxd) -> bytes:
    """The tfxd's fields (times, and the fragment index in version 2), checked for its version."""
    if tfxd.version == 0:
        if max(tfxd.absolute_time, tfxd.duration) > 0xFFFFFFFF:
            raise ValueError("tfxd version 0 holds 32-bit times; use version 1")
        return struct.pack(">II", tfxd.absolute_time, tfxd.duration)
    if tfxd.version == 1:
        return struct.pack(">QQ", tfxd.absolute_time, tfxd.duration)
    if tfxd.version == 2:
        if tfxd.fragment_index is None:
            raise ValueError("tfxd version 2 needs a fragment index")
        return struct.pack(">QQQ", tfxd.absolute_time, tfxd.duration, tfxd.fragment_index)
    raise ValueError(f"unknown tfxd version {tfxd.version}")


def parse_tfxd(payload: bytes) -> Tfxd:
    """A tfxd from a ``uuid`` box payload (extended type included)."""
    if payload[:16] != TFXD_UUID:
        raise BoxError("uuid box is not a tfxd")
    version, _ = boxes.version_flags(payload[16:], "tfxd")
    body = payload[20:]
    if version not in _TFXD_LAYOUTS:
        raise BoxError(f"tfxd version {version} is unknown")
    layout = _TFXD_LAYOUTS[version]
    if len(body) < struct.calcsize(layout):
        raise BoxError(f"tfxd version {version} is truncated")
    values = struct.unpack_from(layout, body)
    return Tfxd(version, values[0], values[1], values[2] if version == 2 else None)


def signed_time(value: int) -> int:
    """A 64-bit fragment time (tfxd v1/v2 ``fragment_absolute_time``, tfdt v1) as the encoder
    meant it: values from 2**63 up are negative, two's complement.

    The fields are unsigned on paper (MS-SSTR 2.2.4.4, ISO/IEC 14496-12 8.8.12), but encoders
    that start audio before zero write the signed value: ffmpeg 5.1's ``ismv`` muxer stamps its
    first AAC fragment -213,333 (the encoder's 1,024-sample priming delay at 10 MHz), which
    read unsigned is 2**64 - 213,333 and puts every later fragment of the track "before" it.
    No stream reaches 2**63 ticks (29,000 years at 10 MHz), so the reading is unambiguous.
    A 32-bit time (tfxd v0, tfdt v0) is below 2**63 and comes back unchanged."""
    return value - (1 << 64) if value >= 1 << 63 else value


def tfxd_of(traf: boxes.ParsedTraf) -> Tfxd | None:
    """The ``tfxd`` of a generic ``traf`` (the last, if it carries several), or None."""
    found = None
    for extension in traf.extensions:
        if extension.user_type == TFXD_UUID:
            found = parse_tfxd(extension.payload)
    return found


def _tfxd_tail(version: int, base_time: int, duration: int, fragment_index: int) -> bytes:
    return write_tfxd(Tfxd(version, base_time, duration, fragment_index))


def traf_tail(tfxd_version: int) -> boxes.TrafTail:
    """The ``tfxd`` that closes each ``traf``, written from its run's time, duration and index."""
    return functools.partial(_tfxd_tail, tfxd_version)


def write_fragment(sequence_number: int, runs: Sequence[TrackRun], tfxd_version: int = 1) -> bytes:
    """``moof`` + ``mdat`` for one fragment, a ``tfxd`` of ``tfxd_version`` in every ``traf``
    (:func:`orchestrator.fmp4.boxes.write_movie_fragment`)."""
    return boxes.write_movie_fragment(sequence_number, runs, traf_tail(tfxd_version))


class FragmentTemplate(MovieFragmentTemplate):
    """:class:`~orchestrator.fmp4.boxes.MovieFragmentTemplate` with Smooth's ``tfxd``: render()
    is byte for byte ``write_fragment(index, [TrackRun(track_id, base_time, samples, index)],
    tfxd_version)``."""

    def __init__(self, samples: Sequence[Sample], tfxd_version: int = 1) -> None:
        super().__init__(samples, traf_tail(tfxd_version))
        self.tfxd_version = tfxd_version


@dataclass(frozen=True)
class ParsedTraf:
    """A ``traf`` as Smooth reads it: the generic fields and its ``tfxd``."""

    track_id: int
    base_time: int | None
    samples: tuple[Sample, ...]
    tfxd: Tfxd | None

    @property
    def duration(self) -> int:
        return sum(s.duration for s in self.samples)


@dataclass(frozen=True)
class ParsedFragment:
    """A ``moof`` + ``mdat`` read back: the fragment index and each track's samples and tfxd."""

    sequence_number: int
    trafs: tuple[ParsedTraf, ...]
    data: bytes = field(repr=False)


def parse_fragment(
    data: bytes, moof_offset: int = 0, defaults: dict[int, boxes.TrackDefaults] | None = None
) -> ParsedFragment:
    """:func:`orchestrator.fmp4.boxes.parse_fragment`, each ``traf``'s ``tfxd`` read."""
    parsed = boxes.parse_fragment(data, moof_offset, defaults)
    trafs = tuple(ParsedTraf(t.track_id, t.base_time, t.samples, tfxd_of(t)) for t in parsed.trafs)
    return ParsedFragment(parsed.sequence_number, trafs, parsed.data)


# --- the receiver's rules ---------------------------------------------------------------------


@dataclass(frozen=True)
class SmoothReceiverRules:
    """What a Smooth publishing point checks (see the module docstring)."""

    manifest: ManifestBox | None = MANIFEST
    require_manifest: bool = True

    def track_names(self, header: Header) -> dict[int, str]:
        return track_names(header.manifest_text)

    def timing(self, traf: boxes.ParsedTraf, sequence_number: int) -> FragmentTiming:
        """Index: tfxd v2 fragment_index, else mfhd.sequence_number; time and duration: the
        tfxd's, else tfdt and the sum of the sample durations. A 64-bit time is read as a
        signed one (:func:`signed_time`): an encoder's first fragment may start before zero."""
        tfxd = tfxd_of(traf)
        if tfxd is None:
            base = None if traf.base_time is None else signed_time(traf.base_time)
            return FragmentTiming(sequence_number, base, traf.duration)
        index = sequence_number if tfxd.fragment_index is None else tfxd.fragment_index
        return FragmentTiming(index, signed_time(tfxd.absolute_time), tfxd.duration)

    def problem(self, traf: boxes.ParsedTraf) -> str | None:
        return "traf has no tfxd" if tfxd_of(traf) is None else None  # ingest spec 3.3

    def init_segment(self, track: boxes.TrackHeader) -> bytes:
        return write_ftyp() + boxes.write_moov([track])

    def single_track_fragment(self, parsed: boxes.ParsedFragment, traf: boxes.ParsedTraf,
                              timing: FragmentTiming) -> bytes:  # fmt: skip
        """Rebuilt with the same index, time, tfxd version (at least 1) and samples (the sync flag
        survives, other sample flags do not; tfdt is set to the tfxd time)."""
        tfxd = tfxd_of(traf)
        assert tfxd is not None  # accepted fragments carry a tfxd
        run = TrackRun(traf.track_id, tfxd.absolute_time, traf.samples, timing.index)
        return write_fragment(parsed.sequence_number, [run], max(1, tfxd.version))


RECEIVER = SmoothReceiverRules()


# --- the format -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmoothFormat:
    """Smooth Streaming live ingest as a :class:`~orchestrator.wire.format.WireFormat`."""

    tfxd_version: int = 1
    name: str = "smooth"
    plan: RequestPlan = PLAN
    receiver: SmoothReceiverRules = RECEIVER

    def header(self, stream_id: str, tracks: Sequence[TrackDescription]) -> StreamHeader:
        return header(stream_id, tracks)

    def fragment(self, index: int, runs: Sequence[TrackRun]) -> bytes:
        return write_fragment(index, runs, self.tfxd_version)

    def fragment_template(self, samples: Sequence[Sample]) -> FragmentTemplate:
        return FragmentTemplate(samples, self.tfxd_version)


def for_profile(profile: Profile) -> SmoothFormat:
    """The format as the profile configures it (its tfxd version)."""
    return SmoothFormat(profile.presentation.tfxd_version)
