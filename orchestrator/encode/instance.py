"""What an encoder instance is: the :class:`Sink` it writes to, the :data:`InstanceRunner` that
runs one, and the synthetic backend's runner.

An *encoder instance* serves one group: it encodes every stream of the presentation and hands
each stream's header and per-track fragments to a sink, starting at a fragment index it is
given. Two backends exist: :func:`run_synthetic_encoder` (below, no dependencies) and
:func:`orchestrator.encode.ffmpeg.run_ffmpeg_encoder`. Index and timestamps come only from the
shared clock, never from a counter of the instance's own. The sink is the group's supervisor
(:class:`~orchestrator.encode.group.GroupEncoder`), which gates the fragments and hands them to
the push side's fan-out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from orchestrator.clock import fragment_due_ns
from orchestrator.encode.synthetic import SharedFragments, SyntheticStream
from orchestrator.fmp4.stream import EncodedFragment, StreamHeader
from orchestrator.profile import Profile
from orchestrator.wallclock import WallClock


class Sink:
    """What an encoder instance hands its output to. Neither method ever blocks."""

    def header(self, header: StreamHeader) -> None:
        raise NotImplementedError

    def fragment(self, fragment: EncodedFragment) -> None:
        raise NotImplementedError

    def instance_started(self, pid: int) -> None:
        """A process backend reports the process it started (for logs, status and drills)."""


InstanceRunner = Callable[[int, Sink], Awaitable[None]]
"""Runs one encoder instance from fragment index ``first_index`` until cancelled or failed."""


async def run_synthetic_encoder(
    profile: Profile, first_index: int, sink: Sink, *, wall: WallClock, shared: SharedFragments | None = None
) -> None:
    """Release every stream's fragments on the shared clock from ``first_index`` on.

    Fragment k is released when it is complete on every track of every stream (its due time),
    built from the packaged clips (through ``shared``, if given: groups of one process then
    share each fragment object). Cancellation: stops between fragments (a fragment set is
    built and handed over in one step, with no checkpoint in between).
    """
    sources = [SyntheticStream(profile, stream) for stream in profile.streams]
    for source in sources:
        sink.header(source.header)
    # The due time per distinct set of track clocks (usually one or two for any number of streams).
    clock_sets = list({tuple(source.clocks): source.clocks for source in sources}.values())
    k = first_index
    while True:
        await wall.sleep_until_ns(max(fragment_due_ns(clocks, k) for clocks in clock_sets))
        for source in sources:
            for fragment in source.fragment(k) if shared is None else shared.fragment(source, k):
                sink.fragment(fragment)
        k += 1
