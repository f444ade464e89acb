"""The relay's own Prometheus series, beside the publishers' (:mod:`orchestrator.ops.metrics`,
same registry). Labels: ``stream``, ``group`` (the relay group), ``track`` (the track ID) and
``presentation`` on the series the cross-relay rule compares (deploy/prometheus/
orchestrator-relay-rules.yml):

- ``orchestrator_relay_fragment_phase_ticks``: the last forwarded fragment's time minus its grid
  point on the profile's fragment grid (:func:`orchestrator.relay.intake.grid`); two relays whose
  encoders' timestamps agree show phases within a sample duration of each other;
- ``orchestrator_relay_sample_duration_ticks``: that fragment's mean sample duration (the
  tolerance);
- ``orchestrator_relay_media_offset_seconds``: the wall time at which the last fragment was
  forwarded minus its end in media seconds: encoders a whole fragment apart differ by a fragment
  duration there, with equal phases;
- ``orchestrator_relay_seconds_since_last_fragment``: computed when scraped, from the relay's
  start before the first fragment, so a silent encoder shows a growing age;
- ``orchestrator_relay_silent_after_seconds``: the group's ``silent_fragments`` x the fragment
  duration, the threshold the silence alert compares with.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

OUTCOMES = ("forwarded", "duplicate", "rejected")


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry, presentation: str) -> None:
        r = registry
        self.presentation = presentation
        self.fragments = Counter(
            "orchestrator_relay_fragments_total",
            "Track fragments read from encoders, by outcome (forwarded, duplicate: forwarded before, rejected)",
            ("stream", "group", "outcome"), registry=r)  # fmt: skip
        self.timeline_resets = Counter(
            "orchestrator_relay_timeline_resets_total",
            "Tracks whose encoder timeline went back on a new POST (an encoder restart with the same header)",
            ("stream", "group"), registry=r)  # fmt: skip
        self.header_changes = Counter(
            "orchestrator_relay_header_changes_total",
            "Stream headers that differ from the one before (an encoder restarted with new settings)",
            ("stream", "group"), registry=r)  # fmt: skip
        self.posts = Counter(
            "orchestrator_relay_encoder_posts_total", "POSTs from encoders (probes excepted), by how they ended",
            ("stream", "group", "status"), registry=r)  # fmt: skip
        self.connected = Gauge(
            "orchestrator_relay_encoder_connected", "Encoder POSTs open now", ("stream", "group"), registry=r
        )
        self.silent = Gauge(
            "orchestrator_relay_encoder_silent", "1 while the stream's encoder has sent nothing for silent_fragments "
            "fragment durations", ("stream", "group"), registry=r)  # fmt: skip
        self.silent_after = Gauge(
            "orchestrator_relay_silent_after_seconds", "An encoder silent this long counts as silent",
            ("presentation", "group"), registry=r)  # fmt: skip
        track = ("presentation", "stream", "group", "track")
        self.last_start = Gauge(
            "orchestrator_relay_last_fragment_start_ticks",
            "Start (track ticks, signed) of the last fragment forwarded", track, registry=r)  # fmt: skip
        self.last_index = Gauge(
            "orchestrator_relay_last_fragment_index", "Grid index of the last fragment forwarded", track, registry=r
        )
        self.phase = Gauge(
            "orchestrator_relay_fragment_phase_ticks",
            "Last fragment forwarded: its start minus its grid point (profile fragment duration), in track ticks",
            track, registry=r)  # fmt: skip
        self.sample_duration = Gauge(
            "orchestrator_relay_sample_duration_ticks", "Mean sample duration of the last fragment forwarded",
            track, registry=r)  # fmt: skip
        self.media_offset = Gauge(
            "orchestrator_relay_media_offset_seconds",
            "Wall time when the last fragment was forwarded minus its end in media seconds", track,
            registry=r)  # fmt: skip
        self.spool_bytes = Gauge(
            "orchestrator_relay_spool_bytes", "Bytes in the durable spool", ("stream", "group"), registry=r
        )
        self.spool_fragments = Gauge(
            "orchestrator_relay_spool_fragments", "Fragments in the durable spool", ("stream", "group"), registry=r
        )
        self.spool_failures = Counter(
            "orchestrator_relay_spool_write_failures_total",
            "Spool writes that failed (the fragment was forwarded from memory only)", ("stream", "group"),
            registry=r)  # fmt: skip
        self.recovered = Counter(
            "orchestrator_relay_recovered_fragments_total", "Fragments re-sent from the spool after a restart",
            ("stream", "group"), registry=r)  # fmt: skip
        self.since_last = _SinceLast(r, presentation)

    def initialise(self, stream_id: str, group: str) -> None:
        for outcome in OUTCOMES:
            self.fragments.labels(stream_id, group, outcome)
        for counter in (self.timeline_resets, self.header_changes, self.spool_failures, self.recovered):
            counter.labels(stream_id, group)
        self.connected.labels(stream_id, group).set(0)
        self.silent.labels(stream_id, group).set(0)


class _SinceLast(Collector):
    """``orchestrator_relay_seconds_since_last_fragment{presentation,stream,group}`` when scraped."""

    def __init__(self, registry: CollectorRegistry, presentation: str) -> None:
        self.presentation = presentation
        self._last: dict[tuple[str, str], float] = {}  # monotonic time of the last fragment, or of the start
        registry.register(self)

    def start(self, stream_id: str, group: str) -> None:
        self._last.setdefault((stream_id, group), time.monotonic())

    def fragment(self, stream_id: str, group: str) -> None:
        self._last[(stream_id, group)] = time.monotonic()

    def seconds(self, stream_id: str, group: str) -> float:
        return time.monotonic() - self._last.get((stream_id, group), time.monotonic())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "orchestrator_relay_seconds_since_last_fragment",
            "Seconds since the stream's encoder last sent a fragment (before the first: since the relay started)",
            labels=("presentation", "stream", "group"))  # fmt: skip
        now = time.monotonic()
        for (stream_id, group), last in self._last.items():
            family.add_metric((self.presentation, stream_id, group), now - last)
        yield family
