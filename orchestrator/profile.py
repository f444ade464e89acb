"""The event profile: what to encode, how to group it into streams, and where to push it.

A profile is a TOML file validated by the pydantic models below. Every error is reported as
``<file>: <key path>: <reason>`` (for example ``demo.toml: streams[0].tracks[1].frame_rate:
...``) through :class:`~orchestrator.errors.ProfileError`; unknown keys are rejected.

Secrets never appear in a profile: an endpoint's credentials name an environment variable or a
file that holds them (``password_env``, ``password_file``, ``token_env``, ``token_file``), and
are read only when the publisher starts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tomllib
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
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from orchestrator.clock import TrackClock
from orchestrator.errors import ProfileError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
AAC_FRAME_SAMPLES = 1024


def _to_fraction(value: Any, *, what: str, allow_decimal: bool) -> Fraction:
    if isinstance(value, Fraction):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, not a boolean")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        if not allow_decimal:
            raise ValueError(f'{what} must be an integer or a ratio such as "30000/1001", not {value!r}')
        value = repr(value)  # the decimal the user wrote, never the binary float
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                result = Fraction(int(num), int(den))
            elif allow_decimal:
                result = Fraction(Decimal(text))
            else:
                result = Fraction(int(text))
        except (ValueError, ZeroDivisionError, OverflowError, InvalidOperation):  # Overflow: "inf"
            raise ValueError(f'{what} {value!r} is not a number or a ratio such as "30000/1001"') from None
        return result
    raise ValueError(f"{what} must be a number or a ratio string, got {type(value).__name__}")


def _fraction_text(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


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
    bitrate: int = Field(gt=0, description="bits per second")
    width: int = Field(ge=16, le=7680)
    height: int = Field(ge=16, le=4320)
    frame_rate: FrameRate
    timescale: int | None = Field(default=None, gt=0, description="default: presentation.video_timescale")
    codec: Literal["h264"] = "h264"

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
    bitrate: int = Field(gt=0, description="bits per second")
    sample_rate: int = Field(ge=8000, le=96000)
    channels: int = Field(default=2, ge=1, le=8)
    language: str = Field(default="und", pattern=r"^[a-z]{3}$", description="ISO 639-2/T code")
    codec: Literal["aac"] = "aac"


Track = Annotated[VideoTrack | AudioTrack, Field(discriminator="kind")]


class Stream(_Model):
    """One fragmented-MP4 bitstream, POSTed to ``<publishing point>/Streams(<id>)``."""

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
    video_timescale: int = Field(default=90000, gt=0)
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


class Endpoint(_Model):
    """An ingest publishing point, e.g. ``https://ingest.example.net/live/event.isml``."""

    name: str = Field(pattern=NAME_PATTERN)
    url: str
    region: str = Field(pattern=NAME_PATTERN)
    credentials: Credentials | None = None
    ca_file: Path | None = Field(default=None, description="extra CA bundle; TLS verification stays on")

    @field_validator("url")
    @classmethod
    def _publishing_point(cls, value: str) -> str:
        parts = urlsplit(value)
        # First, so that no later message (they quote the URL) repeats a password.
        if parts.username or parts.password:
            raise ValueError("credentials in the URL are not allowed; use [credentials] with password_env")
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        if not parts.hostname:
            raise ValueError(f"{value!r} has no host")
        if parts.query or parts.fragment:
            raise ValueError("the publishing point URL takes no query or fragment")
        if not parts.path.endswith(".isml"):
            raise ValueError(f"{value!r} must be a publishing point ending in .isml, e.g. .../live/event.isml")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError(f"{value!r} has an invalid port") from None
        return value.rstrip("/")

    def stream_url(self, stream_id: str) -> str:
        return f"{self.url}/Streams({stream_id})"

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(urlsplit(self.url).hostname or "")


class SyntheticEncoder(_Model):
    """Replays a small pre-encoded H.264/AAC clip, re-stamped onto the shared clock."""

    backend: Literal["synthetic"]


class PatternSource(_Model):
    """ffmpeg's lavfi ``testsrc2`` picture and a ``sine`` tone, paced in real time. With
    ``burn_in_clock`` the picture carries the shared-clock time of each frame, to the
    millisecond, so a person can put primary and backup side by side and see them match."""

    kind: Literal["testpattern"]
    tone_hz: int = Field(default=1000, ge=20, le=20000)
    burn_in_clock: bool = True


class FileSource(_Model):
    """A media file, looped forever and read in real time."""

    kind: Literal["file"]
    path: Path


_LIVE_SCHEMES = ("udp", "srt", "rtmp", "rtmps", "rtp", "rtsp", "http", "https")


class LiveSource(_Model):
    """A live input ffmpeg reads as it arrives (udp, srt, rtmp, rtsp ...). A URL that carries a
    secret (an SRT passphrase, a stream key) goes in an environment variable: ``url_env``."""

    kind: Literal["live"]
    url: str | None = None
    url_env: str | None = None

    @model_validator(mode="after")
    def _one_url(self) -> LiveSource:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of url, url_env")
        if self.url is not None:
            parts = urlsplit(self.url)
            if parts.scheme not in _LIVE_SCHEMES:
                raise ValueError(f"{self.url!r}: the scheme must be one of {', '.join(_LIVE_SCHEMES)}")
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
    fallback: Literal["none", "synthetic"] = Field(
        default="none",
        description="what to do when no ffmpeg is found: fail (none) or run the synthetic backend (synthetic)",
    )


Encoder = Annotated[SyntheticEncoder | FfmpegEncoder, Field(discriminator="backend")]


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
    stall_fragments: int = Field(
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
        raise ValueError(f"{listen!r} is not host:port")
    return host.strip("[]"), int(port)


def _listen_address(value: str) -> str:
    parse_listen(value)
    return value


class Metrics(_Model):
    enabled: bool = True
    listen: Annotated[str, BeforeValidator(lambda v: _listen_address(str(v)))] = Field(
        default="127.0.0.1:9464", description="host:port of /metrics; loopback unless you mean otherwise"
    )


class Profile(_Model):
    """A whole event profile."""

    presentation: Presentation
    streams: list[Stream] = Field(min_length=1)
    groups: dict[str, Group]
    metrics: Metrics = Metrics()
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
        if isinstance(track, VideoTrack):
            timescale = track.timescale or p.video_timescale
            frame = 1 / track.frame_rate
        else:
            timescale = track.sample_rate
            frame = Fraction(AAC_FRAME_SAMPLES, track.sample_rate)
        return TrackClock(p.epoch_ns, p.fragment_duration, timescale, frame)

    def track_ids(self, stream: Stream) -> list[int]:
        """The track IDs of ``stream``'s tracks. IDs are numbered over the whole presentation, one
        per distinct track, in order of first appearance: a track carried by several streams (the
        redundant audio of spec section 11) has the same ID, hence the same Live Server Manifest
        entry and byte-identical fragments, in each of them."""
        ids: dict[str, int] = {}
        for s in self.streams:
            for t in s.tracks:
                ids.setdefault(t.model_dump_json(), len(ids) + 1)
        return [ids[t.model_dump_json()] for t in stream.tracks]

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


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        previous = loc[i - 1] if i else None
        # Discriminated unions insert the tag ("video", "synthetic") into the location: skip it.
        if isinstance(item, str) and (isinstance(previous, int) or previous == "encoder") and item in {
            "video", "audio", "synthetic"}:  # fmt: skip
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts)


_REASONS = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def problems_from(error: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for item in error.errors(include_url=False):
        reason = _REASONS.get(item["type"], item["msg"])
        if item["type"] == "too_short" and item["loc"] and item["loc"][-1] in ("endpoints", "streams", "tracks"):
            reason = f"needs at least one entry ({item['msg']})"
        reason = reason.removeprefix("Value error, ")
        problems.append((_key_path(item["loc"]), reason))
    return problems


def parse_profile(text: str, path: str = "<profile>") -> Profile:
    """Validate profile text; raises ProfileError naming ``path``, the key path and the reason."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(path, [("", f"not valid TOML: {exc}")]) from None
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(path, problems_from(exc)) from None


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and validate a profile file."""
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(name, [("", f"cannot read the profile: {exc}")]) from None
    return parse_profile(text, name)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a profile, for editors."""
    return Profile.model_json_schema()
