"""hayai.bench.timing: warm-up and repeats, median and spread, on workloads of known cost."""

from __future__ import annotations

import time

import pytest

from hayai.bench.timing import Stopwatch, Timing, time_callable, timing_from
from hayai.errors import ConfigError


def test_a_sleep_is_timed_at_its_length():
    t = time_callable(lambda: time.sleep(0.02), warmup=1, repeats=5)
    assert t.repeats == 5 and t.warmup == 1
    assert 0.02 <= t.median < 0.02 + 0.015  # sleep never returns early; allow scheduler lateness
    assert t.min >= 0.02


def test_warmup_runs_are_called_but_not_measured():
    now = [0.0]
    durations = iter([0.5, 0.5] + [0.01] * 10)  # the first two calls are slow (lazy initialisation)

    def fn():
        now[0] += next(durations)

    t = time_callable(fn, warmup=2, repeats=4, clock=lambda: now[0])
    assert t.repeats == 4 and t.samples == pytest.approx((0.01,) * 4)


def test_median_and_robust_spread_against_hand_computed_values():
    t = timing_from([1.0, 2.0, 3.0, 4.0, 100.0])
    assert t.median == 3.0
    assert t.quartiles == (2.0, 4.0)  # inclusive (linear) quartiles
    assert t.iqr == 2.0
    assert t.mad == 1.0  # |x - 3| = 2, 1, 0, 1, 97 -> median 1
    assert t.mean == pytest.approx(22.0)  # the outlier moves the mean, not the median
    assert t.rate(6.0) == 2.0
    single = timing_from([0.25])
    assert single.iqr == 0.0 and single.mad == 0.0 and single.median == 0.25


def test_min_seconds_collects_more_samples_up_to_the_cap():
    t = time_callable(lambda: time.sleep(0.005), warmup=0, repeats=2, min_seconds=0.04, max_repeats=30)
    assert 6 <= t.repeats <= 30 and sum(t.samples) >= 0.04
    capped = time_callable(lambda: time.sleep(0.005), warmup=0, repeats=2, min_seconds=10.0, max_repeats=4)
    assert capped.repeats == 4


def test_stopwatch_and_summary():
    with Stopwatch() as sw:
        time.sleep(0.01)
    assert 0.01 <= sw.seconds < 0.05
    text = timing_from([0.0123, 0.0125, 0.0121]).summary()
    assert text.startswith("12.3 ms") and "3 runs" in text
    assert set(timing_from([1.0]).as_dict()) >= {"median_s", "iqr_s", "mad_s", "repeats", "samples_s"}


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError):
        time_callable(lambda: None, repeats=0)
    with pytest.raises(ConfigError):
        Timing(())
