"""The prediction store on both engines: SQLite (one machine) and a real PostgreSQL server
(many replicas). Retention, failures, migration, and replicas writing at once."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from digitops.inference import journal as journal_module
from digitops.inference import store as store_module
from digitops.inference.journal import PredictionJournal
from digitops.inference.store import PredictionStore, RowRefused, StoreError, predictions
from tests.conftest import log_prediction
from tests.servers import postgres_server

ROOT = Path(__file__).resolve().parents[1]
PROBS = [0.1] * 10


def ids(store: PredictionStore) -> set[str]:
    with store.engine.connect() as conn:
        return set(conn.execute(sa.select(predictions.c.id)).scalars())


def test_retention_drops_oldest_unlabelled_only(store_location):
    store = PredictionStore(store_location, max_predictions=3)
    for i in range(6):
        log_prediction(store, f"p{i}", b"png", PROBS, False, "1")
    store.add_feedback("p0", 4)
    store._enforce_retention()
    assert ids(store) == {"p0", "p3", "p4", "p5"}


def test_read_only_sqlite_store_raises_store_error(tmp_path):
    path = tmp_path / "p.db"
    PredictionStore(path).close()
    with pytest.raises(StoreError, match="not usable|cannot be opened"):
        store = PredictionStore(f"file:{path}?mode=ro")
        log_prediction(store, "id", b"png", PROBS, False, "1")


@pytest.mark.slow  # starts PostgreSQL
def test_a_database_that_is_down_raises_store_error_naming_it(postgres):
    with pytest.raises(StoreError, match="cannot be opened") as err:
        PredictionStore(f"postgresql://digitops:secret@127.0.0.1:{postgres.port + 1}/nowhere")
    assert "secret" not in str(err.value)  # the URL is named, its password is not

    with postgres_server() as server:
        store = PredictionStore(server.create_database("gone"))
        log_prediction(store, "before", b"png", PROBS, False, "1")
        server.stop()
        with pytest.raises(StoreError, match="not usable"):
            log_prediction(store, "after", b"png", PROBS, False, "1")


def test_a_store_from_an_earlier_release_is_migrated(tmp_path):
    """Stores made before stress-test noise existed lack its column: it is added at start."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        """CREATE TABLE predictions (id TEXT PRIMARY KEY, created_at REAL NOT NULL,
             input_png BLOB NOT NULL, original BLOB, probabilities TEXT NOT NULL,
             digit INTEGER NOT NULL, confidence REAL NOT NULL, entropy REAL NOT NULL,
             margin REAL NOT NULL, inverted INTEGER NOT NULL, model_version TEXT);
           INSERT INTO predictions VALUES ('old', 1.0, x'00', NULL, '[0.1]', 1, 0.9, 0.1, 0.8,
             0, '1');"""
    )
    old.close()
    store = PredictionStore(path)
    log_prediction(store, "new", b"png", PROBS, False, "2", noise=0.5)
    assert [i["prediction_id"] for i in store.review_queue(10, "entropy")] == ["old"]
    assert store.stats()["predictions"] == 2


def test_feedback_of_an_earlier_release_takes_not_a_digit_after_migration(store_location):
    """Its labels were checked to be 0-9 (a constraint SQLite cannot alter): the table is made
    anew with its rows, on either engine."""
    today = PredictionStore(store_location)  # today's schema, then yesterday's feedback table
    rows = [today.record(p, b"png", PROBS, False, "1") for p in "ab"]
    today.close()
    engine = store_module.engine_for(store_location)
    old = sa.MetaData()
    old_feedback = sa.Table(
        "feedback",
        old,
        *(c.copy() for c in store_module.feedback.columns if c.name != "label"),
        sa.Column("label", sa.Integer, sa.CheckConstraint("label BETWEEN 0 AND 9"), nullable=False),
    )
    with engine.begin() as conn:
        store_module.feedback.drop(conn)
        old_feedback.create(conn)
        conn.execute(sa.insert(predictions), rows)
        row = {"id": "f", "prediction_id": "a", "label": 7, "status": "pending"}
        conn.execute(sa.insert(old_feedback).values(**row, created_at=1.0, updated_at=1.0))
    engine.dispose()
    store = PredictionStore(store_location)
    assert store.add_feedback("b", 10)["label"] == 10  # NOT_A_DIGIT
    assert sorted(item["label"] for item in store.pending()) == [7, 10]
    with pytest.raises(RowRefused):
        store.add_feedback("a", 11)


def test_a_row_is_the_same_from_floats_or_from_an_array(tmp_path):
    store = PredictionStore(tmp_path / "p.db")
    try:
        floats = [0.02] * 9 + [0.82]
        rows = [
            store.record("p", b"png", probabilities, False, "1")
            for probabilities in (floats, np.asarray(floats))
        ]
    finally:
        store.close()
    keys = ("probabilities", "digit", "confidence", "entropy", "margin")
    assert [rows[0][k] for k in keys] == [rows[1][k] for k in keys]
    assert rows[0]["digit"] == 9 and json.loads(rows[0]["probabilities"])[9] == 0.82


def test_many_threads_share_one_store(store_location):
    """A server's request threads log, label and query at once: every write lands, no error."""
    store = PredictionStore(store_location)

    def work(thread: int) -> int:
        for i in range(150):
            log_prediction(store, f"t{thread}-{i}", b"png", PROBS, False, "1")
            if i % 10 == 0:
                store.add_feedback(f"t{thread}-{i}", thread % 10)
                store.review_queue(20, "entropy")
                store.stats()
        return thread

    with ThreadPoolExecutor(12) as pool:
        assert sorted(pool.map(work, range(12))) == list(range(12))
    assert store.stats() == {"pending": 180, "ingested": 0, "rejected": 0, "predictions": 1800}


def test_insert_each_refuses_a_bad_row_alone_and_stores_a_row_once(store_location):
    store = PredictionStore(store_location)
    log_prediction(store, "again", b"png", PROBS, False, "1")
    bad = {**store.record("bad", b"png", PROBS, False, "1"), "input_png": None}
    rows = [store.record(p, b"new", PROBS, False, "1") for p in ("a", "again")] + [bad]
    rows.append(store.record("b", b"new", PROBS, False, "1"))
    errors = store.insert_each(rows)
    assert errors[:2] == [None, None] and errors[3] is None
    assert isinstance(errors[2], RowRefused)  # this row, and only it
    assert ids(store) == {"again", "a", "b"}
    # A row that is already there stays as it was (a journal replayed after a crash).
    with store.engine.connect() as conn:
        again = conn.exec_driver_sql("SELECT input_png FROM predictions WHERE id = 'again'")
        assert bytes(again.scalar_one()) == b"png"


OPEN_WHEN_TOLD = """
import sys
from digitops.inference.store import PredictionStore, StoreError

print("ready", flush=True)
sys.stdin.readline()
try:
    PredictionStore(sys.argv[1]).close()
    print("opened")
except StoreError as err:
    print(err)
"""


def test_workers_opening_a_new_store_at_once_all_get_it(store_location):
    # Every worker and replica creates the tables if they are missing, as it starts: the
    # ones that lose the race must find them made, not fail and serve without a store.
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_WHEN_TOLD, store_location],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for worker in workers:  # all imported and waiting, then all at once
        assert worker.stdout.readline() == "ready\n"
    for worker in workers:
        worker.stdin.write("go\n")
        worker.stdin.flush()
    said = [worker.communicate(timeout=120)[0].strip() for worker in workers]
    assert said == ["opened"] * 4
    assert PredictionStore(store_location).stats()["predictions"] == 0


REPLICA = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from digitops.inference.store import PredictionStore

location, name, label = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = PredictionStore(location)
shared = [f"shared{i}" for i in range(60)]
own = [f"{name}{i}" for i in range(150)]

def log(pid):
    store.insert([store.record(pid, b"png", [0.05] * 9 + [0.55], False, "1")])

def label_it(pid):
    r = store.add_feedback(pid, label if pid[-1] in "02468" else 3, client=name)
    return pid, r["feedback_id"]

def queue(_):
    return [item["prediction_id"] for item in store.review_queue(40, "margin")]

with ThreadPoolExecutor(4) as pool:  # like a replica's request threads
    queues = pool.map(queue, range(30))
    list(pool.map(log, own))
    labelled = dict(pool.map(label_it, shared))
    queues = list(queues)
print(json.dumps({"labelled": labelled, "queues": queues}))
"""


def test_two_replicas_writing_at_once_lose_nothing_and_duplicate_nothing(store_location):
    store = PredictionStore(store_location)
    for i in range(60):
        log_prediction(store, f"shared{i}", b"png", PROBS, False, "1")
    # Both replicas label the same 60 predictions at once: the same label for the odd ones,
    # different labels (3 and 5) for the even ones.
    replicas = [
        subprocess.Popen(
            [sys.executable, "-c", REPLICA, store_location, name, label],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name, label in (("a", "3"), ("b", "5"))
    ]
    a, b = (json.loads(r.communicate(timeout=300)[0]) for r in replicas)
    assert all(r.returncode == 0 for r in replicas)

    assert ids(store) == {f"shared{i}" for i in range(60)} | {
        f"{r}{i}" for r in "ab" for i in range(150)
    }
    # One feedback row per prediction, whichever replica got there first.
    assert store.stats() == {"pending": 60, "ingested": 0, "rejected": 0, "predictions": 360}
    assert a["labelled"] == b["labelled"], "both calls name the same feedback item"
    for queue in a["queues"] + b["queues"]:
        assert len(queue) == len(set(queue)), "an item handed out twice in one call"


def test_upkeep_checkpoints_and_enforces_retention_off_the_commit_path(tmp_path):
    path = tmp_path / "p.db"
    store = PredictionStore(path, max_predictions=100)
    original = bytes(range(256)) * 64  # 16 KiB per row: the log grows by megabytes
    try:
        store.insert(
            [store.record(f"p{i}", b"png", PROBS, False, "1", original) for i in range(400)]
        )
        # No commit checkpointed: the rows are in the write-ahead log, not the database file.
        assert path.stat().st_size < 1_000_000 < (tmp_path / "p.db-wal").stat().st_size
        store.insert([store.record(f"q{i}", b"png", PROBS, False, "1") for i in range(700)])
        assert store.stats()["predictions"] == 1100
        store.upkeep()
        assert path.stat().st_size > 6_000_000 and store.stats()["predictions"] == 100
    finally:
        store.close()


def test_the_write_ahead_log_stays_bounded_while_commits_never_stop(tmp_path, monkeypatch):
    # A commit every millisecond, as from a busy server, and the journal writer's upkeep beside
    # them: no PASSIVE checkpoint finds the log idle, and without a RESTART past the limit this
    # loop left a 48 MB log for 2,200 rows. With it the log peaks at the limit plus one upkeep
    # interval's commits (1.9 MB; a row writes 20 KB of log). The bound leaves room for the
    # upkeep to run 0.3 s late on a loaded machine.
    path, wal, limit = tmp_path / "p.db", tmp_path / "p.db-wal", 1_000_000
    monkeypatch.setattr(store_module, "WAL_LIMIT_BYTES", limit)
    monkeypatch.setattr(journal_module, "UPKEEP_SECONDS", 0.05)
    store = PredictionStore(path)
    journal = PredictionJournal(store, tmp_path / "journal", lambda: None)
    original = bytes(range(256)) * 16  # 4 KiB per row
    largest, rows, stop = 0, 0, time.monotonic() + 3
    try:
        while time.monotonic() < stop:
            store.insert([store.record(f"p{rows}", b"png", PROBS, False, "1", original)])
            rows += 1
            largest = max(largest, wal.stat().st_size)
            time.sleep(0.001)
    finally:
        journal.close()  # and the store
    assert largest < 8 * limit, f"{rows} rows, a {largest}-byte log"
