"""The Live Server Manifest: the SMIL document that opens every ingest POST.

Theory of operation
-------------------
MS-SSTR section 6 / the ingest spec section 3 require a Live Server Manifest box between
``ftyp`` and ``moov``: a SMIL 2.0 document that lists the stream's tracks inside a ``<switch>``,
one ``<video>`` or ``<audio>`` element each, with ``<param>`` children the server reads
(trackID, trackName, timescale, ...).

The document must be byte-identical on every POST of a stream, from every encoder group
(spec 7.5.c and 8.3: headers identical on reconnect and across redundant encoders), so it is a
pure function of the profile and the track headers, and carries nothing that varies by host,
process or version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

_FOURCC = {"avc1": "H264", "avc3": "H264", "mp4a": "AACL", "hvc1": "HEVC", "hev1": "HEVC"}


@dataclass(frozen=True)
class ManifestTrack:
    """What the manifest says about one track."""

    kind: str  # "video" | "audio"
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
