"""The local publishing point: the I/O shell around :mod:`orchestrator.ingest.receiver`, a plain ASGI
app served on trio by hypercorn through :mod:`orchestrator.ops.httpserve`.

Routes:
  * ``POST /<publishing point path>.isml/Streams(<stream id>)``: live ingest (spec section 4).
    An empty body (``Content-Length: 0``, the encoder's probe) answers 200 at once. Otherwise
    the chunked body is fed to the receiver as it arrives and every archived fragment is
    appended to ``<archive>/<point path>/<stream id>/<track name>.mp4``. 200 when the body ends
    cleanly, 400 with a one-line reason for a stream that cannot go on, an unsafe path or a
    limit exceeded (the reason names the limit), 408 when no body bytes arrive for
    ``body_timeout`` seconds, 503 with ``Retry-After`` when the memory budget across POSTs is
    used up, 500 when an archive write fails (the reason names no absolute path).
  * ``POST`` or ``PUT /<point path>/<stream>/<track>/init.m4s`` and ``.../<n>.m4s``: CMAF ingest
    (DASH-IF Interface-1), one CMAF header or segment per request: :mod:`orchestrator.ingest.cmafpoint`.
  * ``GET /metrics``: the same counters for Prometheus (:class:`IngestCollector`), read when
    scraped: nothing is counted twice on the hot path.
  * ``GET /status``: the receiver's counters as JSON; ``GET /status?posts=1`` adds the per-POST log
    (the newest 50 POSTs, ``&limit=<n>`` for up to 200, each with its last 100 fragments);
    ``GET /status?post=<id>`` shows one POST with every fragment its log keeps.
  * ``GET /monitor`` (and ``/monitor.json``, ``/monitor.js`` ...): the confidence monitor, what
    arrived from each encoder group side by side with their pictures of one fragment index
    (:mod:`orchestrator.ingest.monitor`; Smooth POSTs; pictures decoded only while a page is open).
  * anything else: 404, or 405 for a known path with the wrong method.

Limits (:class:`IngestLimits`, the ``orchestrator ingest`` options): each request refused by one
is answered with a status and a one-line body naming it, logged ``ingest.limit.exceeded
limit=<name> status=<code>``, and counted as ``orchestrator_ingest_limit_hits_total{limit,
action}``: ``max_connections`` (503, or ``evicted_idle`` / ``evicted_no_body``: see
:mod:`orchestrator.ops.httpserve`), ``memory_budget`` (503 with ``Retry-After``),
``body_timeout`` (408), ``max_moof_size``, ``max_header_box_size``, ``max_box_size``,
``max_truns_per_traf``, ``max_samples_per_fragment``, ``max_manifest_elements`` (400),
``max_cmaf_body`` (413).

Fault injection: set :attr:`IngestApp.fail_with` to a status code (401, 503 ...) and every POST,
probes included, answers it without reading the body; ``None`` restores normal service.

Archive writes are synchronous, one ``write`` + ``flush`` per fragment, straight from the request
handler. Fragments are small and the disk is local, and this way they reach each file in
exactly the order the receiver decided, and a write can never be interrupted by cancellation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.errors import IngestOverloaded, MediaError
from orchestrator.fmp4.reader import NEED_DATA
from orchestrator.ingest.cmafpoint import MAX_BODY as MAX_CMAF_BODY
from orchestrator.ingest.cmafpoint import Answer, CmafPath, CmafPoint
from orchestrator.ingest.cmafpoint import parse_path as parse_cmaf_path
from orchestrator.ingest.monitor import IngestMonitor
from orchestrator.ingest.receiver import (
    DEFAULT_MEMORY_BUDGET,
    STATUS_POSTS,
    ArchiveWrite,
    Decision,
    Post,
    PostStatus,
    PublishingPoint,
    parse_stream_path,
)
from orchestrator.ops import monitorweb
from orchestrator.ops.httpserve import DEFAULT_MAX_CONNECTIONS, ConnectionStats, Receive, Scope, Send, serve_asgi
from orchestrator.profile import parse_listen

logger = logging.getLogger(__name__)


@dataclass
class _OpenFile:
    path: Path
    file: BinaryIO
    size: int  # bytes written so far: where a failed write is cut back to (no tell() or seek per fragment)


class ArchiveFiles:
    """The open track files under one archive directory.

    Each :class:`~orchestrator.ingest.receiver.ArchiveWrite` is one ``write`` and one ``flush``; an
    init segment (``new_file``) starts the file. A file left by an earlier run is never
    truncated: it is renamed aside (``<name>.<n>.mp4``) first, so restarting the server loses
    nothing. A file holds whole fragments only: a write that fails is cut back to where it
    started, so a disk that fills up leaves no half fragment behind.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        # Open files by their path relative to the root (ArchiveWrite.path): a fragment costs one
        # dict lookup and one write system call, no Path built and no seek.
        self._files: dict[tuple[str, ...], _OpenFile] = {}
        self._ours: set[Path] = set()  # files this run started: an init rewrites them, never moves them aside

    def write(self, write: ArchiveWrite) -> None:
        """Raises OSError if the file cannot be written."""
        entry = self._files.get(write.path)
        if entry is None or write.new_file:
            if entry is not None:
                self._files.pop(write.path)
                entry.file.close()
            path = self.root.joinpath(*write.path)
            # The receiver only hands out safe names; this is the second lock on the door.
            if not path.resolve().is_relative_to(self.root.resolve()):
                raise OSError(f"{path} is outside the archive {self.root}")
            path.parent.mkdir(parents=True, exist_ok=True)
            if write.new_file and path not in self._ours and path.exists():
                _move_aside(path)
            opened: BinaryIO = path.open("wb" if write.new_file else "ab")
            entry = self._files[write.path] = _OpenFile(path, opened, opened.tell())
            self._ours.add(path)
        try:
            entry.file.write(write.data)
            entry.file.flush()
        except OSError:
            self._cut_back(write.path)
            raise
        entry.size += len(write.data)

    def _cut_back(self, key: tuple[str, ...]) -> None:
        """After a failed write: drop what the failed write left (buffered or on disk)."""
        entry = self._files.pop(key)
        path, size = entry.path, entry.size
        with contextlib.suppress(OSError):  # the buffered bytes fail again: they are cut off below
            entry.file.close()
        try:
            os.truncate(path, size)
        except OSError as exc:
            logger.error("ingest.archive.cut_back_failed file=%s size=%d error=%s", path, size, exc.strerror)

    def close(self) -> None:
        for entry in self._files.values():
            entry.file.close()
        self._files.clear()


def _move_aside(path: Path) -> Path:
    """Rename an archive file from an earlier run to the first free ``<stem>.<n><suffix>``."""
    n = 1
    while (target := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    path.rename(target)
    logger.warning("ingest.archive.kept_previous file=%s moved_to=%s", path, target.name)
    return target


DEFAULT_BODY_TIMEOUT = 60.0  # seconds without a body byte; fragments come every 2-6 s (spec 3.7)


@dataclass(frozen=True)
class IngestLimits:
    """What one ingest server may be asked to hold; docs/reliability.md lists what
    a client sees when it hits each."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes held by all POSTs' readers together
    body_timeout: float = DEFAULT_BODY_TIMEOUT  # seconds without a body byte before a 408


class IngestApp:
    """The ASGI application. ``point`` holds the receiver state (and the memory budget);
    ``clock`` gives wall-clock seconds for the POST log; a POST that sends no body bytes for
    ``body_timeout`` seconds is answered 408 and ended."""

    def __init__(
        self,
        archive_dir: Path,
        *,
        point: PublishingPoint | None = None,
        clock: Callable[[], float] = time.time,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
    ) -> None:
        self.archive = ArchiveFiles(archive_dir)
        self.point = point if point is not None else PublishingPoint()
        self.clock = clock
        self.body_timeout = body_timeout
        self.fail_with: int | None = None
        self.connections = ConnectionStats()  # filled in by the listener serve_app starts
        self.refusals: Counter[str] = Counter()  # answers other than 200, by status code
        self.limits: Counter[str] = Counter()  # requests refused by a limit, by the limit's name
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(IngestCollector(self))
        self.cmaf = CmafPoint()  # CMAF ingest (orchestrator.ingest.cmafpoint): its own publishing point
        self.monitor = IngestMonitor(self.point.rules)  # /monitor; its decoder runs in serve_app

    def close(self) -> None:
        """Close the archive files (they are flushed after every fragment already)."""
        self.archive.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # httpserve answers lifespan; a websocket that is not accepted gets 403
        method, path = scope["method"], scope["path"]
        if path == "/metrics":
            if method != "GET":
                await _respond(send, 405, "use GET\n", allow="GET")
                return
            await _respond(send, 200, generate_latest(self.registry).decode(), "text/plain; version=0.0.4")
            return
        if path == "/status":
            if method != "GET":
                await _respond(send, 405, "use GET\n", allow="GET")
                return
            query = parse_qs(scope["query_string"].decode("latin-1"))
            posts = query.get("posts", ["0"])[0] not in ("", "0")
            try:
                limit = int(query.get("limit", [str(STATUS_POSTS)])[0])
                post_id = int(query["post"][0]) if "post" in query else None
            except ValueError:
                await _respond(send, 400, "limit and post take whole numbers\n")
                return
            status = self.point.status(posts=posts, limit=limit, post_id=post_id)
            status["connections"] = dataclasses.asdict(self.connections)
            status["refusals"] = dict(sorted(self.refusals.items()))
            status["limits"] = dict(sorted(self.limits.items()))
            status["cmaf"] = self.cmaf.status(posts=posts, limit=limit)
            await _respond(send, 200, json.dumps(status, indent=2) + "\n", "application/json")
            return
        if monitorweb.is_monitor_path(path):
            if method != "GET":
                await _respond(send, 405, "use GET\n", allow="GET")
                return
            await self.monitor.serve(scope, send)
            return
        try:
            cmaf_path = parse_cmaf_path(path)
            if cmaf_path is not None:
                await self._cmaf(cmaf_path, scope, receive, send)
                return
            stream = parse_stream_path(path)
        except ValueError as exc:
            logger.warning("ingest.request.refused path=%r reason=%r", path, str(exc))
            self.refusals["400"] += 1
            await _respond(send, 400, f"{exc}\n")
            return
        if stream is None:
            await _respond(send, 404, "not an ingest URL (/<path>.isml/Streams(<id>)) or /status\n")
        elif method != "POST":
            await _respond(send, 405, "ingest URLs take POST\n", allow="POST")
        elif self.fail_with is not None:
            logger.info("ingest.post.failed_on_purpose stream=%s status=%d", stream, self.fail_with)
            await _respond(send, self.fail_with, f"fail mode: {self.fail_with}\n")
        elif _header(scope, b"content-length") == "0":
            self.point.record_probe()
            logger.info("ingest.probe server=%s stream=%s group=%s", _server(scope), stream,
                        _header(scope, b"x-encoder-group"))  # fmt: skip
            await _respond(send, 200, "")
        else:
            post = self.point.open_post(stream, _header(scope, b"x-encoder-group"), self.clock())
            answer = await self._ingest(post, receive, _server(scope))
            if answer is not None and answer[0] != 200:
                self.refusals[str(answer[0])] += 1
            if answer is not None:
                await _respond(send, answer[0], answer[1], retry_after="5" if answer[0] == 503 else None)

    async def _cmaf(self, path: CmafPath, scope: Scope, receive: Receive, send: Send) -> None:
        """One CMAF request (POST or PUT): the whole body (at most MAX_BODY bytes, each part
        within ``body_timeout``), then the CMAF point's answer. Cancellation: the request is
        dropped unanswered; nothing of it was archived."""
        if scope["method"] not in ("POST", "PUT"):
            await _respond(send, 405, "CMAF ingest URLs take POST or PUT\n", allow="POST, PUT")
            return
        if self.fail_with is not None:
            await _respond(send, self.fail_with, f"fail mode: {self.fail_with}\n")
            return
        body = bytearray()
        with trio.move_on_after(self.body_timeout) as waiting:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                body += message.get("body", b"")
                waiting.deadline = trio.current_time() + self.body_timeout
                if len(body) > MAX_CMAF_BODY:
                    answer = Answer(413, f"a CMAF request body is at most {MAX_CMAF_BODY} bytes\n")
                    break
                if not message.get("more_body", False):
                    try:
                        answer = self.cmaf.request(path, bytes(body), _header(scope, b"x-encoder-group"),
                                                   self.clock(), self._apply)  # fmt: skip
                    except OSError as exc:
                        logger.error("ingest.archive.write_failed path=%s error=%s", scope["path"], exc)
                        answer = Answer(500, f"archive write failed: {exc.strerror or 'see the server log'}\n")
                    break
        if waiting.cancelled_caught:
            answer = Answer(408, f"no body bytes for {self.body_timeout:g} s (the body timeout)\n")
            self._limit_hit("body_timeout", 408, scope["path"])
        elif answer.status == 413:
            self._limit_hit("max_cmaf_body", 413, scope["path"])
        for notice in answer.notices:
            logger.warning("%s path=%s", notice, scope["path"])
        if answer.status != 200:
            self.refusals[str(answer.status)] += 1
            logger.warning("ingest.cmaf.refused path=%s status=%d reason=%r", scope["path"], answer.status,
                           answer.text.strip())  # fmt: skip
        await _respond(send, answer.status, answer.text)

    async def _ingest(self, post: Post, receive: Receive, server: str) -> tuple[int, str] | None:
        """Feed the body to ``post`` until it ends; the answer to send, or None if the client
        has gone. Cancellation (server shutdown) closes the POST as "cancelled"; every fragment
        archived until then stays whole in its file."""
        logger.info("ingest.post.started server=%s post=%d stream=%s group=%s", server, post.id, post.path,
                    post.encoder_group)  # fmt: skip
        status: PostStatus = "error"
        reason: str | None = "server error"
        answer: tuple[int, str] | None = None
        try:
            # One cancel scope for the whole body, its deadline moved on at every message (a scope
            # per receive() cost more than the rest of the loop). Only receive() waits in here, so
            # the deadline can only cancel that wait.
            with trio.CancelScope() as waiting:
                while True:
                    waiting.deadline = trio.current_time() + self.body_timeout
                    message = await receive()
                    if message["type"] != "http.request":
                        status, reason = "disconnected", "the client went away mid-body"
                        break
                    if message["body"]:
                        post.feed(message["body"])
                        while (decision := post.next_decision()) is not NEED_DATA:
                            self._apply(decision)
                            if decision.outcome == "archived":
                                post.written(decision)
                            self.monitor.decision(post, decision)
                        for notice in post.take_notices():
                            logger.warning("%s post=%d", notice, post.id)
                    if not message.get("more_body", False):
                        post.end_of_body()
                        status, reason, answer = "ok", None, (200, "")
                        break
            if waiting.cancelled_caught:
                status, reason = "error", f"no body bytes for {self.body_timeout:g} s (the body timeout)"
                answer = (408, f"{reason}\n")
                self._limit_hit("body_timeout", 408, str(post.path), post.id)
        except MediaError as exc:
            status, reason = "error", str(exc)
            answer = (400, f"{exc}\n")
            if exc.limit is not None:
                self._limit_hit(exc.limit, 400, str(post.path), post.id)
            if exc.__cause__ is not None and not isinstance(exc.__cause__, MediaError):
                logger.error("ingest.post.internal_error post=%d stream=%s", post.id, post.path, exc_info=exc.__cause__)
        except IngestOverloaded as exc:
            status, reason = "error", str(exc)
            answer = (503, f"{exc}\n")
            self._limit_hit("memory_budget", 503, str(post.path), post.id)
        except OSError as exc:
            # The full error (with the absolute path) goes to the log; the client sees the reason only.
            logger.error("ingest.archive.write_failed post=%d stream=%s error=%s", post.id, post.path, exc)
            status, reason = "error", f"archive write failed: {exc.strerror or 'see the server log'}"
            answer = (500, f"{reason}\n")
        except trio.Cancelled:
            status, reason = "cancelled", "the server is shutting down"
            raise
        finally:
            post.close(self.clock(), status, reason)
            self.monitor.post_ended(post)
            level = logging.INFO if status == "ok" else logging.WARNING
            outcomes = post.outcomes
            logger.log(level, "ingest.post.ended server=%s post=%d stream=%s status=%s archived=%d duplicates=%d "
                       "rejected=%d reason=%r", server, post.id, post.path, status, outcomes["archived"],
                       outcomes["duplicate"], outcomes["rejected"], reason)  # fmt: skip
        return answer

    def _limit_hit(self, limit: str, status: int, where: str, post: int | None = None) -> None:
        self.limits[limit] += 1
        logger.warning("ingest.limit.exceeded limit=%s status=%d stream=%s post=%s hits=%d", limit, status, where,
                       post if post is not None else "-", self.limits[limit])  # fmt: skip

    def _apply(self, decision: Decision) -> None:
        for write in decision.writes:
            self.archive.write(write)
        fragment = decision.fragment
        fields = (decision.post_id, decision.stream, fragment.track_id, fragment.index, fragment.time)
        if decision.outcome == "rejected":
            logger.warning("ingest.fragment.rejected post=%d stream=%s track=%d index=%d time=%s reason=%r",
                           *fields, decision.reason)  # fmt: skip
        elif decision.conflict:
            logger.warning("ingest.fragment.conflict post=%d stream=%s track=%d index=%d time=%s reason=%r",
                           *fields, decision.reason)  # fmt: skip
        else:
            logger.debug("ingest.fragment.%s post=%d stream=%s track=%d index=%d time=%s",
                         decision.outcome, *fields)  # fmt: skip


class IngestCollector(Collector):
    """The ingest server's counters as Prometheus metrics, read from the receiver's state when
    scraped (no per-fragment cost). Labels: ``format`` (smooth, cmaf), ``publishing_point``,
    ``stream``, ``track`` (the /status key: the track ID, ``<id>-<n>`` for a later definition or
    timeline), ``outcome``, ``kind``, ``limit`` and ``action``."""

    def __init__(self, app: IngestApp) -> None:
        self._app = app

    def collect(self) -> Iterator[Metric]:
        app = self._app
        track_labels = ["format", "publishing_point", "stream", "track"]
        fragments = CounterMetricFamily("orchestrator_ingest_fragments", "Track fragments received, by what "
                                        "became of them", labels=[*track_labels, "outcome"])  # fmt: skip
        conflicts = CounterMetricFamily("orchestrator_ingest_conflicts", "Duplicates whose index or duration "
                                        "differ from the archived copy's", labels=track_labels)  # fmt: skip
        gaps = GaugeMetricFamily("orchestrator_ingest_gaps", "Holes in a track's archived timeline",
                                 labels=track_labels)  # fmt: skip
        mismatches = CounterMetricFamily("orchestrator_ingest_header_mismatches", "POSTs whose header differs "
                                         "from the stream's first", labels=track_labels[:3])  # fmt: skip
        tolerated = CounterMetricFamily("orchestrator_ingest_tolerated", "Encoder behaviour taken in stride "
                                        "(negative_time, header_mismatch, encoder_restart, segment_duration)",
                                        labels=["format", "kind"])  # fmt: skip
        posts = CounterMetricFamily("orchestrator_ingest_posts", "Ingest POSTs opened", labels=["format"])
        active = GaugeMetricFamily("orchestrator_ingest_posts_active", "Ingest POSTs open now", labels=["format"])
        reserved = GaugeMetricFamily("orchestrator_ingest_memory_reserved_bytes", "Bytes reserved by open "
                                     "POSTs against the memory budget", labels=["format"])  # fmt: skip
        budget = GaugeMetricFamily("orchestrator_ingest_memory_budget_bytes", "The memory budget",
                                   labels=["format"])  # fmt: skip
        for name, point in (("smooth", app.point), ("cmaf", app.cmaf.point)):
            status = point.status()
            posts.add_metric([name], status["posts"]["total"])
            active.add_metric([name], status["posts"]["active"])
            reserved.add_metric([name], status["memory"]["reserved"])
            budget.add_metric([name], status["memory"]["budget"])
            for kind, count in status["tolerated"].items():
                tolerated.add_metric([name, kind], count)
            for point_name, streams in status["publishing_points"].items():
                for stream_id, stream in streams["streams"].items():
                    mismatches.add_metric([name, point_name, stream_id], stream["header_mismatches"])
                    for key, track in stream["tracks"].items():
                        labels = [name, point_name, stream_id, key]
                        fragments.add_metric([*labels, "archived"], track["fragments_archived"])
                        fragments.add_metric([*labels, "duplicate"], track["duplicates_dropped"])
                        fragments.add_metric([*labels, "rejected"], track["rejected"])
                        conflicts.add_metric(labels, track["conflicts"])
                        gaps.add_metric(labels, track["gaps"])
        limits = CounterMetricFamily("orchestrator_ingest_limit_hits", "Requests and connections refused or "
                                     "evicted by a limit", labels=["limit", "action"])  # fmt: skip
        connections = app.connections
        limits.add_metric(["max_connections", "refused"], connections.refused)
        limits.add_metric(["max_connections", "evicted_idle"], connections.evicted_idle)
        limits.add_metric(["max_connections", "evicted_no_body"], connections.evicted_no_body)
        for limit, count in sorted(app.limits.items()):
            limits.add_metric([limit, "refused"], count)
        open_now = GaugeMetricFamily("orchestrator_ingest_connections_open", "Connections open now")
        open_now.add_metric([], connections.open)
        cap = GaugeMetricFamily("orchestrator_ingest_connections_max", "The connection cap")
        cap.add_metric([], connections.max_connections)
        yield from (fragments, conflicts, gaps, mismatches, tolerated, posts, active, reserved, budget, limits,
                    open_now, cap)  # fmt: skip


def _server(scope: Scope) -> str:
    """``host:port`` this request came in on, so two servers in one process log apart."""
    server = scope.get("server")
    return f"{server[0]}:{server[1]}" if server else "-"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1").strip()[:100]
    return None


async def _respond(
    send: Send,
    status: int,
    body: str,
    content_type: str = "text/plain",
    allow: str | None = None,
    retry_after: str | None = None,
) -> None:
    data = body.encode()
    headers = [(b"content-type", f"{content_type}; charset=utf-8".encode()), (b"content-length", b"%d" % len(data))]
    if allow is not None:
        headers.append((b"allow", allow.encode()))
    if retry_after is not None:
        headers.append((b"retry-after", retry_after.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def serve_app(
    app: IngestApp,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    shutdown_event: trio.Event | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> None:
    """Serve ``app`` on ``host``:``port`` until cancelled or until ``shutdown_event`` is set,
    then return. Reports the bound (host, port) through ``task_status``, so port 0 works.

    Stopping either way cancels the POSTs still open: each is logged and recorded as
    "cancelled", and the archive files are closed. Every fragment is written with one write
    that cancellation cannot interrupt and flushed at once, so each track file ends on a whole
    fragment, readable by a player up to the last fragment received.
    """
    try:
        async with trio.open_nursery() as nursery:
            serve = partial(serve_asgi, app, host, port, "ingest", max_connections=max_connections,
                            stats=app.connections)  # fmt: skip
            await nursery.start(app.monitor.thumbnailer.run)
            bound = await nursery.start(serve)
            task_status.started(bound)
            if shutdown_event is not None:
                await shutdown_event.wait()
                nursery.cancel_scope.cancel()
    finally:
        app.close()


async def serve_ingest(
    host: str,
    port: int,
    archive_dir: Path,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    shutdown_event: trio.Event | None = None,
    limits: IngestLimits = IngestLimits(),
) -> None:
    """Run a local publishing point on ``host``:``port``, archiving into ``archive_dir``. See
    :func:`serve_app` for start-up, shutdown and cancellation."""
    app = IngestApp(archive_dir, point=PublishingPoint(limits.memory_budget), body_timeout=limits.body_timeout)
    await serve_app(app, host, port, task_status=task_status, shutdown_event=shutdown_event,
                    max_connections=limits.max_connections)  # fmt: skip


def run_ingest_server(listen: str, archive_dir: Path, limits: IngestLimits = IngestLimits()) -> None:
    """Run a local publishing point in the foreground until SIGINT or SIGTERM, then stop as
    :func:`serve_app` describes and return (so the CLI exits 0). Raises ValueError for a
    ``listen`` that is not ``host:port``, OSError if it cannot bind."""
    host, port = parse_listen(listen)
    try:
        trio.run(_serve_until_signalled, host, port, archive_dir, limits)
    except BaseExceptionGroup as group:
        # A bind error comes out wrapped in one group per nursery it crossed.
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if isinstance(error, OSError):
            raise error from None
        raise


async def _serve_until_signalled(host: str, port: int, archive_dir: Path, limits: IngestLimits) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_ingest, host, port, archive_dir, limits=limits))
            async for signum in signals:
                logger.info("ingest.signal signal=%s action=stop", signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
