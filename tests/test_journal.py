"""The prediction journal: rows a reply called logged reach the store, even when the worker
that journaled them dies or the store is down for a while; a refused row is reported."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from digitops.inference import journal as journal_module
from digitops.inference.journal import PredictionJournal, recover
from digitops.inference.predictor import new_prediction_id
from digitops.inference.store import PredictionStore, StoreError, UnknownPrediction


def rows(store: PredictionStore, n: int) -> list[dict]:
    return [
        store.record(new_prediction_id(), b"png", [0.9] + [0.01] * 9, False, "7", b"upload")
        for _ in range(n)
    ]


def journal_for(store: PredictionStore, directory: Path, lost: list | None = None):
    return PredictionJournal(store, directory, lambda: lost.append(1) if lost is not None else 0)


def test_rows_reach_the_store_behind_the_append_and_the_journal_empties(tmp_path):
    store = PredictionStore(tmp_path / "p.db")
    journal = journal_for(store, tmp_path / "j")
    assert journal.append(rows(store, 3)) is None
    assert journal.read(store.stats)["predictions"] == 3  # a read waits for them
    # All of it is in the store: the journal that held it is gone, a new one is empty.
    assert list((tmp_path / "j").glob("*.journal")) == [journal.path]
    assert journal.path.stat().st_size == 0
    journal.close()
    assert not journal.path.exists()


def test_a_dead_workers_rows_go_into_the_store_at_the_next_start(tmp_path):
    """A worker SIGKILLed after replying: its journal outlives it, and the next start moves
    the rows into the store, once."""
    db, directory = tmp_path / "p.db", tmp_path / "j"
    PredictionStore(db).close()
    # A worker whose store takes nothing (so every row stays journaled), killed mid-work.
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from digitops.inference.journal import PredictionJournal\n"
        "from digitops.inference.store import PredictionStore, StoreError\n"
        "from tests.test_journal import rows\n"
        "store = PredictionStore(sys.argv[1])\n"
        "store.insert_each = lambda rows: [StoreError('down')] * len(rows)\n"
        "journal = PredictionJournal(store, Path(sys.argv[2]), lambda: None)\n"
        "made = rows(store, 5)\n"
        "assert journal.append(made[:2]) is None and journal.append(made[2:]) is None\n"
        "print(' '.join(r['id'] for r in made), flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(db), str(directory)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == -9, done.stderr
    ids = done.stdout.split()
    store = PredictionStore(db)
    assert len(list(directory.glob("*.journal"))) == 1
    journal = journal_for(store, directory)  # the next worker's start
    assert store.stats()["predictions"] == 5
    assert [store.add_feedback(i, 1, None, "t")["prediction_id"] for i in ids] == ids
    assert list(directory.glob("*.journal")) == [journal.path]
    assert recover(store, directory, lambda: None) == 0  # a live worker's journal is left alone


def test_while_the_store_is_down_rows_wait_in_the_journal_then_go_in(tmp_path):
    store = PredictionStore(tmp_path / "p.db")
    insert, down = store.insert_each, threading.Event()
    down.set()
    store.insert_each = lambda r: [StoreError("down")] * len(r) if down.is_set() else insert(r)
    journal = journal_for(store, tmp_path / "j")
    assert journal.append(rows(store, 2)) is None  # the reply may say logged: it is journaled
    assert not journal.flush(timeout=0.3)
    assert sum(path.stat().st_size for path in (tmp_path / "j").glob("*.journal")) > 0
    down.clear()
    assert journal.flush(timeout=5)
    assert store.stats()["predictions"] == 2


def test_a_row_the_store_refuses_is_reported_and_its_neighbours_go_in(tmp_path):
    store, lost = PredictionStore(tmp_path / "p.db"), []
    journal = journal_for(store, tmp_path / "j", lost)
    good = rows(store, 2)
    bad = {**good[0], "id": new_prediction_id(), "digit": None}  # breaks NOT NULL
    assert journal.append([good[0], bad, good[1]]) is None
    assert journal.flush()
    assert store.stats()["predictions"] == 2 and lost == [1]


def test_feedback_waits_for_a_young_prediction_another_worker_is_committing(tmp_path):
    store = PredictionStore(tmp_path / "p.db")
    journal = journal_for(store, tmp_path / "j")
    (row,) = rows(store, 1)
    threading.Timer(0.2, store.insert, [[row]]).start()  # the other worker's commit
    assert journal.add_feedback(row["id"], 3, None, "client")["label"] == 3
    old = "0" * 12 + "ab" * 10  # made in 1970: nobody is committing it
    started = time.monotonic()
    with pytest.raises(UnknownPrediction):
        journal.add_feedback(old, 3, None, "client")
    assert time.monotonic() - started < 1


def test_a_full_disk_refuses_the_append_and_keeps_the_journal_whole(tmp_path):
    store = PredictionStore(tmp_path / "p.db")
    journal = journal_for(store, tmp_path / "j")
    journal._file = open("/dev/full", "ab", buffering=0)  # noqa: SIM115 - writes fail: disk full
    error = journal.append(rows(store, 1))
    assert isinstance(error, StoreError) and "the disk is full" in str(error)
    assert journal.flush() and store.stats()["predictions"] == 0


def test_under_steady_appends_each_journal_is_deleted_once_its_rows_are_committed(tmp_path):
    store = PredictionStore(tmp_path / "p.db")
    journal = journal_for(store, tmp_path / "j")
    paths, made, stop = set(), 0, time.monotonic() + 1.5
    while time.monotonic() < stop:  # never a moment with every row committed
        assert journal.append(rows(store, 1)) is None
        made += 1
        paths.add(journal.path)
        time.sleep(0.001)
    assert journal.read(store.stats)["predictions"] == made
    assert len(paths) > 1
    assert list((tmp_path / "j").glob("*.journal")) == [journal.path]


def test_an_unexpected_error_in_a_commit_does_not_end_the_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "RETRY_SECONDS", 0.05)
    store = PredictionStore(tmp_path / "p.db")
    insert, calls = store.insert_each, []

    def flaky(rows):
        calls.append(len(rows))
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return insert(rows)

    store.insert_each = flaky
    journal = journal_for(store, tmp_path / "j")
    assert journal.append(rows(store, 2)) is None
    assert journal.flush(timeout=5) and store.stats()["predictions"] == 2
    assert len(calls) >= 2
