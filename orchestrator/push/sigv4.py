"""AWS Signature Version 4 for CMAF ingest requests (MediaPackage v2 takes CMAF ingest from an
encoder other than MediaLive only when its requests are signed for an IAM identity).

Theory of operation
-------------------
The signing itself is botocore's (:class:`botocore.auth.SigV4Auth` over a
:class:`botocore.awsrequest.AWSRequest`): the canonical request, the string to sign, the HMAC
chain and the ``Authorization`` header are its code, not ours. What is ours:

* :func:`signed_headers`, pure: the headers to add to one request (``X-Amz-Date``,
  ``X-Amz-Content-SHA256``, ``X-Amz-Security-Token`` when the credentials have a session token,
  ``Authorization``), given the method, the URL, the body, the credentials, the scope and the
  time. What is signed is chosen here: ``host`` (the value the connection sends, from
  :class:`~orchestrator.push.transport.Target`), ``x-amz-date``, ``x-amz-content-sha256`` and
  ``x-amz-security-token`` when present; nothing else (the other headers of a request, such as
  ``User-Agent`` or ``Transfer-Encoding``, may change on the way without breaking the
  signature). The body of a CMAF request (a track's header, or one whole segment) is known
  before its request starts, so its SHA-256 is signed, never ``UNSIGNED-PAYLOAD``.
* :class:`CredentialSource`: where the keys come from, read when asked: the standard AWS
  environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, optional
  ``AWS_SESSION_TOKEN``), the same names behind a prefix, or a profile of a shared-credentials
  file (the INI format of ``~/.aws/credentials``). The file is looked at (``stat``) before each
  request and read again when it changed, so rotated credentials are used from the next request
  on; should the new file be unreadable or incomplete (written in place, not renamed), the last
  good credentials stay in use and a warning names the file and the reason.
* :class:`RequestSigner`: the shell a publisher calls per request: the credentials now, the
  wall clock now, :func:`signed_headers`.

Secrets: the secret key and the session token are never in a log line, an exception message or
a ``repr`` (:class:`AwsCredentials` hides them); the errors name the variable, file, profile and
key, never a value. botocore's own debug log of the canonical request (which holds the session
token) is never reached: its ``add_auth`` is not called (see :class:`_SigV4AtTime`), and the
``botocore`` logger is kept at WARNING or above anyway.
"""

from __future__ import annotations

import configparser
import datetime as dt
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from orchestrator.errors import OrchestratorError
from orchestrator.profile import Endpoint, Profile, SigV4, endpoint_key
from orchestrator.push.transport import Target

log = logging.getLogger(__name__)
# Not ours to configure, but its DEBUG lines would carry the session token: never below WARNING.
if logging.getLogger("botocore").getEffectiveLevel() < logging.WARNING:
    logging.getLogger("botocore").setLevel(logging.WARNING)

ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
SESSION_TOKEN = "AWS_SESSION_TOKEN"
# The keys of a profile in a shared-credentials file (aws_security_token is the older name of
# the session token, still read by the AWS tools).
FILE_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
FILE_TOKEN_ALIASES = ("aws_session_token", "aws_security_token")


@dataclass(frozen=True)
class AwsCredentials:
    """An IAM identity's keys. Only the access key ID shows in a ``repr``."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Scope:
    """What a signature is for: the endpoint's AWS region and service."""

    region: str
    service: str


class _SigV4AtTime(SigV4Auth):  # type: ignore[misc]  # botocore is untyped
    """botocore's SigV4 at a given instant. ``add_auth`` is botocore's own sequence (prepare the
    headers, canonical request, string to sign, signature, Authorization) with the instant
    given instead of read from the clock, and without its DEBUG lines: every step is botocore's."""

    def __init__(self, credentials: AwsCredentials, scope: Scope, at: dt.datetime) -> None:
        keys = ReadOnlyCredentials(credentials.access_key_id, credentials.secret_access_key,
                                   credentials.session_token)  # fmt: skip
        super().__init__(keys, scope.service, scope.region)
        self._at = at

    def add_auth(self, request: AWSRequest) -> None:
        request.context["timestamp"] = self._at.astimezone(dt.UTC).strftime(SIGV4_TIMESTAMP)
        self._modify_request_before_signing(request)
        canonical = self.canonical_request(request)
        self._inject_signature_to_request(request, self.signature(self.string_to_sign(request, canonical), request))


def signed_headers(method: str, url: str, body: bytes, credentials: AwsCredentials, scope: Scope,
                   at: dt.datetime) -> list[tuple[str, str]]:  # fmt: skip
    """The headers that sign one request: ``X-Amz-Date``, ``X-Amz-Content-SHA256`` (the body's
    SHA-256, hex), ``X-Amz-Security-Token`` if the credentials have one, and ``Authorization``.
    Pure: the same inputs give the same headers. ``url`` is the request's whole URL as the
    connection sends it (its Host header and path are what is signed)."""
    target = Target.parse(url)
    signer = _SigV4AtTime(credentials, scope, at)
    request = AWSRequest(method=method, url=url, data=body, headers={"Host": target.host_header})
    request.headers["X-Amz-Content-SHA256"] = signer.payload(request)  # botocore's SHA-256 of the body
    signer.add_auth(request)
    names = ("X-Amz-Date", "X-Amz-Content-SHA256", "X-Amz-Security-Token", "Authorization")
    return [(name, str(request.headers[name])) for name in names if name in request.headers]


class CredentialError(OrchestratorError, ValueError):
    """The credentials cannot be read; the message names where they were looked for and why,
    never a value."""


def from_environment(prefix: str, environ: Mapping[str, str]) -> AwsCredentials:
    """``<prefix>AWS_ACCESS_KEY_ID``, ``<prefix>AWS_SECRET_ACCESS_KEY`` and, if set,
    ``<prefix>AWS_SESSION_TOKEN``. Raises CredentialError naming a missing variable."""
    names = [prefix + n for n in (ACCESS_KEY_ID, SECRET_ACCESS_KEY)]
    missing = [n for n in names if not environ.get(n)]
    if missing:
        raise CredentialError(f"environment variable{'s' if len(missing) > 1 else ''} {' and '.join(missing)} "
                              f"{'are' if len(missing) > 1 else 'is'} not set or empty")  # fmt: skip
    return AwsCredentials(environ[names[0]], environ[names[1]], environ.get(prefix + SESSION_TOKEN) or None)


def from_file_text(text: str, path: Path, profile: str) -> AwsCredentials:
    """Profile ``profile`` of a shared-credentials file's ``text`` (INI, as ``~/.aws/credentials``:
    a section per profile, keys ``aws_access_key_id``, ``aws_secret_access_key``, optional
    ``aws_session_token``). Raises CredentialError naming the file, profile and key; a syntax
    error names its line only (the line itself may hold a key)."""
    parser = configparser.RawConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        line = getattr(exc, "lineno", None)
        if line is None and isinstance(exc, configparser.ParsingError) and exc.errors:
            line = exc.errors[0][0]
        where = f" at line {line}" if line is not None else ""
        raise CredentialError(f"credentials file {path} is not in the AWS credentials (INI) format{where}: "
                              f"{type(exc).__name__}") from None  # fmt: skip
    if not parser.has_section(profile):
        known = ", ".join(f"[{s}]" for s in parser.sections()) or "none"
        raise CredentialError(f"credentials file {path} has no profile [{profile}] (profiles: {known})")
    section = parser[profile]
    missing = [k for k in FILE_KEYS[:2] if not section.get(k, "").strip()]
    if missing:
        raise CredentialError(f"credentials file {path}, profile [{profile}]: {' and '.join(missing)} "
                              f"{'are' if len(missing) > 1 else 'is'} missing or empty")  # fmt: skip
    token = next((section[k].strip() for k in FILE_TOKEN_ALIASES if section.get(k, "").strip()), None)
    return AwsCredentials(section[FILE_KEYS[0]].strip(), section[FILE_KEYS[1]].strip(), token)


def read_file(path: Path, profile: str) -> AwsCredentials:
    """Profile ``profile`` of the shared-credentials file at ``path`` (see :func:`from_file_text`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CredentialError(f"cannot read credentials file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:  # its message would quote a byte of the file
        raise CredentialError(f"credentials file {path} is not UTF-8 text") from None
    return from_file_text(text, path, profile)


class CredentialSource:
    """An endpoint's credentials, from the environment (read once: a process's environment does
    not change) or from a file (looked at before each use, read again when it changed).

    Construction reads them: CredentialError if they cannot be read now."""

    def __init__(self, config: SigV4, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self._environ = os.environ if environ is None else environ
        self._stamp: tuple[int, int, int] | None = None  # the file's (inode, size, mtime_ns) last read
        self._broken: tuple[int, int, int] | None = None  # a version that could not be used, warned once
        # "~/.aws/credentials" as people write it: the home directory of the user running us.
        self.path = None if config.credentials_file is None else config.credentials_file.expanduser()
        if self.path is None:
            self._credentials = from_environment(config.env_prefix, self._environ)
        else:
            self._stamp = self._file_stamp()
            self._credentials = read_file(self.path, config.profile)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def current(self) -> AwsCredentials:
        """The credentials to sign with now: the file's again if it changed since last read and
        can be used, else the last good ones (a warning, once per version of the file)."""
        path = self.path
        if path is None:
            return self._credentials
        stamp = self._file_stamp()
        if stamp == self._stamp or (stamp is not None and stamp == self._broken):
            return self._credentials
        try:
            credentials = read_file(path, self.config.profile)
        except CredentialError as exc:
            if stamp is not None:
                self._broken = stamp
            log.warning("sigv4.credentials.unusable %s; signing with the credentials read before", exc)
            return self._credentials
        if credentials != self._credentials:
            log.info("sigv4.credentials.reread file=%s profile=%s access_key_id=%s", path, self.config.profile,
                     credentials.access_key_id)  # fmt: skip
        self._credentials, self._stamp, self._broken = credentials, stamp, None
        return credentials


class RequestSigner:
    """Signs an endpoint's requests: ``signer(method, url, body)`` -> the headers to add."""

    def __init__(self, config: SigV4, environ: Mapping[str, str] | None = None) -> None:
        self.scope = Scope(config.region, config.service)
        self.source = CredentialSource(config, environ)

    def __call__(self, method: str, url: str, body: bytes) -> list[tuple[str, str]]:
        now = dt.datetime.fromtimestamp(time.time(), dt.UTC)
        return signed_headers(method, url, body, self.source.current(), self.scope, now)


def signer_for(endpoint: Endpoint, environ: Mapping[str, str] | None = None) -> RequestSigner | None:
    """The signer of an endpoint with ``sigv4``, its credentials read now; None without.
    Raises CredentialError (a ValueError) naming where the credentials were looked for."""
    return None if endpoint.sigv4 is None else RequestSigner(endpoint.sigv4, environ)


def credential_problems(profile: Profile, environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(key path, reason) for every SigV4 endpoint whose credentials cannot be read now: what
    ``orchestrator validate`` reports, as ``up`` and ``relay`` refuse to start on it."""
    problems = []
    for name, group in profile.groups.items():
        for endpoint in group.endpoints:
            if endpoint.sigv4 is not None:
                try:
                    CredentialSource(endpoint.sigv4, environ)
                except CredentialError as exc:
                    problems.append((f"{endpoint_key(name, endpoint)}.sigv4", str(exc)))
    return problems
