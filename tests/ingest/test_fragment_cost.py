"""What one fragment costs the ingest (issue 20): a moof is capped when its size field arrives,
and the memory budget counts what a fragment really holds until it is decided, measured here
with tracemalloc against what the POST reserved.

Before issue 20, one fragment with a 100 MiB moof and a 100 MiB mdat peaked the process at
+789 MiB while the budget counted about 200: the moof was copied out, then joined to the mdat,
the mdat's payload copied again by the parser, and the samples once more."""

from __future__ import annotations

import struct
import tracemalloc

import httpx
import pytest
from ingestkit import Server
from receiverkit import AUDIO, PATH, VIDEO, header

from orchestrator.errors import BoxError, IngestOverloaded
from orchestrator.fmp4 import boxes
from orchestrator.fmp4.reader import MAX_MOOF_SIZE, NEED_DATA
from orchestrator.ingest.receiver import PublishingPoint
from orchestrator.wire import smooth

MIB = 1024 * 1024


def big_fragment(track_ids: list[int], size: int) -> bytes:
    """One fragment of about ``size`` bytes of samples, split over ``track_ids``."""
    runs = []
    for track_id in track_ids:
        samples = [boxes.Sample(bytes(size // len(track_ids) // 100), 3000) for _ in range(100)]
        runs.append(boxes.TrackRun(track_id, 0, samples, 0))
    return smooth.write_fragment(0, runs, 1)


def test_a_moof_over_the_limit_is_refused_when_its_size_arrives() -> None:
    point = PublishingPoint()
    post = point.open_post(PATH, None, 0.0)
    post.feed(header())
    assert post.next_decision() is NEED_DATA
    with pytest.raises(BoxError, match=f"over the limit of {MAX_MOOF_SIZE} for a moof \\(max_moof_size\\)"):
        post.feed(struct.pack(">I4s", 100 * MIB, b"moof"))  # 8 bytes: nothing else was needed to know
    assert MAX_MOOF_SIZE <= 2 * MIB


@pytest.mark.parametrize("track_ids", [[1], [1, 2]], ids=["one-traf", "two-trafs"])
def test_the_budget_counts_what_a_fragment_really_costs(track_ids: list[int]) -> None:
    """A 32 MiB fragment fed in 64 KiB chunks, as a socket hands it over, and decided: the most
    the process allocated at any moment (tracemalloc's peak, the body itself excluded) is no more
    than the most the POST had reserved against the budget. Before issue 20 the POST reserved
    32 MiB and the process peaked at 128 MiB."""
    fragment = big_fragment(track_ids, 32 * MIB)
    point = PublishingPoint(memory_budget=1 << 40)
    post = point.open_post(PATH, None, 0.0)
    body = header((VIDEO, AUDIO)) + fragment
    reserved = 0
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for at in range(0, len(body), 65536):
            post.feed(body[at : at + 65536])
            reserved = max(reserved, point.memory_reserved)
            while (decision := post.next_decision()) is not NEED_DATA:
                assert decision.outcome == "archived"
                post.written(decision)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert len(fragment) < peak <= reserved, f"peak {peak / MIB:.1f} MiB, reserved {reserved / MIB:.1f} MiB"
    assert reserved <= 4 * len(fragment) + MIB  # and not wildly more


def test_a_fragment_counts_its_size_while_it_arrives_and_its_cost_once_whole() -> None:
    """Budget 64 MiB, another POST holding 20 MiB. A 20 MiB fragment reserves 20 MiB from its
    mdat's size field on (40 in all: fine), and once its last byte is in, what deciding it costs,
    3 x 20 MiB: over the budget, refused before it is taken. A 50 MiB one is refused when its
    mdat's size arrives. Fragments still arriving count once each: only the fragment being
    decided is at its peak, one at a time in a process."""
    point = PublishingPoint(memory_budget=64 * MIB)
    other = point.open_post(PATH, None, 0.0)
    other.feed(header() + struct.pack(">I4s", 20 * MIB, b"free"))
    assert other.next_decision() is NEED_DATA
    assert point.memory_reserved == 20 * MIB
    fragment = big_fragment([1], 20 * MIB)
    mdat_at = fragment.index(b"mdat") - 4
    post = point.open_post(PATH, None, 0.0)
    post.feed(header())
    assert post.next_decision() is NEED_DATA
    post.feed(fragment[: mdat_at + 8])
    assert point.memory_reserved == 20 * MIB + len(fragment)
    post.feed(fragment[mdat_at + 8 : -1])
    with pytest.raises(IngestOverloaded, match="over the ingest memory budget of 67108864 bytes"):
        post.feed(fragment[-1:])
    assert point.memory_reserved == 20 * MIB
    bigger = big_fragment([1], 50 * MIB)
    post = point.open_post(PATH, None, 0.0)
    post.feed(header())
    assert post.next_decision() is NEED_DATA
    with pytest.raises(IngestOverloaded, match="over the ingest memory budget of 67108864 bytes"):
        post.feed(bigger[: bigger.index(b"mdat") + 4])


async def test_the_server_names_the_moof_limit(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/live/demo.isml/Streams(video)",
                                     content=header() + struct.pack(">I4s", 100 * MIB, b"moof"))  # fmt: skip
    assert response.status_code == 400
    assert "max_moof_size" in response.text
    assert server.app.point.status()["memory"]["reserved"] == 0
