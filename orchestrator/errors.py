"""The orchestrator's exceptions, one root, the type saying whose fault it was.

    OrchestratorError
    ├── ProfileError            the user's profile: file, key path and reason
    ├── SourceError*            an encoder's source cannot be used: key path below the group's encoder, and why
    │   └── FileLockError*      a file source that cannot be locked to the clock (frame rate, streams, length)
    ├── MediaError              bytes that are not the fragmented MP4 we expect
    │   ├── BoxError            a box that is truncated, oversized or malformed
    │   └── ScanError*          the count sink's request scanner met a malformed request or box (testing/)
    ├── IngestOverloaded        the ingest server's memory budget is used up: retry later
    ├── EncoderError            one of our encoder instances misbehaved
    ├── StateError              the group's state directory cannot be used as it is
    │   ├── InstanceLocked      another instance of the same group holds the state directory
    │   └── StateMismatch*      a state file written for another presentation, group or clock
    ├── StatusUnreadable        ``orchestrator status`` cannot read a running instance's /status
    ├── ListenError             an address to listen on is taken: names it and who set it
    ├── LifecycleError          a publisher's shell fed its request lifecycle an event it does not expect: our bug
    └── EndpointError           the remote ingest endpoint refused or failed
        ├── EndpointUnauthorized    401 / 403: credentials are wrong or missing
        ├── EndpointNotFound        404: the publishing point does not exist
        └── EndpointRejected        any other non-2xx answer

    * also a ``ValueError``, as they were before they joined the tree: the callers that plan a run
      catch a bad value as ``ValueError`` (``int()``, ``Fraction()``, ``json``) and these alike.

Every exception class in the package sits in this tree (``tests/test_errors.py`` walks them all);
the few defined beside their code (``FfmpegExited`` in ``encode/ffmpeg.py``) derive from a branch here.

Foreign exceptions (httpx, OSError, trio) are converted where they enter, in the shells; the
pure core raises only ``MediaError`` / ``BoxError`` and ``ProfileError``.
"""

from __future__ import annotations

from typing import TypeVar

_Media = TypeVar("_Media", bound="MediaError")


def over_limit(error: _Media, limit: str | None, cause: MediaError | None = None) -> _Media:
    """``error``, saying it exceeds ``limit`` (or the limit ``cause`` exceeds, if any: for an
    error re-raised with more context); for ``raise over_limit(BoxError(...), "max_moof_size")``."""
    error.limit = cause.limit if cause is not None and cause.limit is not None else limit
    return error


class OrchestratorError(Exception):
    """Root of every error this package raises on purpose."""


class ProfileError(OrchestratorError):
    """A profile that cannot be used. ``str()`` is the message shown to the operator."""

    def __init__(self, path: str, problems: list[tuple[str, str]]) -> None:
        self.path = path
        self.problems = problems
        lines = [f"{path}: {key}: {reason}" if key else f"{path}: {reason}" for key, reason in problems]
        super().__init__("\n".join(lines))


class SourceError(OrchestratorError, ValueError):
    """A source that cannot be used; ``key`` is its key path below the group's encoder."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


class FileLockError(SourceError):
    """A file source that cannot be locked to the clock; the message says why."""

    def __init__(self, message: str) -> None:
        super().__init__("source.path", message)


class MediaError(OrchestratorError):
    """Bytes that are not a valid fragmented-MP4 live ingest stream. ``limit`` names the limit
    they exceed (``max_moof_size`` ...), if that is what is wrong with them (:func:`over_limit`)."""

    limit: str | None = None


class BoxError(MediaError):
    """A single ISO BMFF box is malformed (bad size, truncated payload, unknown version)."""


class ScanError(MediaError, ValueError):
    """The count sink's request scanner (``testing/bodyscan.py``) met a malformed request line,
    chunk size or box."""


class IngestOverloaded(OrchestratorError):
    """The ingest server cannot take more bytes now (its memory budget across POSTs is in use):
    not the client's fault, and worth a retry."""


class EncoderError(OrchestratorError):
    """An encoder instance failed: it exited, produced bad output, or could not start."""


class StateError(OrchestratorError):
    """The group's state directory (its lock and its continuity state file) cannot be used as it is."""


class InstanceLocked(StateError):
    """Another ``orchestrator up`` already runs this group with this state directory."""


class StateMismatch(StateError, ValueError):
    """The state file belongs to another presentation or clock."""


class StatusUnreadable(OrchestratorError):
    """``orchestrator status`` cannot read a running instance's ``/status`` (unreachable, not 200,
    or not a status document)."""


class ListenError(OrchestratorError):
    """We could not listen on an address; the message names it and the key or option that set it."""


class LifecycleError(OrchestratorError):
    """The publisher's shell fed its request lifecycle an event the current state does not
    expect (``push/lifecycle.py``): a bug in the shell, never the endpoint's doing."""


class EndpointError(OrchestratorError):
    """An ingest endpoint refused our request or failed while serving it."""

    def __init__(self, url: str, message: str, status_code: int | None = None) -> None:
        self.url = url
        self.status_code = status_code
        super().__init__(f"{url}: {message}")


class EndpointUnauthorized(EndpointError):
    """401/403: the endpoint wants credentials we did not give, or rejected them."""


class EndpointNotFound(EndpointError):
    """404: the publishing point does not exist at that URL."""


class EndpointRejected(EndpointError):
    """Any other non-2xx answer."""


def reason_of(exc: BaseException) -> str:
    """The first non-empty message along ``exc``'s chain of causes, for a log line.

    httpx/httpcore wrap a TLS verification failure as ``ConnectError('')`` whose cause is an
    empty ``trio.BrokenResourceError`` whose cause is the ``ssl.SSLCertVerificationError`` that
    says what is wrong; this returns that message instead of nothing."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if str(current):
            return str(current) if current is exc else f"{type(current).__name__}: {current}"
        current = current.__cause__ or current.__context__
    return "no reason given"
