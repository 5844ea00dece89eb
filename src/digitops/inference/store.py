"""The prediction log and feedback queue: every /predict's input and probabilities, and the
labels users attach to them, which the ingestion job moves into the DVC-versioned dataset.

`PredictionStore(location)` takes a file path (SQLite in WAL mode, one machine) or a
`postgresql://` URL (psycopg 3; one database for every replica). The queries are written once
with SQLAlchemy Core (MLflow already installs it), which compiles them for either engine.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
import time
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from digitops import monitoring

# A child of BentoML's logger, so that a server's upkeep warnings reach its log.
log = logging.getLogger("bentoml.digitops")

metadata = sa.MetaData()
# Timestamps are seconds since the epoch (double precision): `mark` compares them for equality.
predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("created_at", sa.Float(53), nullable=False, index=True),
    sa.Column("input_png", sa.LargeBinary, nullable=False),  # the 28x28 model input
    sa.Column("original", sa.LargeBinary),  # the upload, when under the size cap
    sa.Column("probabilities", sa.Text, nullable=False),  # JSON list of 10
    sa.Column("digit", sa.Integer, nullable=False),
    sa.Column("confidence", sa.Float(53), nullable=False),
    sa.Column("entropy", sa.Float(53), nullable=False),
    sa.Column("margin", sa.Float(53), nullable=False),
    sa.Column("inverted", sa.Integer, nullable=False),
    sa.Column("model_version", sa.String),
    # Columns added after the first release (see _migrate): stress-test noise added to the
    # input, and how much the input looked like a digit (digitops.scoring).
    sa.Column("noise", sa.Float(53), nullable=False, server_default="0"),
    sa.Column("digit_score", sa.Float(53)),
    sa.Column("is_digit", sa.Integer, nullable=False, server_default="1"),
    # For the Monitor (digitops.monitoring): the input's embedding (JSON list) and statistics.
    sa.Column("embedding", sa.Text),
    sa.Column("ink", sa.Float(53)),
    sa.Column("stroke", sa.Float(53)),
    sa.Column("brightness", sa.Float(53)),
    # The Monitor's newest inputs of one version, even just after a rollout, when that
    # version's are few among the window's rows.
    sa.Index("predictions_version_created", "model_version", "created_at"),
)
# The Monitor's running totals: one row per model version and minute, added to in the
# transaction that logs the predictions, so that GET /monitor reads a few thousand rows
# however many predictions there are. Stress-test inputs (noise added) are left out.
monitor = sa.Table(
    "monitor_minutes",
    metadata,
    sa.Column("model_version", sa.String, primary_key=True),
    sa.Column("minute", sa.Integer, primary_key=True),  # minutes since the epoch
    sa.Column("predictions", sa.Integer, nullable=False),
    sa.Column("not_digit", sa.Integer, nullable=False),
    sa.Column("inverted", sa.Integer, nullable=False),
    sa.Column("ink", sa.Float(53), nullable=False),  # sums: the means are sum / predictions
    sa.Column("stroke", sa.Float(53), nullable=False),
    sa.Column("brightness", sa.Float(53), nullable=False),
    # Of the inputs taken as digits (predictions - not_digit):
    sa.Column("confidence", sa.Float(53), nullable=False),  # the sum of their confidences
    sa.Column("low_confidence", sa.Integer, nullable=False),
    *(
        sa.Column(f"confidence_{i}", sa.Integer, nullable=False)
        for i in range(monitoring.CONFIDENCE_BINS)
    ),
    *(sa.Column(f"digit_{d}", sa.Integer, nullable=False) for d in range(10)),
)
feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column(
        "prediction_id", sa.String, sa.ForeignKey("predictions.id"), nullable=False, unique=True
    ),
    # 0-9, or NOT_A_DIGIT (10): the input is no digit at all.
    sa.Column("label", sa.Integer, sa.CheckConstraint("label BETWEEN 0 AND 10"), nullable=False),
    sa.Column("comment", sa.Text),
    sa.Column("client", sa.String),
    sa.Column(
        "status",
        sa.String,
        sa.CheckConstraint("status IN ('pending', 'ingested', 'merged', 'rejected')"),
        nullable=False,
        server_default="pending",
    ),
    sa.Column("reason", sa.Text),
    sa.Column("created_at", sa.Float(53), nullable=False),
    sa.Column("updated_at", sa.Float(53), nullable=False),
    sa.Index("feedback_status", "status"),
)
P, F, M = predictions.c, feedback.c, monitor.c
# A version-less model (the shipped file) in the Monitor's totals.
UNVERSIONED = "shipped"
# Monitor totals older than this are dropped.
MONITOR_DAYS = 90
# Predictions nobody has labelled: the review queue's candidates, and what retention drops.
UNLABELLED = ~sa.exists().where(F.prediction_id == P.id)

STRATEGIES = {
    # Ordering of "least sure first" for each active-learning query.
    "entropy": P.entropy.desc(),
    "margin": P.margin.asc(),
    "least_confidence": P.confidence.asc(),
}


class StoreError(RuntimeError):
    """The store cannot be written (disk full, read-only, locked, down); predictions go on."""


class RowRefused(StoreError):
    """The store refused a row for good (it breaks a constraint): trying again will not help."""


class UnknownPrediction(KeyError):
    pass


# Under steady writes a PASSIVE checkpoint never finds the write-ahead log without a commit in
# flight, so SQLite never rewinds the log and it grows for as long as the load lasts. Past this
# size the upkeep waits for a gap between two commits to rewind it (RESTART), and SQLite
# truncates the file back to this size.
WAL_LIMIT_BYTES = 16 * 1024 * 1024


def engine_for(location: str | Path) -> sa.Engine:
    """A SQLAlchemy engine for a file path, a `file:` URI (SQLite) or a database URL. SQLite
    commits leave checkpoints of the write-ahead log to PredictionStore.upkeep()."""
    location = str(location)
    if location.startswith(("postgresql://", "postgres://")):
        url = sa.make_url(location).set(drivername="postgresql+psycopg")  # not psycopg2
        # pre_ping: a replica outlives a database restart (stale pooled connections are replaced).
        return sa.create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=8)
    if location.startswith(("postgresql+", "sqlite:")):
        return sa.create_engine(location)
    uri = location.startswith("file:")  # e.g. file:/var/db.sqlite?mode=ro
    if not uri:
        Path(location).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        "sqlite+pysqlite://",
        creator=lambda: sqlite3.connect(location, timeout=10, check_same_thread=False, uri=uri),
        # Not the SingletonThreadPool SQLAlchemy picks here: it closes connections that other
        # threads still use (workers crashed under load).
        poolclass=sa.pool.QueuePool,
    )

    @sa.event.listens_for(engine, "connect")
    def _sqlite_pragmas(conn, _record) -> None:
        _write_ahead_log(conn)
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives app crashes
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        conn.execute("PRAGMA wal_autocheckpoint=0")

    return engine


def _write_ahead_log(conn: sqlite3.Connection, patience: float = 10.0) -> None:
    """Put the file in write-ahead-log mode. Two processes switching a new file at once: SQLite
    answers the loser "database is locked" without waiting, so the loser tries again."""
    deadline = time.monotonic() + patience
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


class PredictionStore:
    """Thread-safe, and safe for many processes and replicas writing at once. Its owner calls
    `upkeep()` now and then (a server's journal writer, between its commits)."""

    def __init__(
        self,
        location: str | Path,
        max_predictions: int = 100_000,
        max_original_bytes: int = 256 * 1024,
    ):
        self.max_predictions = max_predictions
        self.max_original_bytes = max_original_bytes
        self._unretained = 0  # rows inserted since retention last ran (an estimate)
        # For messages and logs: a URL without its password.
        self.path = str(location)
        if "://" in self.path:
            self.path = sa.make_url(self.path).render_as_string(hide_password=True)
        try:
            self.engine = engine_for(location)
            self._insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[
                self.engine.dialect.name
            ]
            _create_schema(self.engine)
            # A row already there is left as it is: a retried insert adds nothing twice.
            self._log = self._insert(predictions).on_conflict_do_nothing(index_elements=["id"])
            adding = self._insert(monitor)
            counts = [c.name for c in monitor.columns if not c.primary_key]
            self._add_totals = adding.on_conflict_do_update(
                index_elements=["model_version", "minute"],
                set_={name: monitor.c[name] + adding.excluded[name] for name in counts},
            )
        except (OSError, sa.exc.SQLAlchemyError, KeyError) as err:
            raise StoreError(
                f"prediction store {self.path} cannot be opened for writing: {_cause(err)}"
            ) from err

    def close(self) -> None:
        self.engine.dispose()

    def upkeep(self) -> None:
        """SQLite's checkpoint, and retention once a thousand rows went in since it last ran."""
        try:
            if self.engine.dialect.name == "sqlite":
                self._checkpoint()
            if self._unretained >= 1000:
                self._unretained = 0
                self._enforce_retention()
        except StoreError as err:  # the next upkeep tries again; predictions go on
            log.warning("prediction store upkeep failed: %s", err)

    def _checkpoint(self) -> None:
        """Copy the write-ahead log into the database file, and rewind the log once it has
        passed WAL_LIMIT_BYTES."""
        with self._transaction() as conn:
            # PASSIVE: copies what no reader still needs, never waiting for a writer.
            _, frames, _ = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
            page_size = conn.exec_driver_sql("PRAGMA page_size").scalar_one()
            if frames * page_size > WAL_LIMIT_BYTES:
                # RESTART: holds new commits back until it has copied the few frames written
                # since the PASSIVE pass and no reader still reads an older snapshot (queries
                # here take milliseconds), so that the next commit starts the log afresh.
                conn.exec_driver_sql("PRAGMA wal_checkpoint(RESTART)")

    @contextmanager
    def _transaction(self):
        """One transaction; a row refused for good becomes RowRefused, any other database
        failure a StoreError."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except (sa.exc.IntegrityError, sa.exc.DataError) as err:  # a bad row
            raise RowRefused(f"prediction store {self.path} refused: {_cause(err)}") from err
        except sa.exc.SQLAlchemyError as err:  # disk full, read-only, I/O, locked, down
            raise StoreError(f"prediction store {self.path} is not usable: {_cause(err)}") from err

    def record(
        self,
        prediction_id: str,
        input_png: bytes,
        probabilities: Sequence[float] | np.ndarray,
        inverted: bool,
        model_version: str | None,
        original: bytes | None = None,
        noise: float = 0.0,
        digit_score: float | None = None,
        is_digit: bool = True,
        embedding: Sequence[float] | None = None,
        stats: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> dict:
        """A prediction as a row of the log (see `insert`); `embedding` and `stats` are the
        input's for the Monitor (monitoring.Reference.embed, monitoring.input_stats)."""
        p = probabilities.tolist() if isinstance(probabilities, np.ndarray) else probabilities
        clipped = [min(max(x, 1e-12), 1.0) for x in p]
        second, first = sorted(clipped)[-2:]
        entropy, margin = -math.fsum(x * math.log(x) for x in clipped), first - second
        digit = max(range(len(p)), key=p.__getitem__)
        if original is not None and len(original) > self.max_original_bytes:
            original = None  # the 28x28 input is always kept; big originals are not
        return {
            "id": prediction_id,
            "created_at": time.time(),
            "input_png": input_png,
            "original": original,
            "probabilities": json.dumps([round(x, 6) for x in p]),
            "digit": digit,
            "confidence": p[digit],
            "entropy": entropy,
            "margin": margin,
            "inverted": int(bool(inverted)),
            "model_version": model_version,
            "noise": float(noise),
            "digit_score": digit_score,
            "is_digit": int(bool(is_digit)),
            "embedding": None
            if embedding is None
            else json.dumps([round(float(x), 4) for x in embedding]),
            **{
                name: float(value)
                for name, value in zip(monitoring.IMAGE_STATS, stats, strict=True)
            },
        }

    def insert(self, records: list[dict]) -> None:
        """Log predictions (rows from `record`) in one transaction, all of them or none, and
        add the ones new to the log to the Monitor's totals."""
        with self._transaction() as conn:
            inserted = set(conn.execute(self._log.returning(P.id), records).scalars())
            totals = minute_totals(r for r in records if r["id"] in inserted)
            if totals:
                conn.execute(self._add_totals, totals)
        self._unretained += len(records)

    def insert_each(self, records: list[dict]) -> list[StoreError | None]:
        """What kept each row out: one transaction for all (group commit), or, if the store
        refuses one of them, one each, so one bad row never fails its neighbours."""
        try:
            self.insert(records)
            return [None] * len(records)
        except RowRefused as err:
            if len(records) == 1:
                return [err]
        except StoreError as err:  # the store is unusable (down, full): for every row alike
            return [err] * len(records)
        outcome: list[StoreError | None] = []
        for record in records:
            outcome += self.insert_each([record])
        return outcome

    def _enforce_retention(self) -> None:
        """Drop the oldest predictions nobody labelled once over the cap; labelled ones stay."""
        # The creation time of the newest unlabelled prediction beyond the cap.
        cutoff = (
            sa.select(P.created_at)
            .where(UNLABELLED)
            .order_by(P.created_at.desc())
            .offset(self.max_predictions)
            .limit(1)
            .scalar_subquery()
        )
        with self._transaction() as conn:
            # Counting is cheap; a delete under the cap would hold the write lock for nothing.
            logged = conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar()
            if logged > self.max_predictions:
                conn.execute(sa.delete(predictions).where(UNLABELLED, P.created_at <= cutoff))
            oldest = int(time.time() // 60) - MONITOR_DAYS * 24 * 60
            conn.execute(sa.delete(monitor).where(M.minute < oldest))
            if self.engine.dialect.name == "sqlite":
                # Statistics for SQLite's planner (PostgreSQL's autovacuum keeps its own):
                # without them, the Monitor's labelled predictions are found by reading the
                # whole window rather than from the few feedback rows (30 days: 390 -> 20 ms).
                conn.exec_driver_sql("PRAGMA analysis_limit=1000")
                conn.exec_driver_sql("ANALYZE")

    def add_feedback(
        self, prediction_id: str, label: int, comment: str | None = None, client: str | None = None
    ) -> dict:
        """Label a prediction; what /feedback answers. Idempotent; a new label for the same
        prediction replaces the old (`replaced`, `previous_label`). Replicas racing on one
        prediction: the losing insert does nothing and sees the winner's."""
        now, feedback_id = time.time(), uuid.uuid4().hex
        result = {"feedback_id": feedback_id, "prediction_id": prediction_id, "label": label}
        result |= {"status": "pending", "replaced": False}
        with self._transaction() as conn:
            if conn.execute(sa.select(P.id).where(P.id == prediction_id)).first() is None:
                raise UnknownPrediction(prediction_id)
            inserted = conn.execute(
                self._insert(feedback)
                .values(
                    id=feedback_id,
                    prediction_id=prediction_id,
                    label=label,
                    comment=comment,
                    client=client,
                    status="pending",
                    created_at=now,
                    updated_at=now,
                )
                .on_conflict_do_nothing(index_elements=["prediction_id"])
            ).rowcount
            if inserted == 1:
                return result
            feedback_id, old_label, old_status = conn.execute(
                sa.select(F.id, F.label, F.status).where(F.prediction_id == prediction_id)
            ).one()
            result["feedback_id"] = feedback_id
            if old_label == label:  # the same answer again (a double click): nothing changes
                return {**result, "status": old_status}
            # A changed mind goes back to pending, even if the old label was already ingested:
            # ingestion then reconciles the dataset with the newest label.
            conn.execute(
                sa.update(feedback)
                .where(F.id == feedback_id)
                .values(label=label, comment=comment, status="pending", reason=None, updated_at=now)
            )
            return {**result, "replaced": True, "previous_label": old_label}

    def review_queue(self, k: int, strategy: str, digits: bool = True) -> list[dict]:
        """The k unlabelled predictions the model is least sure of (the active-learning query);
        not stress-test inputs (noise added on purpose): their doubt is made up. With
        `digits=False`, the inputs judged not a digit instead, the most digit-like first (the
        likeliest to be digits after all)."""
        order = STRATEGIES[strategy] if digits else P.digit_score.desc()
        query = (
            sa.select(
                P.id.label("prediction_id"),
                P.created_at,
                P.digit,
                P.confidence,
                P.probabilities,
                P.entropy,
                P.margin,
                P.digit_score,
                P.input_png,
            )
            .where(UNLABELLED, P.noise == 0, P.is_digit == int(digits))
            .order_by(order, P.id)
            .limit(k)
        )
        with self._transaction() as conn:
            items = [dict(row._mapping) for row in conn.execute(query)]
        for item in items:
            item["probabilities"] = json.loads(item["probabilities"])
        return items

    def stats(self) -> dict:
        with self._transaction() as conn:
            counts = dict(
                conn.execute(sa.select(F.status, sa.func.count()).group_by(F.status)).all()
            )
            logged = conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar()
        return {
            "pending": counts.get("pending", 0),
            "ingested": counts.get("ingested", 0) + counts.get("merged", 0),
            "rejected": counts.get("rejected", 0),
            "predictions": logged,
        }

    # The Monitor's side (GET /monitor).
    def monitor_totals(self, since: float, bucket_minutes: int = 1) -> list[dict]:
        """The Monitor's totals from `since` (seconds since the epoch) on, summed per model
        version and bucket of `bucket_minutes` minutes (`minute`: the bucket's first)."""
        start = (M.minute - M.minute % bucket_minutes).label("minute")
        sums = [sa.func.sum(c).label(c.name) for c in monitor.columns if not c.primary_key]
        query = (
            sa.select(M.model_version, start, *sums)
            .where(M.minute >= int(since // 60))
            .group_by(M.model_version, start)
            .order_by(start)
        )
        with self._transaction() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def recent_inputs(self, model_version: str | None, since: float, k: int) -> list[dict]:
        """The embeddings and statistics of the newest `k` inputs (no stress tests) a model
        version answered since `since`."""
        version = (
            P.model_version.is_(None)
            if model_version is None
            else (P.model_version == model_version)
        )
        query = (
            sa.select(P.embedding, P.ink, P.stroke, P.brightness)
            .where(version, P.created_at >= since, P.noise == 0, P.embedding.is_not(None))
            .order_by(P.created_at.desc())
            .limit(k)
        )
        with self._transaction() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def labelled(self, since: float) -> list[dict]:
        """The predictions made since `since` (no stress tests) that have a feedback label the
        ingestion job did not reject: when, by which model version, what it answered, how sure
        it was and what the label says."""
        query = (
            sa.select(P.created_at, P.model_version, P.digit, P.confidence, P.is_digit, F.label)
            .join(feedback, F.prediction_id == P.id)
            .where(P.created_at >= since, P.noise == 0, F.status != "rejected")
        )
        with self._transaction() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    # The ingestion job's side.
    def pending(self) -> list[dict]:
        query = (
            sa.select(
                F.id.label("feedback_id"),
                F.prediction_id,
                F.label,
                F.updated_at,
                P.input_png,
                P.model_version,
                P.created_at.label("predicted_at"),
            )
            .join(predictions, P.id == F.prediction_id)
            .where(F.status == "pending")
            .order_by(F.updated_at)
        )
        with self._transaction() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def mark(
        self,
        feedback_id: str,
        status: str,
        reason: str | None = None,
        if_updated_at: float | None = None,
    ) -> bool:
        """Set a feedback item's status; with if_updated_at, only if nobody relabelled it since."""
        query = sa.update(feedback).where(F.id == feedback_id)
        if if_updated_at is not None:
            query = query.where(F.updated_at == if_updated_at)
        with self._transaction() as conn:
            return conn.execute(query.values(status=status, reason=reason)).rowcount == 1


def minute_totals(records) -> list[dict]:
    """The Monitor's totals of logged rows (from `record`), one per model version and minute,
    in key order (so that two writers adding to the same rows lock them in one order)."""
    totals: dict[tuple[str, int], dict] = {}
    for r in records:
        if r["noise"]:
            continue
        key = (r["model_version"] or UNVERSIONED, int(r["created_at"] // 60))
        total = totals.get(key)
        if total is None:
            total = totals[key] = dict.fromkeys((c.name for c in monitor.columns), 0)
            total["model_version"], total["minute"] = key
        total["predictions"] += 1
        total["inverted"] += r["inverted"]
        for name in monitoring.IMAGE_STATS:
            total[name] += r.get(name) or 0.0
        if r["is_digit"]:
            confidence = r["confidence"]
            total["confidence"] += confidence
            total["low_confidence"] += confidence < monitoring.LOW_CONFIDENCE
            total[f"confidence_{monitoring.confidence_bin(confidence)}"] += 1
            total[f"digit_{r['digit']}"] += 1
        else:
            total["not_digit"] += 1
    return [totals[key] for key in sorted(totals)]


# Any constant that other applications sharing the database do not use for their own locks.
SCHEMA_LOCK_KEY = int.from_bytes(b"digitops", "big") >> 1


def _create_schema(engine: sa.Engine) -> None:
    """Create the tables, or bring them up to this schema, one process at a time: every worker
    and replica does this as it starts, and on a new store the loser of a check-then-create race
    would fail (a duplicate `pg_type` key, "table already exists") and serve without a store."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            # An advisory lock, held until the transaction ends; the tables' users never wait.
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(SCHEMA_LOCK_KEY)))
        else:
            # The write lock (sqlite3 opens no transaction for DDL); others wait their timeout.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        metadata.create_all(conn)
        _migrate(conn)
        conn.commit()


def _migrate(conn: sa.Connection) -> None:
    """Bring a store made by an earlier release to this schema: add the columns it lacks (each
    has a default), and let its feedback labels say "not a digit"."""
    inspector = sa.inspect(conn)
    for table in metadata.sorted_tables:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in have:
                spec = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
                conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {spec}"))
        for index in table.indexes:  # create_all makes the indexes of new tables only
            index.create(conn, checkfirst=True)
    checks = inspector.get_check_constraints("feedback")
    # PostgreSQL reports it as "(label >= 0) AND (label <= 9)", SQLite as written.
    if any("label" in c["sqltext"] and not re.search(r"\b10\b", c["sqltext"]) for c in checks):
        # SQLite cannot alter a CHECK constraint: the table is made anew, with its rows.
        rows = [dict(row._mapping) for row in conn.execute(sa.select(feedback))]
        feedback.drop(conn)
        feedback.create(conn)
        if rows:
            conn.execute(feedback.insert(), rows)


def _cause(err: BaseException) -> str:
    """The database's own words, without SQLAlchemy's statement dump and help link."""
    original = getattr(err, "orig", None)
    return str(original or err).strip().splitlines()[0]
