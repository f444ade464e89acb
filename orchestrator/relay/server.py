"""``orchestrator relay``: a local publishing point for someone else's Smooth encoder that
pushes every stream on to the profile's endpoints and never gives up.

Why a relay *group* in the profile (``[groups.<name>] encoder = { backend = "relay", ... }``) run
by its own command, rather than a command with its own configuration: a relay is an encoder
group whose encoder is outside the process. Everything else a group has is what a relay needs
(its endpoints, primary and cross-region, with formats and credentials; ``max_backlog``; the
metrics listener; the presentation's fragment duration, which sets the fragment grid and the
silence threshold), and a primary and a backup encoder, each behind its own relay, are exactly
the profile's primary and backup groups (``orchestrator relay profile.toml --group primary`` on
one machine, ``--group backup`` on the other). ``up`` refuses a relay group (its encoders are
not ours to start), so one profile cannot run a group twice by mistake.

Task tree (trio nurseries)::

    run_relay
    ├── metrics listener (/metrics, /healthz, /readyz, /status, /monitor and its decoder),
    │   signal watcher, idle sweeper
    ├── per (stream, endpoint): a Publisher (orchestrator.push.publisher), fed by the FanOut
    ├── silence watcher: an encoder silent for silent_fragments fragment durations is shown
    │   (group state, metric), and the spool is trimmed to what some outbox still holds
    └── encoder listener: ingest POSTs from encoders (hypercorn, orchestrator.ops.httpserve)

Per POST (:class:`RelayApp`): the body is read through :class:`~orchestrator.relay.intake.EncoderPost`;
the stream header is announced on the stream's board (a changed header re-opens the outbound
POSTs with it); every fragment to forward is first written to the spool (when the group has
one: :mod:`orchestrator.relay.spoolfiles`), then handed to the fan-out, which puts it in every
endpoint's outbox (catch-up backlog, forward buffer, resends: :mod:`orchestrator.push.outbox`).
Duplicates and rejected fragments are counted and logged, never forwarded. The confidence monitor
(:mod:`orchestrator.relay.monitor`, when the metrics listener and ``[monitor]`` are enabled) hears
every header and fragment too, and keeps them only while a page is open.

Start-up with a spool: what an earlier run spooled is announced and pushed again, oldest first,
before the encoder listener opens (receivers drop what they already had).

Graceful stop (SIGTERM, SIGINT): the encoder listener closes (open encoder POSTs are cut; an
encoder reconnects to the next relay), every outbox is closed and the publishers send what they
hold, within ``shutdown_grace`` seconds; what is still spooled is sent by the next run. A second
signal cancels at once. Cancellation of :func:`run_relay` stops everything at once.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import logging
import signal
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from orchestrator.errors import IngestOverloaded, ListenError, MediaError, ProfileError
from orchestrator.fmp4.reader import NEED_DATA, Header
from orchestrator.fmp4.stream import EncodedFragment, StreamHeader
from orchestrator.ingest.receiver import parse_stream_path
from orchestrator.ops.httpserve import ConnectionStats, Receive, Scope, Send, serve_asgi
from orchestrator.ops.listener import serve_listener
from orchestrator.ops.metrics import Metrics
from orchestrator.ops.openfiles import ensure_open_files, files_needed
from orchestrator.ops.state import EncoderState, GroupState, LiveState
from orchestrator.ops.thumbnails import Thumbnailer, find_ffmpeg
from orchestrator.ops.view import StatusView
from orchestrator.profile import Profile, RelayEncoder, endpoint_key, parse_listen
from orchestrator.push.cmafroute import Reboxer, add_cmaf_publishers
from orchestrator.push.connection import FILES_PER_PUBLISHER, Connector
from orchestrator.push.fanout import FanOut
from orchestrator.push.handoff import EndpointOutbox
from orchestrator.push.outbox import OutboxLimits
from orchestrator.push.publisher import IdleSweeper, Publisher, PublisherSettings, auth_for
from orchestrator.push.sigv4 import RequestSigner, signer_for
from orchestrator.relay.intake import Dropped, EncoderPost, Event, Forward, HeaderReceived, StreamTimeline
from orchestrator.relay.metrics import RelayMetrics
from orchestrator.relay.monitor import RelayMonitor
from orchestrator.relay.spool import DEFAULT_SEGMENT_BYTES, FragmentRecord, HeaderRecord, key_of
from orchestrator.relay.spoolfiles import SpoolFiles, sync_all
from orchestrator.wire import smooth

log = logging.getLogger(__name__)

BODY_TIMEOUT = 60.0  # seconds without a body byte before an encoder's POST is ended (408)
DEFAULT_MEMORY_BUDGET = 512 * 1024 * 1024


@dataclass(frozen=True)
class RelayOptions:
    group: str | None = None  # None: the profile's one relay group
    status: str = "auto"
    shutdown_grace: float = 10.0
    handle_signals: bool = True
    profile_path: str = "<profile>"
    publisher_settings: PublisherSettings | None = None
    body_timeout: float = BODY_TIMEOUT
    max_connections: int | None = None  # None: two per stream (an encoder reconnecting beside its old POST) + 64
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes all encoder POSTs' readers may hold together
    spool_segment_bytes: int = DEFAULT_SEGMENT_BYTES


@dataclass
class RelayRunning(LiveState):
    """Handles on a running relay, for tests; the status view sees only its :class:`LiveState`."""

    listen_address: tuple[str, int] | None = None
    metrics_address: tuple[str, int] | None = None
    stop: trio.Event = field(default_factory=trio.Event)
    app: RelayApp | None = None


def choose_group(profile: Profile, group: str | None, profile_path: str) -> tuple[str, RelayEncoder]:
    """The relay group to run: ``group``, else the profile's only relay group. Raises ProfileError."""
    relays = {name: g.encoder for name, g in profile.groups.items() if isinstance(g.encoder, RelayEncoder)}
    if group is None:
        if len(relays) != 1:
            found = ", ".join(relays) or "none"
            raise ProfileError(profile_path, [("groups", f"choose the relay group with --group (relay groups: "
                                                         f"{found})")])  # fmt: skip
        group = next(iter(relays))
    if group not in profile.groups:
        raise ProfileError(profile_path, [("groups", f"no group named {group} (the profile has: "
                                                     f"{', '.join(profile.groups)})")])  # fmt: skip
    if group not in relays:
        raise ProfileError(profile_path, [(f"groups.{group}.encoder.backend",
                                           'a relay runs a group whose encoder is { backend = "relay" }')])  # fmt: skip
    return group, relays[group]


def expected_authorization(config: RelayEncoder) -> str | None:
    """The Authorization header an encoder must send (read from the environment or file now)."""
    if config.credentials is None:
        return None
    secret = config.credentials.authorization()
    if isinstance(secret, tuple):
        return "Basic " + base64.b64encode(f"{secret[0]}:{secret[1]}".encode()).decode("ascii")
    return f"Bearer {secret}"


class RelayStream:
    """One stream of the relay: its timeline (duplicates), its encoder state, its spool."""

    def __init__(self, stream_id: str, group: str) -> None:
        self.stream_id = stream_id
        self.timeline = StreamTimeline(stream_id)
        self.encoder = EncoderState(group, stream_id)
        self.open_posts = 0
        self.last_fragment: float | None = None  # trio time of the last fragment read


class RelayApp:
    """The encoders' side: ASGI app taking Smooth ingest POSTs (see the module docstring)."""

    def __init__(self, *, group: str, fanout: FanOut, streams: dict[str, RelayStream], metrics: RelayMetrics,
                 fragment_duration: Fraction, spool: SpoolFiles | None, authorization: str | None,
                 body_timeout: float = BODY_TIMEOUT, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 clock: Callable[[], float] = time.time, monitor: RelayMonitor | None = None) -> None:  # fmt: skip
        self.group = group
        self.fanout = fanout
        self.streams = streams
        self.metrics = metrics
        self.fragment_duration = fragment_duration
        self.spool = spool
        self._authorization = authorization.encode() if authorization is not None else None
        self.body_timeout = body_timeout
        self.clock = clock
        self.monitor = monitor
        self.connections = ConnectionStats()
        self._post_ids = 0
        # What the open POSTs' readers hold or are about to hold (the declared size of the box or
        # fragment being received, at its real cost: fmp4.reader), against the budget.
        self.memory_budget = memory_budget
        self._reserved: dict[int, int] = {}
        self._reserved_total = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        try:
            parsed = parse_stream_path(path)
        except ValueError as exc:
            await _respond(send, 400, f"{exc}\n")
            return
        if parsed is None:
            await _respond(send, 404, "not an ingest URL (/<path>.isml/Streams(<id>))\n")
            return
        if method != "POST":
            await _respond(send, 405, "ingest URLs take POST\n", allow="POST")
            return
        if self._authorization is not None:
            given = _header(scope, b"authorization")
            if given is None or not hmac.compare_digest(given, self._authorization):
                log.warning("relay.post.unauthorised stream=%s client=%s", parsed.stream_id, _client(scope))
                await _respond(send, 401, "credentials required\n", authenticate='Basic realm="relay", Bearer')
                return
        stream = self.streams.get(parsed.stream_id)
        if stream is None:
            await _respond(send, 404, f"stream {parsed.stream_id!r} is not in the relay's profile\n")
            return
        if _header(scope, b"content-length") == b"0":
            log.info("relay.probe stream=%s client=%s", stream.stream_id, _client(scope))
            await _respond(send, 200, "")
            return
        status, answer = await self._ingest(stream, receive, _client(scope))
        self.metrics.posts.labels(stream.stream_id, self.group, status).inc()
        if answer is not None:
            await _respond(send, answer[0], answer[1])

    async def _ingest(self, stream: RelayStream, receive: Receive, client: str) -> tuple[str, tuple[int, str] | None]:
        """Read one POST to its end. Cancellation (the relay stopping) ends it where it is:
        every fragment read until then was spooled and handed to the fan-out already."""
        self._post_ids += 1
        post_id = self._post_ids
        post = EncoderPost(stream.timeline, self.fragment_duration)
        stream.open_posts += 1
        self.metrics.connected.labels(stream.stream_id, self.group).inc()
        log.info("relay.post.started post=%d stream=%s client=%s", post_id, stream.stream_id, client)
        status: str = "error"
        answer: tuple[int, str] | None = None
        reason: str | None = "server error"
        try:
            with trio.CancelScope() as waiting:
                while True:
                    waiting.deadline = trio.current_time() + self.body_timeout
                    message = await receive()
                    if message["type"] != "http.request":
                        status, reason = "disconnected", "the encoder went away mid-body"
                        break
                    if message["body"]:
                        post.feed(message["body"])
                        self._reserve(post_id, post.reserved)
                        while (event := post.next_event()) is not NEED_DATA:
                            await self._handle(stream, event, post_id)
                        self._reserve(post_id, post.reserved)
                    if not message.get("more_body", False):
                        post.end_of_body()
                        status, reason, answer = "ok", None, (200, "")
                        break
            if waiting.cancelled_caught:
                status, reason = "timeout", f"no body bytes for {self.body_timeout:g} s"
                answer = (408, f"{reason}\n")
        except MediaError as exc:
            status, reason, answer = "error", str(exc), (400, f"{exc}\n")
        except IngestOverloaded as exc:
            status, reason, answer = "overloaded", str(exc), (503, f"{exc}\n")
        except trio.Cancelled:
            status, reason = "cancelled", "the relay is stopping"
            raise
        finally:
            self._reserved_total -= self._reserved.pop(post_id, 0)
            stream.open_posts -= 1
            self.metrics.connected.labels(stream.stream_id, self.group).dec()
            level = logging.INFO if status == "ok" else logging.WARNING
            log.log(level, "relay.post.ended post=%d stream=%s status=%s reason=%r", post_id, stream.stream_id,
                    status, reason)  # fmt: skip
        return status, answer

    def _reserve(self, post_id: int, size: int) -> None:
        """Hold ``size`` bytes for the POST; raises IngestOverloaded (503) over the budget."""
        others = self._reserved_total - self._reserved.get(post_id, 0)
        if others + size > self.memory_budget:
            raise IngestOverloaded(f"the relay's memory budget ({self.memory_budget} bytes over all encoder POSTs) "
                                   f"is used up: this POST needs {size}, the others hold {others}")  # fmt: skip
        self._reserved[post_id] = size
        self._reserved_total = others + size

    async def _handle(self, stream: RelayStream, event: Event, post_id: int) -> None:
        stream_id, group, m = stream.stream_id, self.group, self.metrics
        if isinstance(event, HeaderReceived):
            if event.changed:
                m.header_changes.labels(stream_id, group).inc()
                log.warning("relay.encoder.header_changed post=%d stream=%s action=reopen_outbound_posts", post_id,
                            stream_id)  # fmt: skip
            await self.announce(stream_id, event.header)
            return
        if isinstance(event, Forward):
            fragment = event.fragment
            if event.reset:
                m.timeline_resets.labels(stream_id, group).inc()
                log.warning("relay.encoder.timeline_reset post=%d stream=%s track=%d time=%d", post_id, stream_id,
                            fragment.track_id, fragment.start)  # fmt: skip
            await self.forward(stream, fragment)
            labels = (m.presentation, stream_id, group, str(fragment.track_id))
            m.fragments.labels(stream_id, group, "forwarded").inc()
            m.last_start.labels(*labels).set(fragment.start)
            m.last_index.labels(*labels).set(fragment.index)
            m.phase.labels(*labels).set(event.phase)
            m.sample_duration.labels(*labels).set(event.sample_duration)
            end = Fraction(fragment.start + fragment.duration, fragment.timescale)
            m.media_offset.labels(*labels).set(self.clock() - float(end))
            m.since_last.fragment(stream_id, group)
            stream.last_fragment = trio.current_time()
            stream.encoder.last_index = fragment.index
            stream.encoder.fragments += 1
            return
        assert isinstance(event, Dropped)
        m.fragments.labels(stream_id, group, event.reason).inc()
        if self.monitor is not None:
            self.monitor.dropped(stream_id, event.track_id, event.reason)
        level = logging.INFO if event.reason == "duplicate" else logging.WARNING
        log.log(level, "relay.fragment.%s post=%d stream=%s track=%d time=%s detail=%r", event.reason, post_id,
                stream_id, event.track_id, event.time, event.detail)  # fmt: skip

    async def announce(self, stream_id: str, header: StreamHeader) -> None:
        """The stream's header: to the spool first, then to the publishers."""
        if self.spool is not None:
            try:
                self.spool.append_header(stream_id, header.data)
                await self._synced(stream_id)
            except OSError as exc:
                self._spool_failed(stream_id, exc)
        self.fanout.header(header)
        if self.monitor is not None:
            self.monitor.header(header)

    async def forward(self, stream: RelayStream, fragment: EncodedFragment) -> None:
        """To the spool first (when there is one: written, and fsync'd as the policy says), then
        to every endpoint's outbox. Cancellation while the fsync runs: it completes in its
        thread, then the cancellation is raised; the fragment is spooled, not forwarded (the
        next run sends it)."""
        if self.spool is not None:
            try:
                self.spool.append_fragment(stream.stream_id, fragment)
                await self._synced(stream.stream_id)
            except OSError as exc:
                self._spool_failed(stream.stream_id, exc)
            self._show_spool(stream.stream_id)
        self.fanout.fragment(fragment)
        if self.monitor is not None:
            self.monitor.fragment(fragment)

    async def _synced(self, stream_id: str) -> None:
        """The stream's pending fsyncs, in a worker thread (fsyncs of several streams overlap)."""
        assert self.spool is not None
        if fds := self.spool.take_syncs(stream_id):
            await trio.to_thread.run_sync(sync_all, fds)

    def _spool_failed(self, stream_id: str, exc: OSError) -> None:
        self.metrics.spool_failures.labels(stream_id, self.group).inc()
        log.error("relay.spool.write_failed stream=%s error=%s action=forward_from_memory", stream_id, exc)

    def _show_spool(self, stream_id: str) -> None:
        if self.spool is None:
            return
        spool = self.spool.spool(stream_id)
        self.metrics.spool_bytes.labels(stream_id, self.group).set(spool.bytes)
        self.metrics.spool_fragments.labels(stream_id, self.group).set(spool.fragments)

    def trim_spool(self) -> None:
        """Delete the spool segments that no endpoint's outbox needs any more."""
        if self.spool is None:
            return
        for stream_id in self.streams:
            held: list[tuple[int, int] | None] = []
            for route in self.fanout.routes(stream_id):
                oldest = route.outbox.outbox.oldest_held
                held.append(None if oldest is None else key_of(oldest))
            if self.spool.release(stream_id, held):
                self._show_spool(stream_id)

    def recover(self) -> int:
        """Announce and push again what an earlier run spooled; feed it to the timelines."""
        if self.spool is None:
            return 0
        total = 0
        for stream_id, stream in self.streams.items():
            header: StreamHeader | None = None
            count = 0
            for record in self.spool.recover(stream_id):
                if isinstance(record, HeaderRecord):
                    reader = smooth.reader(require_manifest=True)
                    reader.feed(record.data)
                    parsed = reader.next_event()
                    if not isinstance(parsed, Header):
                        log.error("relay.spool.bad_header stream=%s", stream_id)
                        continue
                    header = StreamHeader(stream_id, parsed.tracks, record.data)
                    stream.timeline.take_header(header)
                    self.fanout.header(header)
                    if self.monitor is not None:
                        self.monitor.header(header)
                elif isinstance(record, FragmentRecord) and header is not None:
                    stream.timeline.forwarded(record.fragment.track_id, record.fragment.start)
                    self.fanout.fragment(record.fragment)
                    count += 1
            if count:
                self.metrics.recovered.labels(stream_id, self.group).inc(count)
                log.info("relay.recovered stream=%s fragments=%d", stream_id, count)
            self._show_spool(stream_id)
            total += count
        return total


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).strip()
    return None


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


async def _respond(send: Send, status: int, body: str, allow: str | None = None,
                   authenticate: str | None = None) -> None:  # fmt: skip
    data = body.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(data))]
    if allow is not None:
        headers.append((b"allow", allow.encode()))
    if authenticate is not None:
        headers.append((b"www-authenticate", authenticate.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def tls_server_context(config: RelayEncoder) -> ssl.SSLContext | None:
    """The listener's TLS context from tls_cert / tls_key, or None."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


async def run_relay(
    profile: Profile,
    options: RelayOptions,
    *,
    registry: CollectorRegistry | None = None,
    task_status: trio.TaskStatus[RelayRunning] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the profile's relay group until stopped (signal or ``RelayRunning.stop``). Raises
    ProfileError before anything starts if the profile cannot run as a relay."""
    group_name, config = choose_group(profile, options.group, options.profile_path)
    group = profile.groups[group_name]
    problems: list[tuple[str, str]] = []
    auth: dict[int, str | None] = {}
    signers: dict[int, RequestSigner | None] = {}
    for i, endpoint in enumerate(group.endpoints):
        try:
            auth[i] = auth_for(endpoint)
        except ValueError as exc:
            problems.append((f"groups.{group_name}.endpoints[{i}].credentials", str(exc)))
        try:
            signers[i] = signer_for(endpoint)
        except ValueError as exc:
            problems.append((f"{endpoint_key(group_name, endpoint)}.sigv4", str(exc)))
    try:
        inbound = expected_authorization(config)
    except ValueError as exc:
        problems.append((f"groups.{group_name}.encoder.credentials", str(exc)))
        inbound = None
    try:
        tls = tls_server_context(config)
    except (OSError, ssl.SSLError) as exc:
        problems.append((f"groups.{group_name}.encoder.tls_cert", f"cannot load the certificate and key: {exc}"))
        tls = None
    if problems:
        raise ProfileError(options.profile_path, problems)

    presentation = profile.presentation
    duration = presentation.fragment_duration
    metrics = Metrics(registry)
    relay_metrics = RelayMetrics(metrics.registry, presentation.name)
    running = RelayRunning(presentation=presentation.name, fragment_duration=float(duration))
    metrics.describe_profile(presentation.name, list(profile.groups), [group_name], presentation.epoch_ns / 1e9,
                             float(duration))  # fmt: skip
    metrics.endpoint_state.watch(running)
    settings = options.publisher_settings or PublisherSettings.for_fragment_duration(float(duration))
    limits = OutboxLimits(group.max_backlog.seconds, int(group.max_backlog.bytes))
    metrics.backlog_limit_seconds.labels(group_name).set(float(group.max_backlog.seconds))
    metrics.backlog_limit_bytes.labels(group_name).set(int(group.max_backlog.bytes))
    silent_after = float(config.silent_fragments * duration)
    relay_metrics.silent_after.labels(presentation.name, group_name).set(silent_after)

    connector = Connector(settings.send_timeout)
    idle_sweeper = IdleSweeper()
    fanout = FanOut(group_name, metrics)
    group_state = GroupState(group_name)
    running.groups.append(group_state)
    streams: dict[str, RelayStream] = {}
    publishers: list[Publisher] = []
    for stream in profile.streams:
        relay_stream = streams[stream.id] = RelayStream(stream.id, group_name)
        running.encoders.append(relay_stream.encoder)
        relay_metrics.initialise(stream.id, group_name)
        relay_metrics.since_last.start(stream.id, group_name)
        board = fanout.add_stream(stream.id)
        reboxer = Reboxer(presentation.epoch_ns)
        for i, endpoint in enumerate(group.endpoints):
            if endpoint.format == "cmaf":  # the profile's tracks name the encoder's track IDs (docs/relay.md)
                tracks = list(zip(profile.track_ids(stream), [t.name for t in stream.tracks], strict=True))
                added = add_cmaf_publishers(
                    fanout, board, tracks, endpoint, reboxer=reboxer, limits=limits, metrics=metrics,
                    settings=settings, connector=connector, authorization=auth[i],
                    idle_sweeper=idle_sweeper, signer=signers[i])  # fmt: skip
            else:
                outbox = EndpointOutbox(limits)
                added = [Publisher(group=group_name, stream_id=stream.id, endpoint=endpoint, header=board,
                                   outbox=outbox, metrics=metrics, settings=settings, connector=connector,
                                   authorization=auth[i], idle_sweeper=idle_sweeper)]  # fmt: skip
                fanout.add_route(stream.id, outbox, added[0].state, added[0].labels)
            for publisher in added:
                publishers.append(publisher)
                metrics.initialise_endpoint(publisher.labels)
                running.publishers.append(publisher.state)

    max_connections = options.max_connections or 2 * len(streams) + 64
    # Each publisher's connections, the encoder connections, and per stream an open spool segment.
    ensure_open_files(files_needed(len(publishers), FILES_PER_PUBLISHER) + max_connections + len(streams))
    spool = None
    if config.spool is not None:
        spool = SpoolFiles(config.spool, fsync=config.fsync == "fragment", segment_bytes=options.spool_segment_bytes)
    monitor = None
    if profile.metrics.enabled and profile.monitor.enabled:  # /monitor beside /status, on the metrics listener
        thumbnailer = Thumbnailer(find_ffmpeg(), fragment_seconds=float(duration),
                                  concurrency=profile.monitor.concurrency)  # fmt: skip
        thumbnailer.counts.on_count = lambda outcome, n: metrics.monitor_decodes.labels(outcome).inc(n)
        monitor = RelayMonitor(running, thumbnailer, group=group_name, streams=list(streams))
    app = RelayApp(group=group_name, fanout=fanout, streams=streams, metrics=relay_metrics, fragment_duration=duration,
                   spool=spool, authorization=inbound, body_timeout=options.body_timeout,
                   memory_budget=options.memory_budget, monitor=monitor)  # fmt: skip
    running.app = app
    try:
        recovered = app.recover()
        async with trio.open_nursery() as services:
            if profile.metrics.enabled:
                host, port = parse_listen(profile.metrics.listen)
                serve_metrics = partial(serve_listener, metrics.registry, running, host, port, monitor=monitor)
                running.metrics_address = await _listen(services, serve_metrics, profile.metrics.listen,
                                                        "the profile's metrics.listen")  # fmt: skip
            if options.handle_signals:
                await services.start(_watch_signals, running.stop, services.cancel_scope)
            services.start_soon(idle_sweeper.run)
            view = StatusView(running, interval=float(duration), mode=options.status)
            async with trio.open_nursery() as publishing:
                for publisher in publishers:
                    publishing.start_soon(publisher.run)
                publishing.start_soon(view.run)
                publishing.start_soon(_watch_encoders, app, group_state, silent_after, relay_metrics)
                async with trio.open_nursery() as listening:
                    host, port = parse_listen(config.listen)
                    serve = partial(serve_asgi, app, host, port, "relay", max_connections=max_connections,
                                    stats=app.connections, ssl_context=tls)  # fmt: skip
                    running.listen_address = await _listen(listening, serve, config.listen,
                                                           f"groups.{group_name}.encoder.listen")  # fmt: skip
                    log.info("relay.started group=%s listen=%s:%d streams=%d publishers=%d recovered=%d spool=%s",
                             group_name, *running.listen_address, len(streams), len(publishers), recovered,
                             config.spool)  # fmt: skip
                    task_status.started(running)
                    await running.stop.wait()
                    log.info("relay.stopping grace_seconds=%g", options.shutdown_grace)
                    listening.cancel_scope.cancel()
                fanout.close()
                view.stop()
                publishing.cancel_scope.deadline = trio.current_time() + options.shutdown_grace
            app.trim_spool()
            services.cancel_scope.cancel()
    finally:
        if spool is not None:
            spool.close()
    log.info("relay.stopped")


async def _listen(nursery: trio.Nursery, serve: Callable[..., Any], address: str, what: str) -> tuple[str, int]:
    """Start a listener; a bind error names the address and the profile key that set it."""
    try:
        bound: tuple[str, int] = await nursery.start(serve)
    except (OSError, BaseExceptionGroup) as exc:
        error = exc
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if not isinstance(error, OSError):
            raise
        raise ListenError(f"cannot listen on {address} (set by {what}): {error.strerror or error}") from exc
    return bound


async def _watch_encoders(app: RelayApp, group_state: GroupState, silent_after: float, metrics: RelayMetrics) -> None:
    """Once a second: which encoders are silent (status, metric, log), and trim the spool.
    Cancellation: nothing is left behind."""
    silent: set[str] = set()
    group_state.set_up(False, time.time())
    while True:
        for stream_id, stream in app.streams.items():
            quiet = metrics.since_last.seconds(stream_id, app.group)
            is_silent = quiet >= silent_after
            if is_silent and stream_id not in silent:
                silent.add(stream_id)
                log.warning("relay.encoder.silent group=%s stream=%s seconds=%.1f open_posts=%d", app.group,
                            stream_id, quiet, stream.open_posts)  # fmt: skip
            elif not is_silent and stream_id in silent:
                silent.discard(stream_id)
                log.info("relay.encoder.back group=%s stream=%s", app.group, stream_id)
            metrics.silent.labels(stream_id, app.group).set(1 if is_silent else 0)
        up = not silent and all(s.last_fragment is not None for s in app.streams.values())
        if up != group_state.up:
            group_state.set_up(up, time.time())
        if silent and group_state.last_error != (error := f"encoder silent: stream {', '.join(sorted(silent))}"):
            group_state.record_failure(error, None, time.time())
        app.trim_spool()
        await trio.sleep(1.0)


async def _watch_signals(stop: trio.Event, everything: trio.CancelScope,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
    """First SIGINT/SIGTERM: graceful stop; second: cancel now. Cancellation: the default handlers come back."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            if not stop.is_set():
                log.info("relay.signal signal=%s action=graceful_stop", signal.Signals(signum).name)
                stop.set()
            else:
                log.warning("relay.signal signal=%s action=cancel_now", signal.Signals(signum).name)
                everything.cancel()


def run_relay_process(profile: Profile, options: RelayOptions) -> None:
    """``orchestrator relay`` in the foreground."""
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run_relay, profile, options)
