"""What a running process knows about itself, as plain data: the status view, the status
endpoint and the tests read it; the encoders and publishers update it. No I/O, no trio.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PublisherState:
    """What the status view shows for one publisher."""

    group: str
    stream_id: str
    endpoint: str
    connected: bool = False
    last_index: int | None = None
    last_push_monotonic: float | None = None
    failures: int = 0
    last_error: str | None = None
    fragments_pushed: int = 0
    reconnects: int = 0
    retry_delay: float = 0.0  # the backoff step being waited out now (0 while connected)


@dataclass
class EncoderState:
    """What the status view shows for one (group, stream)."""

    group: str
    stream_id: str
    last_index: int | None = None
    fragments: int = 0


@dataclass
class LiveState:
    """Every publisher and encoder state of one process: all the status view needs."""

    publishers: list[PublisherState] = field(default_factory=list)
    encoders: list[EncoderState] = field(default_factory=list)
