"""Shared fixtures: the packaged ffmpeg clips, read once per session; the rig's processes
(``orchestrators``, ``ingest_server``, ``up_process``: see ``rig.py``), whose logs' tails a failing
test's report shows. Plugins: ``ci_skips`` (under ``CI=true`` a skipped test fails the run).

The tests leave the checkout alone: the session works in a temporary directory (``away_from_the_checkout``),
every process the rig starts runs in its test's ``tmp_path``, and every port is a free one, so
the suite passes while the demo (``orchestrator up profiles/demo.toml --local-ingest
demo-archive``, with its ``demo-state``, ports 18081, 18082 and 9464) runs in the same checkout.
``tests/check_beside_demo.py`` shows it."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
from rig import LOG_TAIL, IngestServer, Orchestrator, free_port, wait_until

from orchestrator.fmp4.boxes import Sample, TrackHeader
from orchestrator.fmp4.reader import NEED_DATA, Fragment, Header, StreamReader

pytest_plugins = ["ci_skips"]

MEDIA = Path(__file__).resolve().parent.parent / "orchestrator" / "encode" / "media"

Clip = tuple[TrackHeader, tuple[Sample, ...]]
"""The one track of a packaged clip: its header as ffmpeg wrote it, and its samples."""


@pytest.fixture(scope="session", autouse=True)
def away_from_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The whole session in a temporary working directory: a relative path anywhere (a profile's
    ``[state] dir = "demo-state"``, an archive) lands there, never in the user's checkout."""
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        yield cwd


def read_clip(name: str) -> Clip:
    reader = StreamReader()
    reader.feed((MEDIA / name).read_bytes())
    header: Header | None = None
    samples: list[Sample] = []
    while (event := reader.next_event()) is not NEED_DATA:
        if isinstance(event, Header):
            header = event
        elif isinstance(event, Fragment):
            samples.extend(s for traf in event.parsed.trafs for s in traf.samples)
    assert header is not None
    assert len(header.tracks) == 1
    return header.tracks[0], tuple(samples)


@pytest.fixture(scope="session")
def video_clip() -> Clip:
    """``video.mp4``: 50 intra-only H.264 frames, 192x108."""
    return read_clip("video.mp4")


@pytest.fixture(scope="session")
def audio_clip() -> Clip:
    """``audio_48000_2.mp4``: one second of stereo AAC-LC at 48 kHz."""
    return read_clip("audio_48000_2.mp4")


@pytest.fixture
def orchestrators(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Orchestrator]]:
    """Start ``python -m orchestrator ARGS`` in ``tmp_path`` with ``log=`` a file name under
    ``tmp_path`` (or a path); whatever still runs at teardown is killed. A failing test's report
    shows every log's tail, and a :func:`rig.wait_until` given its log fails as soon as it exits."""
    started: list[Orchestrator] = []
    logs: list[Path] = []
    request.node.stash[RIG_LOGS] = logs

    def start(*args: str, log: str | Path, **popen: object) -> Orchestrator:
        path = log if isinstance(log, Path) else tmp_path / log
        popen.setdefault("cwd", tmp_path)  # relative paths in its profile land in the test's directory
        process = Orchestrator(*args, log=path, **popen)
        started.append(process)
        logs.append(path)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def ingest_server(orchestrators: Callable[..., Orchestrator], tmp_path: Path) -> Iterator[Callable[..., IngestServer]]:
    """Start an ``orchestrator ingest`` process on a free port, archiving to ``tmp_path/NAME``, and
    wait until it answers ``/status``. At teardown each is stopped with SIGTERM and must exit 0."""
    servers: list[IngestServer] = []

    def start(name: str = "ingest", *args: str, archive: Path | None = None) -> IngestServer:
        port = free_port()
        directory = archive or tmp_path / name
        process = orchestrators("ingest", "--listen", f"127.0.0.1:{port}", "--archive", str(directory), *args,
                                log=f"{name}.log")  # fmt: skip
        server = IngestServer(port, directory, process)
        servers.append(server)
        wait_until(lambda: server.status() is not None, 20, f"{name} to listen", [process.log])
        return server

    yield start
    codes = [server.process.stop() for server in servers]
    assert codes == [0] * len(servers), "ingest servers must exit 0 on SIGTERM"


@pytest.fixture
def up_process(orchestrators: Callable[..., Orchestrator]) -> Callable[..., Orchestrator]:
    """Start ``orchestrator up PROFILE --status log ARGS`` and, unless ``ready=None``, wait until
    it logs ``ready`` (``supervisor.started``). Stop it with ``.stop()`` (SIGTERM) to see its code."""

    def start(profile: Path, *args: str, log: str | Path = "up.log", ready: str | None = "supervisor.started",
              timeout: float = 30) -> Orchestrator:  # fmt: skip
        process = orchestrators("up", str(profile), "--status", "log", *args, log=log)
        if ready is not None:
            process.wait_logged(ready, timeout)
        return process

    return start


RIG_LOGS = pytest.StashKey[list[Path]]()
Report = pytest.TestReport


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Report, Report]:
    report = yield
    if report.failed:
        for path in item.stash.get(RIG_LOGS, []):
            if path.exists():
                report.sections.append((f"log {path.name}", path.read_text(errors="replace")[-LOG_TAIL:]))
    return report
