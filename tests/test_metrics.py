"""The service's own metrics: predictions are counted by a thread, in batches, and at close."""

import time

from prometheus_client import CollectorRegistry

from digitops.inference.metrics import ServiceMetrics


def value(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_predictions_are_counted_by_the_thread_within_its_interval():
    registry = CollectorRegistry()
    metrics = ServiceMetrics(update_seconds=0.05, registry=registry)
    try:
        metrics.prediction(7, 0.93, inverted=True)
        deadline = time.monotonic() + 5
        while value(registry, "digitops_predictions_total", digit="7") == 0:
            assert time.monotonic() < deadline, "never counted"
            time.sleep(0.01)
        assert value(registry, "digitops_inverted_inputs_total") == 1
        assert value(registry, "digitops_prediction_confidence_bucket", le="0.95") == 1
        assert value(registry, "digitops_prediction_confidence_bucket", le="0.9") == 0
    finally:
        metrics.close()


def test_close_counts_what_is_held():
    registry = CollectorRegistry()
    metrics = ServiceMetrics(update_seconds=3600, registry=registry)
    for digit in (1, 1, 4):
        metrics.prediction(digit, 0.5, inverted=False)
    assert value(registry, "digitops_predictions_total", digit="1") == 0  # held, not yet counted
    metrics.close()
    assert value(registry, "digitops_predictions_total", digit="1") == 2
    assert value(registry, "digitops_predictions_total", digit="4") == 1
    assert value(registry, "digitops_prediction_confidence_sum") == 1.5
    assert value(registry, "digitops_inverted_inputs_total") == 0
