"""Load on a real server, bounded: 20,000 predictions at concurrency 32, and a mixed workload
while the model is reloaded under it, with zero failed requests. (`make bench` reports the same
runs' figures, and can soak for 10 minutes.)"""

from __future__ import annotations

import pytest

from tests.benchmarks.bench_load import (
    ADMIN_TOKEN,
    mixed_with_reloads,
    predictions,
    server_rss_mb,
)
from tests.servers import bentoml_serve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_20000_predictions_at_concurrency_32_and_a_mixed_load_through_reloads(tmp_path):
    settings = {"DIGITOPS_ADMIN_TOKEN": ADMIN_TOKEN, "DIGITOPS_FEEDBACK_PER_MINUTE": "1000000"}
    with bentoml_serve(tmp_path, **settings) as (base, _):
        before = server_rss_mb(base)
        load = predictions(base, 20_000, concurrency=32)
        assert load.requests == 20_000 and load.failed == 0, load.summary()

        mixed, reloads = mixed_with_reloads(base, tmp_path / "bentoml_home", 1_500, reloads=3)
        assert reloads == [200, 200, 200]
        assert mixed.requests == 1_500 and mixed.failed == 0, mixed.summary()
        # A sanity bound, not the soak: 20,000 requests must not grow the workers by half.
        assert server_rss_mb(base) < before * 1.5
