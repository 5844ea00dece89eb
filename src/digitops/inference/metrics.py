"""The service's own Prometheus metrics, served at /metrics next to BentoML's request metrics.

What to alert on is in README.md ("Observability"): most of all a rise in low-confidence
predictions, which is how drift in what users send first shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

CONFIDENCE_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
MONITOR_GAUGES = {
    "predictions": "Predictions the served model made in the Monitor's window",
    "not_digit_share": "Share of them judged not a digit",
    "low_confidence_share": "Share of the answered digits below the low-confidence probability",
    "estimated_accuracy": "Accuracy estimated without labels (mean calibrated confidence)",
    "measured_accuracy": "Accuracy measured on feedback labels (NaN without labels)",
    "labels": "Feedback labels behind the measured accuracy",
    "drift_score": "MMD^2 of the newest inputs' embeddings against the training reference",
    "drift_p_value": "Permutation p-value of that score",
    "drift": "1 when the Monitor reports input drift",
    "warnings": "Warnings on the Monitor page (drift, an accuracy drop)",
}


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
        # The Monitor's figures for the served model over its default window (GET /monitor);
        # every worker and replica computes the same from the shared store.
        self.monitor = {
            name: prom.Gauge(
                f"digitops_monitor_{name}", help, multiprocess_mode="mostrecent", registry=registry
            )
            for name, help in MONITOR_GAUGES.items()
        }
        self.show(None)  # unknown until the first refresh, not 0
        # Every digit's counter made once, here: each is there from the start, at 0.
        self._by_digit = [self.predictions.labels(digit=str(d)) for d in range(10)]

    def prediction(self, digit: int, confidence: float, inverted: bool, is_digit: bool) -> None:
        self._by_digit[digit].inc()
        self.confidence.observe(confidence)
        if inverted:
            self.inverted.inc()
        if not is_digit:
            self.not_a_digit.inc()

    def show(self, figures: dict | None) -> None:
        """Set the Monitor gauges from a GET /monitor report; a figure without data, or every
        figure when there is no report (the store cannot be read), reads NaN."""
        if figures is None:
            for gauge in self.monitor.values():
                gauge.set(float("nan"))
            return
        current = next(v for v in figures["versions"] if v["serving"])
        drift = figures["drift"] or {"embedding": {"score": None, "p_value": None}}
        values = {
            "predictions": current["predictions"],
            "not_digit_share": current["not_digit_share"],
            "low_confidence_share": current["low_confidence_share"],
            "estimated_accuracy": current["estimated_accuracy"],
            "measured_accuracy": current["measured"]["accuracy"],
            "labels": current["measured"]["labels"],
            "drift_score": drift["embedding"]["score"],
            "drift_p_value": drift["embedding"]["p_value"],
            "drift": figures["drifted"],
            "warnings": len(figures["warnings"]),
        }
        for name, value in values.items():
            self.monitor[name].set(float("nan") if value is None else float(value))

    def serving(self, name: str, version: str | None, source: str) -> None:
        if self._model_labels is not None:
            self.model.labels(*self._model_labels).set(0)
        self._model_labels = (name, version or "shipped", source)
        self.model.labels(*self._model_labels).set(1)
