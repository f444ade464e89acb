"""The per-endpoint queue of fragments waiting to be sent: bounded, oldest dropped first.

Theory of operation
-------------------
Each (stream, endpoint) pair has its own :class:`Backlog`. The encoder appends every fragment
to every endpoint's backlog and never waits: one slow or unreachable endpoint must not delay the
encoder or any other endpoint. When a backlog is full, the *oldest* fragment is dropped (the
live edge matters most to viewers) and returned to the caller, who counts and logs it.

``close()`` marks the end of the stream: what is queued is still handed out, then ``pop`` tells
the publisher the stream is over. Pure: the trio wake-up lives in the publisher shell.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from orchestrator.stream import EncodedFragment


class Backlog:
    def __init__(self, max_fragments: int) -> None:
        if max_fragments < 1:
            raise ValueError("a backlog holds at least one fragment")
        self.max_fragments = max_fragments
        self._items: deque[EncodedFragment] = deque()
        self.closed = False
        self.dropped = 0

    def push(self, fragment: EncodedFragment) -> list[EncodedFragment]:
        """Queue ``fragment``; return the fragments dropped to make room (oldest first)."""
        if self.closed:
            raise RuntimeError("push to a closed backlog")
        self._items.append(fragment)
        dropped = []
        while len(self._items) > self.max_fragments:
            dropped.append(self._items.popleft())
        self.dropped += len(dropped)
        return dropped

    def pop(self) -> EncodedFragment | None:
        """The oldest queued fragment, or None if there is none (see ``finished``)."""
        return self._items.popleft() if self._items else None

    def close(self) -> None:
        self.closed = True

    @property
    def finished(self) -> bool:
        """Closed and drained: the publisher should end its POST."""
        return self.closed and not self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[EncodedFragment]:
        return iter(self._items)
