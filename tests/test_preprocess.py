"""Real MNIST digits rendered the ways users send them, through digitops.inference.preprocess."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image
from scipy import ndimage

from digitops.data import mnist
from digitops.inference.errors import ImageError, RequestError
from digitops.inference.preprocess import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    PNG_MAX_CHUNKS,
    WORK_SIDE,
    Preprocessed,
    _plain_png,
    add_noise,
    decode,
    preprocess,
    to_mnist,
)

FIXTURES = Path(__file__).parent / "fixtures" / "mnist"
# Test digits 0-5 are a 7, 2, 1, 0, 4 and 1.
PICKS = range(6)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("mnist")
    mnist._from_directory(FIXTURES, directory)
    return directory


@pytest.fixture(scope="session")
def digits(mnist_dir) -> np.ndarray:
    return mnist.load(mnist_dir, "t10k")[0]


@pytest.fixture(scope="session")
def classify(mnist_dir):
    """A 3-nearest-neighbour classifier on the fixture's training digits, to check class parity."""
    images, labels = mnist.load(mnist_dir, "train")
    train = images.reshape(len(images), -1).astype(np.float32)

    def predict(pixels: np.ndarray) -> int:
        distances = ((train - pixels.reshape(1, -1).astype(np.float32)) ** 2).sum(axis=1)
        return int(np.bincount(labels[np.argsort(distances)[:3]]).argmax())

    return predict


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def canvas(digit: np.ndarray, side: int = 280) -> Image.Image:
    """A browser-canvas drawing: white strokes on black, ten times MNIST's size."""
    return Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC)


def on_paper(
    digit: np.ndarray,
    size: tuple[int, int] = (600, 450),
    box: tuple[int, int, int, int] = (170, 90, 440, 360),
    seed: int = 0,
) -> Image.Image:
    """A phone photo of dark ink on paper: light falling off to one side, vignetting, grain."""
    width, height = size
    ink = np.zeros((height, width), dtype=np.float32)
    left, top, right, bottom = box
    drawn = Image.fromarray(digit).resize((right - left, bottom - top), Image.Resampling.BICUBIC)
    ink[top:bottom, left:right] = np.asarray(drawn, dtype=np.float32) / 255
    y, x = np.mgrid[0:height, 0:width] / max(size)
    light = np.linspace(0.55, 1.0, width)[None, :] * (1 - 0.4 * ((x - 0.5) ** 2 + (y - 0.4) ** 2))
    noise = np.random.default_rng(seed).normal(0, 0.03, ink.shape)
    gray = light * (0.92 - 0.8 * ink) + noise
    return Image.fromarray(np.uint8(np.clip(gray, 0, 1) * 255)).convert("RGB")


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


def assert_mnist_like(result: Preprocessed) -> None:
    """uint8 28x28, ink inside a 20x20 box, centre of mass at (14, 14) as MNIST places it."""
    pixels = result.pixels
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
    assert pixels.max() == 255 and pixels[0].max() == pixels[-1].max() == 0
    rows, cols = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
    assert rows[-1] - rows[0] < 20 and cols[-1] - cols[0] < 20
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) == 19  # longest side scaled to 20
    # Whole-pixel placement, as MNIST did, puts the centre within half a pixel.
    cy, cx = ndimage.center_of_mass(pixels.astype(float))
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5


# --- Train/serve parity ------------------------------------------------------------------


def test_mnist_digit_goes_through_unchanged(digits, classify):
    for index in range(20):
        digit = digits[index]
        result = preprocess(encode(Image.fromarray(digit), "PNG"))
        assert result.inverted is False
        assert correlation(result.pixels, digit) > 0.99
        assert classify(result.pixels) == classify(digit)


def test_pixels_are_read_only_uint8(digits):
    result = to_mnist(Image.fromarray(digits[0]))
    assert result.pixels.shape == (28, 28) and result.pixels.dtype == np.uint8
    assert not result.pixels.flags.writeable


# --- Realistic renderings ----------------------------------------------------------------


def photo_bytes(digit: np.ndarray, seed: int) -> bytes:
    return encode(on_paper(digit, seed=seed), "JPEG", quality=60)


def large_photo_bytes(digit: np.ndarray, seed: int) -> bytes:
    """A small digit far off-centre in a 1200x900 photo."""
    photo = on_paper(digit, size=(1200, 900), box=(880, 80, 1080, 280), seed=seed)
    return encode(photo, "JPEG", quality=85)


RENDERINGS = {
    "canvas": lambda digit, seed: encode(canvas(digit), "PNG"),
    "photo": photo_bytes,
    "large-photo": large_photo_bytes,
}


@pytest.mark.parametrize("rendering", RENDERINGS)
@pytest.mark.parametrize("index", PICKS)
def test_rendered_digit_comes_out_like_mnist(digits, rendering, index):
    result = preprocess(RENDERINGS[rendering](digits[index], index))
    assert result.inverted is (rendering != "canvas")
    assert_mnist_like(result)
    assert correlation(result.pixels, digits[index]) > 0.8


@pytest.mark.parametrize("rendering", RENDERINGS)
def test_class_parity(digits, classify, rendering):
    """Rendered and preprocessed, a digit reads as the same class as the original."""
    same = [
        classify(preprocess(RENDERINGS[rendering](digits[i], i)).pixels) == classify(digits[i])
        for i in range(20)
    ]
    assert sum(same) >= 17  # the nearest-neighbour stand-in for the model flips a few borderline


@pytest.mark.parametrize("index", PICKS)
def test_paper_photo_matches_canvas_drawing(digits, index):
    drawn = preprocess(encode(canvas(digits[index]), "PNG")).pixels
    photo = preprocess(photo_bytes(digits[index], index)).pixels
    assert correlation(photo, drawn) > 0.8


def strokes_on_transparent(digit: np.ndarray, stroke: int, mode: str) -> Image.Image:
    """A canvas export: strokes drawn in the alpha channel over a fully transparent background."""
    alpha = np.asarray(canvas(digit))
    hidden = 255 - stroke  # the colour under transparent pixels: the worst case for each stroke
    if mode == "P":  # GIF-style: a palette entry marked transparent, strokes without antialiasing
        image = Image.fromarray(np.uint8(alpha > 127), "P")
        image.putpalette([hidden] * 3 + [stroke] * 3)
        image.info["transparency"] = 0
        return image
    color = np.where(alpha > 0, stroke, hidden).astype(np.uint8)
    if mode == "LA":
        return Image.fromarray(np.dstack([color, alpha]), "LA")
    return Image.fromarray(np.dstack([color, color, color, alpha]), "RGBA")


@pytest.mark.parametrize("stroke", [0, 255], ids=["black-strokes", "white-strokes"])
@pytest.mark.parametrize(
    ("mode", "fmt"), [("RGBA", "PNG"), ("RGBA", "WEBP"), ("LA", "PNG"), ("P", "PNG"), ("P", "GIF")]
)
def test_strokes_on_transparent_background(digits, stroke, mode, fmt):
    image = strokes_on_transparent(digits[0], stroke, mode)
    assert image.mode == mode
    result = preprocess(encode(image, fmt, lossless=True) if fmt == "WEBP" else encode(image, fmt))
    assert result.inverted is (stroke == 0)
    assert_mnist_like(result)
    # Whatever the stroke colour, the ink is exactly what the alpha channel drew.
    reference = to_mnist(image.convert("RGBA").getchannel("A")).pixels
    assert correlation(result.pixels, reference) > 0.99


def test_fully_transparent_image_is_blank_whatever_its_hidden_colour():
    for color in [(0, 0, 0, 0), (255, 255, 255, 0), (128, 30, 200, 0)]:
        assert not to_mnist(Image.new("RGBA", (200, 150), color)).pixels.any()


# --- Plain PNGs (canvas exports) are decoded by libspng ------------------------------------


def plain_png_variants(digit: np.ndarray) -> dict[str, Image.Image]:
    drawing = canvas(digit)
    alpha = np.asarray(drawing)
    strokes = np.dstack([np.zeros_like(alpha)] * 3 + [alpha])  # black ink in the alpha channel
    return {
        "L": drawing,
        "RGB": drawing.convert("RGB"),
        "RGBA opaque": drawing.convert("RGBA"),
        "RGBA strokes on transparent": Image.fromarray(strokes, "RGBA"),
    }


@pytest.mark.parametrize("kind", ["L", "RGB", "RGBA opaque", "RGBA strokes on transparent"])
def test_plain_png_comes_out_as_through_pillow(digits, kind):
    image = plain_png_variants(digits[0])[kind]
    data = encode(image, "PNG")
    assert _plain_png(data, DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS) is not None  # the fast way
    fast, pillow = preprocess(data), to_mnist(decode(data))
    np.testing.assert_array_equal(fast.pixels, pillow.pixels)
    assert fast.inverted == pillow.inverted


def png_with(image: Image.Image, **params) -> bytes:
    return encode(image, "PNG", **params)


def with_empty_chunks(data: bytes, count: int) -> bytes:
    """The PNG with `count` empty private chunks after its header (Pillow skips them)."""
    chunk = b"\0\0\0\0" + b"zzZz" + zlib.crc32(b"zzZz").to_bytes(4, "big")
    return data[:33] + chunk * count + data[33:]


@pytest.mark.parametrize(
    "kind", ["16-bit", "palette", "transparent colour", "exif", "over WORK_SIDE", "many chunks"]
)
def test_other_pngs_take_pillows_way(digits, kind):
    drawing = canvas(digits[0])
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    data = {
        "many chunks": lambda: with_empty_chunks(png_with(drawing), PNG_MAX_CHUNKS),
        "16-bit": lambda: png_with(Image.fromarray(np.uint16(np.asarray(drawing)) * 257)),
        "palette": lambda: png_with(drawing.convert("P")),
        "transparent colour": lambda: png_with(drawing, transparency=0),
        "exif": lambda: png_with(drawing, exif=exif),
        "over WORK_SIDE": lambda: png_with(canvas(digits[0], side=600)),
    }[kind]()
    assert _plain_png(data, DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS) is None
    # Whatever these mean (a transparent colour, a turn), Pillow's reading of them is the answer.
    pillow = to_mnist(decode(data, draft_side=WORK_SIDE))
    np.testing.assert_array_equal(preprocess(data).pixels, pillow.pixels)


def test_interlaced_png_takes_pillows_way(digits):
    data = encode(canvas(digits[0]), "PNG")
    ihdr = bytearray(data[12:29])  # Pillow writes no interlaced PNG: set the flag and its CRC
    ihdr[16] = 1
    data = data[:12] + bytes(ihdr) + zlib.crc32(bytes(ihdr)).to_bytes(4, "big") + data[33:]
    assert _plain_png(data, DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS) is None


def test_corrupt_plain_png_gets_pillows_error(digits):
    data = bytearray(encode(canvas(digits[0]), "PNG"))
    data[60:70] = b"x" * 10  # inside the compressed pixels
    with pytest.raises(ImageError, match="truncated or corrupt") as caught:
        preprocess(bytes(data))
    assert caught.value.status == 400


def test_damaged_png_is_refused_not_misread(digits):
    # Stored (uncompressed) pixels: one flipped byte still decodes, to wrong pixels, in a
    # decoder that ignores checksums as libspng does here. Only the chunk's CRC tells.
    data = bytearray(encode(canvas(digits[0]), "PNG", compress_level=0))
    data[data.index(b"IDAT") + 4 + 2 + 5 + 281 * 140 + 1 + 140] ^= 0xFF  # row 140, column 140
    assert _plain_png(bytes(data), DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS) is None
    with pytest.raises(ImageError, match="truncated or corrupt") as caught:
        preprocess(bytes(data))
    assert caught.value.status == 400


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(digits, orientation):
    upright = on_paper(digits[0])
    # The camera stores the sensor's pixels and a tag saying how to turn them upright.
    stored = upright.transpose(
        Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270
    )
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    expected = preprocess(encode(upright, "JPEG", quality=90)).pixels
    tagged = preprocess(encode(stored, "JPEG", quality=90, exif=exif)).pixels
    untagged = preprocess(encode(stored, "JPEG", quality=90)).pixels
    assert correlation(tagged, expected) > 0.9
    assert correlation(untagged, expected) < 0.5  # the check can tell a turned digit


def test_specks_do_not_inflate_the_box(digits):
    clean = canvas(digits[0])
    dusty = np.asarray(clean).copy()
    for y, x in [(10, 10), (15, 260), (265, 20), (270, 270), (140, 5)]:
        dusty[y : y + 3, x : x + 3] = 255  # dust, or a stray touch of the pen
    result = to_mnist(Image.fromarray(dusty))
    assert np.array_equal(result.pixels, to_mnist(clean).pixels)


# --- Inversion ---------------------------------------------------------------------------


def test_forced_invert_is_honoured(digits):
    drawing, photo = canvas(digits[0]), on_paper(digits[0])
    assert np.array_equal(to_mnist(drawing, invert=False).pixels, to_mnist(drawing).pixels)
    assert np.array_equal(to_mnist(photo, invert=True).pixels, to_mnist(photo).pixels)
    # Forced the wrong way, the strokes are background and whatever else stands out is taken.
    for image, wrong in [(drawing, True), (photo, False)]:
        forced = to_mnist(image, invert=wrong)
        assert forced.inverted is wrong
        assert not np.array_equal(forced.pixels, to_mnist(image).pixels)


# --- Formats and modes -------------------------------------------------------------------


@pytest.fixture(scope="session")
def photo_gray(digits) -> np.ndarray:
    """Ink on paper as float luminance in [0, 1], the source for every mode below."""
    return np.asarray(on_paper(digits[2]).convert("L"), dtype=np.float32) / 255


def as_mode(gray: np.ndarray, mode: str) -> Image.Image:
    """The same photo in `mode`, as a camera, scanner or editor would write it."""
    rgb = Image.fromarray(np.uint8(gray * 255)).convert("RGB")
    if mode == "I;16":
        return Image.fromarray(np.uint16(gray * 65535))
    if mode == "I":
        return Image.fromarray(np.int32(gray * 65535))
    if mode == "F":
        return Image.fromarray(gray)
    if mode == "1":
        return rgb.convert("L").point(lambda v: 255 * (v > 70)).convert("1")  # a thresholded scan
    if mode in ("LA", "RGBA"):
        image = rgb.convert(mode)
        image.putalpha(255)
        return image
    if mode == "P":  # transparency in palette images: see test_strokes_on_transparent_background
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return rgb.convert(mode)


MODES = ["RGB", "RGBA", "L", "LA", "P", "I;16", "I", "F", "1", "CMYK"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode(photo_gray, mode):
    reference = to_mnist(as_mode(photo_gray, "L"))
    image = as_mode(photo_gray, mode)
    assert image.mode == mode
    result = to_mnist(image)
    assert result.inverted is True
    assert_mnist_like(result)
    assert correlation(result.pixels, reference.pixels) > 0.9


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGB", "WEBP"), ("RGBA", "WEBP"), ("RGB", "BMP"), ("L", "BMP"), ("P", "GIF"),
        ("P", "PNG"), ("LA", "PNG"), ("I;16", "PNG"), ("1", "PNG"), ("I", "TIFF"),
        ("F", "TIFF"), ("CMYK", "JPEG"), ("CMYK", "TIFF"),
    ],
)  # fmt: skip
def test_every_format(photo_gray, mode, fmt):
    reference = to_mnist(as_mode(photo_gray, "L"))
    result = preprocess(encode(as_mode(photo_gray, mode), fmt))
    assert result.inverted is True
    assert_mnist_like(result)
    assert correlation(result.pixels, reference.pixels) > 0.9


def test_animation_uses_first_frame(digits):
    first, second = canvas(digits[0]).convert("P"), canvas(digits[1]).convert("P")
    gif = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    result = preprocess(gif).pixels
    assert correlation(result, to_mnist(first).pixels) > 0.99
    assert correlation(result, to_mnist(second).pixels) < 0.5


def test_decode_returns_loaded_upright_image():
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    image = decode(encode(Image.new("RGB", (40, 30)), "JPEG", exif=exif))
    assert image.size == (30, 40)
    assert image.getexif().get(ExifTags.Base.Orientation, 1) == 1


# --- Nothing to find ---------------------------------------------------------------------


def blank(kind: str) -> bytes:
    rng = np.random.default_rng(0)
    if kind == "white":
        return encode(Image.new("L", (300, 200), 255), "PNG")
    if kind == "black":
        return encode(Image.new("RGB", (300, 200)), "JPEG")
    if kind == "transparent":
        return encode(Image.new("RGBA", (300, 200), (255, 255, 255, 0)), "PNG")
    # Plain paper photographed: a lighting gradient, grain and JPEG artefacts, no ink.
    light = np.linspace(0.6, 0.95, 600)[None, :] * np.ones((450, 1))
    paper = np.clip(light + rng.normal(0, 0.03, light.shape), 0, 1)
    return encode(Image.fromarray(np.uint8(paper * 255)), "JPEG", quality=60)


@pytest.mark.parametrize("kind", ["white", "black", "transparent", "paper"])
def test_blank_image_becomes_a_blank_input(kind):
    """No ink is an answer (the model judges it not a digit), not an error."""
    pixels = preprocess(blank(kind)).pixels
    assert pixels.shape == (28, 28) and not pixels.any()


# --- Bad input ---------------------------------------------------------------------------


def png_of_size(width: int, height: int) -> bytes:
    """A 1-bit all-black PNG, built by hand so that no pixel buffer is ever allocated."""
    compressor = zlib.compressobj(1)  # level 1: the zeros still shrink ~200x, and build fast
    rows = (b"\x00" * (1 + (width + 7) // 8)) * 1000
    raw = b"".join(compressor.compress(rows) for _ in range(height // 1000)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [30000, 10000], ids=["pillow-error", "pillow-warning"])
def test_decompression_bomb_is_refused_fast(side):
    bomb = png_of_size(side, side)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape
        with pytest.raises(ImageError, match="limit is 40,000,000 pixels") as caught:
            decode(bomb)
    assert time.perf_counter() - start < 0.5
    assert caught.value.status == 413


def test_pixel_limit_is_configurable():
    small = encode(Image.new("L", (100, 100)), "PNG")
    with pytest.raises(ImageError, match="100x100") as caught:
        decode(small, max_pixels=5000)
    assert caught.value.status == 413


def truncated_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"", 400, "empty"),
        (b"hello, this is not an image\n", 400, "not a readable image"),
        (truncated_png(), 400, "truncated or corrupt"),
        (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64, 415, "HEIC/AVIF images are not supported"),
        (encode(Image.new("RGB", (8, 8)), "ICO"), 415, "ICO images are not supported"),
    ],
    ids=["empty", "text", "truncated", "heic", "ico"],
)
def test_bad_input(data, status, message):
    with pytest.raises(ImageError, match=message) as caught:
        preprocess(data)
    assert caught.value.status == status
    assert "send" in str(caught.value)  # every message says what to send instead


def test_too_many_bytes():
    with pytest.raises(ImageError, match="limit is 10 bytes") as caught:
        preprocess(encode(Image.new("L", (64, 64)), "PNG"), max_bytes=10)
    assert caught.value.status == 413
    with pytest.raises(ImageError, match="11.0 MiB; the limit is 10.0 MiB") as caught:
        decode(b"\x89PNG" + b"\x00" * (11 * 2**20 - 4))
    assert caught.value.status == 413


# --- Noise for robustness checks ---------------------------------------------------------


def test_add_noise(digits):
    digit = digits[0]
    assert np.array_equal(add_noise(digit, 0.0), digit)
    noisy = add_noise(digit, 0.1, seed=1)
    assert noisy.dtype == np.uint8 and noisy.shape == (28, 28)
    assert np.array_equal(noisy, add_noise(digit, 0.1, seed=1))
    # Away from the clipped ends the added noise has the asked-for spread.
    middle = (digit > 60) & (digit < 190)
    spread = (noisy.astype(float) - digit)[middle].std()
    assert 0.07 * 255 < spread < 0.13 * 255


@pytest.mark.parametrize("level", [-0.1, 1.5, float("nan")])
def test_add_noise_refuses_bad_level(digits, level):
    with pytest.raises(RequestError, match="between 0 and 1") as caught:
        add_noise(digits[0], level)
    assert caught.value.status == 400


@pytest.mark.parametrize("width", [1, 2, 3])
def test_grow_is_square_dilation(width):
    from digitops.inference.preprocess import _grow

    rng = np.random.default_rng(width)
    square = np.ones((3, 3), dtype=bool)
    for shape in [(1, 1), (1, 9), (7, 1), (28, 28), (45, 31)]:
        mask = rng.random(shape) > 0.9
        expected = ndimage.binary_dilation(mask, square, iterations=width)
        assert np.array_equal(_grow(mask, width), expected)
