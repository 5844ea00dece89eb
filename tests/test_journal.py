"""The prediction log's journal: rows are journaled before a reply, committed behind it, and
never lost when the worker dies between the two."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from digitops.inference import journal as journal_module
from digitops.inference.journal import FRAME, PredictionLog, _encode
from digitops.inference.store import PredictionStore, StoreError

PROBS = [0.1] * 10


def rows(store: PredictionStore, *ids: str) -> list[dict]:
    return [
        store.record(i, b"png", PROBS, False, "1", original=b"\x89PNG" + bytes(300)) for i in ids
    ]


def ids(store: PredictionStore) -> set[str]:
    with store.engine.connect() as conn:
        return {r[0] for r in conn.exec_driver_sql("SELECT id FROM predictions")}


def never_lost(row: dict, err: StoreError) -> None:
    pytest.fail(f"{row['id']} lost: {err}")


def test_journaled_rows_reach_the_store_and_the_journal_is_emptied(store_location, tmp_path):
    store = PredictionStore(store_location)
    log = PredictionLog(store, tmp_path / "journal", never_lost)
    for i in range(50):
        assert log.append(rows(store, f"a{i}", f"b{i}")) is None
    assert log.flush(timeout=30)
    assert ids(store) == {f"{p}{i}" for i in range(50) for p in "ab"}
    with store.engine.connect() as conn:  # every field as it went in
        row = conn.exec_driver_sql("SELECT * FROM predictions WHERE id = 'a7'").mappings().one()
    expected = rows(store, "a7")[0]
    assert {**row, "created_at": 0} == {**expected, "created_at": 0}
    journals = list((tmp_path / "journal").glob("*.journal"))
    assert len(journals) == 2 and all(j.stat().st_size == 0 for j in journals)
    log.close()
    assert not list((tmp_path / "journal").glob("*.journal")), "an empty journal is removed"


DIES_AFTER_JOURNALING = """
import os, sys
from digitops.inference import journal as journal_module
from digitops.inference.journal import FRAME, PredictionLog, _encode
from digitops.inference.store import PredictionStore, StoreError

store = PredictionStore(sys.argv[1])
store.insert = lambda rows: (_ for _ in ()).throw(StoreError("database is down"))
log = PredictionLog(store, sys.argv[2], lambda row, err: None)
for i in range(5):
    row = store.record(f"journaled{i}", b"png", [0.1] * 10, False, "1", original=b"o" * 9000)
    assert log.append([row]) is None
with open(sys.argv[3], "ab") as f:  # the tail of a record the process died writing
    f.write(b"\\x10\\x00\\x00\\x00\\xff")
os._exit(0)  # as a killed worker: no shutdown, no flush
"""


def test_a_dead_workers_journal_goes_into_the_store_when_the_next_log_opens(tmp_path):
    store = PredictionStore(tmp_path / "p.db")
    journal = tmp_path / "journal"
    journal.mkdir()
    torn = journal / "0-torn.journal"
    subprocess.run(
        [sys.executable, "-c", DIES_AFTER_JOURNALING, str(tmp_path / "p.db"), journal, torn],
        check=True,
        timeout=120,
    )
    assert ids(store) == set(), "the store was down: the rows are only journaled"
    dead = {p: p.read_bytes() for p in journal.glob("*.journal")}
    assert len(dead) == 3  # the dead worker's two, and the torn one
    log = PredictionLog(store, journal, never_lost)
    assert ids(store) == {f"journaled{i}" for i in range(5)}
    assert not set(journal.glob("*.journal")) & set(dead), "recovered journals are removed"
    # A worker that died after its commit, before emptying its journal: recovering the same
    # rows again stores nothing twice.
    for path, data in dead.items():
        path.write_bytes(data)
    PredictionLog(store, journal, never_lost).close()
    log.close()
    assert store.stats()["predictions"] == 5
    assert not list(journal.glob("*.journal"))


def test_a_journal_that_cannot_be_read_is_set_aside_and_the_log_opens(tmp_path):
    store = PredictionStore(tmp_path / "p.db")
    journal = tmp_path / "journal"
    journal.mkdir()
    # Zeros where a power cut left a record's blocks unwritten, then a header that is no JSON.
    (journal / "zeros.journal").write_bytes(bytes(4096))
    (journal / "garbage.journal").write_bytes(FRAME.pack(3, 0) + b"{x}")
    (journal / "columns.journal").write_bytes(_encode({"id": "p", "no such column": 1}))
    log = PredictionLog(store, journal, never_lost)
    assert store.stats()["predictions"] == 0
    assert sorted(p.name for p in journal.glob("*.bad")) == ["columns.journal.bad"]
    log.close()


def test_a_journal_a_dead_worker_never_named_is_removed_and_a_new_one_is_not(tmp_path):
    store = PredictionStore(tmp_path / "p.db")
    journal = tmp_path / "journal"
    journal.mkdir()
    orphan, making = journal / "1-dead-0.journal.new", journal / "2-live-0.journal.new"
    orphan.touch()
    making.touch()  # a worker naming its journal right now
    made = time.time() - journal_module.UNNAMED_SECONDS - 1
    os.utime(orphan, (made, made))
    journal_module.recover(store, journal)
    assert not orphan.exists() and making.exists()


def test_an_idle_writer_recovers_a_journal_left_after_the_log_opened(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "RECOVER_SECONDS", 0.1)
    store = PredictionStore(tmp_path / "p.db")
    log = PredictionLog(store, tmp_path / "journal", never_lost)
    (tmp_path / "journal" / "late.journal").write_bytes(_encode(rows(store, "late")[0]))
    deadline = time.monotonic() + 10
    while ids(store) != {"late"} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ids(store) == {"late"}
    log.close()


def test_a_live_logs_journal_is_not_taken_by_another(tmp_path):
    down = PredictionStore(tmp_path / "p.db")  # the first log's view of the store: down
    down.insert = lambda rows: (_ for _ in ()).throw(StoreError("database is down"))
    first = PredictionLog(down, tmp_path / "journal", never_lost)
    assert first.append(rows(down, "mine")) is None
    store = PredictionStore(tmp_path / "p.db")
    second = PredictionLog(store, tmp_path / "journal", never_lost)
    assert ids(store) == set(), "the second log left the first's journal alone"
    del down.insert  # the store is back for the first: its writer's next try puts it in
    assert first.flush(timeout=30) and ids(store) == {"mine"}
    first.close()
    second.close()


def test_closing_commits_what_is_journaled_and_refuses_more(tmp_path):
    store = PredictionStore(tmp_path / "p.db")
    log = PredictionLog(store, tmp_path / "journal", never_lost)
    assert log.append(rows(store, *(f"p{i}" for i in range(100)))) is None
    log.close()
    assert store.stats()["predictions"] == 100
    assert "closed" in str(log.append(rows(store, "late")))


def test_a_journal_that_cannot_be_written_refuses_the_rows_whole(tmp_path):
    store = PredictionStore(tmp_path / "p.db")
    log = PredictionLog(store, tmp_path / "journal", never_lost)
    os.close(log._current.fd)  # as a file the process can no longer write
    log._current.fd = os.open(os.devnull, os.O_RDONLY)
    error = log.append(rows(store, "p"))
    assert isinstance(error, StoreError) and "journal" in str(error)
    log.close()  # commits every row that was journaled: this one was not
    assert ids(store) == set()


def test_the_journal_directory_is_one_per_store(tmp_path):
    from digitops.inference.settings import Settings, journal_directory

    sqlite = Settings(predictions_db=str(tmp_path / "p.db"))
    assert journal_directory(sqlite) == tmp_path / "p.db.journal"
    one, other = (Settings(predictions_db=f"postgresql://h/{db}") for db in ("a", "b"))
    assert journal_directory(one) != journal_directory(other)
    assert str(journal_directory(Settings(prediction_journal="/j"))) == "/j"
