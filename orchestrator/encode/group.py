"""The group's encoder supervisor: runs the group's encoder instance (see
:mod:`orchestrator.encode.instance`), gates its output and hands it to the push side.

:class:`GroupEncoder` supervises the group's instance and is its sink:

* every fragment passes the group's :class:`~orchestrator.encode.continuity.Continuity` gate (on the
  shared clock, never an index twice, never backwards) before it is handed, without waiting, to
  the group's :class:`~orchestrator.push.fanout.FanOut`, which pushes it to the outbox of every
  endpoint of its stream (a full outbox drops its oldest fragment, counted and logged there);
* an instance that returns, raises, or emits no fragment for ``stall_after`` seconds is
  stopped and restarted with capped backoff; the restart is counted
  (``orchestrator_encoder_restarts_total{reason}``) and logged, and the new instance starts at
  :meth:`Continuity.first_index`: the live fragment or the one after the last emitted, and if
  the wall clock stepped backwards it waits rather than reissue an index;
* with a state directory, accepted fragments are held until the group's state (the last index
  per track) covering them is written atomically, and only then pushed: a restarted process
  continues after them and never sends an index it already sent (the cost is one fsync per
  batch, milliseconds, on fragments that are seconds long);
* :meth:`GroupEncoder.finish` (graceful shutdown) lets the instance complete the fragment in
  flight, then stops it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from orchestrator.clock import TrackClock, live_index
from orchestrator.encode.continuity import ClockIdentity, Continuity, Verdict, encode_state
from orchestrator.encode.instance import InstanceRunner
from orchestrator.encode.instance import Sink as Sink  # re-exported: encode/ffmpeg.py still imports it from here
from orchestrator.encode.statefile import write_state
from orchestrator.fmp4.stream import EncodedFragment, StreamHeader
from orchestrator.ops.metrics import LabelledChildren, Metrics
from orchestrator.ops.state import EncoderState, GroupState
from orchestrator.profile import Profile
from orchestrator.push.fanout import FanOut, Route
from orchestrator.push.handoff import HeaderBoard
from orchestrator.wallclock import WallClock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    base: float = 0.5
    cap: float = 10.0
    healthy_after: float = 30.0  # an instance that ran this long resets the backoff

    def delay(self, consecutive: int) -> float:
        return 0.0 if consecutive <= 1 else min(self.cap, self.base * 2 ** (consecutive - 2))


class GroupEncoder(Sink):
    """Supervises one group's encoder instance and gates its output. See the module docstring."""

    def __init__(
        self,
        *,
        group: str,
        profile: Profile,
        runner: InstanceRunner,
        fanout: FanOut,
        states: dict[str, EncoderState],
        metrics: Metrics,
        wall: WallClock,
        restored: Mapping[str, Sequence[int]] | None = None,
        state_dir: Path | None = None,
        stall_after: float | None = None,
        restart: RestartPolicy | None = None,
        group_state: GroupState | None = None,
    ) -> None:
        self.group = group
        self.profile = profile
        self.runner = runner
        self.fanout = fanout
        self.states = states
        self.metrics = metrics
        self.wall = wall
        self.clocks: dict[str, list[TrackClock]] = {
            s.id: [profile.track_clock(t) for t in s.tracks] for s in profile.streams
        }
        self.track_ids = {s.id: profile.track_ids(s) for s in profile.streams}
        kinds = {s.id: [t.track_kind for t in s.tracks] for s in profile.streams}
        self.continuity = Continuity(self.clocks, restored, self.track_ids, kinds)
        self.state_dir = state_dir
        self.state_name = f"{profile.presentation.name}.{group}"
        self.fragment_seconds = float(profile.presentation.fragment_duration)
        if stall_after is None:
            stall_after = profile.groups[group].stall_fragments * self.fragment_seconds
        self.stall_after = stall_after
        self.restart = restart or RestartPolicy()
        self.restarts = 0
        self.group_state = group_state or GroupState(group)  # what /status and the view show
        self._identity = ClockIdentity(profile.presentation.name, profile.presentation.epoch_ns,
                                       profile.presentation.fragment_duration)  # fmt: skip
        self._instance_scope: trio.CancelScope | None = None
        self._last_progress = 0.0
        self._final_index: int | None = None
        self._final_reached = trio.Event()
        self._stopping = False
        self._state_dirty = trio.Event()
        self._held: list[EncodedFragment] = []
        self._flush_lock = trio.Lock()
        self.instance_pid: int | None = None  # the running instance's process, for a process backend
        # Metric children looked up once per (stream, group) / endpoint labels, not per fragment.
        self._children: dict[tuple[str, ...], LabelledChildren] = {}

    @property
    def headers(self) -> Mapping[str, HeaderBoard]:
        """The stream header board of each stream (the fan-out's)."""
        return self.fanout.boards

    @property
    def outputs(self) -> Mapping[str, Sequence[Route]]:
        """The routes (an outbox per endpoint) of each stream (the fan-out's)."""
        return {stream_id: list(self.fanout.routes(stream_id)) for stream_id in self.fanout.boards}

    # --- the sink ---------------------------------------------------------------------------

    def header(self, header: StreamHeader) -> None:
        self.fanout.header(header)

    def fragment(self, fragment: EncodedFragment) -> None:
        stream_id = fragment.stream_id
        if self._final_index is not None and fragment.index > self._final_index:
            return  # stopping: only the fragment in flight is finished
        judgement = self.continuity.judge(fragment)
        if judgement.verdict is not Verdict.ACCEPTED:
            level = logging.DEBUG if judgement.verdict is Verdict.REPEAT else logging.ERROR
            log.log(level, "encoder.fragment.rejected group=%s stream=%s track=%d index=%d reason=%s detail=%s",
                    self.group, stream_id, fragment.track_id, fragment.index, judgement.verdict.value,
                    judgement.reason)  # fmt: skip
            self.metrics.encoder_rejected.labels(stream_id, self.group, judgement.verdict.value).inc()
            return
        self._last_progress = trio.current_time()
        if judgement.skipped:
            log.warning("encoder.fragments.skipped group=%s stream=%s track=%d count=%d next_index=%d",
                        self.group, stream_id, fragment.track_id, judgement.skipped, fragment.index)  # fmt: skip
            if fragment.track_id == self.track_ids[stream_id][0]:  # once per stream, not per track
                self.metrics.encoder_skipped.labels(stream_id, self.group).inc(judgement.skipped)
        if self.state_dir is None:
            self._release(fragment)
        else:
            self._held.append(fragment)  # released by _flush once the state covering it is on disk
            self._state_dirty.set()
        children = self._metric_children((stream_id, self.group))
        children.fragments_encoded.inc()
        done = self.continuity.completed(stream_id)
        if done == fragment.index:  # the stream's last track for this index
            children.last_encoded_index.set(done)
            state = self.states.get(stream_id)
            if state is not None:
                state.last_index = done
                state.completed_monotonic = self._last_progress
                state.fragments += 1
            log.debug("encoder.fragment group=%s stream=%s index=%d", self.group, stream_id, done)
        if self._final_index is not None and self.continuity.final_reached:
            self._final_reached.set()

    def _metric_children(self, labels: tuple[str, ...]) -> LabelledChildren:
        children = self._children.get(labels)
        if children is None:
            children = self._children[labels] = LabelledChildren(self.metrics, labels)
        return children

    def _release(self, fragment: EncodedFragment) -> None:
        self.fanout.fragment(fragment)  # to every endpoint's outbox; drops counted and logged there

    def instance_started(self, pid: int) -> None:
        self.instance_pid = pid
        log.info("encoder.instance group=%s pid=%d", self.group, pid)

    # --- supervision ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the group's encoder instance, restarting it whenever it ends, fails or stalls.

        Cancellation: the instance is cancelled (a process backend kills its process) and the
        state is written one last time, shielded.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watchdog)
                nursery.start_soon(self._persist_state)
                await self._restart_loop()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._write_state()

    async def finish(self, grace: float) -> None:
        """Graceful stop: let the instance complete the fragment in flight (the one live now),
        then stop it. Gives up after ``grace`` seconds."""
        now_ns = self.wall.now_ns()
        self._final_index = max(live_index(clocks, now_ns) for clocks in self.clocks.values())
        self.continuity.watch_final(self._final_index)
        if self.continuity.final_reached:  # nothing left in flight (the wall clock stepped back)
            self._final_reached.set()
        log.info("encoder.finishing group=%s final_index=%d", self.group, self._final_index)
        with trio.move_on_after(grace) as waited:
            await self._final_reached.wait()
        if waited.cancelled_caught:
            short = self.continuity.short_of_final
            log.warning("encoder.finish.timeout group=%s final_index=%d seconds=%g streams_short=%d first_short=%s",
                        self.group, self._final_index, grace, len(short), min(short, default=""))  # fmt: skip
        self._stopping = True
        if self._instance_scope is not None:
            self._instance_scope.cancel()
        await self._flush()

    async def _restart_loop(self) -> None:
        consecutive = 0
        while not self._stopping:
            first = await self._wait_for_first_index()
            started = trio.current_time()
            self._last_progress = started + self.fragment_seconds  # allowance for the fragment in flight
            reason, detail = "exited", "the instance returned"
            with trio.CancelScope() as scope:
                self._instance_scope = scope
                self.metrics.encoder_up.labels(self.group).set(1)
                self.group_state.set_up(True, time.time())
                log.info("encoder.started group=%s first_index=%d restarts=%d", self.group, first, self.restarts)
                try:
                    await self.runner(first, self)
                except Exception as exc:  # any failure of an instance is survived: restart it
                    reason, detail = self._classify(exc)
                    log.error("encoder.failed group=%s reason=%s detail=%s", self.group, reason, detail,
                              exc_info=reason == "crashed")  # fmt: skip
                finally:  # also when run() itself is cancelled
                    self.metrics.encoder_up.labels(self.group).set(0)
                    self.group_state.set_up(False, time.time())
            self._instance_scope = None
            self.instance_pid = None
            if self._stopping:
                return
            if scope.cancelled_caught:
                reason, detail = "stalled", f"no fragment for {self.stall_after:g} s"
            ran_for = trio.current_time() - started
            consecutive = 1 if ran_for >= self.restart.healthy_after else consecutive + 1
            delay = self.restart.delay(consecutive)
            self.restarts += 1
            self.group_state.restarts = self.restarts
            self.group_state.record_failure(f"{reason}: {detail}", None, time.time())
            self.metrics.encoder_restarts.labels(self.group, reason).inc()
            log.warning("encoder.restarting group=%s reason=%s detail=%s ran_seconds=%.1f in_seconds=%.1f",
                        self.group, reason, detail, ran_for, delay)  # fmt: skip
            await trio.sleep(delay)

    def _classify(self, exc: BaseException) -> tuple[str, str]:
        exit_code = getattr(exc, "exit_code", None)
        if isinstance(exit_code, int):
            self.metrics.encoder_last_exit_code.labels(self.group).set(exit_code)
            self.group_state.last_exit_code = exit_code
            return ("killed" if exit_code < 0 else "exited"), str(exc)
        return "crashed", f"{type(exc).__name__}: {exc}"

    async def _wait_for_first_index(self) -> int:
        """The index the next instance starts at; waits while the wall clock is behind the last
        fragment emitted (it stepped backwards), so no index is ever issued twice."""
        live = min(live_index(c, self.wall.now_ns()) for c in self.clocks.values())
        first = self.continuity.first_index(live)
        if first > live:
            resume_ns = max(clock.wall_ns(clock.start(first)) for c in self.clocks.values() for clock in c)
            log.warning("encoder.waiting_for_clock group=%s live_index=%d resume_index=%d wait_seconds=%.1f",
                        self.group, live, first, (resume_ns - self.wall.now_ns()) / 1e9)  # fmt: skip
            await self.wall.sleep_until_ns(resume_ns)
        return first

    async def _watchdog(self) -> None:
        """Cancels an instance that emits nothing for ``stall_after`` seconds.
        Cancellation: simply stops watching."""
        while True:
            await trio.sleep(min(1.0, self.stall_after / 4))
            scope = self._instance_scope
            if scope is None or self._stopping or scope.cancel_called:
                continue
            if trio.current_time() - self._last_progress >= self.stall_after:
                log.error("encoder.stalled group=%s seconds=%g", self.group, self.stall_after)
                scope.cancel()

    async def _persist_state(self) -> None:
        """Writes the state file and then releases the fragments it covers, as fragments arrive.
        Cancellation: stops; fragments still held are not sent (the process is stopping hard)."""
        if self.state_dir is None:
            return
        while True:
            await self._state_dirty.wait()
            self._state_dirty = trio.Event()
            await self._flush()

    async def _flush(self) -> None:
        async with self._flush_lock:
            held, self._held = self._held, []
            if held:
                await self._write_state()
            for fragment in held:
                self._release(fragment)

    async def _write_state(self) -> None:
        if self.state_dir is None:
            return
        snapshot = self.continuity.snapshot()
        if not snapshot:
            return
        data = encode_state(self._identity, self.group, snapshot, self.clocks)
        try:
            await trio.to_thread.run_sync(write_state, self.state_dir, self.state_name, data)
        except OSError as exc:
            # Sending live matters more than the state file: log, count, and go on.
            self.metrics.state_write_failures.labels(self.group).inc()
            log.error("encoder.state.write_failed group=%s dir=%s error=%s", self.group, self.state_dir, exc)
