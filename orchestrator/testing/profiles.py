"""Profiles for tests and benchmarks, built from keyword overrides instead of copied TOML.

Theory of operation
-------------------
A test says only what differs from a plain two-group loopback profile: ``profile_text(groups=
two_groups(port), state_dir=tmp_path)``. The pieces are plain dicts (``video()``, ``audio()``,
``endpoint()``, ``group()``) that read like the profile's own tables; :func:`profile_text` renders
them as the TOML an operator writes (so a test that starts ``orchestrator up`` as a process gets
a real file, and one that runs in-process parses the same text with :func:`build_profile`).

Defaults: presentation ``rig``, 2-second fragments, epoch 2026-01-01T00:00:00Z, two streams
(``video``: one 640x360 29.97 fps track; ``audio``: one 48 kHz stereo track), synthetic encoders,
metrics off, no state directory. An endpoint given by ``port`` gets the URL
``http://127.0.0.1:PORT/live/NAME.isml`` with the presentation's name.

The values rendered are the few kinds a profile holds (strings, integers, booleans, instants,
inline tables); a TOML writer library would add a test dependency for a dozen lines.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.profile import Profile, parse_profile

EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SYNTHETIC: dict[str, Any] = {"backend": "synthetic"}

Table = dict[str, Any]


def video(name: str = "video_360p", *, bitrate: int = 800_000, width: int = 640, height: int = 360,
          frame_rate: str | int = "30000/1001", **extra: Any) -> Table:  # fmt: skip
    """A video track table."""
    return {"kind": "video", "name": name, "bitrate": bitrate, "width": width, "height": height,
            "frame_rate": frame_rate, **extra}  # fmt: skip


def audio(name: str = "audio_eng", *, bitrate: int = 128_000, sample_rate: int = 48000, channels: int = 2,
          **extra: Any) -> Table:  # fmt: skip
    """An audio track table."""
    return {"kind": "audio", "name": name, "bitrate": bitrate, "sample_rate": sample_rate, "channels": channels,
            **extra}  # fmt: skip


def ffmpeg(**settings: Any) -> Table:
    """An ffmpeg encoder table, ``ultrafast`` unless told otherwise."""
    return {"backend": "ffmpeg", "preset": "ultrafast", **settings}


def endpoint(port: int | None = None, *, name: str = "ingest", region: str = "here", url: str | None = None,
             **extra: Any) -> Table:  # fmt: skip
    """An endpoint table: ``port`` (a loopback ingest server) or a whole ``url``."""
    if (port is None) == (url is None):
        raise ValueError("give an endpoint a port or a url")
    table: Table = {"name": name, "region": region, **extra}
    if url is not None:
        table["url"] = url
    else:
        table["port"] = port  # becomes the URL once the presentation's name is known
    return table


def group(*endpoints: Table, encoder: Mapping[str, Any] = SYNTHETIC, **extra: Any) -> Table:
    """A group table: its encoder, other keys (``max_backlog``, ``stall_fragments``) and endpoints."""
    return {"encoder": dict(encoder), **extra, "endpoints": list(endpoints)}


def two_groups(port: int, *, encoder: Mapping[str, Any] = SYNTHETIC, **endpoint_keys: Any) -> dict[str, Table]:
    """A primary and a backup group, each with one endpoint at ``port``."""
    return {g: group(endpoint(port, **endpoint_keys), encoder=encoder) for g in ("primary", "backup")}


def two_streams() -> dict[str, list[Table]]:
    """The default streams: ``video`` (one 640x360 29.97 fps track) and ``audio`` (48 kHz stereo)."""
    return {"video": [video()], "audio": [audio()]}


def profile_text(*, groups: Mapping[str, Table], name: str = "rig",
                 streams: Mapping[str, Sequence[Table]] | None = None, fragment_duration: int | str = 2,
                 epoch: dt.datetime = EPOCH,
                 presentation: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None,
                 state_dir: str | Path | None = None, extra: str = "") -> str:  # fmt: skip
    """The profile's TOML. ``presentation``: more presentation keys (``video_timescale``...);
    ``metrics``: the metrics table (default: off); ``extra``: raw TOML appended at the end."""
    lines = ["[presentation]", f"name = {_value(name)}", f"fragment_duration = {_value(fragment_duration)}",
             f"epoch = {_value(epoch)}"]  # fmt: skip
    lines += [f"{key} = {_value(value)}" for key, value in (presentation or {}).items()]
    for stream_id, tracks in (two_streams() if streams is None else streams).items():
        lines += ["", "[[streams]]", f"id = {_value(stream_id)}"]
        for track in tracks:
            lines += ["  [[streams.tracks]]", *(f"  {key} = {_value(value)}" for key, value in track.items())]
    for group_name, table in groups.items():
        lines += ["", f"[groups.{group_name}]"]
        lines += [f"{key} = {_value(value)}" for key, value in table.items() if key != "endpoints"]
        for point in table["endpoints"]:
            point = dict(point)
            if "port" in point:
                point["url"] = f"http://127.0.0.1:{point.pop('port')}/live/{name}.isml"
            lines += [f"  [[groups.{group_name}.endpoints]]", *(f"  {k} = {_value(v)}" for k, v in point.items())]
    lines += ["", "[metrics]", *(f"{k} = {_value(v)}" for k, v in (metrics or {"enabled": False}).items())]
    if state_dir is not None:
        lines += ["", "[state]", f"dir = {_value(state_dir)}"]
    return "\n".join(lines) + "\n" + (f"\n{extra}\n" if extra else "")


def ladder(port: int) -> dict[str, Any]:
    """:func:`profile_text`'s keywords for the ffmpeg ladder of ``tests/encode/test_ffmpeg.py`` (and
    ``bench/encoder_cpu.py``): streams ``hi`` (360p), ``lo`` (180p + audio) and ``audio``, the audio
    track shared; both groups on ffmpeg (ultrafast), the backup restarted after 2 silent fragments."""
    return {
        "name": "ladder",
        "streams": {
            "hi": [video("video_360p", bitrate=500_000)],
            "lo": [video("video_180p", bitrate=150_000, width=320, height=180), audio(bitrate=96_000)],
            "audio": [audio(bitrate=96_000)],
        },
        "groups": {
            "primary": group(endpoint(port, name="region-a", region="eu-west"), encoder=ffmpeg()),
            "backup": group(endpoint(port, name="region-a", region="eu-west"), encoder=ffmpeg(), stall_fragments=2),
        },
    }


class Raw(str):
    """A value written into the TOML as it is (an inline table a test already has as text)."""

    __slots__ = ()


def build_profile(**keys: Any) -> Profile:
    """The parsed profile for :func:`profile_text`'s keywords."""
    return parse_profile(profile_text(**keys), f"{keys.get('name', 'rig')}.toml")


def write_profile(path: Path, **keys: Any) -> Path:
    """:func:`profile_text` written to ``path`` (for a process that reads a file); returns ``path``."""
    path.write_text(profile_text(**keys))
    return path


def _value(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string (paths, names, fractions)
