"""The publisher tests' kit: a fragment index to start the demo profile's synthetic streams at,
and outbox limits wide enough that no test drops a fragment (the profile is ``rig.DEMO``)."""

from __future__ import annotations

from fractions import Fraction

from orchestrator.push.outbox import OutboxLimits

K = 14_080_000
LIMITS = OutboxLimits(max_seconds=Fraction(60), max_bytes=64 * 1024 * 1024)
