"""Feedback ingestion: pending labels in the service's store -> validated data/feedback samples.

Exactly once, whatever kills it: an image file is written atomically under its content hash,
then its manifest line is appended and fsynced, then the store marks the item done. A rerun
after a crash finds the manifest line of an item still marked pending and only marks it.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import signal
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from digitops.data import feedback
from digitops.files import PARTIAL_SUFFIX, png, write_bytes_atomic

MIN_INK_PIXELS = 10  # fewer bright pixels than this in a 28x28 input is not a digit
LOCK = ".ingest.lock"


class FeedbackQueue(Protocol):
    """What ingestion needs of the service's prediction store (inference.store)."""

    def pending(self) -> list[dict]: ...
    def mark(
        self, feedback_id: str, status: str, reason: str | None, if_updated_at: float
    ) -> bool: ...


class IngestBusy(RuntimeError):
    """Another ingestion run holds the lock on this feedback folder."""


def _failpoint(name: str) -> None:
    """Crash-test hook: DIGITOPS_FAILPOINT=name:n SIGKILLs this process the n-th time it passes."""
    spec = os.environ.get("DIGITOPS_FAILPOINT", "")
    if not spec.startswith(f"{name}:"):
        return
    _failpoint.hits[name] = _failpoint.hits.get(name, 0) + 1
    if _failpoint.hits[name] == int(spec.split(":")[1]):
        os.kill(os.getpid(), signal.SIGKILL)


_failpoint.hits = {}


@dataclass
class Summary:
    accepted: int = 0
    relabelled: int = 0
    merged: int = 0
    quarantined: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in self.quarantined.items()) or "none"
        return (
            f"accepted {self.accepted} (relabelled {self.relabelled}), merged {self.merged} "
            f"duplicates, quarantined {sum(self.quarantined.values())}: {reasons}"
        )


def repair(directory: Path) -> None:
    """Undo what a killed run left half done: a torn manifest line, temporary image files."""
    for leftover in (directory / feedback.IMAGES).glob(f"*{PARTIAL_SUFFIX}"):
        leftover.unlink()
    path = directory / feedback.MANIFEST
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


def _decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        pixels = np.asarray(im.convert("L"))
    if pixels.shape != (28, 28):
        raise ValueError(f"input is {pixels.shape[1]}x{pixels.shape[0]}, not 28x28")
    return pixels


def ingest(store: FeedbackQueue, directory: Path) -> Summary:
    directory = Path(directory)
    (directory / feedback.IMAGES).mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IngestBusy(f"another ingestion run is working on {directory}") from None
        repair(directory)
        return _ingest_locked(store, directory)


def _ingest_locked(store: FeedbackQueue, directory: Path) -> Summary:
    by_hash = {r["sha256"]: r for r in feedback.read_manifest(directory)}
    summary = Summary()
    with open(directory / feedback.MANIFEST, "a") as manifest:
        for item in store.pending():
            fid, label, seen = item["feedback_id"], item["label"], item["updated_at"]

            def quarantine(reason: str, fid=fid, seen=seen) -> None:
                if store.mark(fid, "rejected", reason, seen):
                    summary.quarantined[reason.split(":")[0]] += 1

            try:
                pixels = _decode(item["input_png"])
            except Exception as err:
                quarantine(f"image does not decode: {err}")
                continue
            if not 0 <= label <= feedback.NOT_A_DIGIT:
                quarantine(f"label out of range: {label}")
                continue
            # A blank input is no digit: a fine example of "not a digit", a bad one of any digit.
            if label != feedback.NOT_A_DIGIT and int((pixels > 64).sum()) < MIN_INK_PIXELS:
                quarantine("blank image: no ink in the 28x28 input")
                continue
            sha = feedback.pixel_hash(pixels)
            existing = by_hash.get(sha)
            if existing is not None and existing.get("feedback_id") != fid:
                if existing["label"] != label:
                    quarantine(
                        f"conflicting labels: {label} here, {existing['label']} for the "
                        f"same image from prediction {existing['prediction_id']}"
                    )
                elif store.mark(fid, "merged", f"duplicate of {existing['prediction_id']}", seen):
                    summary.merged += 1
                continue
            if existing is not None and existing["label"] == label:
                # Written by a run that was killed before it could mark the item: just mark it.
                summary.accepted += store.mark(fid, "ingested", None, seen)
                continue
            file = f"{feedback.IMAGES}/{sha}.png"
            if not (directory / file).exists():
                write_bytes_atomic(directory / file, png(pixels))
            _failpoint("image")
            record = {
                "file": file,
                "label": label,
                "sha256": sha,
                "split": feedback.split_for(sha),
                "prediction_id": item["prediction_id"],
                "feedback_id": fid,
                "model_version": item["model_version"],
                "created_at": datetime.fromtimestamp(item["predicted_at"], UTC).isoformat(),
                "ingested_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            manifest.write(json.dumps(record) + "\n")
            manifest.flush()
            os.fsync(manifest.fileno())
            _failpoint("manifest")
            # A relabelled sample (the user changed their mind after ingestion) is appended
            # again; readers take the last line for a hash.
            summary.relabelled += existing is not None
            by_hash[sha] = record
            summary.accepted += store.mark(fid, "ingested", None, seen)
    return summary
