"""The outbox: bounded catch-up backlog and forward buffer, as exact sequences."""

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.fmp4.stream import EncodedFragment
from orchestrator.push.outbox import Outbox, OutboxLimits

VIDEO, AUDIO = 1, 2


def frag(index: int, track: int = VIDEO, size: int = 100, duration: int | None = None) -> EncodedFragment:
    timescale = 90000 if track == VIDEO else 48000
    duration = duration if duration is not None else 2 * timescale
    return EncodedFragment("s", track, index, index * duration, duration, timescale, bytes([index % 256]) * size)


def limits(**kw) -> OutboxLimits:
    defaults = dict(max_seconds=Fraction(10), max_bytes=10**9, resend_per_track=2, unconfirmed_bytes=0)
    return OutboxLimits(**{**defaults, **kw})


def drain(outbox: Outbox) -> list[tuple[int, int, bool]]:
    """Take everything pending, each fragment written completely."""
    out = []
    while (item := outbox.take()) is not None:
        outbox.written()
        out.append((item.fragment.track_id, item.fragment.index, item.resend))
    return out


def test_fragments_leave_in_the_order_they_were_pushed():
    outbox = Outbox(limits())
    for k in range(3):
        outbox.push(frag(k, VIDEO))
        outbox.push(frag(k, AUDIO))
    assert drain(outbox) == [(1, 0, False), (2, 0, False), (1, 1, False), (2, 1, False), (1, 2, False), (2, 2, False)]


def test_the_backlog_is_bounded_in_media_seconds_per_track_oldest_dropped_first():
    outbox = Outbox(limits(max_seconds=Fraction(6)))  # three 2-second fragments
    dropped = []
    for k in range(5):
        dropped += outbox.push(frag(k, VIDEO))
        dropped += outbox.push(frag(k, AUDIO))
    assert [(f.track_id, f.index) for f in dropped] == [(1, 0), (2, 0), (1, 1), (2, 1)]
    assert outbox.pending_seconds == 6
    assert outbox.dropped == 4
    assert [index for _, index, _ in drain(outbox)] == [2, 2, 3, 3, 4, 4]


def test_the_backlog_is_bounded_in_bytes():
    outbox = Outbox(limits(max_bytes=250))
    dropped = [f.index for k in range(4) for f in outbox.push(frag(k, size=100))]
    assert dropped == [0, 1]
    assert outbox.pending_bytes == 200


def test_the_newest_fragment_is_kept_even_if_it_alone_exceeds_the_bound():
    outbox = Outbox(limits(max_bytes=50))
    assert outbox.push(frag(0, size=100)) == []
    assert [f.index for f in outbox.push(frag(1, size=100))] == [0]
    assert len(outbox) == 1


def test_rewind_resends_the_last_two_fragments_of_every_track_then_continues():
    outbox = Outbox(limits())
    for k in range(4):
        outbox.push(frag(k, VIDEO))
        outbox.push(frag(k, AUDIO))
    drain(outbox)
    outbox.push(frag(4, VIDEO))
    outbox.push(frag(4, AUDIO))
    again = outbox.rewind()
    assert [(f.track_id, f.index) for f in again] == [(1, 2), (2, 2), (1, 3), (2, 3)]
    assert drain(outbox) == [(1, 2, True), (2, 2, True), (1, 3, True), (2, 3, True), (1, 4, False), (2, 4, False)]
    assert outbox.resent == 4


def test_rewind_also_resends_everything_within_the_unconfirmed_byte_window():
    outbox = Outbox(limits(max_seconds=Fraction(3600), unconfirmed_bytes=450, resend_per_track=2))
    for k in range(10):
        outbox.push(frag(k, size=100))
    drain(outbox)
    # The last 450 bytes taken end within fragments 5..9 (ends at 600..1000 of 1000).
    assert [f.index for f in outbox.rewind()] == [5, 6, 7, 8, 9]


def test_connections_reset_after_a_fixed_byte_count_still_make_progress():
    # A middlebox resets every connection after 1000 bytes; the unconfirmed window (5000 bytes)
    # is larger than that, yet a fragment goes back at most twice in a row, so the POSTs advance.
    outbox = Outbox(limits(max_seconds=Fraction(3600), unconfirmed_bytes=5000, resend_per_track=1))
    for k in range(40):
        outbox.push(frag(k, size=100))
    delivered: set[int] = set()
    for _ in range(12):
        sent = 0
        while sent < 1000 and (item := outbox.take()) is not None:
            delivered.add(item.fragment.index)
            sent += 100
        outbox.rewind()
    assert delivered == set(range(40))


def test_a_second_failure_before_anything_new_is_taken_resends_the_same_fragments():
    outbox = Outbox(limits())
    for k in range(3):
        outbox.push(frag(k))
    drain(outbox)
    assert [f.index for f in outbox.rewind()] == [1, 2]
    outbox.take()  # fragment 1 goes out on the new POST, which breaks at once
    assert [f.index for f in outbox.rewind()] == [1, 2]  # 1 was re-taken, 2 is still queued
    assert [index for _, index, _ in drain(outbox)] == [1, 2]


def test_a_track_that_stops_producing_does_not_pin_the_forward_buffer():
    outbox = Outbox(limits())
    outbox.push(frag(0, AUDIO))
    for k in range(50):
        outbox.push(frag(k, VIDEO))
    drain(outbox)
    assert [(f.track_id, f.index) for f in outbox.forward_buffer] == [(2, 0), (1, 48), (1, 49)]


def test_close_hands_out_what_is_pending_then_finishes():
    outbox = Outbox(limits())
    outbox.push(frag(0))
    outbox.close()
    assert not outbox.finished
    with pytest.raises(RuntimeError):
        outbox.push(frag(1))
    assert outbox.take() is not None
    assert outbox.finished


@given(
    ops=st.lists(st.sampled_from(["push_v", "push_a", "take", "rewind"]), max_size=200),
    max_fragments=st.integers(1, 8),
)
def test_whatever_happens_each_track_leaves_in_index_order_between_rewinds(ops, max_fragments):
    outbox = Outbox(limits(max_seconds=Fraction(2 * max_fragments)))
    next_index = {VIDEO: 0, AUDIO: 0}
    last_taken: dict[int, int] = {}
    pushed = dropped = 0
    for op in ops:
        if op.startswith("push"):
            track = VIDEO if op == "push_v" else AUDIO
            dropped += len(outbox.push(frag(next_index[track], track)))
            next_index[track] += 1
            pushed += 1
        elif op == "take":
            item = outbox.take()
            if item is not None:
                f = item.fragment
                if not item.resend:
                    assert f.index > last_taken.get(f.track_id, -1)
                    last_taken[f.track_id] = f.index
        else:
            outbox.rewind()
        # The bound holds after every step.
        assert outbox.pending_seconds <= 2 * max_fragments or len(outbox) == 1
    assert outbox.dropped == dropped <= pushed


def test_the_fragment_being_written_when_the_post_broke_is_resent_on_top_of_the_last_two():
    outbox = Outbox(limits())
    for k in range(5):
        outbox.push(frag(k))
    for _ in range(4):
        outbox.take()
        outbox.written()
    outbox.take()  # fragment 4: the write fails, written() is never called
    assert [f.index for f in outbox.rewind()] == [2, 3, 4]


def test_a_stalled_receiver_gets_the_whole_window_again_however_little_the_post_carried():
    """The observation of issue 13: a POST carried 16 audio fragments of 32,000 bytes (512,000),
    and ~330,000 bytes sat in buffers of a receiver that had stopped reading when it was reset.
    The old rule capped the window at half of what the POST carried (256,000: fragments 8-15, so
    fragment 5..7 were lost); the window is now the whole 400,000 bytes: every fragment ending
    within it (ends at 128,000..512,000: fragments 3-15)."""
    outbox = Outbox(limits(max_seconds=Fraction(3600), unconfirmed_bytes=400_000))
    for k in range(16):
        outbox.push(frag(k, AUDIO, size=32_000))
    drain(outbox)
    assert outbox.unconfirmed_window == 400_000
    assert [f.index for f in outbox.rewind()] == list(range(3, 16))


def test_what_our_send_queue_held_unacknowledged_widens_the_window_for_that_connection_only():
    outbox = Outbox(limits(max_seconds=Fraction(3600), unconfirmed_bytes=250))
    for k in range(10):
        outbox.push(frag(k, size=100))
    outbox.take()
    outbox.written()
    outbox.observe_unacked(300)
    outbox.observe_unacked(200)  # the most seen counts
    drain(outbox)
    assert outbox.unconfirmed_window == 550
    # Ends at 100..1000; within 550 of the end: ends 500..1000, fragments 4..9.
    assert [f.index for f in outbox.rewind()] == [4, 5, 6, 7, 8, 9]
    assert outbox.unconfirmed_window == 250  # the next connection starts with an empty send queue


def test_a_fragment_goes_back_at_most_max_put_back_times_in_a_row():
    outbox = Outbox(limits(max_seconds=Fraction(3600), unconfirmed_bytes=10_000, resend_per_track=1,
                           max_put_back=2))  # fmt: skip
    for k in range(5):
        outbox.push(frag(k, size=100))
    rounds = []
    for _ in range(4):  # every POST writes everything pending completely, then breaks
        taken = []
        while (item := outbox.take()) is not None:
            outbox.written()
            taken.append((item.fragment.index, item.put_back))
        rounds.append(taken)
        outbox.rewind()
    assert rounds == [
        [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)],
        [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)],
        [(0, 2), (1, 2), (2, 2), (3, 2), (4, 2)],
        [(4, 3)],  # put back twice in a row: only the spec's last fragment of the track goes again
    ]


def test_a_path_cut_every_n_bytes_advances_at_least_n_over_three_per_post():
    """Window (5,000) five times the cut (1,000 bytes, ten 100-byte fragments): each fragment is
    carried by at most three consecutive POSTs, so 30 POSTs deliver at least 100 fragments."""
    outbox = Outbox(limits(max_seconds=Fraction(3600), unconfirmed_bytes=5000, resend_per_track=1))
    for k in range(100):
        outbox.push(frag(k, size=100))
    delivered: set[int] = set()
    for _ in range(30):
        sent = 0
        while sent < 1000 and (item := outbox.take()) is not None:
            outbox.written()
            delivered.add(item.fragment.index)
            sent += 100
        outbox.rewind()
    assert delivered == set(range(100))


class _EagerOutbox(Outbox):
    """The outbox as it was before ``take`` became constant time: a full pass over ``sent`` on
    every take. The reference for the property below."""

    def _forget_oldest(self) -> None:
        self._trim_sent()


@given(st.lists(st.tuples(st.sampled_from(["push_v", "push_a", "take", "take_written", "rewind"]),
                          st.integers(1, 400)), max_size=300),
       st.integers(0, 2), st.sampled_from([0, 500, 2000]), st.integers(0, 3))  # fmt: skip
def test_constant_time_forgetting_selects_exactly_what_a_full_pass_would(ops, per_track, window, put_back):
    """Forgetting sent fragments from the oldest on (constant time per take) plus an occasional
    full pass hands out and resends exactly the same fragments, in the same order, as a full
    pass on every take, through any sequence of pushes, takes and rewinds on two tracks with a
    sparse one; and keeps at most twice as many sent fragments (+ 8) as that full pass does."""
    lim = limits(resend_per_track=per_track, unconfirmed_bytes=window, max_put_back=put_back)
    new, old = Outbox(lim), _EagerOutbox(lim)
    index = {VIDEO: 0, AUDIO: 0}
    for op, size in ops:
        if op.startswith("push"):
            track = VIDEO if op == "push_v" else AUDIO
            fragment = frag(index[track], track, size=size)
            index[track] += 1
            assert new.push(fragment) == old.push(fragment)
        elif op.startswith("take"):
            a, b = new.take(), old.take()
            assert a == b
            if a is not None and op == "take_written":
                new.written()
                old.written()
        else:
            assert new.rewind() == old.rewind()
        assert len(new._sent) <= 2 * len(old._sent) + 8
    assert drain(new) == drain(old)


# --- sparse tracks: fragments now and then, so the per-track rules read an age ----------------

CUES = 3


def cue(index: int, start_s: int, duration_s: int = 1) -> EncodedFragment:
    """A sparse track's fragment: 1 ms ticks, ``continuous=False``."""
    return EncodedFragment("s", CUES, index, start_s * 1000, duration_s * 1000, 1000, b"c" * 10, continuous=False)


def test_a_sparse_fragment_is_dropped_by_age_not_by_its_tracks_seconds():
    outbox = Outbox(limits())  # max_seconds 10
    assert outbox.push(cue(0, 0)) == []  # ends at 1 s
    for k in range(5):
        assert outbox.push(frag(k)) == []  # video up to 10 s: within the bound, and so is the cue (9 s old)
    dropped = outbox.push(frag(5))  # video ends at 12 s: the cue is 11 s behind, video 12 s pending
    assert [(f.track_id, f.index) for f in dropped] == [(CUES, 0), (VIDEO, 0)]
    assert outbox.pending_seconds == 10
    assert drain(outbox) == [(VIDEO, k, False) for k in range(1, 6)]


def test_a_long_sparse_fragment_is_neither_dropped_nor_counted_as_backlog():
    outbox = Outbox(limits())
    outbox.push(frag(0))
    assert outbox.push(cue(0, 0, duration_s=20)) == []  # 20 s long: its track's sum would exceed 10 s
    assert outbox.pending_seconds == 2  # the video's 2 s; a cue's duration is no backlog
    for k in range(1, 4):
        assert outbox.push(frag(k)) == []
    assert drain(outbox) == [(VIDEO, 0, False), (CUES, 0, False), (VIDEO, 1, False), (VIDEO, 2, False),
                             (VIDEO, 3, False)]  # fmt: skip


def test_an_old_sparse_fragment_is_not_sent_again_after_a_failure_but_a_recent_one_is():
    old = Outbox(limits())
    old.push(cue(0, 0))  # ends at 1 s
    for k in range(10):
        old.push(frag(k))  # video to 20 s
    drain(old)
    assert [(f.track_id, f.index) for f in old.rewind()] == [(VIDEO, 8), (VIDEO, 9)]  # the cue is 19 s old

    recent = Outbox(limits())
    for k in range(8):
        recent.push(frag(k))
    recent.push(cue(0, 15))  # ends at 16 s, 4 s before the newest video
    for k in (8, 9):
        recent.push(frag(k))
    drain(recent)
    assert [(f.track_id, f.index) for f in recent.rewind()] == [(CUES, 0), (VIDEO, 8), (VIDEO, 9)]


def test_an_old_sparse_fragment_does_not_stay_in_the_forward_buffer():
    outbox = Outbox(limits())
    outbox.push(cue(0, 0))
    drain(outbox)
    assert outbox.forward_buffer == [cue(0, 0)]  # the newest thing sent: kept for a resend
    for k in range(10):
        outbox.push(frag(k))
        drain(outbox)
    assert [(f.track_id, f.index) for f in outbox.forward_buffer] == [(VIDEO, 8), (VIDEO, 9)]
    # Forgotten, not only skipped (video 7 is forgotten at the next take, as before sparse tracks).
    assert [(s.fragment.track_id, s.fragment.index) for s in outbox._sent] == [(VIDEO, 7), (VIDEO, 8), (VIDEO, 9)]


def test_oldest_held_is_never_newer_than_what_a_rewind_or_a_take_could_still_hand_out():
    """What a relay's spool keeps for this endpoint (orchestrator/relay/spool.py): conservative,
    it counts what the outbox has not forgotten yet (forgetting happens on take)."""
    outbox = Outbox(limits(unconfirmed_bytes=0, resend_per_track=1))
    assert outbox.oldest_held is None
    fragments = [frag(i) for i in range(4)]
    for fragment in fragments:
        outbox.push(fragment)
    assert outbox.oldest_held is fragments[0]  # pending
    for _ in range(3):
        outbox.take()
        outbox.written()
    # A rewind would send fragment 2 again (one per track, no byte window); 1 is forgotten at the next take.
    assert outbox.forward_buffer == [fragments[2]]
    assert outbox.oldest_held is fragments[1]
    outbox.take()
    assert outbox.oldest_held is fragments[2]  # 3 in flight, 2 kept until 3 is written
    outbox.written()
    assert outbox.forward_buffer == [fragments[3]]
    outbox.rewind()  # the forward buffer goes back to pending; the rest is forgotten
    assert outbox.oldest_held is fragments[3]
    drain(outbox)
    outbox.rewind()
    outbox.close()
    drain(outbox)
    assert outbox.oldest_held is fragments[3]  # still the last one written: a rewind could send it
