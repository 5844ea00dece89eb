"""The prediction log and feedback queue: a SQLite file by default, PostgreSQL for many replicas.

Every /predict is recorded (input, probabilities, uncertainty); users attach labels to
predictions; the ingestion job moves validated labels into the DVC-versioned dataset.

`PredictionStore(location)` takes a file path (SQLite in WAL mode, one machine) or a
`postgresql://` URL (one database for every replica). The queries are written once with
SQLAlchemy Core, which compiles them for either engine: it is already installed (MLflow's
tracking store is built on it), and it pools connections, so there is no second code path per
backend. PostgreSQL is reached through psycopg 3.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

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
    # Stress-test noise added to the input (added after the first release: see _migrate).
    sa.Column("noise", sa.Float(53), nullable=False, server_default="0"),
)
feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column(
        "prediction_id", sa.String, sa.ForeignKey("predictions.id"), nullable=False, unique=True
    ),
    sa.Column("label", sa.Integer, sa.CheckConstraint("label BETWEEN 0 AND 9"), nullable=False),
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
P, F = predictions.c, feedback.c
# Predictions nobody has labelled: the review queue's candidates, and what retention drops.
UNLABELLED = ~sa.exists().where(F.prediction_id == P.id)

STRATEGIES = {
    # Ordering of "least sure first" for each active-learning query.
    "entropy": P.entropy.desc(),
    "margin": P.margin.asc(),
    "least_confidence": P.confidence.asc(),
}


class StoreError(RuntimeError):
    """The store cannot be written (disk full, read-only, locked, database down); predictions
    go on without it."""


class RowRefused(StoreError):
    """The store refused a row for good (it breaks a constraint): trying again will not help."""


class UnknownPrediction(KeyError):
    pass


def uncertainty(probabilities: Sequence[float]) -> tuple[float, float]:
    """(entropy in nats, margin between the top two probabilities). In plain Python: on ten
    numbers, numpy's per-call overhead is most of the cost."""
    p = [min(max(x, 1e-12), 1.0) for x in probabilities]
    second, first = sorted(p)[-2:]
    return -math.fsum(x * math.log(x) for x in p), first - second


# Under steady writes a PASSIVE checkpoint never finds the write-ahead log without a commit in
# flight, so SQLite never rewinds the log and it grows for as long as the load lasts. Past this
# size the upkeep waits for a gap between two commits to rewind it (RESTART), and SQLite
# truncates the file back to this size.
WAL_LIMIT_BYTES = 16 * 1024 * 1024


def engine_for(location: str | Path, checkpoints: bool = True) -> sa.Engine:
    """A SQLAlchemy engine for a file path, a `file:` URI (SQLite) or a database URL.

    Without `checkpoints`, a SQLite commit never checkpoints the write-ahead log itself: the
    owner of the engine does (PredictionStore's upkeep)."""
    location = str(location)
    if location.startswith(("postgresql://", "postgres://")):
        # psycopg 3, not SQLAlchemy's default (psycopg2), for a plain postgresql:// URL.
        url = sa.make_url(location).set(drivername="postgresql+psycopg")
        # pre_ping: a replica outlives a database restart (a stale pooled connection is
        # replaced, not handed to a request).
        return sa.create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=8)
    if location.startswith(("postgresql+", "sqlite:")):
        return sa.create_engine(location)
    uri = location.startswith("file:")  # e.g. file:/var/db.sqlite?mode=ro
    if not uri:
        Path(location).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        "sqlite+pysqlite://",
        creator=lambda: sqlite3.connect(location, timeout=10, check_same_thread=False, uri=uri),
        # A pool of connections each used by one thread at a time, as for any file database.
        # (For a URL without a file SQLAlchemy would pick SingletonThreadPool, which closes
        # connections that other threads still use: workers crashed under load.)
        poolclass=sa.pool.QueuePool,
    )

    @sa.event.listens_for(engine, "connect")
    def _sqlite_pragmas(conn, _record) -> None:
        _write_ahead_log(conn)
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives app crashes
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        if not checkpoints:
            conn.execute("PRAGMA wal_autocheckpoint=0")

    return engine


def _write_ahead_log(conn: sqlite3.Connection, patience: float = 10.0) -> None:
    """Put the file in write-ahead-log mode (it stays so). When two processes switch a new
    file at once, SQLite answers the loser "database is locked" at once, without its busy
    timeout (waiting could deadlock), so the loser tries again until the winner is done."""
    deadline = time.monotonic() + patience
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


@dataclass
class FeedbackResult:
    feedback_id: str
    prediction_id: str
    label: int
    status: str
    replaced: bool
    previous_label: int | None

    def reply(self) -> dict:
        """What /feedback answers; the earlier label only when this one replaced it."""
        reply = dataclasses.asdict(self)
        if not self.replaced:
            del reply["previous_label"]
        return reply


class PredictionStore:
    """Thread-safe, and safe for many processes and replicas writing at once.

    Upkeep is SQLite's checkpoints (copying the write-ahead log into the database file, with an
    fsync) and retention. The commit that comes due pays for it; with `external_upkeep`, the
    owner calls `upkeep()` instead (a server's journal writer, between its commits).
    """

    def __init__(
        self,
        location: str | Path,
        max_predictions: int = 100_000,
        max_original_bytes: int = 256 * 1024,
        external_upkeep: bool = False,
    ):
        self.max_predictions = max_predictions
        self.max_original_bytes = max_original_bytes
        self._inserts = self._retained_at = 0
        self._count_lock = threading.Lock()
        self.path = _shown(location)
        try:
            self.engine = engine_for(location, checkpoints=not external_upkeep)
            self._insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[
                self.engine.dialect.name
            ]
            _create_schema(self.engine)
            # A row already there is left as it is: a retried insert adds nothing twice.
            self._log = self._insert(predictions).on_conflict_do_nothing(index_elements=["id"])
        except (OSError, sa.exc.SQLAlchemyError, KeyError) as err:
            raise StoreError(
                f"prediction store {self.path} cannot be opened for writing: {_cause(err)}"
            ) from err
        self.external_upkeep = external_upkeep

    def close(self) -> None:
        self.engine.dispose()

    def upkeep(self) -> None:
        """Checkpoint, and enforce retention when it is due."""
        try:
            if self.engine.dialect.name == "sqlite":
                self._checkpoint()
            if self._retention_due():
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
        """One transaction; any database failure becomes one StoreError."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except sa.exc.SQLAlchemyError as err:  # disk full, read-only, I/O, locked, down
            raise self._unusable(err) from err

    def log_prediction(self, *args, **kwargs) -> None:
        """Log one prediction (the arguments of `record`)."""
        self.insert([self.record(*args, **kwargs)])

    def record(
        self,
        prediction_id: str,
        input_png: bytes,
        probabilities: Sequence[float] | np.ndarray,
        inverted: bool,
        model_version: str | None,
        original: bytes | None = None,
        noise: float = 0.0,
    ) -> dict:
        """A prediction as a row of the log (see `insert`); `probabilities` as Python floats
        (an array is converted here)."""
        p = probabilities.tolist() if isinstance(probabilities, np.ndarray) else probabilities
        entropy, margin = uncertainty(p)
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
        }

    def insert(self, records: list[dict]) -> None:
        """Log predictions (rows from `record`) in one transaction: all of them, or none."""
        try:
            with self.engine.begin() as conn:
                conn.execute(self._log, records)
        except (sa.exc.IntegrityError, sa.exc.DataError) as err:  # a bad row
            raise RowRefused(f"prediction store {self.path} refused: {_cause(err)}") from err
        except sa.exc.SQLAlchemyError as err:  # disk full, read-only, I/O, locked, down
            raise self._unusable(err) from err
        with self._count_lock:
            self._inserts += len(records)
        if not self.external_upkeep and self._retention_due():
            self._enforce_retention()

    def _retention_due(self) -> bool:
        """Whether a thousand rows went in since retention last ran; if so, it is now run's."""
        with self._count_lock:
            if self._inserts - self._retained_at < 1000:
                return False
            self._retained_at = self._inserts
            return True

    def _unusable(self, err: Exception) -> StoreError:
        return StoreError(f"prediction store {self.path} is not usable: {_cause(err)}")

    def insert_each(self, records: list[dict]) -> list[StoreError | None]:
        """Log predictions in one transaction if they all go in (group commit); if the store
        refuses one of them, each alone, so one bad row never fails its neighbours. Says per
        row what kept it out."""
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
            # Counting is cheap (an index scan); the delete is not, and under the cap (the
            # usual case) it would only hold the write lock for nothing.
            logged = conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar()
            if logged > self.max_predictions:
                conn.execute(sa.delete(predictions).where(UNLABELLED, P.created_at <= cutoff))

    def add_feedback(
        self, prediction_id: str, label: int, comment: str | None = None, client: str | None = None
    ) -> FeedbackResult:
        """Label a prediction. Idempotent; a new label for the same prediction replaces the old.

        Safe when replicas label the same prediction at once: the insert that loses the race
        on the unique prediction_id does nothing, and that call then sees the winner's row.
        """
        now = time.time()
        with self._transaction() as conn:
            if conn.execute(sa.select(P.id).where(P.id == prediction_id)).first() is None:
                raise UnknownPrediction(prediction_id)
            feedback_id = uuid.uuid4().hex
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
                return FeedbackResult(feedback_id, prediction_id, label, "pending", False, None)
            feedback_id, old_label, old_status = conn.execute(
                sa.select(F.id, F.label, F.status).where(F.prediction_id == prediction_id)
            ).one()
            if old_label == label:  # the same answer again (a double click): nothing changes
                return FeedbackResult(feedback_id, prediction_id, label, old_status, False, None)
            # A changed mind goes back to pending, even if the old label was already ingested:
            # ingestion then reconciles the dataset with the newest label.
            conn.execute(
                sa.update(feedback)
                .where(F.id == feedback_id)
                .values(label=label, comment=comment, status="pending", reason=None, updated_at=now)
            )
            return FeedbackResult(feedback_id, prediction_id, label, "pending", True, old_label)

    def review_queue(self, k: int, strategy: str) -> list[dict]:
        """The k unlabelled predictions the model is least sure of (the active-learning query).

        Stress-test inputs (noise added on purpose) are not candidates: their doubt is made up.
        """
        query = (
            sa.select(
                P.id.label("prediction_id"),
                P.created_at,
                P.digit,
                P.confidence,
                P.probabilities,
                P.entropy,
                P.margin,
                P.input_png,
            )
            .where(UNLABELLED, P.noise == 0)
            .order_by(STRATEGIES[strategy], P.id)
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


# Any constant that other applications sharing the database do not use for their own locks.
SCHEMA_LOCK_KEY = int.from_bytes(b"digitops", "big") >> 1


def _create_schema(engine: sa.Engine) -> None:
    """Create the tables, or bring them up to this schema, one process at a time.

    Every worker of a server opens the store as it starts, and every replica of a cluster too.
    Checking for a table and then creating it is a race: on a new store the loser fails
    (PostgreSQL: a duplicate `pg_type` key; SQLite: "table already exists" or "database is
    locked"), and its worker would serve without a store. So each first takes a lock
    (PostgreSQL: an advisory lock only this asks for; SQLite: the write lock), and the
    others then find the tables made."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            # Held until the transaction ends; readers and writers of the tables never wait.
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(SCHEMA_LOCK_KEY)))
        else:
            # SQLite's write lock, before the check for tables (Python's sqlite3 would not
            # open a transaction for DDL at all); a second process waits its busy timeout.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        metadata.create_all(conn)
        _migrate(conn)
        conn.commit()


def _migrate(conn: sa.Connection) -> None:
    """Bring a store made by an earlier release up to this schema: add the columns it lacks
    (each new column has a default, so old rows stay valid)."""
    inspector = sa.inspect(conn)
    for table in metadata.sorted_tables:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in have:
                spec = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
                conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {spec}"))


def _shown(location: str | Path) -> str:
    """The store's location for messages and logs: a URL without its password."""
    location = str(location)
    if "://" in location:
        return sa.make_url(location).render_as_string(hide_password=True)
    return location


def _cause(err: BaseException) -> str:
    """The database's own words, without SQLAlchemy's statement dump and help link."""
    original = getattr(err, "orig", None)
    return str(original or err).strip().splitlines()[0]
