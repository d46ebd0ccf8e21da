"""The dead-letter circuit breaker trips on sustained garbage, not on occasional bad records."""

from __future__ import annotations

import pytest

from stream.breaker import CircuitBreakerOpen, DeadLetterBreaker
from stream.settings import DeadLetterSettings


def feed(breaker: DeadLetterBreaker, pattern: list[bool], times: int = 1) -> int:
    """Records fed before the breaker tripped (all of them if it did not)."""
    n = 0
    for _ in range(times):
        for valid in pattern:
            try:
                breaker.record(valid)
            except CircuitBreakerOpen:
                return n
            n += 1
    return n


def test_trips_on_the_consecutive_limit_exactly():
    breaker = DeadLetterBreaker(DeadLetterSettings(max_consecutive_invalid=5, max_invalid_ratio=1.0))
    assert feed(breaker, [True] + [False] * 10) == 5  # the 5th invalid in a row raises
    with pytest.raises(CircuitBreakerOpen, match="max_consecutive_invalid=5"):
        breaker.record(False)


def test_a_valid_record_resets_the_consecutive_count():
    breaker = DeadLetterBreaker(DeadLetterSettings(max_consecutive_invalid=5, max_invalid_ratio=1.0))
    assert feed(breaker, [False] * 4 + [True], times=100) == 500


def test_trips_on_the_ratio_only_once_the_window_has_enough_records():
    settings = DeadLetterSettings(
        max_invalid_ratio=0.5, window=20, min_window=10, max_consecutive_invalid=1000
    )
    # 2 of 3 invalid: ratio 0.67 from the start, but it is judged only from the 10th record on.
    assert feed(DeadLetterBreaker(settings), [False, False, True], times=10) == 9


def test_ratio_is_over_a_sliding_window_so_old_garbage_ages_out():
    settings = DeadLetterSettings(
        max_invalid_ratio=0.5, window=10, min_window=10, max_consecutive_invalid=1000
    )
    breaker = DeadLetterBreaker(settings)
    # 4 invalid then a long run of valid records mixed with invalid ones at ratio 0.4: never above 0.5.
    assert feed(breaker, [False] * 4 + [True] * 6) == 10
    assert feed(breaker, [False, True, False, True, True], times=40) == 200


def test_a_healthy_stream_with_occasional_bad_records_never_trips():
    breaker = DeadLetterBreaker(DeadLetterSettings())
    assert feed(breaker, [True] * 9 + [False], times=500) == 5000
