"""Everything between an image and the model's input, in one place (the input's scale,
`normalize`, lives with the model). Any image a user sends (a canvas export, a scan, a phone
photo of ink on paper) becomes a 28x28 uint8 digit drawn the way MNIST's are: white ink on
black, the longest side 20 px, the centre of mass at (14, 14).
"""

from __future__ import annotations

import functools
import io
import warnings
import zlib
from dataclasses import dataclass

import cv2
import numpy as np
import pyspng
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from digitops.files import PNG_SIGNATURE
from digitops.inference.errors import ImageError, RequestError

# A request's work runs on one core; OpenCV's own thread pool would only compete for them.
cv2.setNumThreads(1)

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000  # decoded-size limit against decompression bombs

# TIFF is what many scanners write. Pillow's JPEG reader also opens MPO, the multi-picture JPEG
# that many phone cameras write.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
SEND_INSTEAD = "send a PNG, JPEG, WebP, BMP, GIF or TIFF file"

# The ink is searched for at this size at most: plenty for a 20 px digit, and fast on big photos.
WORK_SIDE = 512
# A drawing's strokes are clean, so a fraction of that is enough: 8x the 20 px they become.
DRAWING_SIDE = 160
# Ink must stand out from its background by at least this fraction of full scale.
MIN_CONTRAST = 0.1
# Faint pixels within EDGE_WIDTH px of the ink, down to this level or 3 noise sigmas, are its
# anti-aliased edge; half a uint8 step keeps every deliberate pixel of a clean image (MNIST's
# edges go down to 1/255).
MIN_EDGE = 0.5 / 255
EDGE_WIDTH = 2
# Blobs smaller than this fraction of the largest one are specks, not strokes.
SPECK_FRACTION = 0.05
# At least this share of a drawing's pixels is exactly its background colour.
FLAT_FRACTION = 0.5
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's convert("L")
PNG_GREY, PNG_RGB, PNG_RGBA = 0, 2, 6  # the colour types of plain PNGs
# Chunks that change what the pixels mean to decode(): a transparent colour, an orientation.
PNG_PIXEL_CHUNKS = (b"tRNS", b"eXIf")
# A canvas export has 3-5 chunks, a 512 px image in 8 KB IDATs ~130; more is no plain PNG.
PNG_MAX_CHUNKS = 256
INVERT_WORDS = {
    "auto": None, "true": True, "false": False, "1": True, "0": False,
    "yes": True, "no": False, "on": True, "off": False,
}  # fmt: skip


@dataclass(frozen=True, eq=False)  # numpy arrays have no single truth value to compare by
class Preprocessed:
    """One image as the model sees it, and whether it had to be inverted to get there."""

    pixels: np.ndarray  # uint8 [28, 28], white ink on black, centred as MNIST
    inverted: bool  # whether the input was dark-on-light and got inverted


def add_noise(pixels: np.ndarray, level: float, seed: int | None = None) -> np.ndarray:
    """Gaussian noise of standard deviation level*255 on uint8 pixels, for robustness checks."""
    if not 0 <= level <= 1:  # also refuses NaN
        raise RequestError(f"noise level must be between 0 and 1; got {level}.")
    noise = np.random.default_rng(seed).normal(0.0, level * 255, pixels.shape)
    return np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Options:
    """A request's say in how its image becomes the model's input."""

    invert: bool | None = None  # None: decide from the image
    noise: float = 0.0  # stress test: Gaussian noise of this share of full scale
    seed: int | None = None  # the noise's seed; None: new noise every time


def prepare(data: bytes, options: Options, max_bytes: int = DEFAULT_MAX_BYTES) -> Preprocessed:
    """An upload as the model's input, with the noise the request asked for."""
    prepared = preprocess(data, options.invert, max_bytes=max_bytes)
    if options.noise == 0:
        return prepared
    noisy = add_noise(prepared.pixels, options.noise, options.seed)
    return Preprocessed(pixels=noisy, inverted=prepared.inverted)


def decode(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_side: int | None = None,
) -> Image.Image:
    """Untrusted bytes -> a fully loaded, upright PIL image (an animation's first frame). With
    `draft_side`, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, far
    cheaper) while its longest side stays at least that."""
    if not data:
        raise ImageError(f"The request body is empty; {SEND_INSTEAD}.")
    if len(data) > max_bytes:
        raise ImageError(
            f"The image is {_size(len(data))}; the limit is {_size(max_bytes)}. "
            "Send a smaller or more compressed image.",
            status=413,
        )
    # Pillow's own bomb check fires inside open(): no warning or unexplained error may leak.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            raise _not_readable(data) from None
        except Image.DecompressionBombError:
            raise ImageError(
                f"The image has too many pixels; the limit is {max_pixels:,} pixels. "
                "Send a smaller image.",
                status=413,
            ) from None
        except Exception as err:  # Pillow raises many types on malformed headers
            raise ImageError(f"The image header is corrupt ({err}); {SEND_INSTEAD}.") from None
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"The image is {width}x{height} pixels; the limit is {max_pixels:,} pixels. "
                    "Send a smaller image.",
                    status=413,
                )
            if draft_side and image.format in ("JPEG", "MPO"):
                scale = draft_side / max(width, height)
                image.draft(image.mode, (int(width * scale) or 1, int(height * scale) or 1))
            try:
                image.load()  # surfaces truncation and corruption here, not in the caller
                return ImageOps.exif_transpose(image)
            except Exception as err:  # as above: any decoder error means a broken file
                raise ImageError(
                    f"The {image.format} image is truncated or corrupt ({err}); "
                    "send the complete file."
                ) from None


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _not_readable(data: bytes) -> ImageError:
    """Tell a known but unsupported format (415) from bytes that are not an image (400)."""
    name = None
    if data[4:8] == b"ftyp":
        name = "HEIC/AVIF"
    elif data.startswith(b"%PDF"):
        name = "PDF"
    elif data.lstrip()[:5].lower() in (b"<svg ", b"<?xml"):
        name = "SVG"
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as other:  # header only, never decoded
                    name = other.format
        except Exception:
            pass
    if name:
        return ImageError(f"{name} images are not supported; {SEND_INSTEAD}.", status=415)
    return ImageError(f"The data is not a readable image; {SEND_INSTEAD}.")


def preprocess(
    data: bytes,
    invert: bool | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Preprocessed:
    """Image file bytes -> the model's 28x28 input; see decode() and to_mnist()."""
    gray = _plain_png(data, max_bytes, max_pixels)
    if gray is None:
        image = decode(data, max_bytes=max_bytes, max_pixels=max_pixels, draft_side=WORK_SIDE)
        gray = _grayscale(image)
    return _from_grayscale(gray, invert)


def _plain_png(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray | None:
    """Luminance in [0, 1] of a plain PNG (8-bit grey, RGB or RGBA, not interlaced, no chunk
    that changes what its pixels mean, at most WORK_SIDE, every checksum right), else None.

    That is what canvases export, and libspng decodes it straight into an array, faster than
    Pillow (benchmarks/bench_preprocess.py). Anything else takes decode()'s way, errors too."""
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 29:
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if max(width, height) > WORK_SIDE or len(data) > max_bytes:
        return None
    depth, color, interlaced = data[24], data[25], data[28]
    if (
        depth != 8
        or color not in (PNG_GREY, PNG_RGB, PNG_RGBA)
        or interlaced
        or width * height > max_pixels
    ):
        return None
    chunks = _png_chunk_types(data)
    if chunks is None or any(kind in PNG_PIXEL_CHUNKS for kind in chunks):
        return None
    try:
        pixels = pyspng.load(data)
    except RuntimeError:  # e.g. a cut-off or malformed pixel stream
        return None
    if pixels.shape[:2] != (height, width):
        return None
    if color == PNG_RGBA:
        if pixels[..., 3].min() < 255:
            return _flattened(pixels)
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGBA2GRAY)
    elif color == PNG_RGB:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    return np.divide(pixels, 255, dtype=np.float32)  # one pass: no float copy to divide


def _png_chunk_types(data: bytes) -> list[bytes] | None:
    """The types of a PNG's chunks up to IEND; None when one is cut off or fails its CRC (pyspng
    ignores checksums, Pillow refuses them: a damaged upload is refused either way), or when
    there are more than PNG_MAX_CHUNKS."""
    kinds, at, view = [], len(PNG_SIGNATURE), memoryview(data)
    while at + 12 <= len(data) and len(kinds) < PNG_MAX_CHUNKS:
        size = int.from_bytes(data[at : at + 4], "big")
        end = at + 8 + size
        if end + 4 > len(data):
            return None
        kind = data[at + 4 : at + 8]
        if zlib.crc32(view[at + 4 : end]) != int.from_bytes(data[end : end + 4], "big"):
            return None
        kinds.append(kind)
        if kind == b"IEND":
            return kinds
        at = end + 4
    return None


def to_mnist(image: Image.Image, invert: bool | None = None) -> Preprocessed:
    """Any PIL image -> a 28x28 MNIST-style digit; invert None decides from the image itself.
    Nothing in the image standing out as ink gives a blank (all-black) input."""
    return _from_grayscale(_grayscale(image), invert)


def _from_grayscale(gray: np.ndarray, invert: bool | None) -> Preprocessed:
    # A drawing's background is exact at any size, so it is recognised on the small copy too.
    small, edge = _drawing_size(gray)
    background = _flat_background(small)
    if invert is None:
        invert = background > 0.5 if background is not None else _looks_dark_on_light(gray)
    if background is not None and (background > 0.5) == invert:
        ink = _drawn_ink(small, background, edge)
    else:
        ink = _find_ink(gray, invert)
    pixels = _center(ink)
    pixels.flags.writeable = False  # Preprocessed is frozen; so are its pixels
    return Preprocessed(pixels=pixels, inverted=bool(invert))


def _drawing_size(gray: np.ndarray) -> tuple[np.ndarray, int]:
    """`gray` shrunk by a whole factor to at most DRAWING_SIDE (block means), and the width
    there of EDGE_WIDTH px of the image as sent."""
    factor = -(-max(gray.shape) // DRAWING_SIDE)
    small = gray if factor == 1 else _block_mean(gray, factor)
    return small, max(1, round(EDGE_WIDTH / factor))


def _flat_background(gray: np.ndarray) -> float | None:
    """The background level of a digital drawing (one exact value over most of the image), or
    None for anything else (a photo or scan always has noise). A drawing needs no lighting or
    noise model, which makes the live-drawing path several times faster."""
    levels = np.rint(gray[::2, ::2] * 255).astype(np.uint8).ravel()
    counts = np.bincount(levels, minlength=256)
    mode = int(counts.argmax())
    if counts[mode] < FLAT_FRACTION * levels.size:
        return None
    return mode / 255


def _drawn_ink(gray: np.ndarray, background: float, edge: int = EDGE_WIDTH) -> np.ndarray:
    """Ink of a drawing on a flat background: every pixel that differs from it, specks dropped;
    only the strokes' bounding box plus the edge margin (the rest is background)."""
    contrast = max(background, 1 - background)
    difference = np.abs(gray - background)
    strong = difference > MIN_CONTRAST * contrast
    x, y, width, height = cv2.boundingRect(_as_uint8(strong))
    if width == 0:
        return np.zeros_like(gray)  # blank
    box = (
        slice(max(y - edge, 0), y + height + edge),
        slice(max(x - edge, 0), x + width + edge),
    )
    ink, strong = difference[box] / contrast, strong[box]
    kept = _without_specks(strong)
    # Strokes without stray dots, plus their anti-aliased edges; faint resampling halos farther
    # out would stretch the bounding box.
    return np.where(_grow(kept, edge), ink, 0)


def _without_specks(strong: np.ndarray) -> np.ndarray:
    """The mask without blobs under SPECK_FRACTION of the largest (strokes touching at a corner
    are one blob)."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(_as_uint8(strong), connectivity=8)
    areas = stats[:, cv2.CC_STAT_AREA]
    areas[0] = 0  # the background
    specks = areas < SPECK_FRACTION * areas.max()
    specks[0] = False  # the background is not a speck, and is not kept either (strong is 0)
    return strong & ~specks[labels] if specks.any() else strong


def _grow(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask dilated by `width` px in all 8 directions."""
    square = np.ones((2 * width + 1, 2 * width + 1), dtype=np.uint8)
    return cv2.dilate(_as_uint8(mask), square).view(bool)  # 0s and 1s: already booleans


def _as_uint8(mask: np.ndarray) -> np.ndarray:
    """A boolean mask as the contiguous 0/1 bytes OpenCV takes (no copy when it already is)."""
    return np.ascontiguousarray(mask).view(np.uint8)


def _grayscale(image: Image.Image) -> np.ndarray:
    """Luminance in [0, 1], longest side at most WORK_SIDE, transparency flattened away."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.nan_to_num(np.asarray(image, dtype=np.float32))
        image = Image.fromarray(np.clip(_unit_range(image.mode, values), 0, 1).astype(np.float32))
    elif image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = _shrink(image.convert("RGBA"))
        if rgba.getextrema()[3][0] < 255:
            return _flattened(np.asarray(rgba))
        # Opaque, as most canvas exports are: nothing to flatten.
        image = rgba.convert("L")
    else:
        try:
            image = image.convert("L")
        except ValueError:
            raise ImageError(
                f"Images in colour mode {image.mode} are not supported; send an RGB or "
                "grayscale image.",
                status=415,
            ) from None
    return np.asarray(_shrink(image), dtype=np.float32) / (1 if image.mode == "F" else 255)


def _unit_range(mode: str, values: np.ndarray) -> np.ndarray:
    """High-depth pixels scaled to [0, 1]: white is 65535 for 16-bit ones, and a guess otherwise."""
    if mode.startswith("I;16"):
        return values / 65535
    low, peak = float(values.min()), float(values.max())
    for white in (1.0, 255.0, 65535.0):  # the usual ranges of float, 8-bit and 16-bit data
        if low >= 0 and peak <= white:
            return values / white
    return (values - low) / max(peak - low, 1e-12)


def _shrink(image: Image.Image) -> Image.Image:
    scale = WORK_SIDE / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BOX)


def _flattened(rgba: np.ndarray) -> np.ndarray:
    """Luminance in [0, 1] of uint8 RGBA pixels with transparency, composited onto a background
    level chosen so that transparent areas read as background."""
    pixels = rgba.astype(np.float32) / 255
    color, alpha = pixels[..., :3] @ LUMA, pixels[..., 3]
    if alpha.sum() == 0:
        return np.zeros_like(alpha)  # fully transparent: blank
    level = np.average(color, weights=alpha)
    if alpha.mean() >= 0.5:
        # Mostly opaque: a picture with transparent margins; extend its own background level.
        return color * alpha + level * (1 - alpha)
    # Mostly transparent: what is opaque is the strokes, so put them on the opposite colour.
    return color * alpha + (1.0 if level < 0.5 else 0.0) * (1 - alpha)


def _looks_dark_on_light(gray: np.ndarray) -> bool:
    """Whether the background (the median, while ink covers under half the image) is nearer
    the bright end than the dark end; block means keep noise from setting the extremes."""
    small = _block_mean(gray, _block_side(gray.shape))
    return bool(np.median(small) > (small.min() + small.max()) / 2)


def _find_ink(gray: np.ndarray, invert: bool) -> np.ndarray:
    """Ink intensity in [0, 1] (background exactly 0), with specks dropped and soft edges kept."""
    ink = 1 - gray if invert else gray
    background = _background(ink)
    signal = ink - background
    if invert:
        # Lighting scales paper and ink alike, so contrast relative to the paper is what is even.
        signal /= np.maximum(1 - background, 0.2)
    sample = signal[::2, ::2]  # a quarter of the pixels estimate the noise as well, and faster
    noise = 1.4826 * np.median(np.abs(sample - np.median(sample)))  # robust std (MAD)
    signal = np.clip(signal, 0, None)

    strong = signal > max(_otsu(signal), 5 * noise, MIN_CONTRAST)
    count, labels = cv2.connectedComponents(_as_uint8(strong), connectivity=8)
    if count == 1:  # the background alone
        return np.zeros_like(gray)
    areas = np.bincount(labels.ravel())
    areas[0] = 0  # the background
    if areas.max() < 1e-4 * gray.size:
        return np.zeros_like(gray)  # a few stray pixels in a big image are dust, not a digit
    kept = (areas >= SPECK_FRACTION * areas.max())[labels]

    # Fainter pixels count as the strokes' anti-aliased edges only right beside them: grown
    # further (hysteresis), they can creep through faint background texture across the image.
    floor = 3 * noise
    mask = _grow(kept, EDGE_WIDTH) & (signal > max(floor, MIN_EDGE))
    # Taking off the noise floor lets the faintest kept pixels fade out instead of ending in a
    # step; a clean image (no noise) keeps its exact values, so an MNIST digit passes unchanged.
    stroke = np.percentile(signal[kept], 90)  # the level a stroke's core reaches
    soft = np.clip((signal - floor) / max(stroke - floor, 1e-6), 0, 1)
    return np.where(mask, soft, 0)


def _block_side(shape: tuple[int, ...]) -> int:
    """Side of the blocks that leave about 64 of them along the image's short side."""
    return max(1, min(shape) // 64)


def _blocks(image: np.ndarray, factor: int) -> list[np.ndarray]:
    """One array per offset within the image's `factor`-square blocks, edges padded."""
    height, width = image.shape
    padded = image
    if height % factor or width % factor:  # a copy only when it is needed
        padded = np.pad(image, ((0, -height % factor), (0, -width % factor)), mode="edge")
    return [padded[i::factor, j::factor] for i in range(factor) for j in range(factor)]


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    height, width = image.shape
    if factor > 1 and height % factor == 0 and width % factor == 0 and image.dtype == np.float32:
        # Whole blocks: OpenCV's area resize is exactly their means.
        size = (width // factor, height // factor)
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    parts = _blocks(image, factor)
    return sum(parts[1:], parts[0]) / len(parts)


def _background(ink: np.ndarray) -> np.ndarray:
    """Smooth level under the ink: a grey opening wider than any stroke, at low resolution."""
    # Block maxima, not means: a dark gap narrower than a block (between strokes) must not
    # drag the background down around it.
    small = functools.reduce(np.maximum, _blocks(ink, _block_side(ink.shape)))
    size = max(3, min(small.shape) // 3)  # a third of the image: wider than even a thick stroke
    # Odd reflection continues lighting gradients past the edge; plain padding would flatten them
    # there and leave a band of false ink along the darker border.
    small = np.pad(small, size, mode="reflect", reflect_type="odd")
    opened = ndimage.grey_opening(small, size=(size, size))[size:-size, size:-size]
    # Resize to whole blocks, then crop, so that block centres stay where they belong.
    factor = _block_side(ink.shape)
    blocks = (opened.shape[1] * factor, opened.shape[0] * factor)
    full = np.asarray(Image.fromarray(opened).resize(blocks, Image.Resampling.BILINEAR))
    return full[: ink.shape[0], : ink.shape[1]]


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold: the level that best splits non-negative values into two classes."""
    top = max(float(values.max()), 1e-6)
    bins = np.minimum(values.ravel() * (256 / top), 255).astype(np.intp)
    counts = np.bincount(bins, minlength=256)
    centers = (np.arange(256) + 0.5) * (top / 256)
    below = np.cumsum(counts)
    above = below[-1] - below
    sum_below = np.cumsum(counts * centers)
    mean_below = sum_below / np.maximum(below, 1)
    mean_above = (sum_below[-1] - sum_below) / np.maximum(above, 1)
    between = below * above * (mean_below - mean_above) ** 2
    return (int(np.argmax(between)) + 1) * top / 256


def _center(ink: np.ndarray) -> np.ndarray:
    """Crop to the ink, scale its longest side to 20 px, centre its mass at (14, 14) in 28x28."""
    x, y, width, height = cv2.boundingRect(_as_uint8(ink > 0))
    if width == 0:
        return np.zeros((28, 28), dtype=np.uint8)  # no ink: a blank input
    crop = np.ascontiguousarray(ink[y : y + height, x : x + width], dtype=np.float32)
    scale = 20 / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS)
    digit = np.asarray(resized).clip(0, 1)
    peak = digit.max()
    if peak == 0:
        return np.zeros((28, 28), dtype=np.uint8)
    # Thin strokes fade when shrunk, but MNIST strokes always peak at white.
    digit = np.rint(digit / peak * 255).astype(np.uint8)
    # MNIST moved each digit by whole pixels (its centres of mass lie within half a pixel of
    # (14, 14)); a subpixel shift would resample, blurring the strokes and breaking parity.
    moments = cv2.moments(digit)
    cy, cx = moments["m01"] / moments["m00"], moments["m10"] / moments["m00"]
    top = min(max(round(14 - cy), 0), 28 - size[1])
    left = min(max(round(14 - cx), 0), 28 - size[0])
    canvas = np.zeros((28, 28), dtype=np.uint8)
    canvas[top : top + size[1], left : left + size[0]] = digit
    return canvas
