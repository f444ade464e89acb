"""The publisher tests' kit: a fragment index to start the demo profile's synthetic streams at,
and outbox limits wide enough that no test drops a fragment (the profile is ``rig.DEMO``)."""

from __future__ import annotations

from fractions import Fraction

from rig import DEMO

from orchestrator.push.outbox import OutboxLimits

K = 14_080_000
LIMITS = OutboxLimits(max_seconds=Fraction(60), max_bytes=64 * 1024 * 1024)

# The demo profile with an audio track beside its video one: a stream of two tracks.
TWO_TRACKS = DEMO.read_text().replace(
    """  frame_rate = "30000/1001"
""",
    """  frame_rate = "30000/1001"
  [[streams.tracks]]
  kind = "audio"
  name = "audio_eng"
  bitrate = 128_000
  sample_rate = 48000
  channels = 2
  language = "eng"
""",
    1,
)
