"""When to try an endpoint again after a failed probe or POST.

Theory of operation
-------------------
A pure policy: given how many attempts have failed in a row and what kind of failure the last
one was, return the delay before the next attempt, in seconds. Retries never stop (ingest spec
7.4). The first retry after a working connection broke is immediate; later ones back off
exponentially up to a cap, with jitter drawn from a caller-supplied fraction in [0, 1) so the
function stays deterministic under test. Credential and not-found failures retry slowly: an
operator has to fix something, and we must notice when they have.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Failure(enum.Enum):
    """What kind of failure ended a request (:mod:`orchestrator.push.failures` maps errors to it)."""

    TRANSPORT = "transport"  # connect/read/write error or timeout
    SERVER = "server"  # 5xx
    UNAUTHORIZED = "unauthorized"  # 401/403
    NOT_FOUND = "not_found"  # 404
    REJECTED = "rejected"  # any other non-2xx


@dataclass(frozen=True)
class RetryPolicy:
    base: float = 0.5
    cap: float = 8.0
    slow: float = 15.0  # for failures a person has to fix
    jitter: float = 0.25  # +/- fraction of the delay

    def delay(self, consecutive_failures: int, failure: Failure, jitter_fraction: float = 0.5) -> float:
        """Seconds to wait before the next attempt. ``consecutive_failures`` counts from 1."""
        if failure in (Failure.UNAUTHORIZED, Failure.NOT_FOUND):
            nominal = self.slow
        elif consecutive_failures <= 1:
            return 0.0
        else:
            nominal = min(self.cap, self.base * 2 ** (consecutive_failures - 2))
        return nominal * (1 + self.jitter * (2 * jitter_fraction - 1))
