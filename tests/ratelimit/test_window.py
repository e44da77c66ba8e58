"""Fixed-window status and stats arithmetic (pure), as upstream counts it."""

from ratelimit_svc.window import OK, OVER_LIMIT, Outcome, outcome, seconds_until_reset, window_start


def test_window_start_aligns_to_unit() -> None:
    assert window_start(1234, 60) == 1200
    assert window_start(1200, 60) == 1200
    assert window_start(1234, 1) == 1234


def test_reset_counts_down_to_next_window() -> None:
    assert seconds_until_reset(2222, 60) == 58
    assert seconds_until_reset(1200, 60) == 60


def test_hits_below_near_threshold_are_only_within() -> None:
    assert outcome(10, 8, 1, 0.8) == Outcome(OK, 2, 0, 0, 1)


def test_hits_crossing_near_threshold_count_near() -> None:
    assert outcome(10, 9, 1, 0.8) == Outcome(OK, 1, 0, 1, 1)
    assert outcome(10, 10, 3, 0.8) == Outcome(OK, 0, 0, 2, 3)


def test_first_hit_over_limit_counts_over() -> None:
    assert outcome(10, 11, 1, 0.8) == Outcome(OVER_LIMIT, 0, 1, 0, 0)


def test_addend_crossing_the_limit_splits_over_and_near() -> None:
    # 7 -> 12 with limit 10: 2 hits over the limit, 2 between near (8) and the limit
    assert outcome(10, 12, 5, 0.8) == Outcome(OVER_LIMIT, 0, 2, 2, 0)


def test_zero_limit_denies_every_hit() -> None:
    assert outcome(0, 1, 1, 0.8).code == OVER_LIMIT


def test_near_threshold_is_computed_in_float32_as_upstream() -> None:
    # NEAR_LIMIT_RATIO 0.7, limit 90: float32 gives 63 (upstream), float64 62.99999999999999 -> 62
    assert outcome(90, 63, 1, 0.7) == Outcome(OK, 27, 0, 0, 1)
    assert outcome(90, 64, 1, 0.7) == Outcome(OK, 26, 0, 1, 1)
