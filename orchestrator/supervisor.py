"""Supervisor: runs every encoder group, stream, encoder instance and publisher of a profile.

Task tree (all trio nurseries, nothing detached)::

    run_up
    ├── local ingest servers (``--local-ingest``), metrics listener      [services]
    ├── signal watcher: 1st SIGINT/SIGTERM = graceful stop, 2nd = cancel everything
    ├── idle sweeper: ends the POSTs that have had nothing to send for a while
    ├── garbage collection, paced by the shared clock (``orchestrator.gcpacer``)
    ├── status view (live table on a TTY, log lines otherwise)
    └── per group:
        ├── GroupEncoder: the group's encoder instance, restarted when it
        │   fails or stalls, gating every fragment onto the shared clock    [encoders]
        └── per stream, one publisher per endpoint                          [publishers]

Graceful stop (SIGTERM, SIGINT, ``--duration``): each group's instance finishes the fragment in
flight and is stopped; every endpoint outbox is closed; each publisher sends what is queued,
ends its chunked body and waits for the final response. All of it within ``shutdown_grace``
seconds, after which whatever is left is cancelled. Then the services stop and ``run_up``
returns normally (the CLI exits 0).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import trio
from prometheus_client import CollectorRegistry

from orchestrator.encode.continuity import ClockIdentity, decode_state
from orchestrator.encode.ffmpeg import (
    HOW_TO_GET_FFMPEG,
    FfmpegPlan,
    find_ffmpeg,
    plan_ffmpeg,
    run_ffmpeg_encoder,  # fmt: skip
)
from orchestrator.encode.group import GroupEncoder
from orchestrator.encode.instance import InstanceRunner, Sink, run_synthetic_encoder
from orchestrator.encode.statefile import hold_group_lock, read_state, state_path
from orchestrator.encode.synthetic import SharedFragments, SyntheticStream
from orchestrator.errors import EncoderError, ListenError, ProfileError, SourceError
from orchestrator.fmp4.stream import EncodedFragment, StreamHeader
from orchestrator.gcpacer import GcPacer, paced_collection
from orchestrator.ops.listener import UpMonitor, serve_listener
from orchestrator.ops.metrics import Metrics
from orchestrator.ops.monitorweb import Peers
from orchestrator.ops.openfiles import ensure_open_files, files_needed
from orchestrator.ops.state import EncoderState, GroupState, LiveState
from orchestrator.ops.thumbnails import Thumbnailer
from orchestrator.ops.thumbnails import find_ffmpeg as find_decoder
from orchestrator.ops.view import StatusView
from orchestrator.profile import FfmpegEncoder, Profile, RelayEncoder, endpoint_key, parse_listen
from orchestrator.push.cmafroute import Reboxer, add_cmaf_publishers
from orchestrator.push.connection import FILES_PER_PUBLISHER, Connector
from orchestrator.push.connection import tls_context as tls_context  # re-exported: tests and callers use it from here
from orchestrator.push.fanout import FanOut
from orchestrator.push.handoff import EndpointOutbox
from orchestrator.push.outbox import OutboxLimits
from orchestrator.push.publisher import IdleSweeper, Publisher, PublisherSettings, auth_for
from orchestrator.push.sigv4 import RequestSigner, signer_for
from orchestrator.wallclock import SystemWallClock, WallClock

log = logging.getLogger(__name__)

CONCURRENT_PROBES = 512  # probes (new connections) under way at once, over all publishers of the process


@dataclass(frozen=True)
class UpOptions:
    groups: Sequence[str] | None = None  # None: every group of the profile
    local_ingest: Path | None = None  # serve the loopback endpoints in-process, archiving here
    duration: float | None = None  # stop by itself after this many seconds
    status: str = "auto"  # "auto" | "live" | "log" | "off"
    # The graceful-stop bound: SIGTERM to exit (the encoder's finish, ffmpeg's own stop and the final
    # responses all fit in it). Kubernetes kills the pod terminationGracePeriodSeconds after SIGTERM,
    # so deploy/kubernetes/base/statefulset.yaml keeps that above this bound:
    # terminationGracePeriodSeconds: 30 (tests/deploy checks the relation).
    shutdown_grace: float = 10.0
    handle_signals: bool = True
    profile_path: str = "<profile>"
    publisher_settings: PublisherSettings | None = None  # None: derived from the fragment duration
    stall_after: float | None = None  # None: the group's stall_fragments x the fragment duration


@dataclass
class Running(LiveState):
    """Handles on a running ``up``, for tests; the status view sees only its :class:`LiveState`."""

    group_encoders: list[GroupEncoder] = field(default_factory=list)
    metrics_address: tuple[str, int] | None = None
    monitor: UpMonitor | None = None
    ingest_addresses: list[tuple[str, int]] = field(default_factory=list)
    stop: trio.Event = field(default_factory=trio.Event)


class _Planned:
    """Everything built from the profile before any task starts, so that configuration errors
    (a missing secret, a non-loopback endpoint with --local-ingest) fail before we go live."""

    def __init__(self, profile: Profile, options: UpOptions, metrics: Metrics) -> None:
        self.profile = profile
        selected = list(options.groups) if options.groups else list(profile.groups)
        unknown = [g for g in selected if g not in profile.groups]
        if unknown:
            known = ", ".join(profile.groups)
            raise ProfileError(options.profile_path, [("groups", f"no group named {', '.join(unknown)} "
                                                                  f"(the profile has: {known})")])  # fmt: skip
        self.groups = selected
        self.ffmpeg: dict[str, FfmpegPlan | None] = {}
        problems: list[tuple[str, str]] = [
            (f"groups.{name}.encoder.backend", "a relay group is run by `orchestrator relay`, not `up` (choose the "
             "other groups with --group)")
            for name in selected if isinstance(profile.groups[name].encoder, RelayEncoder)
        ]  # fmt: skip
        if problems:
            raise ProfileError(options.profile_path, problems)
        for group_name in selected:
            try:
                self.ffmpeg[group_name] = self._plan_ffmpeg(group_name)
            except (ValueError, EncoderError) as exc:
                key = f".{exc.key}" if isinstance(exc, SourceError) else ""
                problems.append((f"groups.{group_name}.encoder{key}", str(exc)))
        if any(plan is None for plan in self.ffmpeg.values()):
            for stream in profile.streams:  # the synthetic clips must cover every track: fail now, not live
                SyntheticStream(profile, stream)
        self.settings = options.publisher_settings or PublisherSettings.for_fragment_duration(
            float(profile.presentation.fragment_duration))  # fmt: skip
        self.auth: dict[tuple[str, int], str | None] = {}  # Authorization header values: never logged
        self.signers: dict[tuple[str, int], RequestSigner | None] = {}  # SigV4, credentials read: never logged
        for group_name in selected:
            for i, endpoint in enumerate(profile.groups[group_name].endpoints):
                key_path = endpoint_key(group_name, endpoint)
                try:
                    self.auth[(group_name, i)] = auth_for(endpoint)
                except ValueError as exc:
                    problems.append((f"{key_path}.credentials", str(exc)))
                try:
                    self.signers[(group_name, i)] = signer_for(endpoint)
                except ValueError as exc:
                    problems.append((f"{key_path}.sigv4", str(exc)))
                if options.local_ingest is not None and not endpoint.is_loopback:
                    problems.append((f"{key_path}.url", "--local-ingest serves loopback endpoints only; "
                                                        f"{endpoint.url} is not on this host"))  # fmt: skip
                if options.local_ingest is not None and endpoint.format == "cmaf" and endpoint.cmaf_paths != "template":
                    problems.append((f"{key_path}.cmaf_paths", 'the local publishing point takes CMAF on '
                                     'cmaf_paths = "template" only (a Streams() path is Smooth\'s there)'))  # fmt: skip
        if problems:
            raise ProfileError(options.profile_path, problems)
        self.metrics = metrics
        self.shared_fragments = SharedFragments()  # the synthetic groups' fragments, built once
        self.restored = {group: self._restore(group) for group in selected}

    def _restore(self, group: str) -> dict[str, list[int]] | None:
        """The group's continuity state from the state directory, if any. A state file that
        cannot be used is reported and ignored: the shared clock alone still gives a consistent
        (if possibly repeated) index, and refusing to go live would be worse."""
        directory = self.profile.state.dir
        if directory is None:
            return None
        p = self.profile.presentation
        name = f"{p.name}.{group}"
        where = state_path(directory, name)
        try:
            data = read_state(directory, name)
            if data is None:
                log.info("supervisor.state.none group=%s file=%s", group, where)
                return None
            restored = decode_state(data, ClockIdentity(p.name, p.epoch_ns, p.fragment_duration), group)
        except (OSError, ValueError) as exc:
            log.error("supervisor.state.ignored group=%s file=%s error=%s", group, where, exc)
            return None
        log.info("supervisor.state.restored group=%s file=%s last_index=%s", group, where,
                 ",".join(f"{s}:{max(i)}" for s, i in sorted(restored.items())))  # fmt: skip
        return restored

    def _plan_ffmpeg(self, group: str) -> FfmpegPlan | None:
        """The group's ffmpeg plan; None for the synthetic backend (chosen, or the fallback)."""
        config = self.profile.groups[group].encoder
        if not isinstance(config, FfmpegEncoder):
            return None
        executable = find_ffmpeg(config.path)
        if executable is None:
            if config.fallback == "synthetic":
                log.warning("supervisor.ffmpeg.missing group=%s fallback=synthetic how=%r", group, HOW_TO_GET_FFMPEG)
                return None
            raise EncoderError(f"no ffmpeg found on PATH; {HOW_TO_GET_FFMPEG}")
        tracks = [t for s in self.profile.streams for t in s.tracks]
        plan = plan_ffmpeg(config, executable, needs_video=any(t.kind == "video" for t in tracks),
                           needs_audio=any(t.kind == "audio" for t in tracks))  # fmt: skip
        log.info("supervisor.ffmpeg group=%s executable=%s burn_in=%s", group, executable, plan.burn_in)
        return plan

    def runner(self, group: str, wall: WallClock) -> InstanceRunner:
        profile, metrics, ffmpeg = self.profile, self.metrics, self.ffmpeg.get(group)
        shared = self.shared_fragments

        async def synthetic(first_index: int, sink: Sink) -> None:
            await run_synthetic_encoder(profile, first_index, sink, wall=wall, shared=shared)

        if ffmpeg is None:
            return synthetic

        async def real(first_index: int, sink: Sink) -> None:
            await run_ffmpeg_encoder(profile, ffmpeg, first_index, sink, group=group, wall=wall, metrics=metrics)

        return real

    def local_ingest_addresses(self) -> dict[tuple[str, int], str]:
        """Each address the local ingest servers listen on -> the first endpoint key that set it."""
        addresses: dict[tuple[str, int], str] = {}
        for group_name in self.groups:
            for endpoint in self.profile.groups[group_name].endpoints:
                parts = urlsplit(endpoint.url)
                host = parts.hostname or "127.0.0.1"
                address = ("127.0.0.1" if host == "localhost" else host, parts.port or 80)
                addresses.setdefault(address, f"{endpoint_key(group_name, endpoint)}.url")
        return dict(sorted(addresses.items()))

    def lock_groups(self, stack: contextlib.ExitStack) -> None:
        """One instance per (profile, group): hold each group's lock in the state directory.
        Without a state directory there is nothing on disk two instances would corrupt, and no
        shared place to look for the other one; say so once."""
        directory = self.profile.state.dir
        for group in self.groups:
            if directory is None:
                log.warning("supervisor.lock.none group=%s reason='no [state] dir: a second instance of this "
                            "group would go unnoticed'", group)  # fmt: skip
                continue
            stack.enter_context(hold_group_lock(directory, f"{self.profile.presentation.name}.{group}", group))


async def run_up(
    profile: Profile,
    options: UpOptions,
    *,
    wall: WallClock | None = None,
    registry: CollectorRegistry | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the profile until stopped (signal, ``options.duration`` or ``Running.stop``).

    Raises ProfileError before anything starts if the profile cannot run here.
    Cancellation: everything stops at once; POSTs in flight are cut without their final chunk.
    """
    wall = wall or SystemWallClock()
    metrics = Metrics(registry)
    p = profile.presentation
    running = Running(presentation=p.name, fragment_duration=float(p.fragment_duration), epoch_ns=p.epoch_ns,
                      fragment_duration_exact=p.fragment_duration, started_wall=wall.now_ns() / 1e9,
                      state_dir=None if profile.state.dir is None else str(profile.state.dir))  # fmt: skip
    view = StatusView(running, interval=running.fragment_duration, mode=options.status)
    with view.quiet_console():  # on a terminal the table is the view: the console keeps to warnings
        plan = _Planned(profile, options, metrics)
        metrics.describe_profile(p.name, list(profile.groups), plan.groups, p.epoch_ns / 1e9,
                                 running.fragment_duration)  # fmt: skip
        metrics.endpoint_state.watch(running)
        metrics.push_lag.watch(running)
        with contextlib.ExitStack() as locks:
            plan.lock_groups(locks)
            await _run_services(plan, options, running, wall, view, task_status)
        log.info("supervisor.stopped")
        view.print_summary()


async def _listen(
    services: trio.Nursery, what: str, host: str, port: int, serve: Callable[..., Awaitable[None]]
) -> tuple[str, int]:
    """Start ``serve(host, port)`` as a listener; an address in use (or any bind error) names the
    address and ``what`` set it, instead of a bare ``[Errno 98] Address already in use``."""
    try:
        bound: tuple[str, int] = await services.start(serve, host, port)
    except (OSError, BaseExceptionGroup) as exc:
        error = _os_error(exc)
        if error is None:
            raise
        hint = (
            "; another process (or another `orchestrator up`) listens there" if error.errno == errno.EADDRINUSE else ""
        )
        raise ListenError(f"cannot listen on {host}:{port} (set by {what}): {error.strerror or error}{hint}") from exc
    return bound


def _os_error(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _os_error(inner)) is not None:
                return found
    return None


async def _run_services(
    plan: _Planned,
    options: UpOptions,
    running: Running,
    wall: WallClock,
    view: StatusView,
    task_status: trio.TaskStatus[Running],
) -> None:
    profile, metrics = plan.profile, plan.metrics
    async with trio.open_nursery() as services:
        if options.local_ingest is not None:
            from orchestrator.ingest.server import serve_ingest

            for (host, port), key in plan.local_ingest_addresses().items():
                # One archive per server (per region), as separate ingest services would keep.
                archive = options.local_ingest / f"{host}-{port}"
                bound = await _listen(services, f"{key} with --local-ingest", host, port,
                                      functools.partial(serve_ingest, archive_dir=archive))  # fmt: skip
                running.ingest_addresses.append(bound)
                running.archives.append(str(archive))
        if profile.metrics.enabled:
            host, port = parse_listen(profile.metrics.listen)
            if profile.monitor.enabled:
                running.monitor = _monitor(plan, running)
            # /metrics, /healthz, /readyz, /status, /monitor; ``running`` is filled in as the groups are built.
            serve = functools.partial(serve_listener, metrics.registry, running, monitor=running.monitor)
            running.metrics_address = await _listen(services, "the profile's metrics.listen", host, port, serve)
        if options.handle_signals:
            # start(), not start_soon(): the handlers are in place before anything logs "started",
            # so a SIGTERM that follows at once is a graceful stop, never the default kill.
            await services.start(_watch_signals, running.stop, services.cancel_scope)
        if options.duration is not None:
            services.start_soon(_stop_after, options.duration, running.stop)

        await _run_groups(plan, options, running, wall, view, services, task_status)
        services.cancel_scope.cancel()


async def _run_groups(
    plan: _Planned,
    options: UpOptions,
    running: Running,
    wall: WallClock,
    view: StatusView,
    services: trio.Nursery,
    task_status: trio.TaskStatus[Running],
) -> None:
    """Build the groups' publishers and encoders and run them; ``services`` runs what serves them
    all (the idle sweeper, the garbage-collection pacer) and is cancelled by the caller after.
    The status view runs until the last publisher has ended, then draws its last frame."""
    profile, metrics = plan.profile, plan.metrics
    publishers: list[Publisher] = []
    encoders: list[GroupEncoder] = []
    fanouts: list[FanOut] = []
    count = len(profile.streams) * sum(len(profile.groups[g].endpoints) for g in plan.groups)
    ensure_open_files(files_needed(count, FILES_PER_PUBLISHER))
    connector = Connector(plan.settings.send_timeout)  # one connection per request: see orchestrator.push.connection
    connect_slots = trio.CapacityLimiter(CONCURRENT_PROBES)
    idle_sweeper = IdleSweeper()
    services.start_soon(idle_sweeper.run)
    for group_name in plan.groups:
        group = profile.groups[group_name]
        limits = OutboxLimits(group.max_backlog.seconds, int(group.max_backlog.bytes))
        metrics.backlog_limit_seconds.labels(group_name).set(float(group.max_backlog.seconds))
        metrics.backlog_limit_bytes.labels(group_name).set(int(group.max_backlog.bytes))
        metrics.initialise_group(group_name, [stream.id for stream in profile.streams])
        fanout = FanOut(group_name, metrics)  # the encoder's output to every endpoint's outbox
        if running.monitor is not None:
            fanout.tap = MonitorTap(running.monitor.thumbnailer, group_name)
        fanouts.append(fanout)
        states: dict[str, EncoderState] = {}
        group_state = GroupState(group_name)
        running.groups.append(group_state)
        for stream in profile.streams:
            board = fanout.add_stream(stream.id)
            states[stream.id] = EncoderState(group_name, stream.id)
            running.encoders.append(states[stream.id])
            reboxer = Reboxer(profile.presentation.epoch_ns)  # CMAF endpoints: one re-boxing per fragment
            for i, endpoint in enumerate(group.endpoints):
                if endpoint.format == "cmaf":  # a publisher per track (orchestrator.push.cmafroute)
                    tracks = list(zip(profile.track_ids(stream), [t.name for t in stream.tracks], strict=True))
                    added = add_cmaf_publishers(
                        fanout, board, tracks, endpoint, reboxer=reboxer, limits=limits, metrics=metrics,
                        settings=plan.settings, connector=connector, authorization=plan.auth[(group_name, i)],
                        connect_slots=connect_slots, idle_sweeper=idle_sweeper,
                        signer=plan.signers[(group_name, i)])  # fmt: skip
                else:
                    outbox = EndpointOutbox(limits)
                    added = [Publisher(
                        group=group_name, stream_id=stream.id, endpoint=endpoint, header=board,
                        outbox=outbox, metrics=metrics, settings=plan.settings, connector=connector,
                        authorization=plan.auth[(group_name, i)], connect_slots=connect_slots,
                        idle_sweeper=idle_sweeper)]  # fmt: skip
                    fanout.add_route(stream.id, outbox, added[0].state, added[0].labels)
                for publisher in added:
                    publishers.append(publisher)
                    metrics.initialise_endpoint(publisher.labels)
                    running.publishers.append(publisher.state)
        encoder = GroupEncoder(
            group=group_name, profile=profile, runner=plan.runner(group_name, wall), fanout=fanout,
            states=states, metrics=metrics, wall=wall, restored=plan.restored[group_name],
            state_dir=profile.state.dir, stall_after=options.stall_after, group_state=group_state)  # fmt: skip
        encoders.append(encoder)
        running.group_encoders.append(encoder)

    log.info("supervisor.started profile=%s groups=%s streams=%d publishers=%d", profile.presentation.name,
             ",".join(plan.groups), len(profile.streams), len(publishers))  # fmt: skip
    # Garbage is collected in the quiet middle of each fragment duration, not in the bursts at
    # its boundaries (see orchestrator.gcpacer); what was built above is frozen, never walked again.
    pacer = GcPacer(profile.presentation.epoch_ns, profile.presentation.fragment_duration, wall)
    with paced_collection():
        services.start_soon(pacer.run)
        async with trio.open_nursery() as view_nursery:
            view_nursery.start_soon(view.run)
            async with trio.open_nursery() as publishers_nursery:
                for publisher in publishers:
                    publishers_nursery.start_soon(publisher.run)
                async with trio.open_nursery() as encoders_nursery:
                    for encoder in encoders:
                        encoders_nursery.start_soon(encoder.run)
                    task_status.started(running)
                    await running.stop.wait()
                    running.stopping = True  # the view says "stopping", not "encoder down"
                    deadline = trio.current_time() + options.shutdown_grace
                    log.info("supervisor.stopping grace_seconds=%g", options.shutdown_grace)
                    # Finish the fragment in flight, but leave the publishers at least a third of the grace.
                    async with trio.open_nursery() as finishing:
                        for encoder in encoders:
                            finishing.start_soon(encoder.finish, options.shutdown_grace * 2 / 3)
                    encoders_nursery.cancel_scope.deadline = trio.current_time() + 1.0
                for fanout in fanouts:
                    fanout.close()
                publishers_nursery.cancel_scope.deadline = deadline
            view.stop()  # every publisher has ended: the last frame says "stopped"


def _monitor(plan: _Planned, running: Running) -> UpMonitor:
    """The confidence monitor: decodes with the groups' ffmpeg if they have one, else any found."""
    p, config = plan.profile.presentation, plan.profile.monitor
    decoder = next((ff.executable for ff in plan.ffmpeg.values() if ff is not None), None) or find_decoder()
    thumbnailer = Thumbnailer(decoder, fragment_seconds=float(p.fragment_duration), concurrency=config.concurrency)
    decodes = plan.metrics.monitor_decodes
    thumbnailer.counts.on_count = lambda outcome, n: decodes.labels(outcome).inc(n)
    peers = Peers(config.peers, refresh=min(1.0, float(p.fragment_duration) / 2)) if config.peers else None
    return UpMonitor(running, thumbnailer, epoch_ns=p.epoch_ns, fragment_duration=p.fragment_duration, peers=peers)


class MonitorTap:
    """What a group's fan-out hands the confidence monitor: each stream's header and the
    fragments of its first video and first audio track (the thumbnailer keeps them only while
    a page is open)."""

    def __init__(self, thumbnailer: Thumbnailer, group: str) -> None:
        self.thumbnailer = thumbnailer
        self.group = group
        self._kinds: dict[str, dict[int, str]] = {}  # stream -> track ID -> "video" | "audio"

    def header(self, header: StreamHeader) -> None:
        kinds: dict[int, str] = {}
        for track in header.tracks:
            kind = {b"vide": "video", b"soun": "audio"}.get(track.handler)
            if kind is not None and kind not in kinds.values():
                kinds[track.track_id] = kind
        self._kinds[header.stream_id] = kinds
        self.thumbnailer.header(((header.stream_id,), self.group), header.data, kinds.values())

    def fragment(self, fragment: EncodedFragment) -> None:
        kind = self._kinds.get(fragment.stream_id, {}).get(fragment.track_id)
        if kind is not None:
            self.thumbnailer.offer(((fragment.stream_id,), self.group), fragment.index, kind, fragment.data)


async def _stop_after(seconds: float, stop: trio.Event) -> None:
    await trio.sleep(seconds)
    log.info("supervisor.duration_reached seconds=%g", seconds)
    stop.set()


async def _watch_signals(
    stop: trio.Event, everything: trio.CancelScope, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """First SIGINT/SIGTERM: graceful stop. Second: cancel everything now. Reports started once
    the handlers are installed. Cancellation: the default handlers come back."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            if not stop.is_set():
                log.info("supervisor.signal signal=%s action=graceful_stop", signal.Signals(signum).name)
                stop.set()
            else:
                log.warning("supervisor.signal signal=%s action=cancel_now", signal.Signals(signum).name)
                everything.cancel()
