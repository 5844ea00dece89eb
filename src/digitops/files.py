"""Small file helpers every layer shares: atomic writes and PNG encoding."""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

# Temporary files end with this; a reader that finds one knows it is a killed writer's leftover.
PARTIAL_SUFFIX = ".part"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@contextlib.contextmanager
def atomic_write(path: str | Path, fsync: bool = True) -> Iterator[BinaryIO]:
    """Write through a temporary file in the same folder, then rename it over `path`.

    A reader sees the old file or the whole new one, never half of it, whatever kills the
    writer. `fsync` makes the new bytes durable before the rename (needed when a later step,
    such as a manifest line, will refer to them).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; servers may run as another user
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | Path, data: bytes, fsync: bool = True) -> None:
    with atomic_write(path, fsync=fsync) as f:
        f.write(data)


def png(pixels: np.ndarray, scale: int = 1) -> bytes:
    """uint8 pixels ([H, W] gray or [H, W, 3] RGB) as PNG bytes, enlarged `scale` times.

    Written here rather than by OpenCV or Pillow: every prediction encodes its 28x28 input, and
    a request meets an image library's encoder with cold caches, where its generality costs
    (OpenCV's imencode: 119 against 75 us in request order, 18 against 12 in a loop). Rows are
    stored unfiltered and deflated fast: these images are tiny, and speed matters more than
    bytes."""
    if scale > 1:
        pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or pixels.shape[2:] not in ((), (3,)):
        raise ValueError(f"cannot encode pixels of shape {pixels.shape} ({pixels.dtype}) as PNG")
    height, width = pixels.shape[:2]
    rows = np.zeros((height, 1 + pixels[0].size), dtype=np.uint8)  # each row: filter 0, pixels
    rows[:, 1:] = pixels.reshape(height, -1)
    colour = 0 if pixels.ndim == 2 else 2  # grey, or RGB
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)),
            _chunk(b"IEND", b""),
        )
    )


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
