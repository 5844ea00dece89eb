"""The feedback dataset: user-corrected digits that training adds to MNIST.

Layout of `data/feedback/` (versioned with the rest of `data/` by `data.dvc`):

    manifest.jsonl          one JSON object per accepted sample, appended in order
    images/<sha256>.png     the 28x28 8-bit grayscale model input (white ink on black, as MNIST)

A relabelled sample is appended again; the last line for a hash wins.
Manifest fields: `file` (path relative to the folder), `label` (0-9, or NOT_A_DIGIT for an
input a user marked as no digit at all: kept apart from the digits), `sha256` (of the
PNG's pixels, the de-duplication key), `split` (`train` or `holdout`, fixed by the hash so
a sample never moves), `prediction_id`, `model_version`, `created_at`, `ingested_at`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

MANIFEST = "manifest.jsonl"
IMAGES = "images"
HOLDOUT_EVERY = 5  # one sample in five is held out to check that retraining learned the style
NOT_A_DIGIT = 10  # the label of "that's not a digit" in the store and the manifest


def pixel_hash(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


def split_for(sha256: str) -> str:
    return "holdout" if int(sha256[:8], 16) % HOLDOUT_EVERY == 0 else "train"


def read_manifest(directory: Path) -> list[dict]:
    """The current record of every sample, in first-seen order.

    The file is append-only: a relabelled sample gets a new line, and the last line for a
    hash wins. A torn last line (a writer killed mid-append) is ignored.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return []
    latest: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        latest[record["sha256"]] = record
    return list(latest.values())


def load(
    directory: Path, split: str | None = None, digits: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of one split, or all when split is None:
    the digits, or (`digits=False`) the inputs marked not a digit."""
    directory = Path(directory)
    records = [
        r
        for r in read_manifest(directory)
        if (split is None or r["split"] == split) and (int(r["label"]) != NOT_A_DIGIT) == digits
    ]
    images = np.zeros((len(records), 28, 28), dtype=np.uint8)
    for i, record in enumerate(records):
        with Image.open(directory / record["file"]) as im:
            images[i] = np.asarray(im.convert("L"))
    labels = np.array([int(r["label"]) for r in records], dtype=np.int64)
    return images, labels
