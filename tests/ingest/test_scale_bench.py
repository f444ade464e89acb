"""``bench/scale.py``'s ingest run reports what the ingest server saw while ``up`` was pushing.

Its first version started the server with the default cap of 512 connections for 4,000 POSTs,
waited its whole start-up bound for a count of open POSTs the cap made unreachable, and read its
last ``/status`` after ``up`` had reached its ``--duration`` and ended every POST: it printed
"POSTs active 0" next to an archive rate. Not timed: two streams (8 POSTs), a short window.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from rig import load_module

SCALE = Path(__file__).resolve().parents[2] / "bench" / "scale.py"

pytestmark = pytest.mark.integration


def load_scale() -> ModuleType:
    return load_module(SCALE, "bench_scale")


def test_every_post_active_at_both_ends_of_the_window(tmp_path):
    scale = load_scale()
    result = scale.run_ingest(2, 3.0, tmp_path)
    assert result["posts_active_start"] == 8
    assert result["posts_active"] == 8
    assert result["max_connections"] > 8  # the cap leaves room for every POST and the bench's /status reads
    assert result["refusals"] == 0
    assert result["archived_per_s"] > 0
    assert result["tracks"] == 4  # 2 streams x 2 publishing points, one track each


def test_up_stopping_before_the_window_ends_is_an_error_not_a_figure(tmp_path, monkeypatch):
    """``up`` stops by itself (``--duration``) 5 s after it starts, inside the 8 s window: its POSTs
    end, so a ``/status`` read then would say 0 active. The run must fail, naming it."""
    scale = load_scale()
    start_up = scale.start_up
    monkeypatch.setattr(scale, "start_up", lambda profile, _duration, log: start_up(profile, 5.0, log))
    with pytest.raises(SystemExit, match=r"^up exited \(0\) before"):
        scale.run_ingest(2, 8.0, tmp_path)
