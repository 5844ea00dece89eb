"""The shared file helpers: PNG encoding and atomic writes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from digitops.files import png, write_bytes_atomic


@pytest.mark.parametrize(
    "shape, mode", [((28, 28), "L"), ((5, 7), "L"), ((28, 40, 3), "RGB"), ((1, 1), "L")]
)
def test_png_decodes_to_the_same_pixels(shape, mode):
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    with Image.open(io.BytesIO(png(pixels))) as image:
        image.load()  # checks every chunk's CRC and the zlib stream on the way
        assert image.format == "PNG" and image.mode == mode
        assert np.array_equal(np.asarray(image), pixels)


def test_png_enlarges_by_whole_pixels():
    pixels = np.array([[0, 255], [128, 7]], dtype=np.uint8)
    with Image.open(io.BytesIO(png(pixels, scale=3))) as image:
        assert np.array_equal(np.asarray(image), pixels.repeat(3, axis=0).repeat(3, axis=1))


def test_png_of_a_non_contiguous_view():
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)[::2, 1::3]
    with Image.open(io.BytesIO(png(pixels))) as image:
        assert np.array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize(
    "pixels",
    [
        np.zeros((4, 4), dtype=np.float32),
        np.zeros((4, 4, 4), dtype=np.uint8),
        np.zeros(4, np.uint8),
    ],
)
def test_png_refuses_what_it_cannot_encode(pixels):
    with pytest.raises(ValueError, match="cannot encode"):
        png(pixels)


def test_an_atomic_write_replaces_the_whole_file(tmp_path):
    path = tmp_path / "sub" / "file.bin"
    write_bytes_atomic(path, b"old")
    write_bytes_atomic(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert [p.name for p in path.parent.iterdir()] == ["file.bin"]  # no temporary file left
