"""Feedback ingestion: pending labels in the service's store -> validated data/feedback samples.

Exactly once, whatever kills it: an image file is written atomically under its content hash,
then its manifest line is appended and fsynced, then the store marks the item done. A rerun
after a crash finds the manifest line of an item still marked pending and only marks it.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from digitops import feedback
from digitops.store import PredictionStore

MIN_INK_PIXELS = 10  # fewer bright pixels than this in a 28x28 input is not a digit


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


def repair_manifest(directory: Path) -> None:
    """Cut a torn last line left by a killed writer, so appends start on a fresh line."""
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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ingest(store: PredictionStore, directory: Path) -> Summary:
    directory = Path(directory)
    (directory / feedback.IMAGES).mkdir(parents=True, exist_ok=True)
    repair_manifest(directory)
    by_hash = {r["sha256"]: r for r in feedback.read_manifest(directory)}
    summary = Summary()
    with open(directory / feedback.MANIFEST, "a") as manifest:
        for item in store.pending():
            fid, label = item["feedback_id"], item["label"]

            def quarantine(reason: str, item=item) -> None:
                store.mark(item["feedback_id"], "rejected", reason, item["updated_at"])
                summary.quarantined[reason.split(":")[0]] += 1

            try:
                pixels = _decode(item["input_png"])
            except Exception as err:
                quarantine(f"image does not decode: {err}")
                continue
            if not 0 <= label <= 9:
                quarantine(f"label out of range: {label}")
                continue
            if int((pixels > 64).sum()) < MIN_INK_PIXELS:
                quarantine("blank image: no ink in the 28x28 input")
                continue
            sha = feedback.pixel_hash(pixels)
            existing = by_hash.get(sha)
            if existing is not None and existing.get("feedback_id") != fid:
                if existing["label"] == label:
                    store.mark(
                        fid,
                        "merged",
                        f"duplicate of {existing['prediction_id']}",
                        item["updated_at"],
                    )
                    summary.merged += 1
                else:
                    quarantine(
                        f"conflicting labels: {label} here, {existing['label']} for the "
                        f"same image from prediction {existing['prediction_id']}"
                    )
                continue
            if existing is not None and existing["label"] == label:
                # Written by a run that was killed before it could mark the item: just mark it.
                store.mark(fid, "ingested", None, item["updated_at"])
                summary.accepted += 1
                continue
            relabel = existing is not None  # the same user changed their mind after ingestion
            file = f"{feedback.IMAGES}/{sha}.png"
            if not (directory / file).exists():
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="PNG")
                _write_atomic(directory / file, buf.getvalue())
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
            by_hash[sha] = record
            store.mark(fid, "ingested", None, item["updated_at"])
            summary.accepted += 1
            summary.relabelled += relabel
    return summary
