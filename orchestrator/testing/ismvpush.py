"""ffmpeg's own Smooth ingest push, the third-party encoder of the relay's tests and benchmark.

``ffmpeg ... -movflags isml+frag_keyframe -f ismv http://.../<point>.isml/Streams(<id>)``: a
test pattern (H.264, one keyframe every ``gop_seconds``) and a tone (AAC), paced in real time,
for ``seconds``. This is ffmpeg's ismv muxer as the first field report's encoders behave: one
chunked POST, no probe, ``Connection: close``, tfxd v1 and no tfdt, mfhd numbered across both
tracks, the first audio fragment at -213,333 (AAC priming). ffmpeg does not reconnect: a POST
that breaks ends it with an error.
"""

from __future__ import annotations

RATE = 25  # frames a second


def ismv_push_argv(url: str, seconds: int, *, ffmpeg: str = "ffmpeg", gop_seconds: int = 2, size: str = "320x180",
                   video_bitrate: str = "300k", audio_bitrate: str = "64k") -> list[str]:  # fmt: skip
    """The argv (never a shell string) of an ffmpeg that pushes ``seconds`` of video and audio to ``url``."""
    gop = str(RATE * gop_seconds)
    return [
        ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "warning", "-re",
        "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={RATE}",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
        "-t", str(seconds),
        "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-b:v", video_bitrate,
        "-g", gop, "-keyint_min", gop, "-sc_threshold", "0",
        "-c:a", "aac", "-b:a", audio_bitrate, "-ac", "2",
        "-movflags", "isml+frag_keyframe", "-f", "ismv", url,
    ]  # fmt: skip
