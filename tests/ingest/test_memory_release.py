"""The ingest server gives a POST's memory back however the POST ends, fast and direct: the ASGI
application driven in-process (no sockets; the body timeout on the autojump clock), one POST
holding part of a fragment in memory, then ending each way the server knows: answered 200, 400
(bad media), 503 (over the budget), 408 (body timeout), the client gone, the server shutting down.
``test_fuzz.py`` and ``test_server_limits.py`` show the same over real HTTP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing
from ingestkit import INGEST, Media

from orchestrator.ingest.receiver import PublishingPoint
from orchestrator.ingest.server import IngestApp

HELD = 900_000  # bytes the held POST's unfinished mdat declares
BUDGET = 1024 * 1024


def opening(media: Media, mdat_size: int) -> bytes:
    """The header, then fragment 0 up to an mdat of ``mdat_size`` bytes whose payload never comes."""
    moof_end = media.fragments[0].index(b"mdat") - 4
    return media.header + media.fragments[0][:moof_end] + mdat_size.to_bytes(4, "big") + b"mdat"


@pytest.fixture
def make_app(tmp_path) -> Iterator[Callable[..., IngestApp]]:
    """An ingest app with a 1 MiB budget; its archive files are closed at the end."""
    apps: list[IngestApp] = []

    def make(**options: Any) -> IngestApp:
        apps.append(IngestApp(tmp_path / "archive", point=PublishingPoint(BUDGET), **options))
        return apps[-1]

    yield make
    for app in apps:
        app.close()


def scope() -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": INGEST, "query_string": b"", "headers": [],
            "server": ("127.0.0.1", 8080)}  # fmt: skip


async def post(app: IngestApp, body: list[bytes], then: str) -> tuple[int | None, int]:
    """POST ``body`` (one message per part) to ``app``, then end as ``then`` says: ``end`` (the
    last part), ``disconnect``, ``hang`` (never another message) or ``cancel`` (the server shuts
    down while waiting). Returns the answer's status (None if none) and the bytes the publishing
    point held just before the ending."""
    held: list[int] = []
    answers: list[int] = []
    parts = list(body)

    async def receive() -> dict[str, Any]:
        if parts:
            part = parts.pop(0)
            return {"type": "http.request", "body": part, "more_body": bool(parts) or then != "end"}
        held.append(app.point.memory_reserved)
        if then == "disconnect":
            return {"type": "http.disconnect"}
        if then == "cancel":
            scope_to_cancel.cancel()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answers.append(message["status"])

    with trio.CancelScope() as scope_to_cancel:
        await app(scope(), receive, send)
    if not held:  # it ended on its own body ("end", or refused before the end)
        held.append(-1)
    return (answers[0] if answers else None), held[0]


@pytest.mark.parametrize(
    ("name", "then", "status"),
    [
        ("body timeout", "hang", 408),
        ("client gone", "disconnect", None),
        ("server shutting down", "cancel", None),
    ],
)
async def test_a_post_that_ends_while_holding_memory_gives_it_back(autojump_clock, make_app, media, name, then,
                                                                     status):  # fmt: skip
    app = make_app(body_timeout=5)
    answer, held = await post(app, [opening(media, HELD)], then)
    assert answer == status
    assert held >= HELD, f"{name}: the POST held {held} bytes before it ended"
    assert app.point.memory_reserved == 0, f"{name}: {app.point.memory_reserved} bytes still reserved"
    assert app.point.status()["posts"]["active"] == 0


async def test_a_post_answered_200_gives_its_memory_back(make_app, media):
    app = make_app()
    half = len(media.fragments[1]) // 2
    answer, _ = await post(app, [media.header, media.fragments[0], media.fragments[1][:half],
                                 media.fragments[1][half:]], "end")  # fmt: skip
    assert answer == 200
    assert app.point.memory_reserved == 0
    assert app.point.status()["posts"]["active"] == 0


async def test_a_post_answered_400_gives_its_memory_back(make_app, media):
    app = make_app()
    answer, _ = await post(
        app, [opening(media, HELD)[:-8], b"\x00\x00\x00\x08" + b"moov"], "end"
    )  # a moov mid-fragment
    assert answer == 400
    assert app.point.memory_reserved == 0
    assert app.point.status()["posts"]["active"] == 0


async def test_a_post_refused_503_gives_its_memory_back_and_the_others_keep_theirs(make_app, media):
    """Two POSTs: the first holds most of the budget; the second, over it, is refused 503 and
    holds nothing after; the first still holds exactly what it held."""
    app = make_app()
    answers: list[int | None] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(post, app, [opening(media, HELD)], "hang")
        await trio.testing.wait_all_tasks_blocked()
        assert app.point.memory_reserved >= HELD
        first = app.point.memory_reserved
        answers.append((await post(app, [opening(media, 200_000)], "end"))[0])
        assert app.point.memory_reserved == first
        nursery.cancel_scope.cancel()
    assert answers == [503]
    assert app.point.memory_reserved == 0
    assert app.point.status()["memory"]["refusals"] == 1
