"""Small file helpers every layer shares: atomic writes and PNG encoding."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

# Temporary files end with this; a reader that finds one knows it is a killed writer's leftover.
PARTIAL_SUFFIX = ".part"


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

    OpenCV encodes a 28x28 input in half the time Pillow takes (21 against 41 us), and every
    prediction encodes one."""
    if scale > 1:
        pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)  # OpenCV's channel order
    # Speed over bytes: these are tiny.
    ok, encoded = cv2.imencode(".png", pixels, (cv2.IMWRITE_PNG_COMPRESSION, 1))
    if not ok:
        raise ValueError(f"cannot encode pixels of shape {pixels.shape} as PNG")
    return encoded.tobytes()
