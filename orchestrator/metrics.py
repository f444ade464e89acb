"""Prometheus metrics of the orchestrator, created against an injectable registry.

Labels: ``stream`` (stream id), ``group`` (encoder group), ``endpoint`` (endpoint name),
``region``. No label or value ever holds a URL's credentials or a secret.
"""

from __future__ import annotations

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, make_asgi_app

from orchestrator.httpserve import serve_asgi

_ENDPOINT = ("stream", "group", "endpoint", "region")


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
        self.post_failures = Counter(
            "orchestrator_post_failures_total", "Probes or POSTs that failed, by reason",
            (*_ENDPOINT, "reason"), registry=r)  # fmt: skip
        self.endpoint_up = Gauge(
            "orchestrator_endpoint_up", "1 while a POST to the endpoint is streaming", _ENDPOINT, registry=r
        )
        self.queue_depth = Gauge(
            "orchestrator_queue_fragments", "Fragments waiting for an endpoint", _ENDPOINT, registry=r
        )
        self.queue_dropped = Counter(
            "orchestrator_queue_dropped_fragments_total",
            "Fragments dropped because an endpoint's queue was full", _ENDPOINT, registry=r)  # fmt: skip


async def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` over HTTP until cancelled; reports the bound (host, port).

    Cancellation: the listener closes; scrapes in flight are cut off.
    """
    app = make_asgi_app(registry)
    await serve_asgi(app, host, port, name="metrics", task_status=task_status)
