"""The prediction log, written behind the replies.

A reply waits for its rows to reach a local journal file (one append), not for the store's
commit; a thread commits them to the store in groups. A journaled row survives the process (it
is in the page cache), as a SQLite commit in WAL mode with synchronous=NORMAL does.

Each worker appends to a journal file of its own, locked (flock) while it lives; when the
writer takes the rows, later ones go to a new file, and the old one is deleted once its rows
are committed. A journal whose lock is free belongs to a dead worker: the next one to start
moves its rows into the store (a row inserted twice is kept once) and deletes it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from digitops.inference.settings import Settings
from digitops.inference.store import (
    PredictionStore,
    RowRefused,
    StoreError,
    UnknownPrediction,
)

log = logging.getLogger("bentoml.digitops")
T = TypeVar("T")

# Rows journaled within this long of each other share one commit.
GROUP_SECONDS = 0.02
# While the store refuses every write (down, disk full), the writer tries again this often.
RETRY_SECONDS = 1.0
# Between commits the writer does the store's upkeep (checkpoints, retention) this often.
UPKEEP_SECONDS = 1.0
# Journaled rows not yet in the store, at most: past this (the store is down) a reply says
# `logged: false` rather than hold more in memory.
MAX_BACKLOG_ROWS = 10_000
# How long a read of the store waits for this worker's journaled rows, and feedback on a
# prediction the store lacks waits for one made this recently (by another worker or replica).
CATCH_UP_SECONDS = 2.0
BYTES_FIELDS = ("input_png", "original")
SIZES = struct.Struct("<IIi")


def open_log(settings: Settings, on_lost: Callable[[], None]) -> PredictionJournal | None:
    """The store and its journal; None if either cannot be opened (predictions go on). Each
    store has a directory of journals, so that a dead worker's rows go to its own store."""
    location = settings.predictions_db
    directory = Path(f"{location}.journal")
    if "://" in location or location.startswith("file:"):
        directory = Path("var/journal") / hashlib.sha256(location.encode()).hexdigest()[:16]
    try:
        store = PredictionStore(location, settings.max_predictions)
        return PredictionJournal(store, directory, on_lost)
    except StoreError as err:
        log.warning("%s; predictions will not be logged and feedback is disabled", err)
        return None


class PredictionJournal:
    def __init__(self, store: PredictionStore, directory: Path, on_lost: Callable[[], None]):
        self.store, self.on_lost = store, on_lost
        try:
            directory.mkdir(parents=True, exist_ok=True)
            recover(store, directory, on_lost)
            self._file, self.path = _own_journal(directory)
        except OSError as err:
            raise StoreError(f"prediction journal in {directory}: {err.strerror}") from err
        self._size = 0
        self._pending: list[dict] = []  # journaled, not yet taken by the writer
        self._appended = self._settled = 0  # rows journaled; rows committed or reported lost
        self._hurry = self._closing = False
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._writer = threading.Thread(target=self._write_behind, name="log-writer", daemon=True)
        self._writer.start()

    def append(self, rows: list[dict]) -> StoreError | None:
        """Journal `rows` in one write (all of them or none); the error that kept them out."""
        data = b"".join(_encode(row) for row in rows)
        with self._lock:
            if self._appended - self._settled + len(rows) > MAX_BACKLOG_ROWS:
                return StoreError(f"prediction store {self.store.path} is behind; not logged")
            written, reason = 0, "the disk is full"
            try:
                written = self._file.write(data)
            except OSError as err:
                reason = "the disk is full" if err.errno == errno.ENOSPC else err.strerror
            if written != len(data):
                if written:  # the disk filled up mid-write: take the partial record back out
                    self._file.truncate(self._size)
                return StoreError(f"prediction journal {self.path}: {reason}")
            self._size += written
            self._pending += rows
            self._appended += len(rows)
            self._changed.notify_all()
        return None

    def flush(self, timeout: float = CATCH_UP_SECONDS) -> bool:
        """Whether every row journaled before this call is in the store, after waiting up to
        `timeout` for it."""
        with self._lock:
            target, self._hurry = self._appended, True
            self._changed.notify_all()
            return self._changed.wait_for(lambda: self._settled >= target, timeout)

    def read(self, query: Callable[..., T], *args) -> T:
        """`query(*args)` on the store once this worker's journaled rows are in it, so that a
        client sees its own predictions."""
        self.flush()
        return query(*args)

    def add_feedback(self, prediction_id: str, *args) -> dict:
        """`store.add_feedback` once the store can have the prediction: after this worker's
        journaled rows and, for a young prediction, the other workers' and replicas'."""
        caught_up = self.flush()
        while True:
            try:
                return self.store.add_feedback(prediction_id, *args)
            except UnknownPrediction:
                if not caught_up:
                    raise StoreError("journaled predictions are waiting for the store") from None
                if time.time() - _made_at(prediction_id) > CATCH_UP_SECONDS:
                    raise
                time.sleep(GROUP_SECONDS)

    def close(self) -> None:
        """Commit what is journaled, delete the journal if all of it went in, close the store."""
        with self._lock:
            self._closing = True
            self._changed.notify_all()
        self._writer.join(CATCH_UP_SECONDS * 5)
        with self._lock:
            if self._settled == self._appended:
                self.path.unlink(missing_ok=True)
            self._file.close()  # and its lock: a row still in it goes in at the next start
        self.store.close()

    def _write_behind(self) -> None:
        next_upkeep = time.monotonic() + UPKEEP_SECONDS
        while True:
            with self._lock:
                self._changed.wait_for(lambda: self._pending or self._closing, UPKEEP_SECONDS)
                if self._pending:
                    self._changed.wait_for(lambda: self._hurry or self._closing, GROUP_SECONDS)
                rows, self._pending, self._hurry = self._pending, [], False
                closing = self._closing
                taken = self._next_file() if rows else None
            if rows and not self._settle(rows, taken):
                return  # closing while the store is down: the rows stay journaled
            if closing and not rows:
                return
            if time.monotonic() >= next_upkeep:
                try:
                    self.store.upkeep()
                except Exception:  # as for commits: the writer goes on, upkeep tries again
                    log.exception("prediction store upkeep failed")
                next_upkeep = time.monotonic() + UPKEEP_SECONDS

    def _settle(self, rows: list[dict], taken) -> bool:
        """Commit `rows`, trying again while the store is down, then delete `taken`, the
        journal file that held them; False if closed meanwhile."""
        while not commit(self.store, rows, self.on_lost):
            with self._lock:
                if self._closing:
                    return False
                self._changed.wait(RETRY_SECONDS)
        if taken is not None:
            taken[1].unlink(missing_ok=True)
            taken[0].close()
        with self._lock:
            self._settled += len(rows)
            self._changed.notify_all()
        return True

    def _next_file(self) -> tuple[BinaryIO, Path] | None:
        """Send later appends to a new journal file; the (file, path) that holds the rows just
        taken, or None if no new file could be made (the rows stay in this one, which a later
        call retires)."""
        try:
            file, path = _own_journal(self.path.parent)
        except OSError as err:
            log.warning("prediction journal not renewed: %s", err)
            return None
        taken = self._file, self.path
        self._file, self.path, self._size = file, path, 0
        return taken


def commit(store: PredictionStore, rows: list[dict], on_lost: Callable[[], None]) -> bool:
    """Commit journaled `rows`; False if the store cannot take them now. A row it refuses for
    good is reported lost."""
    try:
        errors = store.insert_each(rows)
    except Exception:  # a bug must not end the writer: the rows wait, and it tries again
        log.exception("committing journaled predictions failed")
        return False
    if any(error is not None and not isinstance(error, RowRefused) for error in errors):
        log.warning("journaled predictions wait for the store: %s", errors[0])
        return False
    for row, error in zip(rows, errors, strict=True):
        if error is not None:
            log.error("prediction %s journaled but refused by the store: %s", row["id"], error)
            on_lost()
    return True


def _own_journal(directory: Path):
    """A new journal file, open for appending and locked (made again if another worker's
    recover() deleted it before the lock)."""
    while True:
        path = directory / f"{os.getpid()}-{secrets.token_hex(4)}.journal"
        file = open(path, "ab", buffering=0)  # noqa: SIM115 - open for the worker's life
        fcntl.flock(file, fcntl.LOCK_EX)
        if path.exists() and os.stat(path).st_ino == os.fstat(file.fileno()).st_ino:
            return file, path
        file.close()


def recover(store: PredictionStore, directory: Path, on_lost: Callable[[], None]) -> int:
    """Move the rows of dead workers' journals in `directory` into the store; how many."""
    moved = 0
    for path in sorted(directory.glob("*.journal")):
        try:
            file = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:  # another worker recovered it meanwhile
            continue
        with file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its worker is alive
                continue
            rows = _decode(file.read(), path)
            if rows and not commit(store, rows, on_lost):
                continue  # the journal stays for the next start
            path.unlink(missing_ok=True)
            moved += len(rows)
    if moved:
        log.info("moved %d journaled predictions of stopped workers into the store", moved)
    return moved


def _encode(row: dict) -> bytes:
    """A record: the sizes of its JSON header and of its images, then all three."""
    header = json.dumps({k: v for k, v in row.items() if k not in BYTES_FIELDS}).encode()
    png, original = row["input_png"], row["original"] or b""
    sizes = SIZES.pack(len(header), len(png), len(original) if row["original"] else -1)
    return b"".join((sizes, header, png, original))


def _decode(data: bytes, path: Path) -> list[dict]:
    rows, at = [], 0
    while at < len(data):
        if at + SIZES.size > len(data):
            break
        header, png, original = SIZES.unpack_from(data, at)
        at += SIZES.size
        end = at + header + png + max(original, 0)
        if end > len(data):
            break
        row = json.loads(data[at : at + header])
        row["input_png"] = data[at + header : at + header + png]
        row["original"] = data[at + header + png : end] if original >= 0 else None
        rows.append(row)
        at = end
    if at < len(data):  # a record cut off by a power cut: no reply acknowledged it
        log.warning("skipped a torn record at the end of %s", path)
    return rows


def _made_at(prediction_id: str) -> float:
    """When a prediction was made, from its time-ordered id (predictor.new_prediction_id)."""
    try:
        return int(prediction_id[:12], 16) / 1000
    except ValueError:
        return 0.0
