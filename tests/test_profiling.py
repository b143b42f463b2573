"""coin_ray.profiling: spans are written only when COIN_RAY_PROFILE is set, and the wall time is split so
the phases sum to it (concurrent phases share an instant; a trial with no finer span running is start-up)."""
from __future__ import annotations

import pytest

from coin_ray import profiling


def test_span_writes_only_when_profiling(tmp_path, monkeypatch):
    path = tmp_path / "spans.jsonl"
    monkeypatch.delenv(profiling.ENV, raising=False)
    with profiling.span("training"):
        pass
    assert not path.exists()
    monkeypatch.setenv(profiling.ENV, str(path))
    profiling.label(trial="A>B-s0")
    try:
        with profiling.span("training", stage=1):
            pass
        with pytest.raises(ValueError):
            with profiling.span("evaluation"):  # a failing block is still recorded
                raise ValueError("boom")
        profiling.record_span("trial start-up", 10.0, 12.5, part="Ray Train start")
        profiling.record_span("trial start-up", 12.5, 12.0)  # inverted: not recorded
    finally:
        profiling._labels.clear()
    spans = profiling.read_spans(str(path))
    assert [s["phase"] for s in spans] == ["training", "evaluation", "trial start-up"]
    assert spans[0]["stage"] == 1 and all(s["trial"] == "A>B-s0" for s in spans)
    assert spans[2]["end"] - spans[2]["start"] == 2.5


def _span(phase, start, end, pid=1, **labels):
    return {"phase": phase, "start": start, "end": end, "pid": pid, **labels}


def test_wall_shares_sum_to_the_wall_time_and_share_concurrent_work():
    spans = [
        _span("preprocessing", 2, 6, pid=0),
        _span("trial", 6, 20, pid=10, trial="a"),            # trial a: 6-8 start-up, 8-18 training, 18-20 overhead
        _span("training", 8, 18, pid=11, trial="a"),
        _span("trial", 6, 14, pid=20, trial="b"),            # trial b: 6-10 start-up, 10-14 training
        _span("training", 10, 14, pid=21, trial="b"),
        _span("evaluation", 12, 13, pid=21, trial="b"),      # nested in b's training: takes that time from it
    ]
    shares = profiling.wall_shares(spans, 0.0, 24.0)
    assert sum(shares.values()) == pytest.approx(24.0)
    assert shares["driver start"] == pytest.approx(2.0)     # before the first span
    assert shares["preprocessing"] == pytest.approx(4.0)
    # 6-8: a and b start up (1 each) + 8-10: a trains, b starts up (1 each) + 18-20: a's teardown (2)
    assert shares["trial start-up"] == pytest.approx(2 + 1 + 2)
    assert shares["evaluation"] == pytest.approx(0.5)       # 12-13 shared with a's training
    assert shares["training"] == pytest.approx(1 + 2 + 1.5 + 4)  # 8-10, 10-12, 12-14, 14-18
    assert shares["idle"] == pytest.approx(4.0)              # 20-24
    assert profiling.busy_seconds(spans)["training"] == pytest.approx(14.0)
