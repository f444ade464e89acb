from orchestrator.backlog import Backlog
from orchestrator.stream import EncodedFragment


def fragment(index: int, track_id: int = 1) -> EncodedFragment:
    return EncodedFragment("video", track_id, index, index * 180180, 180180, 90000, bytes([index % 256]) * 10)


def test_fifo_order_and_no_drop_below_bound():
    backlog = Backlog(3)
    assert backlog.push(fragment(1)) == []
    assert backlog.push(fragment(2)) == []
    assert [f.index for f in backlog] == [1, 2]
    assert backlog.pop().index == 1
    assert backlog.pop().index == 2
    assert backlog.pop() is None
    assert backlog.dropped == 0


def test_full_backlog_drops_oldest_and_counts():
    backlog = Backlog(2)
    backlog.push(fragment(1))
    backlog.push(fragment(2))
    dropped = backlog.push(fragment(3))
    assert [f.index for f in dropped] == [1]
    assert [f.index for f in backlog] == [2, 3]
    assert backlog.dropped == 1


def test_close_drains_then_finishes():
    backlog = Backlog(4)
    backlog.push(fragment(1))
    backlog.close()
    assert not backlog.finished
    assert backlog.pop().index == 1
    assert backlog.finished
