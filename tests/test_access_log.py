"""The access lines are held back and written in batches, through the log's own handlers."""

import logging
import time

import pytest

from digitops.inference.access_log import ACCESS_LOGGER, BufferedAccessLog


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def written():
    """What reaches the handlers above the access logger (BentoML puts its own there), from an
    access logger as BentoML leaves it: no handlers, propagating. (The session's in-process
    service holds its own lines there until the session ends: set aside meanwhile.)"""
    logger, lines = logging.getLogger(ACCESS_LOGGER), Lines()
    parent, level = logger.parent, logger.parent.level
    handlers, propagate = logger.handlers[:], logger.propagate
    for handler in handlers:
        logger.removeHandler(handler)
    logger.propagate = True
    parent.addHandler(lines)
    parent.setLevel(logging.INFO)
    yield lines
    parent.removeHandler(lines)
    parent.setLevel(level)
    for handler in handlers:
        logger.addHandler(handler)
    logger.propagate = propagate


def test_a_line_is_held_then_written_with_the_time_it_was_made(written):
    access = BufferedAccessLog(flush_seconds=0.2)
    try:
        made = time.time()
        logging.getLogger(ACCESS_LOGGER).info("%s (%s) %.3fms", "127.0.0.1:1", "status=200", 1.5)
        assert written.messages() == []  # not on the request's own time
        deadline = time.monotonic() + 5
        while not written.records and time.monotonic() < deadline:
            time.sleep(0.05)
        assert written.messages() == ["127.0.0.1:1 (status=200) 1.500ms"]
        assert abs(written.records[0].created - made) < 0.1
    finally:
        access.close()


def test_close_writes_what_is_held_in_order_and_restores_the_logger(written):
    logger = logging.getLogger(ACCESS_LOGGER)
    access = BufferedAccessLog(flush_seconds=60)
    for i in range(3):
        logger.info("line %d", i)
    assert written.messages() == []
    access.close()
    assert written.messages() == ["line 0", "line 1", "line 2"]
    assert logger.propagate and not logger.handlers
    logger.info("after")  # written at once again
    assert written.messages()[-1] == "after"


def test_a_warning_is_written_at_once_after_the_lines_held_before_it(written):
    logger = logging.getLogger(ACCESS_LOGGER)
    access = BufferedAccessLog(flush_seconds=60)
    try:
        logger.info("held")
        logger.warning("urgent")
        assert written.messages() == ["held", "urgent"]
    finally:
        access.close()


def test_a_full_buffer_is_written_by_the_line_that_fills_it(written):
    logger = logging.getLogger(ACCESS_LOGGER)
    access = BufferedAccessLog(flush_seconds=60, capacity=4)
    try:
        for i in range(4):
            logger.info("line %d", i)
        assert written.messages() == [f"line {i}" for i in range(4)]
    finally:
        access.close()


def test_a_line_made_while_a_batch_is_written_does_not_wait_for_it(written, monkeypatch):
    """The thread writes a batch outside the handler's lock: a request's line goes on."""
    import threading

    logger = logging.getLogger(ACCESS_LOGGER)
    access = BufferedAccessLog(flush_seconds=60)
    writing, release = threading.Event(), threading.Event()
    emit = written.emit

    def slow_emit(record):  # the log's own handler, stuck on a slow disk
        writing.set()
        release.wait(10)
        emit(record)

    monkeypatch.setattr(written, "emit", slow_emit)
    try:
        logger.info("in the batch")
        flusher = threading.Thread(target=access.held.flush)
        flusher.start()
        assert writing.wait(10)
        made = threading.Thread(target=logger.info, args=("meanwhile",))
        made.start()
        made.join(2)
        assert not made.is_alive(), "a request's line waited for the batch being written"
        release.set()
        flusher.join(10)
    finally:
        release.set()
        access.close()
    assert written.messages() == ["in the batch", "meanwhile"]


def test_close_leaves_a_logger_that_did_not_propagate_as_it_was(written):
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.propagate = False  # as a service's own held log leaves it
    BufferedAccessLog(flush_seconds=60).close()
    assert not logger.propagate and not logger.handlers
