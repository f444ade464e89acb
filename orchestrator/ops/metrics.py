"""Prometheus metrics of the orchestrator, created against an injectable registry.

Labels: ``stream`` (stream id), ``group`` (encoder group), ``endpoint`` (endpoint name),
``endpoint_region`` (the endpoint's region: not ``region``, which Prometheus setups commonly use
as an external label for the region of the Prometheus itself), and ``presentation`` on the
series a ruler that sees every group aggregates over (``orchestrator_profile_group_info``,
``orchestrator_fragment_duration_seconds``, ``orchestrator_seconds_since_last_push``,
``orchestrator_push_lag_seconds``). No label or value ever holds a URL's credentials or a secret.
They are served, with the health and status routes, by :mod:`orchestrator.ops.listener`.

The series the alert rules (deploy/prometheus/) are built on exist from the process start, so
that "never pushed" and "a group nobody runs" are visible, and they do not move with the moment
Prometheus scrapes them, so that series scraped at different phases of an interval compare:

- ``orchestrator_seconds_since_last_push``: since the last push, or since the publisher started
  while it has pushed nothing;
- ``orchestrator_push_lag_seconds``: when the last fragment was pushed minus the end of that
  fragment on the shared clock (a property of the push, the same whenever it is read);
- ``orchestrator_profile_group_info``: every group of the profile, 1 where this process runs it;
- ``orchestrator_wall_clock_seconds``: this process's wall clock when scraped, against which
  the scrape's own timestamp shows a clock that is off.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.ops.state import LiveState
from orchestrator.ops.status import STATES, endpoint_state

_ENDPOINT = ("stream", "group", "endpoint", "endpoint_region")
LIVE_LOCK_METRIC = "orchestrator_live_lock_offset_ticks"
LIVE_LOCK_ESTABLISHED_METRIC = "orchestrator_live_lock_established_ms"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.fragments_encoded = Counter(
            "orchestrator_fragments_encoded_total", "Fragments produced by an encoder instance, per track",
            ("stream", "group"), registry=r)  # fmt: skip
        self.last_encoded_index = Gauge(
            "orchestrator_last_encoded_fragment_index", "Shared-clock index of the last fragment encoded",
            ("stream", "group"), registry=r)  # fmt: skip
        self.fragments_pushed = Counter(
            "orchestrator_fragments_pushed_total", "Track fragments written to an ingest POST", _ENDPOINT,
            registry=r)  # fmt: skip
        self.bytes_pushed = Counter(
            "orchestrator_bytes_pushed_total", "Bytes written to ingest POST bodies (headers included)",
            _ENDPOINT, registry=r)  # fmt: skip
        self.last_pushed_index = Gauge(
            "orchestrator_last_pushed_fragment_index", "Shared-clock index of the last fragment pushed",
            _ENDPOINT, registry=r)  # fmt: skip
        self.last_pushed_timestamp = Gauge(
            "orchestrator_last_pushed_fragment_timestamp_seconds",
            "Media time (seconds since the shared-clock epoch) of the last fragment pushed", _ENDPOINT,
            registry=r)  # fmt: skip
        self.last_push_time = Gauge(
            "orchestrator_last_push_time_seconds", "Unix time at which the last fragment was pushed",
            _ENDPOINT, registry=r)  # fmt: skip
        self.posts_opened = Counter(
            "orchestrator_posts_opened_total", "Long-running ingest POSTs opened", _ENDPOINT, registry=r
        )
        self.connections_opened = Counter(
            "orchestrator_connections_opened_total",
            "Connections (TCP, and TLS over it) made to the endpoint, probes included; a CMAF track's "
            "requests share one kept connection", _ENDPOINT, registry=r)  # fmt: skip
        self.post_failures = Counter(
            "orchestrator_post_failures_total", "Probes or POSTs that failed, by reason",
            (*_ENDPOINT, "reason"), registry=r)  # fmt: skip
        self.endpoint_up = Gauge(
            "orchestrator_endpoint_up", "1 while a POST to the endpoint is streaming", _ENDPOINT, registry=r
        )
        self.reconnects = Counter(
            "orchestrator_reconnects_total", "POSTs reopened after a failed one", _ENDPOINT, registry=r
        )
        self.resent_fragments = Counter(
            "orchestrator_resent_fragments_total",
            "Track fragments sent again on a new POST after a failure (forward buffer)", _ENDPOINT,
            registry=r)  # fmt: skip
        self.backlog_fragments = Gauge(
            "orchestrator_backlog_fragments", "Track fragments waiting for an endpoint", _ENDPOINT, registry=r
        )
        self.backlog_seconds = Gauge(
            "orchestrator_backlog_seconds", "Media seconds waiting for an endpoint (largest over tracks)",
            _ENDPOINT, registry=r)  # fmt: skip
        self.backlog_bytes = Gauge("orchestrator_backlog_bytes", "Bytes waiting for an endpoint", _ENDPOINT, registry=r)
        self.dropped_fragments = Counter(
            "orchestrator_dropped_fragments_total",
            "Track fragments an endpoint will never get: its backlog bound was reached", _ENDPOINT,
            registry=r)  # fmt: skip
        self.encoder_restarts = Counter(
            "orchestrator_encoder_restarts_total", "Encoder instances restarted, by reason (exited, crashed, stalled)",
            ("group", "reason"), registry=r)  # fmt: skip
        self.encoder_up = Gauge(
            "orchestrator_encoder_up", "1 while the group's encoder instance runs", ("group",), registry=r
        )
        self.encoder_last_exit_code = Gauge(
            "orchestrator_encoder_last_exit_code",
            "Exit code of the group's last encoder process to end (negative: killed by that signal)",
            ("group",), registry=r)  # fmt: skip
        self.encoder_rejected = Counter(
            "orchestrator_encoder_rejected_fragments_total",
            "Fragments from an encoder instance not sent: repeats after a restart, or off the shared clock",
            ("stream", "group", "reason"), registry=r)  # fmt: skip
        self.encoder_skipped = Counter(
            "orchestrator_encoder_skipped_fragments_total",
            "Fragment indices a group never produced (its encoder was down); the other group covers them",
            ("stream", "group"), registry=r)  # fmt: skip
        self.monitor_decodes = Counter(
            "orchestrator_monitor_decodes_total",
            "Tiles the confidence monitor decoded while a page was open, by outcome (decoded, failed, timed_out)",
            ("outcome",), registry=r)  # fmt: skip
        self.state_write_failures = Counter(
            "orchestrator_state_write_failures_total",
            "Failed writes of the group's continuity state file (a restart may then repeat an index)",
            ("group",), registry=r)  # fmt: skip
        self.fragment_duration = Gauge(
            "orchestrator_fragment_duration_seconds",
            "The presentation's fragment duration (the alert rules count stalls in fragment durations)",
            ("presentation",), registry=r)  # fmt: skip
        self.profile_group = Gauge(
            "orchestrator_profile_group_info",
            "Every group of the profile: 1 for a group this process runs, 0 for one it expects elsewhere",
            ("presentation", "group"), registry=r)  # fmt: skip
        self.backlog_limit_seconds = Gauge(
            "orchestrator_backlog_limit_seconds", "The group's max_backlog.seconds: beyond it, fragments are dropped",
            ("group",), registry=r)  # fmt: skip
        self.backlog_limit_bytes = Gauge(
            "orchestrator_backlog_limit_bytes", "The group's max_backlog.bytes: beyond it, fragments are dropped",
            ("group",), registry=r)  # fmt: skip
        self.content_offset = Gauge(
            "orchestrator_content_offset_seconds",
            "Content of the last fragment's first frame against the lock: file (first video track): the picture "
            "ffmpeg delivered minus the one the lock puts there, in seconds of the file (0 when locked); test "
            "pattern: 0; live: source timestamp minus shared-clock time. Equal in every group that carries the "
            "same content",
            ("stream", "group", "track"), registry=r)  # fmt: skip
        self.live_lock_offset = Gauge(
            LIVE_LOCK_METRIC,
            "Live source: shared-clock tick minus source timestamp (90 kHz, modulo 2^33) the group maps frames "
            "with; peers read it to adopt the same mapping", ("group",), registry=r)  # fmt: skip
        self.live_locks = Counter(
            "orchestrator_live_locks_total",
            "Live source mappings taken at instance start, by origin (peer, saved, established)",
            ("group", "origin"), registry=r)  # fmt: skip
        self.live_lock_established = Gauge(
            LIVE_LOCK_ESTABLISHED_METRIC,
            "Live source: when the group's mapping was first established (ms since the Unix epoch, the "
            "establishing group's clock) and by which group; the earliest is the one every group converges on",
            ("group", "established_by"), registry=r)  # fmt: skip
        self.live_lock_moves = Counter(
            "orchestrator_live_lock_moves_total",
            "Live source: times a running group moved to the agreed mapping of its peers (at a fragment boundary)",
            ("group",), registry=r)  # fmt: skip
        self.live_peer_up = Gauge(
            "orchestrator_live_peer_up",
            "Live source: 1 when the peer's metrics endpoint answered the last check, else 0 (each group then "
            "keeps its own mapping)", ("group", "peer"), registry=r)  # fmt: skip
        self.seconds_since_push = _SecondsSincePush(r)
        self.endpoint_state = _EndpointState(r)
        self.push_lag = _PushLag(r)
        _WallClock(r)

    def describe_profile(
        self, presentation: str, groups: list[str], running: list[str], epoch_seconds: float, fragment_duration: float
    ) -> None:
        """What the rules compare between processes: the presentation's name, fragment duration
        and shared-clock epoch, and every group of its profile (``running``: the ones here)."""
        self.fragment_duration.labels(presentation).set(fragment_duration)
        for group in groups:
            self.profile_group.labels(presentation, group).set(1 if group in running else 0)
        self.seconds_since_push.presentation = presentation
        self.push_lag.set_profile(presentation, epoch_seconds, fragment_duration)

    def initialise_endpoint(self, labels: tuple[str, str, str, str]) -> None:
        """Export the endpoint's counters at 0 from the start, so that ``increase()`` in the
        alert rules sees their first increment (a series born at 1 has no increase)."""
        for counter in (self.fragments_pushed, self.bytes_pushed, self.posts_opened, self.connections_opened,
                        self.reconnects, self.resent_fragments, self.dropped_fragments):  # fmt: skip
            counter.labels(*labels)

    def initialise_group(self, group: str, stream_ids: list[str]) -> None:
        """The group's counters at 0 from the start (see :meth:`initialise_endpoint`)."""
        for reason in RESTART_REASONS:
            self.encoder_restarts.labels(group, reason)
        self.state_write_failures.labels(group)
        for stream_id in stream_ids:
            self.fragments_encoded.labels(stream_id, group)
            self.encoder_skipped.labels(stream_id, group)


# GroupEncoder's restart reasons.
RESTART_REASONS = ("exited", "killed", "crashed", "stalled")


class _EndpointState(Collector):
    """``orchestrator_endpoint_state{state}``: 1 for the endpoint's current state (see
    :func:`orchestrator.ops.status.endpoint_state`), 0 for the others, read at scrape time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._live: LiveState | None = None
        registry.register(self)

    def watch(self, live: LiveState) -> None:
        self._live = live

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "orchestrator_endpoint_state",
            "1 for the endpoint's current state: " + ", ".join(STATES), labels=(*_ENDPOINT, "state"))  # fmt: skip
        for p in self._live.publishers if self._live is not None else ():
            current = endpoint_state(p)
            for state in STATES:
                family.add_metric((p.stream_id, p.group, p.endpoint, p.region, state), 1 if state == current else 0)
        yield family


class _SecondsSincePush(Collector):
    """``orchestrator_seconds_since_last_push``, computed at scrape time from each publisher's
    last push, so it keeps growing while a stream is stalled (a gauge set on push would not).
    Before a publisher's first push it counts from when the publisher was tracked (its start):
    a process that never pushes shows an age that grows, not a missing series (which no alert
    sees)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._sources: dict[tuple[str, str, str, str], tuple[Callable[[], float | None], float]] = {}
        self.presentation = ""
        registry.register(self)

    def track(self, labels: tuple[str, str, str, str], seconds_since: Callable[[], float | None]) -> None:
        self._sources[labels] = (seconds_since, time.monotonic())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "orchestrator_seconds_since_last_push",
            "Seconds since a fragment was last written to the endpoint's POST (before the first: since the "
            "publisher started)", labels=("presentation", *_ENDPOINT))  # fmt: skip
        for labels, (source, tracked) in self._sources.items():
            value = source()
            family.add_metric((self.presentation, *labels), time.monotonic() - tracked if value is None else value)
        yield family


class _PushLag(Collector):
    """``orchestrator_push_lag_seconds``: the wall time at which the endpoint's last fragment was
    pushed minus the end of that fragment on the shared clock (epoch + (index + 1) x duration).

    It is a property of the last push, not of the moment it is read: two groups in step show
    the same lag whatever the phase at which each is scraped (their raw fragment indices,
    scraped seconds apart, differ by up to a fragment per 2 s of phase). A group k fragments
    behind shows k fragment durations more. Absent before the first push."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._live: LiveState | None = None
        self._presentation = ""
        self._epoch = 0.0
        self._duration = 0.0
        registry.register(self)

    def set_profile(self, presentation: str, epoch_seconds: float, fragment_duration: float) -> None:
        self._presentation, self._epoch, self._duration = presentation, epoch_seconds, fragment_duration

    def watch(self, live: LiveState) -> None:
        self._live = live

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "orchestrator_push_lag_seconds",
            "Wall time of the endpoint's last push minus the end of that fragment on the shared clock",
            labels=("presentation", *_ENDPOINT))  # fmt: skip
        try:
            now_monotonic = trio.current_time()  # the publishers' clock (PublisherState.last_push_monotonic)
        except RuntimeError:  # read outside trio (a test reading the registry afterwards)
            yield family
            return
        now_wall = time.time()
        for p in self._live.publishers if self._live is not None else ():
            if p.last_index is None or p.last_push_monotonic is None:
                continue
            pushed_wall = now_wall - (now_monotonic - p.last_push_monotonic)
            lag = pushed_wall - (self._epoch + (p.last_index + 1) * self._duration)
            family.add_metric((self._presentation, p.stream_id, p.group, p.endpoint, p.region), lag)
        yield family


class _WallClock(Collector):
    """``orchestrator_wall_clock_seconds``: ``time.time()`` when scraped. Its value minus the
    sample's timestamp (Prometheus's clock at the scrape) is this host's clock error plus the
    scrape's latency: the shared clock is the wall clock, so a group on a wrong clock encodes
    fragment indices out of step with the others."""

    def __init__(self, registry: CollectorRegistry) -> None:
        registry.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("orchestrator_wall_clock_seconds", "Unix time on this host when scraped",
                                value=time.time())  # fmt: skip


class LabelledChildren:
    """``children.bytes_pushed`` is ``metrics.bytes_pushed.labels(*labels)``, looked up once (when
    first used, so a series appears when it first has a value). prometheus-client's ``labels()``
    hashes the values and takes a lock on every call; on a path taken for every fragment of
    every stream that was a visible share of the CPU."""

    def __init__(self, metrics: Metrics, labels: tuple[str, ...]) -> None:
        self._metrics = metrics
        self._labels = labels

    def __getattr__(self, name: str) -> Any:
        child = getattr(self._metrics, name).labels(*self._labels)
        setattr(self, name, child)  # found as an attribute from now on; __getattr__ is not called again
        return child
