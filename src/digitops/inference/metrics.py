"""The service's own Prometheus metrics, served at /metrics next to BentoML's request metrics.

What to alert on is in README.md ("Observability"): most of all a rise in low-confidence
predictions, which is how drift in what users send first shows.
"""

from __future__ import annotations

import numpy as np

CONFIDENCE_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


class ServiceMetrics:
    """Create once per worker process, in the service's constructor."""

    def __init__(self) -> None:
        # Imported here, not at module import: BentoML sets PROMETHEUS_MULTIPROC_DIR in each
        # worker after the service module is imported, and prometheus_client picks its
        # (multiprocess) storage when it is first imported.
        import prometheus_client as prom

        self.predictions = prom.Counter(
            "digitops_predictions", "Predictions answered, by predicted digit", ["digit"]
        )
        self.confidence = prom.Histogram(
            "digitops_prediction_confidence",
            "Probability of the predicted digit; a shift to the left is drift",
            buckets=CONFIDENCE_BUCKETS,
        )
        self.inverted = prom.Counter(
            "digitops_inverted_inputs", "Inputs inverted because the ink was dark on light"
        )
        self.no_digit = prom.Counter(
            "digitops_no_digit", "Images in which no digit was found (answered 422)"
        )
        self.feedback = prom.Counter(
            "digitops_feedback", "Corrections received, by what they did", ["result"]
        )
        self.store_failures = prom.Counter(
            "digitops_store_write_failures", "Predictions or feedback the store could not write"
        )
        self.model = prom.Gauge(
            "digitops_model_info",
            "1 for the model this worker serves",
            ["name", "version", "source"],
            multiprocess_mode="liveall",
        )
        self._model_labels: tuple[str, str, str] | None = None

    def prediction(self, probabilities: np.ndarray, inverted: bool) -> None:
        digit = int(np.argmax(probabilities))
        self.predictions.labels(digit=str(digit)).inc()
        self.confidence.observe(float(probabilities[digit]))
        if inverted:
            self.inverted.inc()

    def serving(self, name: str, version: str | None, source: str) -> None:
        if self._model_labels is not None:
            self.model.labels(*self._model_labels).set(0)
        self._model_labels = (name, version or "shipped", source)
        self.model.labels(*self._model_labels).set(1)
