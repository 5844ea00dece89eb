"""The prediction log, written behind the replies: a reply waits for its row to reach a local
journal file, and a thread of the log's own commits the rows to the store in groups.

Why: the store's commit was the request path's biggest step after the work itself (0.37 ms of
a 2.4 ms /predict at c=1, README.md "Serving"), and a reply waited for it only so that it could
say truthfully whether its row was kept. An append to a local file keeps that promise for a
fraction of the cost. Once a reply says its row is logged, the row is in the journal - as
durable as a SQLite commit in WAL mode with synchronous=NORMAL: it survives the process, not a
power cut - and it stays there until the store has it. A row the store refuses for good is
reported, never dropped quietly (`on_lost`).

Each worker has two journal files, locked (flock) for as long as it lives, that take turns:
the writer seals the one that holds the rows it is about to commit, appends go to the other
meanwhile, and the sealed one is emptied once its rows are in the store. A journal whose lock
is free belongs to a worker that died; the next log to open in that directory, or an idle
writer's periodic look (RECOVER_SECONDS), moves its rows into the store (inserting a row
twice does nothing, so a crash between commit and emptying costs nothing).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson

from digitops.inference.store import PredictionStore, RowRefused, StoreError

log = logging.getLogger("bentoml.digitops")

# A journal record: the lengths of its JSON header and of its bytes fields, then both.
FRAME = struct.Struct("<II")
# Journaled rows not yet in the store, at most (in bytes of journal): past this, while the
# store is down or behind, a reply says `logged: false` rather than hold more in memory.
MAX_BACKLOG_BYTES = 64 * 1024 * 1024
# Rows journaled within this long of each other share one commit, up to GROUP_ROWS of them.
# With a commit per request, /predict at c=1 was 0.5 ms slower (paired rounds): each commit
# ran beside the next request and took the GIL from it (README.md, "Benchmarks"). A reader of
# the store hurries the writer (`flush`).
GROUP_SECONDS = 0.05
GROUP_ROWS = 256
# The writer's pauses between attempts while the store refuses every write (down, disk full).
RETRY_SECONDS = (0.05, 5.0)
# How often an idle writer looks for journals of dead workers that no log has recovered yet
# (the store was down when the next worker started, or no worker has started since).
RECOVER_SECONDS = 30.0
# A journal still under its first name (`.journal.new`) this long after it was made belongs to
# a worker that died before naming it (a live one names it at once); it never held a row.
UNNAMED_SECONDS = 60.0


class PredictionLog:
    """Rows of the prediction log: journaled at once, committed to `store` in groups."""

    def __init__(
        self,
        store: PredictionStore,
        directory: str | Path,
        on_lost: Callable[[dict, StoreError], None],
        max_backlog_bytes: int = MAX_BACKLOG_BYTES,
    ):
        self.store = store
        self.directory = Path(directory)
        self.on_lost = on_lost
        self.max_backlog_bytes = max_backlog_bytes
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            recover(store, self.directory)
            name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self._files = [_Journal(self.directory / f"{name}-{i}.journal") for i in (0, 1)]
        except OSError as err:
            raise StoreError(f"prediction journal in {self.directory}: {err}") from err
        self._current = self._files[0]
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pending: list[dict] = []  # journaled, not yet taken by the writer
        self._pending_bytes = 0  # their size in the journal
        self._backlog = 0  # bytes journaled and not yet in the store
        self._appended = self._settled = 0  # rows journaled; rows stored or reported lost
        self._hurry = 0  # callers of flush() waiting
        self._closing = False
        self._writer = threading.Thread(target=self._write_behind, name="log-writer", daemon=True)
        self._writer.start()

    def append(self, rows: list[dict]) -> StoreError | None:
        """Journal `rows` (one write: all of them or none); the error that kept them out."""
        frames = b"".join(_encode(row) for row in rows)
        with self._lock:
            if self._closing:
                return StoreError("the prediction log is closed")
            if self._backlog + len(frames) > self.max_backlog_bytes:
                return StoreError(
                    f"prediction store {self.store.path} is behind by {self._backlog} bytes of "
                    "journaled rows"
                )
            try:
                self._current.write(frames)
            except OSError as err:
                return StoreError(f"prediction journal {self._current.path}: {err.strerror}")
            # Only the first row of a group, or a full group, wakes the writer: a wake-up per
            # row would take the GIL from requests for nothing.
            wake = not self._pending or len(self._pending) + len(rows) >= GROUP_ROWS
            self._pending += rows
            self._pending_bytes += len(frames)
            self._backlog += len(frames)
            self._appended += len(rows)
            if wake:
                self._changed.notify_all()
        return None

    def flush(self, timeout: float) -> bool:
        """Wait until every row journaled before this call is in the store (or reported lost);
        False if that took longer than `timeout` seconds."""
        with self._lock:
            target = self._appended
            self._hurry += 1
            self._changed.notify_all()
            try:
                return self._changed.wait_for(lambda: self._settled >= target, timeout)
            finally:
                self._hurry -= 1

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is journaled (for up to `timeout` seconds) and stop; what is left stays
        in the journal for the next log to open here."""
        with self._lock:
            self._closing = True
            self._changed.notify_all()
        self._writer.join(timeout)

    def _write_behind(self) -> None:
        while True:
            with self._lock:
                idle = not self._changed.wait_for(
                    lambda: self._pending or self._closing, RECOVER_SECONDS
                )
            if idle:
                self._recover_others()
                continue
            with self._lock:
                self._changed.wait_for(self._group_ready, GROUP_SECONDS)
                if not self._pending:
                    break  # closing, and everything is in
                rows, taken = self._pending, self._pending_bytes
                self._pending, self._pending_bytes = [], 0
                sealed = self._current
                self._current = self._files[1 - self._files.index(sealed)]
            if not self._commit(rows):
                break  # closing while the store is down: the rows stay journaled
            try:
                sealed.empty()
            except OSError as err:  # its rows are stored: a later recovery adds nothing twice
                log.error("cannot empty journal %s: %s", sealed.path, err)
            with self._lock:
                self._backlog -= taken
                self._settled += len(rows)
                self._changed.notify_all()
        for journal in self._files:  # unlocked: a log opened later takes what is left
            journal.close()

    def _recover_others(self) -> None:
        """Recover dead workers' journals that nobody has yet."""
        try:
            recover(self.store, self.directory)
        except Exception:  # recovery must not end the writer
            log.exception("recovering journals in %s failed", self.directory)

    def _report_lost(self, row: dict, error: StoreError) -> None:
        try:
            self.on_lost(row, error)
        except Exception:  # a bug in the handler must not end the writer
            log.exception("prediction %s refused by the store: %s", row["id"], error)

    def _group_ready(self) -> bool:
        return self._closing or self._hurry > 0 or len(self._pending) >= GROUP_ROWS

    def _commit(self, rows: list[dict]) -> bool:
        """Put `rows` in the store in one transaction, retrying while the store is unusable;
        each row it refuses for good is reported to `on_lost`. False if the log was closed
        before the store took them."""
        pause = RETRY_SECONDS[0]
        while True:
            try:
                errors = self.store.insert_each(rows)
            except Exception as err:  # a bug: retrying would stall every row behind these
                log.exception("prediction log writer failed")
                errors = [RowRefused(f"prediction log failed: {err}")] * len(rows)
            refused, waiting = _sort_out(rows, errors)
            for row, error in refused:
                self._report_lost(row, error)
            if not waiting:
                return True
            log.warning(
                "%d journaled predictions wait for the store (next try in %.2f s): %s",
                len(waiting),
                pause,
                waiting[0][1],
            )
            with self._lock:
                if self._changed.wait_for(lambda: self._closing, pause):
                    return False
            rows, pause = [row for row, _ in waiting], min(pause * 2, RETRY_SECONDS[1])


class _Journal:
    """One journal file, locked while it is ours."""

    def __init__(self, path: Path):
        self.path = path
        # Made under a name that recovery skips, and locked before it takes its own: another
        # worker's recovery would take an unlocked journal for a dead worker's.
        made = path.with_name(path.name + ".new")
        self.fd = os.open(made, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(made, path)
        self.size = 0

    def write(self, data: bytes) -> None:
        """Append `data`, all of it or none."""
        try:
            written = os.write(self.fd, data)
        except OSError:
            os.ftruncate(self.fd, self.size)  # a failed write may have left part of a frame
            raise
        if written < len(data):  # the disk filled up mid-write
            os.ftruncate(self.fd, self.size)
            raise OSError(28, "No space left on device (the disk is full)")
        self.size += written

    def empty(self) -> None:
        os.ftruncate(self.fd, 0)
        self.size = 0

    def close(self) -> None:
        """Unlock; an empty journal is removed, one with rows is left to be recovered."""
        if self.size == 0 and os.fstat(self.fd).st_size == 0:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)


def recover(store: PredictionStore, directory: Path) -> int:
    """Move the rows of the journals in `directory` whose workers are gone into `store`;
    how many. A journal the store cannot take now stays for the next try; one that cannot be
    read at all is set aside as `<name>.bad`, for a person to look at; one that a worker died
    before naming is removed."""
    for path in directory.glob("*.journal.new"):
        with contextlib.suppress(OSError):  # gone meanwhile: another recovery removed it
            if time.time() - path.stat().st_mtime > UNNAMED_SECONDS:
                path.unlink()
    recovered = 0
    for path in sorted(directory.glob("*.journal")):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:  # another worker recovered it meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its worker is alive, or another is recovering it
            os.close(fd)
            continue
        try:
            recovered += _recover_one(store, path, fd)
        except Exception:  # one bad journal must not keep a worker from starting
            log.exception("journal %s cannot be recovered; set aside as %s.bad", path, path.name)
            with contextlib.suppress(OSError):
                path.rename(path.with_name(path.name + ".bad"))
        finally:
            os.close(fd)
    if recovered:
        log.info("moved %d predictions from stopped workers' journals into the store", recovered)
    return recovered


def _recover_one(store: PredictionStore, path: Path, fd: int) -> int:
    with os.fdopen(os.dup(fd), "rb") as f:
        rows = list(_decode(f.read(), path))
    refused, waiting = _sort_out(rows, store.insert_each(rows) if rows else [])
    if waiting:
        log.warning("journal %s waits for the store: %s", path, waiting[0][1])
        return 0
    for row, error in refused:
        log.error("journaled prediction %s refused by the store: %s", row["id"], error)
    path.unlink(missing_ok=True)
    return len(rows) - len(refused)


def _sort_out(rows: list[dict], errors: list[StoreError | None]) -> tuple[list, list]:
    """The (row, error) pairs of `insert_each`'s outcome that the store refused for good, and
    those that wait for it (it is down or full)."""
    failed = [(row, error) for row, error in zip(rows, errors, strict=True) if error is not None]
    refused = [(row, error) for row, error in failed if isinstance(error, RowRefused)]
    return refused, [(row, error) for row, error in failed if not isinstance(error, RowRefused)]


def _encode(row: dict) -> bytes:
    """A row as one journal record; its bytes fields (images) go raw, after a JSON header."""
    blobs = {k: v for k, v in row.items() if isinstance(v, bytes)}
    fields = {k: v for k, v in row.items() if not isinstance(v, bytes)}
    header = orjson.dumps({"fields": fields, "blobs": [[k, len(v)] for k, v in blobs.items()]})
    body = b"".join(blobs.values())
    return FRAME.pack(len(header), len(body)) + header + body


def _decode(data: bytes, path: Path) -> Iterator[dict]:
    """The rows of a journal; a torn last record (the process died mid-write) ends it."""
    at = 0
    while at < len(data):
        if len(data) - at < FRAME.size:
            break
        header_size, body_size = FRAME.unpack_from(data, at)
        start = at + FRAME.size
        end = start + header_size + body_size
        if end > len(data):
            break
        try:
            header = json.loads(data[start : start + header_size])
            row, offset = header["fields"], start + header_size
            for name, size in header["blobs"]:
                row[name], offset = data[offset : offset + size], offset + size
        except (ValueError, KeyError, TypeError):  # zeros or garbage where a record was torn
            break
        yield row
        at = end
    if at < len(data):
        log.warning("journal %s ends in a torn record (%d bytes), left out", path, len(data) - at)
