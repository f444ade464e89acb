"""The process's open-files limit (RLIMIT_NOFILE), raised at start to what the profile needs.

Every POST is a socket, so a profile of N streams in G groups with E endpoints each needs about
``3 x N x G x E`` descriptors (per publisher: the probe's connection, the POST's, and the
duplicate of it that the readability watch waits on) plus a margin for
listeners, archive files, the state directory and the encoder processes' pipes. Distributions
often start processes with a soft limit of 1024, which a 300-stream profile exceeds. At start,
``up`` raises the soft limit to what it needs (never above the hard limit, never lowers it), and
if the hard limit is too low it says so with the numbers and how to fix it, then goes on: the
publishers that cannot open a socket fail and retry like any other connection failure, visibly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

try:
    import resource
except ImportError:  # pragma: no cover (not POSIX)
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MARGIN = 256  # listeners, archive files, state files, pipes, the metrics scrapes


def files_needed(publishers: int, connections_per_publisher: int) -> int:
    return publishers * connections_per_publisher + MARGIN


@dataclass(frozen=True)
class LimitOutcome:
    needed: int
    soft_before: int
    soft: int
    hard: int

    @property
    def sufficient(self) -> bool:
        return self.soft >= self.needed


def _unlimited(value: int) -> int:
    return 1 << 62 if resource is not None and value == resource.RLIM_INFINITY else value


def ensure_open_files(needed: int) -> LimitOutcome | None:
    """Raise the soft RLIMIT_NOFILE to ``needed`` (capped at the hard limit). Logs what it did;
    logs an error naming the numbers if the hard limit is below ``needed``. None where the
    platform has no such limit."""
    if resource is None:
        return None
    soft_before, hard = (_unlimited(v) for v in resource.getrlimit(resource.RLIMIT_NOFILE))
    soft = soft_before
    if soft < needed:
        target = min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            soft = target
        except (ValueError, OSError) as exc:
            log.error("supervisor.open_files.raise_failed soft=%d target=%d error=%s", soft, target, exc)
    outcome = LimitOutcome(needed, soft_before, soft, hard)
    if not outcome.sufficient:
        log.error(
            "supervisor.open_files.too_low needed=%d soft=%d hard=%d hint=%s", needed, soft, hard,
            f"this profile needs {needed} open files but the hard limit is {hard}; raise it "
            "(ulimit -Hn, systemd LimitNOFILE=, docker --ulimit nofile=, /etc/security/limits.conf) "
            "or split the profile; publishers beyond the limit will fail to connect and keep retrying")  # fmt: skip
    elif soft != soft_before:
        log.info("supervisor.open_files.raised needed=%d soft=%d->%d hard=%d", needed, soft_before, soft, hard)
    return outcome
