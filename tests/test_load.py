"""Load on a real server, bounded: a few hundred predictions at concurrency 32, and a mixed
workload while the model is reloaded under it, with zero failed requests. Capacity (20,000
requests, memory over a 10-minute soak) is measured by `make bench` and `make soak`
(benchmarks/bench_load.py), with these same functions."""

from __future__ import annotations

import pytest

from benchmarks.bench_load import ADMIN_TOKEN, mixed_with_reloads, predictions
from tests.servers import bentoml_serve

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(600)]


def test_predictions_at_concurrency_32_and_a_mixed_load_through_reloads_never_fail(tmp_path):
    settings = {"DIGITOPS_ADMIN_TOKEN": ADMIN_TOKEN, "DIGITOPS_FEEDBACK_PER_MINUTE": "1000000"}
    with bentoml_serve(tmp_path, **settings) as (base, _):
        load = predictions(base, 640, concurrency=32)
        assert load.requests == 640 and load.failed == 0, load.summary()

        mixed, reloads = mixed_with_reloads(base, tmp_path / "bentoml_home", 400, reloads=3)
        assert reloads == [200, 200, 200]
        assert mixed.requests >= 400 and mixed.failed == 0, mixed.summary()
