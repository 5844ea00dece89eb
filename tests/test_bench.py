"""The benchmarks' own arithmetic (the benchmarks themselves run with `make bench`)."""

import operator

from tests.benchmarks.bench_serving import paired


def test_a_comparison_of_two_systems_is_made_within_each_round():
    # A slow first round slows both systems; compared within rounds, ours is 1-4 ms slower,
    # where the two medians (5 and 2 ms) would say 3.
    ours = {"rounds": [{"p50_ms": 10.0}, {"p50_ms": 4.0}, {"p50_ms": 5.0}]}
    theirs = {"rounds": [{"p50_ms": 9.0}, {"p50_ms": 2.0}, {"p50_ms": 1.0}]}
    assert paired(ours, theirs, "p50_ms", operator.sub) == 2.0
    assert paired(ours, theirs, "p50_ms", operator.truediv) == 2.0
