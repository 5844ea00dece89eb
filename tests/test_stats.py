"""The statistics the evaluation and release gates share."""

import pytest

from digitops.stats import wilson


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263 and 0/10.
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)


def test_wilson_interval_stays_inside_zero_one_and_narrows_with_n():
    low, high = wilson(1990, 2000)
    assert 0.99 < high < 1.0 and low < 0.995 < high
    assert wilson(10, 10)[1] == 1.0
    assert wilson(199, 200)[1] - wilson(199, 200)[0] > high - low
    assert wilson(0, 0) == (0.0, 1.0)
