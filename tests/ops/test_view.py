from pathlib import Path

import trio

from orchestrator.ops.state import EncoderState, LiveState, PublisherState
from orchestrator.ops.view import StatusView
from orchestrator.profile import load_profile

DEMO = Path(__file__).resolve().parents[2] / "profiles" / "demo.toml"


async def test_one_line_per_stream_with_each_group(autojump_clock):
    profile = load_profile(DEMO)
    running = LiveState()
    running.encoders += [EncoderState("primary", "video", last_index=41), EncoderState("backup", "video", 42)]
    a = PublisherState("primary", "video", "region-a", connected=True, last_push_monotonic=trio.current_time())
    b = PublisherState("primary", "video", "region-b", connected=False)
    c = PublisherState("backup", "video", "region-a", connected=True, last_push_monotonic=trio.current_time())
    running.publishers += [a, b, c]
    await trio.sleep(1.5)
    view = StatusView(running, profile, mode="log")
    lines = [view.line(*row) for row in view.rows()]
    assert lines == [
        "stream=video index=42 primary=1/2 last_push=1.5s backup=1/1 last_push=1.5s",
        "stream=audio index=- primary=0/0 last_push=never backup=0/0 last_push=never",
    ]
    table = view.table()
    assert [column.header for column in table.columns] == [
        "stream", "fragment index", "primary: up / last push", "backup: up / last push"]  # fmt: skip
    assert table.row_count == 2
