"""The service's own Prometheus metrics, served at /metrics next to BentoML's request metrics.

What to alert on is in README.md ("Observability"): most of all a rise in low-confidence
predictions, which is how drift in what users send first shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

CONFIDENCE_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


class ServiceMetrics:
    """Create once per worker process, in the service's constructor. `registry` is
    Prometheus's default one unless given (tests give their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Imported here: BentoML sets PROMETHEUS_MULTIPROC_DIR in each worker after the service
        # module is imported, and prometheus_client picks its storage at its first import.
        import prometheus_client as prom

        registry = prom.REGISTRY if registry is None else registry

        self.predictions = prom.Counter(
            "digitops_predictions",
            "Predictions answered, by predicted digit",
            ["digit"],
            registry=registry,
        )
        self.confidence = prom.Histogram(
            "digitops_prediction_confidence",
            "Probability of the predicted digit; a shift to the left is drift",
            buckets=CONFIDENCE_BUCKETS,
            registry=registry,
        )
        self.inverted = prom.Counter(
            "digitops_inverted_inputs",
            "Inputs inverted because the ink was dark on light",
            registry=registry,
        )
        self.not_a_digit = prom.Counter(
            "digitops_not_a_digit",
            "Inputs answered is_digit false (they look like no digit the model was trained on)",
            registry=registry,
        )
        self.feedback = prom.Counter(
            "digitops_feedback",
            "Corrections received, by what they did",
            ["result"],
            registry=registry,
        )
        self.store_failures = prom.Counter(
            "digitops_store_write_failures",
            "Predictions or feedback the store could not write",
            registry=registry,
        )
        self.model = prom.Gauge(
            "digitops_model_info",
            "1 for the model this worker serves",
            ["name", "version", "source"],
            multiprocess_mode="liveall",
            registry=registry,
        )
        self._model_labels: tuple[str, str, str] | None = None
        # Every digit's counter made once, here: each is there from the start, at 0.
        self._by_digit = [self.predictions.labels(digit=str(d)) for d in range(10)]

    def prediction(self, digit: int, confidence: float, inverted: bool, is_digit: bool) -> None:
        self._by_digit[digit].inc()
        self.confidence.observe(confidence)
        if inverted:
            self.inverted.inc()
        if not is_digit:
            self.not_a_digit.inc()

    def serving(self, name: str, version: str | None, source: str) -> None:
        if self._model_labels is not None:
            self.model.labels(*self._model_labels).set(0)
        self._model_labels = (name, version or "shipped", source)
        self.model.labels(*self._model_labels).set(1)
