"""Command line: ``orchestrator up | relay | status | validate | schema | ingest``.

Exit codes: 0 success (including a stop by SIGINT/SIGTERM), 2 a profile or usage error (the
message names the file, the key path and the reason), 1 anything else that went wrong.
``orchestrator status``: 0 everything streaming, 1 something down, 3 the status could not be read.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click
import trio

from orchestrator import __version__
from orchestrator.errors import ListenError, OrchestratorError, ProfileError
from orchestrator.profile import json_schema, load_profile


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is now, so log lines land above rich's live table."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _setup_logging(level: str, log_file: Path | None = None) -> None:
    from orchestrator.ops.view import ConsoleLogHandler

    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    handler = ConsoleLogHandler(_CurrentStderr())
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if log_file is not None:  # everything, even while the live table keeps the console to warnings
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setFormatter(formatter)
        root.addHandler(to_file)
    root.setLevel(level.upper())
    # Hypercorn logs every connection error at INFO; keep ours readable.
    logging.getLogger("hypercorn").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _fail(exc: Exception, code: int) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(code)


def _error_in(group: BaseExceptionGroup[BaseException]) -> Exception | None:
    """Our own error (a group already running, an address in use) or an OSError (an unwritable
    archive) inside nested trio exception groups."""
    for exc in group.exceptions:
        if isinstance(exc, OrchestratorError | OSError):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := _error_in(exc)) is not None:
            return found
    return None


MAIN_EPILOG = """\b
Try the demo (no outside server: its publishing points run in-process):
  orchestrator up profiles/demo.toml --local-ingest demo-archive
  orchestrator status           (in another terminal: what it is doing)

\b
A real event, one group per host:
  orchestrator validate event.toml
  orchestrator up event.toml --group primary      (host A)
  orchestrator up event.toml --group backup       (host B)

\b
Installed in a virtualenv: activate it (. .venv/bin/activate) first.
Shell completion, bash (zsh_source and fish_source for the others):
  eval "$(_ORCHESTRATOR_COMPLETE=bash_source orchestrator)"

Each command has its own examples: orchestrator COMMAND --help.
"""
UP_EPILOG = """\b
Examples:
  orchestrator up profiles/demo.toml --local-ingest demo-archive
      the demo: both groups, local publishing points, until Ctrl-C
  orchestrator up event.toml --group primary
      this host's group of a real event (the other host runs --group backup)
  orchestrator --log-file up.log up event.toml --duration 60
      one minute; the whole log in up.log, the terminal keeps the table
  orchestrator up event.toml --status log
      log lines instead of the table (as in a pod's log)

Ctrl-C (or SIGTERM) stops it gracefully: the fragment in flight is finished and every POST
ended; the last frame says "stopped" and a summary says what was pushed where.
"""
STATUS_EPILOG = """\b
Examples:
  orchestrator status
      the up on this host (127.0.0.1:9464)
  orchestrator status --profile event.toml --watch
      at that profile's metrics.listen, redrawn until Ctrl-C
  orchestrator status --url http://10.0.0.5:9464
      another host's up
  orchestrator status > status.txt
      piped: the full table at its own width, not cut to 80 columns
  orchestrator status || echo "something is down"
      exit 1 when an encoder or an endpoint is down, 3 when nothing answers
"""
VALIDATE_EPILOG = """\b
Examples:
  orchestrator validate profiles/demo.toml
  orchestrator validate event.toml && orchestrator up event.toml

\b
Errors read "<file>: <key path>: <reason>" (exit 2), e.g.
  event.toml: streams[video].tracks[video_360p].bitrate: "fast" is not a
  bitrate; write bits per second, e.g. 800000, "800k" or "2.5M"
"""
RELAY_EPILOG = """\b
Examples:
  orchestrator relay event.toml --group primary
      the primary encoder pushes Smooth ingest to this relay's listen
      address (encoder = { backend = "relay", listen = ... }); the relay
      pushes on to the group's endpoints and survives their outages
  orchestrator relay event.toml --group backup      (on the backup's host)
"""
SCHEMA_EPILOG = """\b
Example (completion and checks in an editor that reads JSON Schema):
  orchestrator schema > orchestrator-profile.schema.json
"""
INGEST_EPILOG = """\b
Examples:
  orchestrator ingest --archive archive
      a publishing point on 127.0.0.1:8080; push to
      http://127.0.0.1:8080/live/NAME.isml
  orchestrator ingest --listen 127.0.0.1:18081 --archive region-a
      one of the demo's two regions (up --local-ingest runs them in-process)
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=MAIN_EPILOG)
@click.version_option(__version__, prog_name="orchestrator")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))  # fmt: skip
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Also append the whole log to FILE (the live table keeps the console to warnings).")  # fmt: skip
def main(log_level: str, log_file: Path | None) -> None:
    """Multi-encoder redundancy orchestrator for fragmented-MP4 (Smooth Streaming) live ingest."""
    _setup_logging(log_level, log_file)


@main.command(epilog=UP_EPILOG)
@click.argument("profile", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--group", "groups", multiple=True, metavar="NAME",
              help="Run only this encoder group (repeatable); default: every group.")  # fmt: skip
@click.option("--local-ingest", type=click.Path(file_okay=False, path_type=Path), metavar="ARCHIVE_DIR",
              help="Also run the local publishing point for the profile's loopback endpoints, "
                   "archiving to ARCHIVE_DIR (no outside server needed).")  # fmt: skip
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop by itself after SECONDS (default: run until SIGINT/SIGTERM).")  # fmt: skip
@click.option("--status", type=click.Choice(["auto", "live", "log", "off"]), default="auto", show_default=True,
              help="Live table on a terminal, log lines otherwise.")  # fmt: skip
def up(profile: Path, groups: tuple[str, ...], local_ingest: Path | None, duration: float | None,
       status: str) -> None:  # fmt: skip
    """Encode the profile's presentation in its encoder groups and push it to the endpoints."""
    from orchestrator.supervisor import UpOptions, run_up

    try:
        loaded = load_profile(profile)
        options = UpOptions(groups=groups or None, local_ingest=local_ingest, duration=duration, status=status,
                            profile_path=str(profile))  # fmt: skip
        trio.run(run_up, loaded, options)
    except ProfileError as exc:
        _fail(exc, 2)
    except OrchestratorError as exc:
        _fail(exc, 1)
    except OSError as exc:
        _fail(exc, 1)
    except BaseExceptionGroup as group:
        if (error := _error_in(group)) is None:
            raise
        _fail(error, 2 if isinstance(error, ProfileError) else 1)


@main.command(epilog=STATUS_EPILOG)
@click.option("--url", metavar="URL",
              help="A running up's metrics listener, e.g. http://127.0.0.1:9464 "
                   "(default: the --profile's metrics.listen, else 127.0.0.1:9464).")  # fmt: skip
@click.option("--profile", type=click.Path(dir_okay=False, path_type=Path), help="Take the address from this profile.")
@click.option("--watch", is_flag=True, help="Redraw until Ctrl-C (exit code: the last state seen).")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True, metavar="SECONDS",
              help="With --watch, seconds between reads.")  # fmt: skip
def status(url: str | None, profile: Path | None, watch: bool, interval: float) -> None:
    """Show a running up's streams, groups and endpoints (from its /status).

    Exit 0 when every encoder is up and every endpoint streaming, 1 when something is down
    (listed below the table), 3 when the status cannot be read.
    """
    from orchestrator.ops.statuscli import show_status

    if url is None:
        listen = "127.0.0.1:9464"
        if profile is not None:
            try:
                listen = load_profile(profile).metrics.listen
            except ProfileError as exc:
                _fail(exc, 2)
        url = f"http://{listen}"
    sys.exit(show_status(url, watch=watch, interval=interval))


@main.command(epilog=VALIDATE_EPILOG)
@click.argument("profile", type=click.Path(dir_okay=False, path_type=Path))
def validate(profile: Path) -> None:
    """Check a profile (and probe its file sources); print what it describes, or the errors (exit 2)."""
    from orchestrator.encode.ffmpeg import check_file_sources
    from orchestrator.push.sigv4 import credential_problems

    try:
        loaded = load_profile(profile)
        # Probed once here, and again by ``up``; SigV4 keys read (from the environment or their file) as ``up`` would.
        if problems := check_file_sources(loaded) + credential_problems(loaded):
            raise ProfileError(str(profile), problems)
    except ProfileError as exc:
        _fail(exc, 2)
        return
    p = loaded.presentation
    click.echo(f"{profile}: ok: presentation {p.name!r}, {len(loaded.streams)} streams, "
               f"{sum(len(s.tracks) for s in loaded.streams)} tracks, groups {', '.join(loaded.groups)}, "
               f"fragment duration {p.fragment_duration} s")  # fmt: skip


@main.command(epilog=SCHEMA_EPILOG)
def schema() -> None:
    """Print the profile's JSON Schema (for editors)."""
    schema_doc: dict[str, Any] = json_schema()
    click.echo(json.dumps(schema_doc, indent=2))


@main.command(epilog=INGEST_EPILOG)
@click.option("--listen", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT",
              help="Where to accept ingest POSTs (loopback unless you say otherwise).")  # fmt: skip
@click.option("--archive", type=click.Path(file_okay=False, path_type=Path), required=True,
              metavar="DIR", help="Write one fragmented MP4 per track here.")  # fmt: skip
@click.option("--max-connections", type=click.IntRange(1, 100_000), default=512, show_default=True,
              help="Connections open at once; at the cap, an idle one (or one whose POST sent no body byte "
                   "for 2 s) is closed to make room, else the new one is answered 503.")  # fmt: skip
@click.option("--memory-budget-mib", type=click.IntRange(1, 1_048_576), default=512, show_default=True,
              help="MiB that all POSTs together may hold in memory (a whole fragment counts 3-4 times its "
                   "size while it is decided); a POST over it is answered 503.")  # fmt: skip
@click.option("--body-timeout", type=click.FloatRange(1, 86_400), default=60, show_default=True, metavar="SECONDS",
              help="A POST that sends no body bytes for this long is answered 408.")  # fmt: skip
def ingest(listen: str, archive: Path, max_connections: int, memory_budget_mib: int, body_timeout: float) -> None:
    """Run a local publishing point: accept live ingest POSTs, check, de-duplicate, archive."""
    from orchestrator.ingest.server import IngestLimits, run_ingest_server

    limits = IngestLimits(max_connections, memory_budget_mib * 1024 * 1024, body_timeout)
    try:
        run_ingest_server(listen, archive, limits)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            _fail(ListenError(f"cannot listen on {listen} (set by ingest --listen): {exc.strerror or exc}"), 1)
        _fail(exc, 1)


@main.command(epilog=RELAY_EPILOG)
@click.argument("profile", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--group", metavar="NAME",
              help='The relay group to run (its encoder is { backend = "relay" }); default: the only one.')  # fmt: skip
@click.option("--status", type=click.Choice(["auto", "live", "log", "off"]), default="auto", show_default=True,
              help="Live table on a terminal, log lines otherwise.")  # fmt: skip
def relay(profile: Path, group: str | None, status: str) -> None:
    """Relay Smooth encoders' POSTs to the group's endpoints (probe, reconnect, resend, catch-up, spool)."""
    from orchestrator.relay.server import RelayOptions, run_relay_process

    try:
        loaded = load_profile(profile)
        run_relay_process(loaded, RelayOptions(group=group, status=status, profile_path=str(profile)))
    except ProfileError as exc:
        _fail(exc, 2)
    except OrchestratorError as exc:
        _fail(exc, 1)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            _fail(ListenError(f"cannot listen ({exc.strerror or exc}): check the relay's listen and metrics.listen"), 1)
        _fail(exc, 1)
    except BaseExceptionGroup as group_error:
        if (error := _error_in(group_error)) is None:
            raise
        _fail(error, 2 if isinstance(error, ProfileError) else 1)
