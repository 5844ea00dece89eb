"""GET /monitor: how the served model is doing, from the prediction log (digitops.monitoring
says what each figure means). Every replica reads the same store, so every replica answers
the same; a thread per worker refreshes the Prometheus gauges and logs each new warning."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from datetime import UTC, datetime

import numpy as np

from digitops import monitoring
from digitops.inference.served import ServedModel
from digitops.inference.store import UNVERSIONED, PredictionStore, StoreError
from digitops.inference.store import monitor as monitor_table

log = logging.getLogger("bentoml.digitops")

# The most buckets one report may have.
MAX_BUCKETS = 2000
# The drift tests need at least this many recent inputs; fewer say nothing either way.
MIN_DRIFT_INPUTS = 50
# An estimated accuracy below the reference by more than the allowed drop is a warning once
# at least this many answers are behind it; a measured one, once this many labels are.
MIN_ESTIMATE_INPUTS = 50
MIN_LABELS = 30


def report(
    store: PredictionStore,
    served: ServedModel,
    hours: float = 24,
    bucket_minutes: int = 60,
    drift_score: float = 0.015,
    accuracy_drop: float = 0.02,
    now: float | None = None,
) -> dict:
    """The Monitor's figures for the last `hours`, per model version (the served one first)
    and per bucket of `bucket_minutes` (widened to keep to MAX_BUCKETS), with the served
    model's drift tests and warnings."""
    bucket_minutes = max(bucket_minutes, math.ceil(hours * 60 / MAX_BUCKETS))
    now = time.time() if now is None else now
    since = now - hours * 3600
    totals, labelled = store.monitor_totals(since, bucket_minutes), store.labelled(since)
    identity = served.identity()
    serving = identity["version"] or UNVERSIONED
    reference = served.reference.summary if served.reference is not None else None

    drift, drifted = None, None
    if served.reference is not None:
        rows = store.recent_inputs(identity["version"], since, monitoring.WINDOW)
        if len(rows) >= MIN_DRIFT_INPUTS:
            embeddings = np.array([json.loads(r["embedding"]) for r in rows])
            stats = np.array([[r[name] for name in monitoring.IMAGE_STATS] for r in rows])
            drift = served.reference.drift(embeddings, stats)
        drifted = monitoring.verdict(drift, drift_score)

    versions = _versions(totals, labelled, bucket_minutes)
    current = next((v for v in versions if v["version"] == serving), None)
    if current is None:
        current = {"version": serving, **_figures(_zeros(), [0, 0, 0.0]), "buckets": []}
        versions.append(current)
    current["serving"] = True
    versions.sort(key=lambda v: (not v["serving"], -v["predictions"], v["version"]))
    warnings = _warnings(current, reference, drifted, accuracy_drop)
    return {
        "generated_at": _iso(now),
        "hours": hours,
        "bucket_minutes": bucket_minutes,
        "model": identity,
        "headline": monitoring.headline(
            serving if identity["version"] is None else f"v{serving}", hours, current, drifted
        ),
        "status": "warning" if warnings else "ok",
        "drifted": bool(drifted),
        "warnings": warnings,
        "thresholds": {
            "drift_p_value": monitoring.P_VALUE,
            "drift_score": drift_score,
            "stat_distance": monitoring.STAT_DISTANCE,
            "accuracy_drop": accuracy_drop,
            "low_confidence": monitoring.LOW_CONFIDENCE,
            "drift_window": monitoring.WINDOW,
        },
        "reference": reference,
        "drift": drift,
        "versions": versions,
    }


def _versions(totals: list[dict], labelled: list[dict], bucket_minutes: int) -> list[dict]:
    """Per model version: its window's figures and its buckets' (`totals` come summed per
    bucket, keyed by its first minute; `labelled` rows go to the same buckets)."""
    rows: dict[str, dict[int, dict]] = {}
    for total in totals:
        rows.setdefault(total["model_version"], {})[total["minute"]] = total
    labels: dict[str, dict[int, list]] = {}
    for row in labelled:
        version = row["model_version"] or UNVERSIONED
        start = int(row["created_at"] // 60) // bucket_minutes * bucket_minutes
        counts = labels.setdefault(version, {}).setdefault(start, [0, 0, 0.0])
        if row["is_digit"]:  # an answered digit: right only when the label is that digit
            counts[0] += row["label"] == row["digit"]
            counts[1] += 1
            counts[2] += row["confidence"]
    versions = []
    for version in sorted(set(rows) | set(labels)):
        buckets, version_labels = rows.get(version, {}), labels.get(version, {})
        whole = _zeros()
        for bucket in buckets.values():
            for key in whole:
                whole[key] += bucket[key]
        labelled_whole = [sum(c[i] for c in version_labels.values()) for i in range(3)]
        summary = {"version": version, "serving": False, **_figures(whole, labelled_whole)}
        summary["buckets"] = [
            {
                "start": _iso(start * 60),
                **_figures(buckets.get(start, _zeros()), version_labels.get(start, [0, 0, 0.0])),
            }
            for start in sorted(set(buckets) | set(version_labels))
        ]
        versions.append(summary)
    return versions


def _zeros() -> dict:
    return dict.fromkeys((c.name for c in monitor_table.columns if not c.primary_key), 0)


def _figures(total: dict, labels: list) -> dict:
    """A bucket's (or a window's) figures from its summed totals and its labels (right,
    labelled, sum of their confidences)."""
    n = total["predictions"]
    digits = n - total["not_digit"]
    return {
        "predictions": n,
        "answered": digits,
        "not_digit_share": _share(total["not_digit"], n),
        "low_confidence_share": _share(total["low_confidence"], digits),
        "inverted_share": _share(total["inverted"], n),
        "estimated_accuracy": _share(total["confidence"], digits),
        "measured": monitoring.accuracy(*labels),
        "confidence": monitoring.shares(
            [total[f"confidence_{i}"] for i in range(monitoring.CONFIDENCE_BINS)]
        ),
        "digits": monitoring.shares([total[f"digit_{d}"] for d in range(10)]),
        "stats": {name: _share(total[name], n) for name in monitoring.IMAGE_STATS},
    }


def _warnings(
    current: dict, reference: dict | None, drifted: list[str] | None, accuracy_drop: float
) -> list[str]:
    warnings = []
    if drifted:
        warnings.append("input drift: " + ", ".join(drifted))
    if reference is None:
        return warnings
    expected, estimated = reference["estimated_accuracy"], current["estimated_accuracy"]
    if current["answered"] >= MIN_ESTIMATE_INPUTS and estimated < expected - accuracy_drop:
        warnings.append(
            f"estimated accuracy {estimated:.1%} is more than {accuracy_drop:.0%} below "
            f"the {expected:.1%} expected at training time"
        )
    measured = current["measured"]
    if measured["labels"] >= MIN_LABELS and measured["high"] < measured["expected"] - accuracy_drop:
        warnings.append(
            f"measured accuracy {measured['accuracy']:.1%} (at most {measured['high']:.1%}, "
            f"{measured['labels']} labels) is below the {measured['expected']:.1%} its "
            "calibrated confidence promised for the same answers"
        )
    return warnings


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


class Watch:
    """Refreshes the gauges (metrics.ServiceMetrics.show) every `seconds` from `report` of the
    default window, and logs each warning when it first appears and when it clears."""

    def __init__(self, compute, metrics, seconds: float):
        self.compute, self.metrics, self.seconds = compute, metrics, seconds
        self._warnings: set[str] = set()
        threading.Thread(target=self._run, name="monitor", daemon=True).start()

    def _run(self) -> None:
        while True:
            self.refresh()
            time.sleep(self.seconds)

    def refresh(self) -> dict | None:
        try:
            figures = self.compute()
            self.metrics.show(figures)
        except Exception as err:  # the next refresh tries again; serving goes on
            self.metrics.show(None)  # unknown, not the last figures: an alert must not hang on
            if isinstance(err, StoreError):
                log.warning("monitor: cannot read the prediction store: %s", err)
            else:
                log.exception("monitor: refresh failed")
            return None
        warnings = set(figures["warnings"])
        for warning in sorted(warnings - self._warnings):
            log.warning("monitor: %s", warning)
        if self._warnings and not warnings:
            log.info("monitor: back to normal (%s)", figures["headline"])
        self._warnings = warnings
        return figures
