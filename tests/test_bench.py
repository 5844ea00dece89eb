"""The benchmarks' own arithmetic (the benchmarks themselves run with `make bench`)."""

import operator

from benchmarks.bench_serving import gap_at_c1, paired


def test_a_comparison_of_two_systems_is_made_within_each_round():
    # A slow first round slows both systems; compared within rounds, ours is 1-4 ms slower,
    # where the two medians (5 and 2 ms) would say 3.
    ours = {"rounds": [{"p50_ms": 10.0}, {"p50_ms": 4.0}, {"p50_ms": 5.0}]}
    theirs = {"rounds": [{"p50_ms": 9.0}, {"p50_ms": 2.0}, {"p50_ms": 1.0}]}
    assert paired(ours, theirs, "p50_ms", operator.sub) == 2.0
    assert paired(ours, theirs, "p50_ms", operator.truediv) == 2.0


def test_the_gap_to_the_baseline_is_split_into_framework_and_work_within_each_round():
    def system(*p50s, path="/predict"):
        return {path: {"c1": {"rounds": [{"p50_ms": p} for p in p50s]}}}

    results = {
        "fastapi_floor": system(1.0, 2.0),
        "fastapi_baseline": system(4.0, 8.0),
        "bentoml_floor": system(2.0, 4.0),
        "digitops": system(5.0, 10.0),
        "digitops_baseline_work": system(3.5, 7.0, path="/predict log=false"),
    }
    assert dict(gap_at_c1(results)) == {
        "BentoML floor minus FastAPI floor: BentoML's stack": 1.5,
        "FastAPI baseline minus FastAPI floor: its work (preprocessing, model, reply)": 4.5,
        "/predict minus the BentoML floor: ours (the same work, log, input PNG, metrics)": 4.5,
        "/predict minus the FastAPI baseline": 1.5,
        "/predict doing only the baseline's work minus the FastAPI baseline": -0.75,
        "/predict minus /predict doing only the baseline's work: the access line and the "
        "prediction log": 2.25,
    }
