"""The prediction log and feedback queue: one SQLite file in WAL mode.

Every /predict is recorded (input, probabilities, uncertainty); users attach labels to
predictions; the ingestion job moves validated labels into the DVC-versioned dataset.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id            TEXT PRIMARY KEY,
    created_at    REAL NOT NULL,
    input_png     BLOB NOT NULL,              -- the 28x28 model input
    original      BLOB,                       -- the upload, when under the size cap
    probabilities TEXT NOT NULL,              -- JSON list of 10
    digit         INTEGER NOT NULL,
    confidence    REAL NOT NULL,
    entropy       REAL NOT NULL,
    margin        REAL NOT NULL,
    inverted      INTEGER NOT NULL,
    model_version TEXT,
    noise         REAL NOT NULL DEFAULT 0     -- stress-test noise added to the input
);
CREATE INDEX IF NOT EXISTS predictions_created ON predictions(created_at);
CREATE TABLE IF NOT EXISTS feedback (
    id            TEXT PRIMARY KEY,
    prediction_id TEXT NOT NULL UNIQUE REFERENCES predictions(id),
    label         INTEGER NOT NULL CHECK (label BETWEEN 0 AND 9),
    comment       TEXT,
    client        TEXT,
    status        TEXT NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'ingested', 'merged', 'rejected')),
    reason        TEXT,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_status ON feedback(status);
"""

STRATEGIES = {
    # SQL ordering of "least sure first" for each active-learning query.
    "entropy": "p.entropy DESC",
    "margin": "p.margin ASC",
    "least_confidence": "p.confidence ASC",
}


class StoreError(RuntimeError):
    """The store cannot be written (disk full, read-only, locked); predictions go on without it."""


class UnknownPrediction(KeyError):
    pass


def uncertainty(probabilities: np.ndarray) -> tuple[float, float]:
    """(entropy in nats, margin between the top two probabilities)."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    top2 = np.sort(p)[-2:]
    return float(-(p * np.log(p)).sum()), float(top2[1] - top2[0])


@dataclass
class FeedbackResult:
    feedback_id: str
    prediction_id: str
    label: int
    status: str
    replaced: bool
    previous_label: int | None


class PredictionStore:
    """Thread-safe; one connection guarded by a lock (SQLite allows one writer at a time anyway)."""

    def __init__(
        self, path: str | Path, max_predictions: int = 100_000, max_original_bytes: int = 256 * 1024
    ):
        self.path = str(path)
        self.max_predictions = max_predictions
        self.max_original_bytes = max_original_bytes
        self._lock = threading.Lock()
        self._inserts = 0
        uri = self.path.startswith("file:")  # e.g. file:/var/db.sqlite?mode=ro
        try:
            if not uri:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, timeout=10, isolation_level=None, uri=uri
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives app crashes
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise StoreError(
                f"prediction store {self.path} cannot be opened for writing: {err}"
            ) from err

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, params=()) -> sqlite3.Cursor:
        """Every query goes through here: any database failure becomes one StoreError."""
        try:
            return self._db.execute(sql, params)
        except sqlite3.Error as err:  # disk full, read-only file, I/O error, locked, corrupt
            raise StoreError(f"prediction store {self.path} is not usable: {err}") from err

    def log_prediction(
        self,
        prediction_id: str,
        input_png: bytes,
        probabilities: np.ndarray,
        inverted: bool,
        model_version: str | None,
        original: bytes | None = None,
        noise: float = 0.0,
    ) -> None:
        entropy, margin = uncertainty(probabilities)
        if original is not None and len(original) > self.max_original_bytes:
            original = None  # the 28x28 input is always kept; big originals are not
        row = (
            prediction_id,
            time.time(),
            input_png,
            original,
            json.dumps([round(float(p), 6) for p in probabilities]),
            int(np.argmax(probabilities)),
            float(np.max(probabilities)),
            entropy,
            margin,
            int(bool(inverted)),
            model_version,
            float(noise),
        )
        with self._lock:
            self._run("INSERT INTO predictions VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", row)
            self._inserts += 1
            if self._inserts % 1000 == 0:
                self._enforce_retention()

    def _enforce_retention(self) -> None:
        """Drop the oldest predictions nobody labelled once over the cap; labelled ones stay."""
        self._run(
            """DELETE FROM predictions WHERE id IN (
                 SELECT p.id FROM predictions p LEFT JOIN feedback f ON f.prediction_id = p.id
                 WHERE f.id IS NULL ORDER BY p.created_at DESC LIMIT -1 OFFSET ?)""",
            (self.max_predictions,),
        )

    def add_feedback(
        self, prediction_id: str, label: int, comment: str | None = None, client: str | None = None
    ) -> FeedbackResult:
        """Label a prediction. Idempotent; a new label for the same prediction replaces the old."""
        now = time.time()
        with self._lock:
            exists = self._run(
                "SELECT 1 FROM predictions WHERE id = ?", (prediction_id,)
            ).fetchone()
            if not exists:
                raise UnknownPrediction(prediction_id)
            previous = self._run(
                "SELECT id, label, status FROM feedback WHERE prediction_id = ?", (prediction_id,)
            ).fetchone()
            if previous is None:
                feedback_id = uuid.uuid4().hex
                self._run(
                    "INSERT INTO feedback (id, prediction_id, label, comment, client, status,"
                    " created_at, updated_at) VALUES (?,?,?,?,?, 'pending', ?, ?)",
                    (feedback_id, prediction_id, label, comment, client, now, now),
                )
                return FeedbackResult(feedback_id, prediction_id, label, "pending", False, None)
            feedback_id, old_label, old_status = previous
            if old_label == label:  # the same answer again (a double click): nothing changes
                return FeedbackResult(feedback_id, prediction_id, label, old_status, False, None)
            # A changed mind goes back to pending, even if the old label was already ingested:
            # ingestion then reconciles the dataset with the newest label.
            self._run(
                "UPDATE feedback SET label = ?, comment = ?, status = 'pending', reason = NULL,"
                " updated_at = ? WHERE id = ?",
                (label, comment, now, feedback_id),
            )
            return FeedbackResult(feedback_id, prediction_id, label, "pending", True, old_label)

    def review_queue(self, k: int, strategy: str) -> list[dict]:
        """The k unlabelled predictions the model is least sure of (the active-learning query).

        Stress-test inputs (noise added on purpose) are not candidates: their doubt is made up.
        """
        order = STRATEGIES[strategy]
        with self._lock:
            rows = self._run(
                f"""SELECT p.id, p.created_at, p.digit, p.confidence, p.probabilities, p.entropy,
                           p.margin, p.input_png
                    FROM predictions p LEFT JOIN feedback f ON f.prediction_id = p.id
                    WHERE f.id IS NULL AND p.noise = 0 ORDER BY {order} LIMIT ?""",
                (k,),
            ).fetchall()
        keys = (
            "prediction_id",
            "created_at",
            "digit",
            "confidence",
            "probabilities",
            "entropy",
            "margin",
            "input_png",
        )
        items = [dict(zip(keys, row, strict=True)) for row in rows]
        for item in items:
            item["probabilities"] = json.loads(item["probabilities"])
        return items

    def stats(self) -> dict:
        with self._lock:
            counts = dict(
                self._run("SELECT status, COUNT(*) FROM feedback GROUP BY status").fetchall()
            )
            predictions = self._run("SELECT COUNT(*) FROM predictions").fetchone()[0]
        return {
            "pending": counts.get("pending", 0),
            "ingested": counts.get("ingested", 0) + counts.get("merged", 0),
            "rejected": counts.get("rejected", 0),
            "predictions": predictions,
        }

    # The ingestion job's side.
    def pending(self) -> list[dict]:
        with self._lock:
            rows = self._run(
                """SELECT f.id, f.prediction_id, f.label, f.updated_at, p.input_png,
                          p.model_version, p.created_at
                   FROM feedback f JOIN predictions p ON p.id = f.prediction_id
                   WHERE f.status = 'pending' ORDER BY f.updated_at"""
            ).fetchall()
        keys = (
            "feedback_id",
            "prediction_id",
            "label",
            "updated_at",
            "input_png",
            "model_version",
            "predicted_at",
        )
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def mark(
        self,
        feedback_id: str,
        status: str,
        reason: str | None = None,
        if_updated_at: float | None = None,
    ) -> bool:
        """Set a feedback item's status; with if_updated_at, only if nobody relabelled it since."""
        sql = "UPDATE feedback SET status = ?, reason = ? WHERE id = ?"
        params: tuple = (status, reason, feedback_id)
        if if_updated_at is not None:
            sql += " AND updated_at = ?"
            params += (if_updated_at,)
        with self._lock:
            return self._run(sql, params).rowcount == 1
