"""The event profile: what to encode, how to group it into streams, and where to push it.

A profile is a TOML file validated by the pydantic models below. Every error is reported as
``<file>: <key path>: <reason>`` through :class:`~orchestrator.errors.ProfileError`, in the
user's words: the key path names list entries by their name (``demo.toml:
streams[video].tracks[video_360p].bitrate: "fast" is not a bitrate; write bits per second, e.g.
800000, "800k" or "2.5M"``), the reason repeats the value written and says what would do;
unknown keys are rejected (with a "did you mean" when one is close). Where people write units,
units are accepted: a bitrate as ``"800k"``, a size as ``"256MiB"``.

Secrets never appear in a profile: an endpoint's credentials name an environment variable or a
file that holds them (``password_env``, ``password_file``, ``token_env``, ``token_file``; for
AWS SigV4, ``sigv4.env_prefix`` or ``sigv4.credentials_file``), and are read only when the
publisher starts (and a SigV4 credentials file again whenever it changes).
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import ipaddress
import os
import re
import ssl
import time
import tomllib
import typing
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from orchestrator.clock import TrackClock
from orchestrator.errors import ProfileError
from orchestrator.tracks import AUDIO, VIDEO, TrackDescription, TrackKind

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
AAC_FRAME_SAMPLES = 1024

# Bounds checked before any arithmetic, so that no value can make validation slow: a number
# written as text has at most this many characters, and a decimal exponent at most this magnitude.
MAX_NUMBER_TEXT = 40
MAX_DECIMAL_EXPONENT = 12
# Wire-format limits that `up` must be able to honour for the life of an event.
UINT32_MAX = 2**32 - 1  # mfhd.sequence_number, mdhd.timescale (ISO/IEC 14496-12, 8.8.5, 8.4.2)
UINT64_MAX = 2**64 - 1  # tfxd v1 fragment_absolute_time (MS-SSTR 2.2.4.4), tfdt v1
MAX_BACKLOG_BYTES = 64 * 1024**3
RUN_YEARS = 100  # an epoch must leave this many years of fragment indices and times


def _to_fraction(value: Any, *, what: str, allow_decimal: bool) -> Fraction:
    if isinstance(value, Fraction):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, not a boolean")
    if isinstance(value, int):
        if abs(value) > 10**MAX_DECIMAL_EXPONENT:
            raise ValueError(f"{what} {value} is out of range")
        return Fraction(value)
    if isinstance(value, float):
        if not allow_decimal:
            raise ValueError(f'{what} must be an integer or a ratio such as "30000/1001", not {_shown(value)}')
        value = repr(value)  # the decimal the user wrote, never the binary float
    if isinstance(value, str):
        text = value.strip()
        if allow_decimal and text.endswith("s"):  # a duration as people write it: "2s", "120 s"
            text = text[:-1].rstrip()
        if len(text) > MAX_NUMBER_TEXT:
            raise ValueError(f"{what} is {len(text)} characters long; at most {MAX_NUMBER_TEXT} are accepted")
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                return Fraction(int(num), int(den))
            if not allow_decimal:
                return Fraction(int(text))
            number = Decimal(text)
        except (ValueError, ZeroDivisionError, InvalidOperation):
            example = '2, 2.5, "2s" or "2002/1000"' if allow_decimal else '30, "25" or "30000/1001"'
            raise ValueError(f"{what} {_shown(value)} is not a number; write {example}") from None
        # Checked before Fraction(), which would compute 10**exponent: "1e-999999999" is refused
        # at once, not after minutes of arithmetic.
        if not number.is_finite() or abs(number.adjusted()) > MAX_DECIMAL_EXPONENT:
            raise ValueError(f"{what} {_shown(value)} is out of range")
        result = Fraction(number)
        return result
    raise ValueError(f"{what} must be a number or a ratio string, got {type(value).__name__}")


def _fraction_text(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


BITRATE_EXAMPLE = 'bits per second, e.g. 800000, "800k" or "2.5M"'
_BITRATE = re.compile(r"(\d+(?:\.\d+)?)\s*([kKMG]?)(?:bps|bit/s|b/s)?")
_BITRATE_UNITS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}  # SI, as ffmpeg's: k = 1000; m is milli


def _bits_per_second(value: Any) -> Any:
    """``800000``, ``"800k"``, ``"800 kbps"``, ``"2.5M"`` -> 800000, 800000, 800000, 2500000.
    Integers pass through (the range is checked after); anything else is refused with an example."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    shown = _shown(value)
    if isinstance(value, str) and len(value) <= MAX_NUMBER_TEXT and (match := _BITRATE.fullmatch(value.strip())):
        bits = Decimal(match[1]) * _BITRATE_UNITS[match[2]]
        if bits != bits.to_integral_value():
            raise ValueError(f"{shown} is not a whole number of bits per second; write {BITRATE_EXAMPLE}")
        return int(bits)
    raise ValueError(f"{shown} is not a bitrate; write {BITRATE_EXAMPLE}")


def _shown(value: Any) -> str:
    """A value as the user wrote it in TOML: strings in double quotes, booleans lower case, long
    values cut."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    elif isinstance(value, int | float | Decimal | Fraction):
        text = str(value)
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = "a list"
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:59] + "…"


Bitrate = Annotated[
    StrictInt,
    BeforeValidator(_bits_per_second),
    Field(gt=0, le=UINT32_MAX),
    WithJsonSchema({"anyOf": [{"type": "integer", "exclusiveMinimum": 0, "maximum": UINT32_MAX},
                              {"type": "string", "pattern": _BITRATE.pattern}],
                    "description": BITRATE_EXAMPLE + " (k = 1000, M = 1000000)"}),
]  # fmt: skip
FrameRate = Annotated[
    Fraction,
    BeforeValidator(lambda v: _to_fraction(v, what="frame rate", allow_decimal=False)),
    PlainSerializer(_fraction_text, return_type=str),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^\d+(/\d+)?$"}],
                    "description": "frames per second: an integer or an exact ratio such as \"30000/1001\""}),
]  # fmt: skip
Seconds = Annotated[
    Fraction,
    BeforeValidator(lambda v: _to_fraction(v, what="duration", allow_decimal=True)),
    PlainSerializer(_fraction_text, return_type=str),
    WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "string"}],
                    "description": "seconds: a number or an exact decimal/ratio string"}),
]  # fmt: skip


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VideoTrack(_Model):
    """A video rendition. Frame rate is exact: use "30000/1001" for 29.97 fps."""

    kind: Literal["video"]
    name: str = Field(pattern=NAME_PATTERN)
    bitrate: Bitrate
    width: StrictInt = Field(ge=16, le=7680)
    height: StrictInt = Field(ge=16, le=4320)
    frame_rate: FrameRate
    timescale: StrictInt | None = Field(
        default=None, gt=0, le=UINT32_MAX, description="default: presentation.video_timescale"
    )
    codec: Literal["h264"] = "h264"

    @property
    def track_kind(self) -> TrackKind:
        return VIDEO

    def clock_timescale(self, presentation: Presentation) -> int:
        """Ticks per second: the track's own timescale, else the presentation's video timescale."""
        return self.timescale or presentation.video_timescale

    @property
    def frame_duration(self) -> Fraction:
        return 1 / self.frame_rate

    def describe(self, track_id: int, timescale: int, sample_entry: bytes) -> TrackDescription:
        return TrackDescription(track_id, self.name, VIDEO, timescale, self.bitrate, sample_entry,
                                width=self.width, height=self.height)  # fmt: skip

    @field_validator("frame_rate")
    @classmethod
    def _frame_rate_range(cls, value: Fraction) -> Fraction:
        if not Fraction(1) <= value <= Fraction(120):
            raise ValueError(f"frame rate {_fraction_text(value)} is outside 1 to 120 fps")
        return value


class AudioTrack(_Model):
    """An audio track; its timescale is its sample rate."""

    kind: Literal["audio"]
    name: str = Field(pattern=NAME_PATTERN)
    bitrate: Bitrate
    sample_rate: StrictInt = Field(ge=8000, le=96000)
    channels: StrictInt = Field(default=2, ge=1, le=8)
    language: str = Field(default="und", pattern=r"^[a-z]{3}$", description="ISO 639-2/T code")
    codec: Literal["aac"] = "aac"

    @property
    def track_kind(self) -> TrackKind:
        return AUDIO

    def clock_timescale(self, presentation: Presentation) -> int:
        """Ticks per second: the sample rate."""
        return self.sample_rate

    @property
    def frame_duration(self) -> Fraction:
        return Fraction(AAC_FRAME_SAMPLES, self.sample_rate)

    def describe(self, track_id: int, timescale: int, sample_entry: bytes) -> TrackDescription:
        return TrackDescription(track_id, self.name, AUDIO, timescale, self.bitrate, sample_entry,
                                language=self.language, sample_rate=self.sample_rate,
                                channels=self.channels)  # fmt: skip


Track = Annotated[VideoTrack | AudioTrack, Field(discriminator="kind")]


class Stream(_Model):
    """One fragmented-MP4 bitstream, pushed as its wire format's requests (Smooth: one long POST
    to ``<publishing point>/Streams(<id>)``; see ``orchestrator.wire``)."""

    id: str = Field(pattern=NAME_PATTERN)
    tracks: list[Track] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_track_names(self) -> Stream:
        names = [t.name for t in self.tracks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"track names must be unique within a stream: {', '.join(duplicates)}")
        return self


class Presentation(_Model):
    name: str = Field(pattern=NAME_PATTERN)
    fragment_duration: Seconds = Field(description="seconds, 2 to 6")
    epoch: dt.datetime = Field(description="shared-clock epoch, an RFC 3339 UTC instant; same in every group")
    video_timescale: StrictInt = Field(default=90000, gt=0, le=UINT32_MAX, description="mdhd timescale: 32 bits")
    tfxd_version: Literal[1, 2] = Field(
        default=1,
        description="1: MS-SSTR tfxd (time, duration). 2: ASSUMED layout, v1 fields + 64-bit fragment index",
    )

    @field_validator("fragment_duration")
    @classmethod
    def _duration_range(cls, value: Fraction) -> Fraction:
        if not Fraction(2) <= value <= Fraction(6):
            raise ValueError(f"fragment duration {float(value):g} s is outside 2 to 6 s (ingest spec, 3.7)")
        return value

    @field_validator("epoch")
    @classmethod
    def _epoch_has_zone(cls, value: dt.datetime) -> dt.datetime:
        if value.tzinfo is None:
            raise ValueError("epoch needs a time zone, e.g. 2026-01-01T00:00:00Z")
        return value

    @property
    def epoch_ns(self) -> int:
        delta = self.epoch - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


class Credentials(_Model):
    """Where the publisher finds its secret: never the secret itself."""

    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    token_env: str | None = None
    token_file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one_secret(self) -> Credentials:
        sources = [k for k in ("password_env", "password_file", "token_env", "token_file") if getattr(self, k)]
        if len(sources) != 1:
            raise ValueError("give exactly one of password_env, password_file, token_env, token_file")
        if sources[0].startswith("password") and not self.username:
            raise ValueError("password_env/password_file needs a username")
        if sources[0].startswith("token") and self.username:
            raise ValueError("a bearer token takes no username")
        return self

    def authorization(self, environ: dict[str, str] | None = None) -> tuple[str, str] | str:
        """Read the secret now: ``(username, password)`` for Basic auth, or a bearer token.

        Raises ValueError naming the variable or file (never its content) when it is missing.
        """
        environ = dict(os.environ) if environ is None else environ

        def read(env: str | None, path: Path | None) -> str:
            if env is not None:
                if not environ.get(env):
                    raise ValueError(f"environment variable {env} is not set or empty")
                return environ[env]
            assert path is not None
            try:
                secret = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
            except UnicodeDecodeError:  # its message would quote a byte of the secret
                raise ValueError(f"secret file {path} is not UTF-8 text") from None
            if not secret:
                raise ValueError(f"secret file {path} is empty")
            return secret

        if self.username is not None:
            return self.username, read(self.password_env, self.password_file)
        return read(self.token_env, self.token_file)


AWS_REGION_PATTERN = r"^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}$"
ENV_PREFIX_PATTERN = r"^([A-Za-z_][A-Za-z0-9_]*)?$"


class SigV4(_Model):
    """AWS Signature Version 4 on every request of a CMAF endpoint (MediaPackage v2 ingest from an
    encoder other than MediaLive), for an IAM identity whose keys are read from the environment or
    a shared-credentials file: never from the profile (orchestrator.push.sigv4)."""

    region: str = Field(pattern=AWS_REGION_PATTERN, description='the AWS region signed for, e.g. "eu-west-1"')
    service: str = Field(default="mediapackagev2", pattern=r"^[a-z0-9][a-z0-9-]*$",
                         description="the AWS service signed for")  # fmt: skip
    env_prefix: str = Field(
        default="", pattern=ENV_PREFIX_PATTERN,
        description="read <env_prefix>AWS_ACCESS_KEY_ID, <env_prefix>AWS_SECRET_ACCESS_KEY and, if set, "
        "<env_prefix>AWS_SESSION_TOKEN; default: the standard AWS variables",
    )  # fmt: skip
    credentials_file: Path | None = Field(
        default=None,
        description="a shared-credentials file (INI, as ~/.aws/credentials) instead of the environment; read "
        "again when it changes (rotated credentials)",
    )
    profile: str = Field(default="default", pattern=r"^[^\[\]\s]+$",
                         description="the profile (section) of credentials_file")  # fmt: skip

    @model_validator(mode="after")
    def _one_source(self) -> SigV4:
        if self.credentials_file is not None and self.env_prefix:
            raise ValueError("give env_prefix (environment variables) or credentials_file, not both")
        if "profile" in self.model_fields_set and self.credentials_file is None:
            raise ValueError("profile names a section of credentials_file; give credentials_file too")
        return self

    def where(self) -> str:
        """Where the keys are read from, in words (no value)."""
        if self.credentials_file is not None:
            return f"profile [{self.profile}] of {self.credentials_file}"
        return f"environment variables {self.env_prefix}AWS_ACCESS_KEY_ID and {self.env_prefix}AWS_SECRET_ACCESS_KEY"


class Endpoint(_Model):
    """An ingest publishing point, e.g. ``https://ingest.example.net/live/event.isml``."""

    name: str = Field(pattern=NAME_PATTERN)
    # Before url, whose check depends on it.
    format: Literal["smooth", "cmaf"] = Field(
        default="smooth",
        description="wire format: Smooth Streaming live ingest, or CMAF ingest (DASH-IF Interface-1); "
        "see orchestrator.wire",
    )
    cmaf_paths: Literal["streams", "template"] = Field(
        default="streams",
        description="CMAF request paths: /Streams(<stream>-<track>), or /<stream>/<track>/init.m4s and "
        "/<stream>/<track>/<index>.m4s (orchestrator.wire.cmaf.PATH_SCHEMES)",
    )
    url: str
    region: str = Field(pattern=NAME_PATTERN)
    credentials: Credentials | None = None
    sigv4: SigV4 | None = Field(
        default=None,
        description="sign each request with AWS Signature Version 4 (CMAF endpoints only; MediaPackage v2)",
    )
    ca_file: Path | None = Field(
        default=None,
        description="extra CA bundle (PEM), trusted in addition to the default ones; TLS verification stays on",
    )

    @field_validator("url")
    @classmethod
    def _publishing_point(cls, value: str, info: ValidationInfo) -> str:
        parts = urlsplit(value)
        # First, so that no later message (they quote the URL) repeats a password.
        if parts.username or parts.password:
            raise ValueError("credentials in the URL are not allowed; use [credentials] with password_env")
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{_shown(value)} is not an http:// or https:// URL")
        if not parts.hostname:
            raise ValueError(f"{_shown(value)} has no host")
        if parts.query or parts.fragment:
            raise ValueError("the publishing point URL takes no query or fragment")
        # A Smooth publishing point ends in .isml; a CMAF one is any base URL (MediaPackage v2:
        # .../in/v1/<group>/1/<channel>). No check while the format itself is invalid.
        if info.data.get("format") == "smooth" and not parts.path.endswith(".isml"):
            raise ValueError(f"{_shown(value)} must be a publishing point ending in .isml, e.g. .../live/event.isml")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError(f"{_shown(value)} has an invalid port") from None
        return value.rstrip("/")

    @field_validator("ca_file")
    @classmethod
    def _readable_bundle(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=value)
            except ssl.SSLError:  # before OSError, of which it is a subclass
                raise ValueError(f"{value} holds no PEM certificate") from None
            except OSError as exc:
                raise ValueError(f"cannot read CA bundle {value}: {exc.strerror}") from None
        return value

    @model_validator(mode="after")
    def _no_secret_in_clear(self) -> Endpoint:
        # An error, not a warning: Basic auth sends the password itself, and a bearer token is as
        # good as one; over http:// both cross every network hop in clear text, and a warning in a
        # log nobody reads at 3 a.m. would not take them back. Loopback stays allowed (tests, a
        # local relay), and TLS is the fix anywhere else.
        if self.credentials is not None and urlsplit(self.url).scheme == "http" and not self.is_loopback:
            raise ValueError("credentials over plain http:// to a non-loopback host would send the secret in clear "
                             "text; use https://")  # fmt: skip
        # A SigV4 signature is not the secret, but a session token travels as it is, and a signed
        # request could be replayed by anyone on the path within its validity: https:// too.
        if self.sigv4 is not None and urlsplit(self.url).scheme == "http" and not self.is_loopback:
            raise ValueError("sigv4 over plain http:// to a non-loopback host would send the session token and "
                             "replayable signed requests in clear text; use https://")  # fmt: skip
        return self

    @field_validator("sigv4")
    @classmethod
    def _sigv4_on_cmaf(cls, value: SigV4 | None, info: ValidationInfo) -> SigV4 | None:
        # Per-request signing needs each request's body in hand before it starts: CMAF ingest (one
        # request per segment) has it; Smooth's one long POST per stream does not.
        if value is not None and info.data.get("format") == "smooth":
            raise ValueError(
                'SigV4 signs CMAF ingest requests only; this endpoint is format = "smooth" (one '
                'long POST per stream, whose body is not known when it starts): set format = "cmaf"'
            )
        if value is not None and info.data.get("credentials") is not None:
            raise ValueError("an endpoint takes [credentials] (Basic/Bearer) or sigv4, not both")
        return value

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(urlsplit(self.url).hostname or "")


class SyntheticEncoder(_Model):
    """Replays a small pre-encoded H.264/AAC clip, re-stamped onto the shared clock."""

    backend: Literal["synthetic"]


class PatternSource(_Model):
    """Colour bars with a moving box and a tone with a pip each second, paced in real time; every
    pixel and sample a function of the shared clock (encode/lock.py). With ``burn_in_clock`` the
    picture carries the shared-clock frame number and time of each frame, to the millisecond, so a
    person can put primary and backup side by side and see them match."""

    kind: Literal["testpattern"]
    tone_hz: StrictInt = Field(default=1000, ge=20, le=20000)
    burn_in_clock: StrictBool = True


class FileSource(_Model):
    """A media file, looped forever, locked to the shared clock: frame n shows position
    (n x F) mod the file's length, wherever and whenever the encoder starts (encode/lock.py)."""

    kind: Literal["file"]
    path: Path


_LIVE_SCHEMES = ("udp", "srt", "rtmp", "rtmps", "rtp", "rtsp", "http", "https")


class LiveSource(_Model):
    """A live input ffmpeg reads as it arrives (udp, srt, rtmp, rtsp ...). A URL that carries a
    secret (an SRT passphrase, a stream key) goes in an environment variable: ``url_env``."""

    kind: Literal["live"]
    url: str | None = None
    url_env: str | None = None
    peers: list[str] = Field(
        default_factory=list,
        description="metrics URLs (http://host:port/metrics) of the other groups' orchestrators: a starting "
        "group adopts the live lock (source timestamp -> shared clock) they use",
    )

    @model_validator(mode="after")
    def _one_url(self) -> LiveSource:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of url, url_env")
        if self.url is not None:
            parts = urlsplit(self.url)
            if parts.scheme not in _LIVE_SCHEMES:
                raise ValueError(f"{_shown(self.url)}: the scheme must be one of {', '.join(_LIVE_SCHEMES)}")
            if parts.password or "passphrase=" in parts.query or "streamid=" in parts.query:
                raise ValueError("this URL carries a secret; put the whole URL in an environment variable (url_env)")
        return self

    def resolve(self, environ: dict[str, str] | None = None) -> str:
        """The URL, read from the environment if so configured (never logged)."""
        if self.url is not None:
            return self.url
        environ = dict(os.environ) if environ is None else environ
        assert self.url_env is not None
        value = environ.get(self.url_env, "")
        if not value:
            raise ValueError(f"environment variable {self.url_env} is not set or empty")
        return value


Source = Annotated[PatternSource | FileSource | LiveSource, Field(discriminator="kind")]


class FfmpegEncoder(_Model):
    """Real encoding by ffmpeg (libx264, AAC), supervised and re-cut onto the shared clock."""

    backend: Literal["ffmpeg"]
    path: Path | None = Field(
        default=None,
        description="the ffmpeg executable; default: ffmpeg on PATH, else the imageio-ffmpeg wheel "
        "(pip install 'orchestrator[ffmpeg]')",
    )
    source: Source = Field(default_factory=lambda: PatternSource(kind="testpattern"))
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"] = "veryfast"
    threads: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field(
        default="auto",
        description="threads per ffmpeg instance (encoders and filter graph); auto: the CPUs this process "
        "may use (its cgroup's CPU quota, rounded up, else the CPUs it may run on), not the node's cores",
    )
    fallback: Literal["none", "synthetic"] = Field(
        default="none",
        description="what to do when no ffmpeg is found: fail (none) or run the synthetic backend (synthetic)",
    )


class RelayEncoder(_Model):
    """Someone else's encoder: the group relays what Smooth encoders POST to it (``orchestrator
    relay``, :mod:`orchestrator.relay`) to the group's endpoints. The stream header and the
    fragments are the encoder's; the profile's ``[[streams]]`` say which stream ids it accepts."""

    backend: Literal["relay"]
    listen: Annotated[str, BeforeValidator(lambda v: _listen_address(str(v)))] = Field(
        default="127.0.0.1:8081",
        description="host:port where encoders POST (http://<listen>/<point>.isml/Streams(<id>)); loopback "
        "unless you mean otherwise",
    )
    spool: Path | None = Field(
        default=None,
        description="directory of the durable spool: every fragment read from an encoder is on disk until every "
        "endpoint has it, so a restarted relay loses nothing it had read; relative to the working directory. "
        "Without it, fragments are kept in memory only",
    )
    fsync: Literal["fragment", "none"] = Field(
        default="fragment",
        description="fragment: each spooled fragment is fsync'd before it is forwarded (survives a host crash); "
        "none: written to the page cache only (survives a killed process, not a crashed host)",
    )
    tls_cert: Path | None = Field(default=None, description="PEM certificate chain: the relay listens with TLS")
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert")
    credentials: Credentials | None = Field(
        default=None,
        description="what an encoder must send (HTTP Basic or a bearer token, read from the environment or a "
        "file); without it any encoder that reaches the listener may POST",
    )
    silent_fragments: StrictInt = Field(
        default=3, ge=1, le=30,
        description="an encoder that sends nothing for this many fragment durations counts as silent (status, "
        "metric, alert)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _tls_pair(self) -> RelayEncoder:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        return self


Encoder = Annotated[SyntheticEncoder | FfmpegEncoder | RelayEncoder, Field(discriminator="backend")]


class BacklogBound(_Model):
    """The outage catch-up bound, per stream and endpoint: whichever limit is reached first."""

    seconds: Seconds = Field(default=Fraction(120), description="media seconds kept for an endpoint that is down")
    bytes: ByteSize = Field(default=ByteSize(256 * 1024 * 1024), description='bytes kept, e.g. "256MiB"')

    @field_validator("seconds")
    @classmethod
    def _positive_seconds(cls, value: Fraction) -> Fraction:
        if not Fraction(4) <= value <= Fraction(86400):
            raise ValueError(f"{float(value):g} s is outside 4 s to 1 day")
        return value

    @field_validator("bytes")
    @classmethod
    def _enough_bytes(cls, value: ByteSize) -> ByteSize:
        if value < 1024 * 1024:
            raise ValueError(f"{value} bytes is below 1 MiB: not even a fragment would fit")
        if value > MAX_BACKLOG_BYTES:
            raise ValueError(f"{value} bytes is over {MAX_BACKLOG_BYTES} (64 GiB)")
        return value


class State(_Model):
    """Where the supervisor keeps what must survive a restart of the process or pod."""

    dir: Path | None = Field(
        default=None,
        description="directory for the last emitted (index, time) per group and stream; relative to the "
        "working directory. Without it, a restarted orchestrator starts at the live index of the shared clock.",
    )


class Group(_Model):
    """An encoder group (primary, backup, ...): its encoder backend and its ingest endpoints."""

    encoder: Encoder
    endpoints: list[Endpoint] = Field(min_length=1)
    max_backlog: BacklogBound = Field(
        default_factory=lambda: BacklogBound(),
        description="how much an unreachable endpoint may fall behind before its oldest fragments are dropped",
    )
    stall_fragments: StrictInt = Field(
        default=3, ge=2, le=30, description="an encoder instance silent for this many fragment durations is restarted"
    )

    @model_validator(mode="after")
    def _unique_endpoint_names(self) -> Group:
        names = [e.name for e in self.endpoints]
        if len(set(names)) != len(names):
            raise ValueError("endpoint names must be unique within a group")
        return self


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` or ``"[::1]:8080"`` -> (host, port). Raises ValueError otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{_shown(listen)} is not host:port")
    return host.strip("[]"), int(port)


def _listen_address(value: str) -> str:
    parse_listen(value)
    return value


class Metrics(_Model):
    enabled: StrictBool = True
    listen: Annotated[str, BeforeValidator(lambda v: _listen_address(str(v)))] = Field(
        default="127.0.0.1:9464", description="host:port of /metrics; loopback unless you mean otherwise"
    )


class Monitor(_Model):
    """The confidence monitor (``/monitor`` on the metrics listener): each group's pictures side by side."""

    enabled: StrictBool = Field(default=True, description="serve /monitor on the metrics listener (needs metrics)")
    peers: list[str] = Field(
        default_factory=list,
        description="base URLs (http://host:port) of the metrics listeners of the orchestrators that run the "
        "other groups (one pod per region): their tiles are shown beside this process's, fetched by this process",
    )
    concurrency: StrictInt = Field(default=2, ge=1, le=16, description="thumbnail decodes (ffmpeg) at once")

    @field_validator("peers")
    @classmethod
    def _peer_urls(cls, peers: list[str]) -> list[str]:
        for url in peers:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url!r}: a peer is http://host:port or https://host:port")
            if parts.username or parts.password:
                raise ValueError(f"{url!r}: no credentials in a peer URL (the monitor is read-only and needs none)")
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ValueError(f"{url!r}: give the listener's base URL only (no path, query or fragment)")
        if len(set(peers)) != len(peers):
            raise ValueError("each peer once")
        return peers


class Profile(_Model):
    """A whole event profile."""

    presentation: Presentation
    streams: list[Stream] = Field(min_length=1)
    groups: dict[str, Group]
    metrics: Metrics = Metrics()
    monitor: Monitor = Monitor()
    state: State = State()

    # Field validators rather than one model validator, so that the error names its key path
    # ("streams: ...", "groups: ...") like every other error.
    @field_validator("streams")
    @classmethod
    def _unique_stream_ids(cls, streams: list[Stream]) -> list[Stream]:
        ids = [s.id for s in streams]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"stream ids must be unique: {', '.join(duplicates)}")
        # A track name is one track of the presentation: the same name in two streams must mean
        # the same settings (a redundant copy), or clients would see two tracks as one.
        seen: dict[str, tuple[str, Track]] = {}
        for stream in streams:
            for track in stream.tracks:
                first = seen.setdefault(track.name, (stream.id, track))
                if first[1] != track:
                    raise ValueError(f"track {track.name!r} differs between streams {first[0]} and {stream.id}; "
                                     "a track carried by several streams must be identical in each")  # fmt: skip
        return streams

    @field_validator("groups")
    @classmethod
    def _primary_and_backup(cls, groups: dict[str, Group]) -> dict[str, Group]:
        missing = [g for g in ("primary", "backup") if g not in groups]
        if missing:
            raise ValueError(f"must include primary and backup; missing: {', '.join(missing)}")
        for name in groups:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"group name {name!r} must match {NAME_PATTERN}")
        return groups

    def track_clock(self, track: VideoTrack | AudioTrack) -> TrackClock:
        """The shared clock of one track: the same on every host that loads this profile."""
        p = self.presentation
        return TrackClock(p.epoch_ns, p.fragment_duration, track.clock_timescale(p), track.frame_duration)

    def describe(self, stream: Stream, sample_entries: Sequence[bytes]) -> tuple[TrackDescription, ...]:
        """``stream``'s tracks as a wire format takes them, given one sample entry box per track
        (in profile order): the one adapter from the profile to the wire formats."""
        if len(sample_entries) != len(stream.tracks):
            raise ValueError("one sample entry per track is needed")
        return tuple(
            track.describe(track_id, track.clock_timescale(self.presentation), entry)
            for track_id, track, entry in zip(self.track_ids(stream), stream.tracks, sample_entries, strict=True)
        )

    def track_ids(self, stream: Stream) -> list[int]:
        """The track IDs of ``stream``'s tracks. IDs are numbered over the whole presentation, one
        per distinct track, in order of first appearance: a track carried by several streams (the
        redundant audio of spec section 11) has the same ID, hence the same Live Server Manifest
        entry and byte-identical fragments, in each of them."""
        ids = self.presentation_track_ids
        return [ids[t.model_dump_json()] for t in stream.tracks]

    @functools.cached_property
    def presentation_track_ids(self) -> dict[str, int]:
        """Track (as its JSON) -> track ID, over the presentation. Computed once: every stream's
        encoder and publisher asks, and walking every stream for each of them was quadratic in
        the number of streams (seconds of start-up at 1,000 streams)."""
        ids: dict[str, int] = {}
        for s in self.streams:
            for t in s.tracks:
                ids.setdefault(t.model_dump_json(), len(ids) + 1)
        return ids

    def track(self, stream_id: str, track_id: int) -> VideoTrack | AudioTrack:
        """The track with ID ``track_id`` in stream ``stream_id`` (KeyError if there is none)."""
        stream = self.stream(stream_id)
        ids = self.track_ids(stream)
        if track_id not in ids:
            raise KeyError(f"{stream_id}/{track_id}")
        return stream.tracks[ids.index(track_id)]

    def stream(self, stream_id: str) -> Stream:
        for s in self.streams:
            if s.id == stream_id:
                return s
        raise KeyError(stream_id)


def entry_name(entry: Any, siblings: Sequence[Any] = ()) -> str | None:
    """The name a person gave a list entry (a track's or endpoint's ``name``, a stream's ``id``),
    if it is one to name it by: a valid name, not all digits (``[0]`` is an index), and unique
    among ``siblings``."""
    if not isinstance(entry, dict):
        return None
    key = "name" if "name" in entry else "id"
    name = entry.get(key)
    if not isinstance(name, str) or not re.match(NAME_PATTERN, name) or name.isdigit():
        return None
    if sum(isinstance(s, dict) and s.get(key) == name for s in siblings) > 1:
        return None
    return name


def _key_path(loc: tuple[int | str, ...], data: Any = None) -> str:
    """A pydantic error location as the key path a person finds in the TOML: list entries by
    their name where they have one (``streams[video].tracks[video_360p].bitrate``), else by
    index (``streams[0]``)."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        previous = loc[i - 1] if i else None
        # Discriminated unions insert the tag (a track's kind, an encoder's backend, a source's
        # kind) into the location, where the TOML has no such key: skip it.
        if isinstance(item, str) and isinstance(data, dict) and item not in data and item in (
            data.get("kind"), data.get("backend")):  # fmt: skip
            continue
        if isinstance(item, str) and data is None and (isinstance(previous, int) or previous == "encoder") and item in {
            "video", "audio", "synthetic", "ffmpeg"}:  # fmt: skip
            continue
        if isinstance(item, int):
            entries = data if isinstance(data, list) else []
            entry = entries[item] if 0 <= item < len(entries) else None
            name = entry_name(entry, entries)
            parts.append(f"[{item if name is None else name}]")
            data = entry
        else:
            parts.append(("." if parts else "") + item)
            data = data.get(item) if isinstance(data, dict) else None
    return "".join(parts)


_REASONS = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}
_PATTERNS = {  # what a pattern asks for, in words
    NAME_PATTERN: "letters, digits, '_', '.' and '-', starting with a letter or digit",
    r"^[a-z]{3}$": 'a three-letter ISO 639-2/T language code such as "eng"',
    AWS_REGION_PATTERN: 'an AWS region code such as "eu-west-1"',
    ENV_PREFIX_PATTERN: 'the start of an environment variable name (letters, digits, "_"), such as "MP_PRIMARY_"',
    r"^[a-z0-9][a-z0-9-]*$": 'an AWS service name such as "mediapackagev2"',
    r"^[^\[\]\s]+$": "a profile name without spaces or brackets",
}


def _reason(item: Any) -> str:
    """pydantic's error ``item`` in the user's words, repeating the value they wrote."""
    kind, ctx, value = item["type"], item.get("ctx") or {}, item.get("input")
    shown = _shown(value)
    if kind in _REASONS:
        return _REASONS[kind]
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{shown} is not a whole number"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bound = {"greater_than": "more than", "greater_than_equal": "at least", "less_than": "less than",
                 "less_than_equal": "at most"}[kind]  # fmt: skip
        limit = next(iter(ctx.values()), "")
        return f"{shown} is out of range: it must be {bound} {limit}"
    if kind == "path_type":
        return f"{shown} is not a path; write it in double quotes"
    if kind in ("string_type",):
        return f"{shown} is not text; write it in double quotes"
    if kind == "string_pattern_mismatch":
        wanted = _PATTERNS.get(ctx.get("pattern", ""), f"text matching {ctx.get('pattern')}")
        return f"{shown} is not valid here: write {wanted}"
    if kind == "literal_error":
        return f"{shown} is not one of {ctx.get('expected')}"
    if kind in ("bool_type", "bool_parsing"):
        return f"{shown} is not true or false"
    if kind == "union_tag_invalid":
        key = str(ctx.get("discriminator")).strip("'")
        return f"{key} = {_shown(ctx.get('tag'))} is not one of {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return f"required key is missing: {str(ctx.get('discriminator')).strip(chr(39))}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{shown} is not a table; write [table] or {{ key = value }}"
    if kind == "list_type":
        return f"{shown} is not a list; write [[array-of-tables]] or [ ... ]"
    if kind.startswith("datetime") or kind.startswith("date_"):
        return f"{shown} is not a date and time; write an RFC 3339 instant such as 2026-01-01T00:00:00Z"
    if kind.startswith("byte_size"):
        return f'{shown} is not a size; write bytes as a whole number or with a unit, e.g. "256MiB" or "1GB"'
    if kind == "too_short":
        return f"needs at least one entry ({item['msg']})"
    reason = str(item["msg"]).removeprefix("Value error, ")
    if kind != "value_error" and isinstance(value, str | int | float) and shown not in reason:
        reason += f" (got {shown})"
    return reason


def problems_from(error: ValidationError, data: Any = None) -> list[tuple[str, str]]:
    """The errors of validating ``data`` as (key path, reason) pairs, in the user's words."""
    problems = []
    for item in error.errors(include_url=False):
        reason = _reason(item)
        if item["type"] == "extra_forbidden" and item["loc"] and isinstance(item["loc"][-1], str):
            close = difflib.get_close_matches(item["loc"][-1], _keys_at(item["loc"][:-1]), n=1)
            if close:
                reason += f"; did you mean {close[0]!r}?"
        problems.append((_key_path(item["loc"], data), reason))
    return problems


def track_key(stream: Stream, track: VideoTrack | AudioTrack) -> str:
    """``streams[video].tracks[video_360p]``: a validated track's key path (names are unique)."""
    return f"streams[{stream.id}].tracks[{track.name}]"


def endpoint_key(group: str, endpoint: Endpoint) -> str:
    """``groups.primary.endpoints[region-a]``: a validated endpoint's key path (names are unique)."""
    return f"groups.{group}.endpoints[{endpoint.name}]"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models an annotation can hold (through Annotated, unions, lists and dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    models: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        models += _models_in(arg)
    return models


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The keys allowed at ``loc`` (a pydantic error location), for a "did you mean"."""
    models: list[type[BaseModel]] = [Profile]
    for item in loc:
        if isinstance(item, int):
            continue  # a list index
        fields = [m.model_fields[item] for m in models if item in m.model_fields]
        if fields:
            models = [m for f in fields for m in _models_in(f.annotation)]
            continue
        # A discriminator tag ("video", "ffmpeg") or a dict key (a group name): narrow or keep.
        tagged = [m for m in models if any(item in typing.get_args(f.annotation) for f in m.model_fields.values())]
        models = tagged or models
    return sorted({key for model in models for key in model.model_fields})


def runnable_problems(profile: Profile, now_ns: int) -> list[tuple[str, str]]:
    """What ``up`` could not run although every value is well-formed: the epoch against the
    wall clock ``now_ns`` and the wire format's field widths over the next RUN_YEARS years.

    The fragment index goes into ``mfhd.sequence_number`` (32 bits) and the fragment time, in
    each track's timescale, into ``tfxd``/``tfdt`` (64 bits). A negative index (an epoch in the
    future) cannot be sent at all.
    """
    p = profile.presentation
    problems: list[tuple[str, str]] = []
    if p.epoch_ns > now_ns:
        problems.append(
            (
                "presentation.epoch",
                f"{p.epoch.isoformat()} is in the future; the shared clock "
                "must already run when the encoders start (use a past instant, the same in every group)",
            )
        )
        return problems
    horizon_ns = now_ns + RUN_YEARS * 365_25 * 864 * 10**9  # RUN_YEARS Julian years
    span = Fraction(horizon_ns - p.epoch_ns, 10**9)
    last_index = span / p.fragment_duration
    if last_index > UINT32_MAX:
        problems.append(
            (
                "presentation.epoch",
                f"{p.epoch.isoformat()} is too far in the past: fragment "
                f"indices within {RUN_YEARS} years from now would exceed mfhd.sequence_number "
                f"(32 bits, {UINT32_MAX})",
            )
        )
    problems += _cmaf_problems(profile)
    for stream in profile.streams:
        for track in stream.tracks:
            timescale = track.clock_timescale(p)
            if span * timescale > UINT64_MAX:
                # The key to change: a video track's own timescale, else the presentation's; an
                # audio track's timescale is its sample rate, so only the epoch can move.
                key = "presentation.epoch"
                if isinstance(track, VideoTrack):
                    key = f"{track_key(stream, track)}.timescale" if track.timescale else "presentation.video_timescale"
                problems.append(
                    (
                        key,
                        f"with the epoch {p.epoch.isoformat()}, track {track.name!r}'s fragment "
                        f"times within {RUN_YEARS} years from now would exceed tfxd's 64 bits",
                    )
                )
    return problems


def _cmaf_problems(profile: Profile) -> list[tuple[str, str]]:
    """What CMAF endpoints need of the presentation: times counted from 1970 in whole ticks of
    every track's timescale (orchestrator.wire.cmaf.epoch_ticks), and, for the Streams() path
    scheme, one name per (stream, track) (``<stream>-<track>``: names may hold "-" themselves)."""
    p = profile.presentation
    endpoints = [(name, i, e) for name, g in profile.groups.items() for i, e in enumerate(g.endpoints)
                 if e.format == "cmaf"]  # fmt: skip
    if not endpoints:
        return []
    problems: list[tuple[str, str]] = []
    for timescale in sorted({t.clock_timescale(p) for s in profile.streams for t in s.tracks}):
        if p.epoch_ns * timescale % 10**9:
            problems.append(("presentation.epoch", f"{p.epoch.isoformat()} does not fall on a tick of timescale "
                             f"{timescale}, so CMAF times (ticks since 1970) could not be exact"))  # fmt: skip
    names = [f"{s.id}-{t.name}" for s in profile.streams for t in s.tracks]
    clashes = sorted({n for n in names if names.count(n) > 1})
    for group, _, endpoint in endpoints:
        if endpoint.cmaf_paths == "streams" and clashes:
            problems.append((f"{endpoint_key(group, endpoint)}.cmaf_paths", "two tracks would share the path "
                             f"Streams({clashes[0]}); rename one or use cmaf_paths = \"template\""))  # fmt: skip
    return problems


_DIGITS = re.compile(r"\d[\d_]{4299,}")


def _toml_value_error(text: str, exc: ValueError) -> tuple[str, str]:
    """A ValueError out of tomllib (an integer over Python's 4300-digit limit) as (key, reason),
    with the key read from the line that holds the long number."""
    match = _DIGITS.search(text)
    if match is None:
        return "", f"not valid TOML: {exc}"
    line_no = text.count("\n", 0, match.start()) + 1
    line = text.splitlines()[line_no - 1]
    table = ""
    for previous in text.splitlines()[: line_no - 1]:
        if header := re.fullmatch(r"\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?", previous):
            table = header[1]
    key = line.split("=", 1)[0].strip() if "=" in line else ""
    digits = len(match[0].replace("_", ""))
    return ".".join(k for k in (table, key) if k), f"line {line_no}: a number with {digits} digits is out of range"


def parse_profile(text: str, path: str = "<profile>", *, now_ns: int | None = None) -> Profile:
    """Validate profile text; raises ProfileError naming ``path``, the key path and the reason.

    ``now_ns`` (default: the system clock) is the wall clock that the epoch is checked against:
    see :func:`runnable_problems`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(path, [("", f"not valid TOML: {exc}")]) from None
    except ValueError as exc:  # an integer over 4300 digits
        raise ProfileError(path, [_toml_value_error(text, exc)]) from None
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(path, problems_from(exc, data)) from None
    problems = runnable_problems(profile, time.time_ns() if now_ns is None else now_ns)
    if problems:
        raise ProfileError(path, problems)
    return profile


def load_profile(path: str | os.PathLike[str], *, now_ns: int | None = None) -> Profile:
    """Read and validate a profile file (see :func:`parse_profile`)."""
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(name, [("", f"cannot read the profile: {exc}")]) from None
    return parse_profile(text, name, now_ns=now_ns)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a profile, for editors."""
    return Profile.model_json_schema()
