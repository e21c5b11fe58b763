"""kd_lightning.progress: counts, the time-left estimate, plain lines in logs, bad input."""

from __future__ import annotations

import io

import pytest

from kd_lightning import progress as progress_module
from kd_lightning.progress import Progress, format_seconds, progress


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 42.4, 75.2, 3725)] == ["0s", "42s", "1m15s", "1h02m"]
    assert format_seconds(float("nan")) == "?" and format_seconds(float("inf")) == "?"


def test_lines_report_done_and_time_left(monkeypatch):
    clock = iter([100.0, 110.0, 120.0, 130.0, 140.0, 150.0, 160.0])
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    items = list(progress(["a", "b", "c"], desc="specialists", stream=out, bar=False))
    assert items == ["a", "b", "c"]
    lines = out.getvalue().splitlines()
    # Start at 100; item 1 done at 110 -> 10 s per item, 2 left -> 20 s left.
    assert lines[0] == "specialists: 1/3 done (33%), 10s elapsed, about 20s left"
    assert lines[-1].startswith("specialists: 3/3 done (100%)") and lines[-1].endswith("about 0s left")


def test_note_and_unknown_estimate():
    out = io.StringIO()
    tracker = Progress(2, desc="members", stream=out, bar=False)
    assert tracker.line().endswith("about ? left")  # nothing done yet: no estimate
    tracker.update(note="member 0: 91.2%")
    assert out.getvalue().strip().endswith("| member 0: 91.2%")


def test_bar_mode_writes_a_tqdm_bar():
    out = io.StringIO()
    with Progress(4, desc="views", unit="view", stream=out, bar=True) as tracker:
        tracker.update(2)
    assert "views" in out.getvalue() and "2/4" in out.getvalue() and "<" in out.getvalue()  # elapsed<left


def test_bad_input():
    with pytest.raises(ValueError, match="`total` must be a non-negative integer, got -1"):
        Progress(-1)
    with pytest.raises(ValueError, match="`total` is required"):
        list(progress(x for x in range(2)))


def test_initial_items_count_as_done_but_not_in_the_pace(monkeypatch):
    clock = iter([100.0, 110.0, 110.0])
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    tracker = Progress(10, desc="epochs", stream=out, bar=False, initial=4)  # a resumed run: 4 done before
    assert tracker.line().endswith("about ? left")
    tracker.update()  # 1 item in 10 s at this start: 5 left -> 50 s
    assert out.getvalue().strip() == "epochs: 5/10 done (50%), 10s elapsed, about 50s left"
    with pytest.raises(ValueError, match=r"`initial` must be an integer in \[0, total=3\], got 4"):
        Progress(3, initial=4)
