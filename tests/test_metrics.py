"""The service's own metrics, counted as each prediction is answered."""

import pytest
from prometheus_client import CollectorRegistry

from digitops.inference.metrics import ServiceMetrics


def value(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_predictions_are_counted_by_digit_confidence_inversion_and_not_a_digit():
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry=registry)
    answers = ((1, 0.5, False, True), (1, 0.5, False, False), (7, 0.93, True, True))
    for digit, confidence, inverted, is_digit in answers:
        metrics.prediction(digit, confidence, inverted, is_digit)
    assert value(registry, "digitops_not_a_digit_total") == 1
    assert value(registry, "digitops_predictions_total", digit="1") == 2
    assert value(registry, "digitops_predictions_total", digit="7") == 1
    assert value(registry, "digitops_inverted_inputs_total") == 1
    assert value(registry, "digitops_prediction_confidence_bucket", le="0.95") == 3
    assert value(registry, "digitops_prediction_confidence_bucket", le="0.9") == 2
    assert value(registry, "digitops_prediction_confidence_sum") == pytest.approx(1.93)
