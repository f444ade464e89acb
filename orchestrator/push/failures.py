"""Every way a publisher's request can fail, mapped in one place.

Theory of operation
-------------------
A request ends badly in one of two ways: the endpoint answered with a status that is not 2xx,
or the transport failed (a socket or TLS error, a deadline). Both become an
:class:`~orchestrator.errors.EndpointError` here, whose type says what the operator should look
at, and each such error has one :class:`~orchestrator.push.reconnect.Failure` kind, which the
retry policy, the ``orchestrator_post_failures_total{reason}`` metric and the status view use:

    status 401, 403   EndpointUnauthorized   Failure.UNAUTHORIZED   (retried slowly)
    status 404        EndpointNotFound       Failure.NOT_FOUND      (retried slowly)
    status 5xx        EndpointRejected       Failure.SERVER
    other non-2xx     EndpointRejected       Failure.REJECTED
    2xx mid-body      EndpointRejected       Failure.REJECTED       (an answer before the body ended)
    transport         EndpointError          Failure.TRANSPORT      (connect, write, read, deadline)

The foreign exceptions themselves (OSError, ``trio.BrokenResourceError``, ``ssl.SSLError``) are
caught by the transport (:mod:`orchestrator.push.connection`), which hands them to
:func:`transport_error`. Pure: no I/O.
"""

from __future__ import annotations

from orchestrator.errors import (
    EndpointError,
    EndpointNotFound,
    EndpointRejected,
    EndpointUnauthorized,
    reason_of,
)
from orchestrator.push.reconnect import Failure


def classify_status(status_code: int) -> Failure:
    """The failure kind of a non-2xx status."""
    if status_code in (401, 403):
        return Failure.UNAUTHORIZED
    if status_code == 404:
        return Failure.NOT_FOUND
    if status_code >= 500:
        return Failure.SERVER
    return Failure.REJECTED


def status_error(url: str, status: int, reason: str = "") -> EndpointError | None:
    """The error a status means, or None for a 2xx (success)."""
    if 200 <= status < 300:
        return None
    text = f"HTTP {status} {reason}".strip()
    if status in (401, 403):
        return EndpointUnauthorized(url, f"{text}: credentials missing or refused", status)
    if status == 404:
        return EndpointNotFound(url, f"{text}: publishing point not found", status)
    return EndpointRejected(url, text, status)


def answered_mid_body(url: str, status: int, reason: str = "") -> EndpointError:
    """The endpoint answered while the body was still being sent: the request is over either way
    (a refusal says why; a 2xx before the end of the body is a refusal too)."""
    return status_error(url, status, reason) or EndpointRejected(
        url, f"the server answered HTTP {status} before the body ended", status
    )


def transport_error(url: str, exc: BaseException) -> EndpointError:
    """A failed socket or TLS operation as an EndpointError, with the reason along its causes
    (a TLS verification failure arrives as an empty BrokenResourceError caused by the
    ``SSLCertVerificationError`` that says what is wrong)."""
    return EndpointError(url, f"connection failed: {type(exc).__name__}: {reason_of(exc)}")


def timed_out(url: str, what: str, seconds: float) -> EndpointError:
    """A deadline passed: ``what`` is connect, write or response."""
    return EndpointError(url, f"timed out ({what}, {seconds:g} s)")


def failure_of(error: EndpointError) -> Failure:
    """The failure kind of an error from :func:`status_error`, :func:`transport_error` or
    :func:`timed_out`."""
    return classify_status(error.status_code) if error.status_code else Failure.TRANSPORT
