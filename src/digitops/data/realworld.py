"""A held-out set of "real-world" digit images, to score the served model end to end.

Three sources of digits, drawn the way users send them to the service:
MNIST *test* digits (never training digits) as web-canvas drawings and as photos of ink on
paper, and digits from handwriting fonts in both styles. Everything is derived from one seed,
so the same command writes the same files.

    python -m digitops.data.realworld --out DIR --count 400 --seed 0 --first-index 5000
"""

from __future__ import annotations

import argparse
import csv
import logging
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from digitops.data import mnist

log = logging.getLogger(__name__)

KINDS = ("canvas", "paper", "font-canvas", "font-paper")
# How `--count` is split over the kinds: MNIST digits carry most of the weight because fonts
# are far less varied than handwriting.
KIND_SHARES = {"canvas": 0.375, "paper": 0.375, "font-canvas": 0.125, "font-paper": 0.125}

# Debian packages of the handwriting fonts, and the files used from them (globs under
# FONT_DIR). Chosen from a contact sheet: every digit reads unambiguously to a person.
# Left out: Rufscript (its 7 looks like a 1), Humor Sans (odd 9), Breip and Delphine (1 and 2
# too unusual), BecauseWeLearn/Mentor (6 and 7 look like letters), Kristi (its 7 reads as a 2).
# Ecolier is a French school hand: flagged 1s and crossed 7s, as much of Europe writes them.
FONT_PACKAGES = (
    "fonts-comic-neue",
    "fonts-dkg-handwriting",
    "fonts-sjfonts",
    "fonts-klee",
    "fonts-bwht",
    "fonts-dancingscript",
    "fonts-ecolier-court",
)
FONT_DIR = Path("/usr/share/fonts")
FONT_GLOBS = (
    "*/comic-neue/ComicNeue-Bold.otf",
    "*/comic-neue/ComicNeue-Regular.otf",
    "*/comic-neue/ComicNeue-BoldItalic.otf",
    "*/fifthhorseman/dkg.ttf",
    "*/fifthhorseman/dkgBd.ttf",
    "*/sjfonts/SteveHand.ttf",
    "*/klee/KleeOne-SemiBold.ttf",
    "*/bwht/BecauseWeConnect-Regular.otf",
    "*/bwht/BecauseWeOrganize-Regular.otf",
    "*/dancingscript/DancingScript-Bold.otf",
    "*/ecolier-court/Ecolier-court.ttf",
)

CANVAS_SIZE = 280  # the web page's drawing canvas, in pixels
BRUSH_WIDTHS = (6, 40)  # the page's brush slider, in canvas pixels
# Digits are thinned to their centre line at this height at most (`_stroke`).
THIN_HEIGHT = 64


def find_fonts(font_dir: Path = FONT_DIR) -> list[Path]:
    """The installed font files of FONT_GLOBS, in FONT_GLOBS order."""
    return [path for pattern in FONT_GLOBS for path in sorted(Path(font_dir).glob(pattern))]


def font_digit(font_path: Path, digit: int, rng: np.random.Generator) -> np.ndarray:
    """`digit` in the font as an ink mask (uint8, ink 255 on 0), with a random slant."""
    return font_glyph(font_path, str(digit), rng)


def font_glyph(font_path: Path, text: str, rng: np.random.Generator) -> np.ndarray:
    """`text` in the font as an ink mask (uint8, ink 255 on 0), with a random slant."""
    size = 200
    font = ImageFont.truetype(str(font_path), size)
    image = Image.new("L", (2 * size, 2 * size), 0)
    ImageDraw.Draw(image).text((size, size), text, fill=255, font=font, anchor="mm")
    shear = rng.uniform(-0.15, 0.15)
    # Shear about the centre, so the glyph stays on the image.
    image = image.transform(
        image.size, Image.Transform.AFFINE, (1, shear, -shear * size, 0, 1, 0), Image.BICUBIC
    )
    return _crop_to_ink(np.asarray(image))


def render_canvas(ink: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A digit as drawn on the web page: a white round-brush stroke on a black 280x280 canvas.

    `ink` is any ink mask (white on black), e.g. a 28x28 MNIST digit or a `font_digit`. Drawn
    from a quarter of the canvas tall to nearly all of it, anywhere on it, with a brush from
    the page's slider (never so wide for its size that the digit becomes a blob). 60% are
    opaque (RGBA or RGB); 40% have a transparent background, as a canvas exported without a
    fill does, half of those with black strokes.
    """
    height = rng.uniform(0.25, 0.9) * CANVAS_SIZE
    low, high = BRUSH_WIDTHS
    brush = rng.uniform(low, np.clip(0.22 * height, low, high))
    alpha = _stroke(ink, height, brush, angle=rng.uniform(-10, 10))
    coverage = _place(alpha, (CANVAS_SIZE, CANVAS_SIZE), rng, margin=6)
    level = np.round(coverage * 255).astype(np.uint8)
    style = rng.random()
    if style < 0.6:
        return Image.fromarray(level).convert("RGBA" if style < 0.45 else "RGB")
    # Browsers export untouched pixels as (0, 0, 0, 0) and stroke pixels in the stroke colour
    # with the coverage in alpha.
    white = style < 0.8
    rgb = np.where(level[..., None] > 0, 255 if white else 0, 0).astype(np.uint8)
    return Image.fromarray(np.dstack([np.broadcast_to(rgb, (*level.shape, 3)), level]), "RGBA")


def render_paper(ink: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A digit written on paper and photographed or scanned (RGB, save it as JPEG).

    Black or blue pen, or pencil (a fifth: grey, grainy, thin); plain paper or, a third of the
    time, ruled or squared; the digit off-centre at 20-70% of the height, rotated up to 12
    degrees; then `photograph`.
    """
    shape = paper_shape(rng)
    ink_height = rng.uniform(0.2, 0.7) * shape[0]
    pencil = rng.random() < 0.2
    pen = max(1.5, (rng.uniform(0.03, 0.06) if pencil else rng.uniform(0.04, 0.11)) * ink_height)
    alpha = _stroke(ink, ink_height, pen, angle=rng.uniform(-12, 12))
    alpha = _place(alpha, shape, rng, margin=max(4, round(0.03 * min(shape))))
    # Pen pressure and ink flow vary along the stroke; graphite leaves grain.
    flow = rng.uniform(0.85, 1.0) * (1 - 0.1 * _smooth_noise(shape, max(2.0, pen), rng))
    if pencil:
        grain = np.abs(_smooth_noise(shape, 0.7, rng))
        flow = flow * rng.uniform(0.55, 0.85) * (1 - 0.3 * np.minimum(grain, 1.5))
    alpha = np.clip(alpha * flow, 0, 1)
    lines = paper_lines(shape, rng, creases=False) if rng.random() < 0.33 else None
    return photograph(alpha, rng, ink="pencil" if pencil else "pen", lines=lines)


def paper_shape(rng: np.random.Generator) -> tuple[int, int]:
    """The pixel size of a photo or scan: mostly phone-sized, a tenth of them large."""
    long_side = rng.uniform(200, 800) if rng.random() < 0.9 else rng.uniform(800, 1600)
    aspect = rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9])
    shape = (round(long_side / aspect), round(long_side))
    return shape[::-1] if rng.random() < 0.5 else shape


def paper_lines(shape: tuple[int, int], rng: np.random.Generator, creases: bool) -> np.ndarray:
    """Coverage of the printed lines of ruled or squared paper or, if `creases`, a third of the
    time a crease or two instead: long, faint straight lines across the sheet."""
    alpha = Image.new("F", shape[::-1], 0)
    pen = ImageDraw.Draw(alpha)
    gap = rng.uniform(0.04, 0.1) * min(shape)
    style = rng.integers(3 if creases else 2)
    level = rng.uniform(0.15, 0.4)
    width = max(1, round(gap / 12))
    if style < 2:  # ruled (style 0) or squared (style 1)
        for y in np.arange(rng.uniform(0, gap), shape[0], gap):
            pen.line([(0, y), (shape[1], y)], fill=level, width=width)
        for x in np.arange(rng.uniform(0, gap), shape[1], gap) if style == 1 else ():
            pen.line([(x, 0), (x, shape[0])], fill=level, width=width)
    else:
        for _ in range(int(rng.integers(1, 4))):
            ends = rng.uniform(0, 1, 4) * [shape[1], shape[0], shape[1], shape[0]]
            pen.line([tuple(ends[:2]), tuple(ends[2:])], fill=level / 2, width=width)
    return np.asarray(alpha)


# Ink colours (RGB): black and blue pens; graphite.
PEN_COLOURS = ([20, 20, 25], [25, 35, 110], [30, 45, 150], [45, 45, 55])
PENCIL_COLOUR = [70, 70, 78]
# Printed rulings: light blue, grey, or the red of a margin line.
LINE_COLOURS = ([150, 185, 225], [170, 170, 175], [200, 150, 150])


def photograph(
    alpha: np.ndarray,
    rng: np.random.Generator,
    ink: str = "pen",
    lines: np.ndarray | None = None,
) -> Image.Image:
    """Ink coverage `alpha` (0 everywhere: a blank sheet) on tinted, textured paper with
    optional printed `lines`, photographed (uneven light, a shadow a fifth of the time, blur,
    sensor noise) or, a tenth of the time, scanned (even light, sharper, little noise). RGB."""
    shape, long_side = alpha.shape, max(alpha.shape)
    tint = rng.choice([[0, 4, 14], [0, 0, 0], [6, 3, 0], [2, 2, 6]])
    paper = np.array([255, 255, 255]) - tint - rng.uniform(0, 25)
    texture = 4 * _smooth_noise(shape, 0.7, rng) + 3 * _smooth_noise(shape, min(shape) / 10, rng)
    image = (paper[None, None, :] + texture[..., None] - 4).astype(np.float32)
    if lines is not None:
        colour = np.array(LINE_COLOURS[rng.integers(len(LINE_COLOURS))], np.float32)
        image += (colour - image) * lines[..., None]
    colour = PENCIL_COLOUR if ink == "pencil" else PEN_COLOURS[rng.integers(len(PEN_COLOURS))]
    image += (np.array(colour, np.float32) - image) * alpha[..., None]

    scan = rng.random() < 0.1
    if scan:
        image *= rng.uniform(0.97, 1.03)
        sigma, noise = rng.uniform(0.3, 0.6), rng.uniform(0.2, 1.0)
    else:
        image *= _lighting(shape, rng)[..., None]
        sigma, noise = rng.uniform(0.4, 1.2) * max(1.0, long_side / 800), rng.uniform(0.5, 2.5)
    image = cv2.GaussianBlur(image, (0, 0), sigma)
    image += noise * rng.standard_normal(image.shape, dtype=np.float32)
    return Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8), "RGB")


# Share of the MNIST 1s and 7s redrawn the European way (`european`).
EUROPEAN_SHARE = 0.6


def european(ink: np.ndarray, digit: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """An MNIST 1 given a flag (and half the time a foot), or a 7 given a bar through its stem,
    the way much of Europe writes them: (the ink mask, 4x larger; the style's name)."""
    big = np.asarray(
        Image.fromarray(ink).resize((ink.shape[1] * 4, ink.shape[0] * 4), Image.BICUBIC)
    )
    strong = big > 128
    rows, cols = np.nonzero(strong)
    top, bottom = rows.min(), rows.max()
    height = bottom - top + 1
    width = round(2 * np.percentile(ndimage.distance_transform_edt(strong)[strong], 90))
    image = Image.fromarray(big)
    pen = ImageDraw.Draw(image)
    if digit == 7:
        # Across the stem a little below half height, about a third of the height long.
        y = top + rng.uniform(0.45, 0.6) * height
        x = cols[np.abs(rows - y) < 3].mean()
        half = rng.uniform(0.13, 0.22) * height
        tilt = np.tan(np.deg2rad(rng.uniform(-6, 6))) * half
        pen.line([(x - half, y + tilt), (x + half, y - tilt)], fill=255, width=width)
        return np.asarray(image), "crossed-7"
    near_top, near_bottom = rows < top + 0.1 * height, rows > bottom - 0.1 * height
    head = np.array([cols[near_top].mean(), top])
    foot = np.array([cols[near_bottom].mean(), bottom])
    up = (head - foot) / np.linalg.norm(head - foot)  # along the stem, in (x, y) with y down
    right = np.array([-up[1], up[0]])
    # The flag runs from the top down to the left, at 25-50 degrees to the stem's normal.
    drop = np.deg2rad(rng.uniform(25, 50))
    flag = rng.uniform(0.25, 0.45) * height * (-np.cos(drop) * right - np.sin(drop) * up)
    pen.line([tuple(head), tuple(head + flag)], fill=255, width=width)
    if rng.random() < 0.5:
        return np.asarray(image), "flagged-1"
    half = rng.uniform(0.15, 0.25) * height
    pen.line([tuple(foot - half * right), tuple(foot + half * right)], fill=255, width=width)
    return np.asarray(image), "flagged-footed-1"


def make_set(
    out_dir: Path,
    n_per_kind: Mapping[str, int],
    seed: int,
    mnist_dir: Path = Path("data/mnist"),
    first_index: int = 0,
) -> list[dict[str, str]]:
    """Write the images of each kind and `labels.csv` (file,label,kind,source,style) into
    `out_dir`; `style` names a European 1 or 7 (`european`), else it is empty.

    Labels cycle through 0-9 within each kind, so every kind is balanced over digits. MNIST
    digits come from test indices >= `first_index`, each used once. The font kinds are skipped,
    with a warning, when none of FONT_GLOBS is installed. Returns the rows of `labels.csv`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = mnist.load(mnist_dir, "t10k")
    order = np.random.default_rng(seed).permutation(np.arange(first_index, len(labels)))
    unused = {digit: [i for i in order if labels[i] == digit] for digit in range(10)}

    fonts = find_fonts()
    font_kinds = [kind for kind, n in n_per_kind.items() if kind.startswith("font") and n > 0]
    if font_kinds and not fonts:
        log.warning(
            "no handwriting fonts under %s, skipping %s; install them with: apt-get install %s",
            FONT_DIR,
            ", ".join(font_kinds),
            " ".join(FONT_PACKAGES),
        )

    rows = []
    for kind, count in n_per_kind.items():
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        if kind.startswith("font") and not fonts:
            continue
        for i in range(count):
            # One generator per image: an image does not change when another kind's count does.
            rng = np.random.default_rng([seed, KINDS.index(kind), i])
            digit, style = i % 10, ""
            if kind.startswith("font"):
                font = fonts[rng.integers(len(fonts))]
                ink, source = font_digit(font, digit, rng), f"font:{font.stem}"
            else:
                index = int(unused[digit].pop(0))
                ink, source = images[index], f"mnist-t10k:{index}"
                if digit in (1, 7) and rng.random() < EUROPEAN_SHARE:
                    ink, style = european(ink, digit, rng)
            if kind.endswith("canvas"):
                name = f"{kind}-{i:04d}.png"
                render_canvas(ink, rng).save(out_dir / name, optimize=True)
            else:
                name = f"{kind}-{i:04d}.jpg"
                quality = int(rng.integers(50, 91))
                render_paper(ink, rng).save(out_dir / name, quality=quality, optimize=True)
            rows.append(
                {"file": name, "label": str(digit), "kind": kind, "source": source, "style": style}
            )

    with open(out_dir / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "label", "kind", "source", "style"])
        writer.writeheader()
        writer.writerows(rows)
    log.info("wrote %d images and labels.csv to %s", len(rows), out_dir)
    return rows


def split_count(total: int) -> dict[str, int]:
    """`total` images shared out over the kinds by KIND_SHARES."""
    return {kind: round(total * share) for kind, share in KIND_SHARES.items()}


def _crop_to_ink(ink: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(ink > 0.2 * ink.max())
    return ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _stroke(ink: np.ndarray, height: float, width: float, angle: float) -> np.ndarray:
    """Coverage in [0, 1] of `ink` redrawn `height` px tall with a round pen `width` px wide.

    An upscaled 28x28 digit is a blurry bitmap whose strokes swell and thin; a pen draws one
    width everywhere. So the digit is thinned to its centre line, which is then drawn with the
    pen: the distance to the centre line, cut at the pen's radius, with a 1 px ramp as
    anti-aliasing.
    """
    ink = _crop_to_ink(ink).astype(np.float32)
    pad = max(ink.shape) // 4 + 2  # room for the pen to grow and for rotation
    ink = np.pad(ink, pad)
    # Thinning costs one pass per pixel of stroke half-width, so big digits are thinned at a
    # smaller size (THIN_HEIGHT) and their centre line is scaled up.
    work_height = min(height, THIN_HEIGHT)
    scale = work_height / (ink.shape[0] - 2 * pad)
    size = (round(ink.shape[1] * scale), round(ink.shape[0] * scale))
    field = Image.fromarray(ink, "F").resize(size, Image.BICUBIC)
    field = np.asarray(field.rotate(angle, Image.BILINEAR, expand=True))
    field = ndimage.gaussian_filter(field, np.clip(0.3 * scale, 0.5, 6))
    # A faint stretch of stroke is still stroke (cut at half height it would break in two),
    # but faint grey inside a loop is blur, and keeping it would close the loop.
    strong = field > 0.5 * field.max()
    loops = ndimage.binary_fill_holes(strong) & ~strong
    shape = (field > 0.2 * field.max()) & ~loops
    centre = _thin(shape)
    zoom = height / work_height
    # Thinning a filled blob (a loop the writer inked in, the heavy bar of a 7) would leave a
    # short line, and the digit would lose what makes it readable. So the shape stays filled
    # where its core is over twice as thick as its usual stroke (where strokes cross it is
    # already about 1.5 x as thick). Faint edges would blur the measure, so it uses `strong`.
    inside = ndimage.distance_transform_edt(strong)
    blob_radius = 2.0 * np.median(inside[centre & strong])
    core = inside > blob_radius
    blob = np.zeros(shape.shape, np.float32)
    if core.any():
        reach = ndimage.distance_transform_edt(~core)
        blob = np.clip(blob_radius + 0.5 - reach, 0, 1).astype(np.float32)

    centre_line = centre.astype(np.float32)
    if zoom > 1:
        out_size = (round(field.shape[1] * zoom), round(field.shape[0] * zoom))
        centre_line = np.asarray(Image.fromarray(centre_line, "F").resize(out_size, Image.BILINEAR))
        centre_line = centre_line > 0.3
        blob = np.asarray(Image.fromarray(blob, "F").resize(out_size, Image.BILINEAR))
    distance = ndimage.distance_transform_edt(centre_line == 0)
    # Scaling up widens the line by about `zoom` px, which the pen's radius makes up for.
    radius = max(0.5, (width - max(zoom, 1)) / 2)
    pen = np.clip(radius + 0.5 - distance, 0, 1)
    return _crop_to_ink(np.maximum(pen, blob).astype(np.float32))


def _thin(shape: np.ndarray) -> np.ndarray:
    """The one-pixel centre line of a binary shape (Zhang-Suen thinning, whole array per pass)."""
    image = np.pad(shape, 1).astype(np.uint8)
    while True:
        changed = False
        for second_pass in (False, True):
            core = image[1:-1, 1:-1]
            # The 8 neighbours clockwise from north, as in Zhang and Suen's paper.
            n, ne, e, se = image[:-2, 1:-1], image[:-2, 2:], image[1:-1, 2:], image[2:, 2:]
            s, sw, w, nw = image[2:, 1:-1], image[2:, :-2], image[1:-1, :-2], image[:-2, :-2]
            ring = [n, ne, e, se, s, sw, w, nw, n]
            count = sum(ring[:8])
            transitions = sum((a == 0) & (b == 1) for a, b in zip(ring[:-1], ring[1:], strict=True))
            if second_pass:
                keep_edge = (n * e * w == 0) & (n * s * w == 0)
            else:
                keep_edge = (n * e * s == 0) & (e * s * w == 0)
            remove = (core == 1) & (count >= 2) & (count <= 6) & (transitions == 1) & keep_edge
            if remove.any():
                core[remove] = 0
                changed = True
        if not changed:
            return image[1:-1, 1:-1].astype(bool)


def _place(alpha: np.ndarray, shape: tuple[int, int], rng: np.random.Generator, margin: int):
    """`alpha` pasted at a random position on a zero array of `shape`, `margin` px from edges."""
    room = np.array(shape) - 2 * margin
    if np.any(np.array(alpha.shape) > room):  # a wide digit: shrink to fit rather than clip
        factor = min(room / np.array(alpha.shape))
        size = (max(1, int(alpha.shape[1] * factor)), max(1, int(alpha.shape[0] * factor)))
        alpha = np.clip(np.asarray(Image.fromarray(alpha, "F").resize(size, Image.BICUBIC)), 0, 1)
    top = margin + rng.integers(0, room[0] - alpha.shape[0] + 1)
    left = margin + rng.integers(0, room[1] - alpha.shape[1] + 1)
    out = np.zeros(shape, np.float32)
    out[top : top + alpha.shape[0], left : left + alpha.shape[1]] = alpha
    return out


def _smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise blurred by `sigma` px and rescaled to unit standard deviation."""
    # Noise this smooth has no detail finer than sigma: drawn at a coarser step and scaled up,
    # it costs a fraction of blurring full-size noise.
    step = max(1.0, sigma / 2)
    small = (int(np.ceil(shape[0] / step)) + 1, int(np.ceil(shape[1] / step)) + 1)
    noise = cv2.GaussianBlur(rng.standard_normal(small, dtype=np.float32), (0, 0), sigma / step)
    if step > 1:
        noise = cv2.resize(noise, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    noise = noise[: shape[0], : shape[1]]
    return noise / (noise.std() + 1e-9)


def _lighting(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Brightness factor per pixel: a linear fall-off in a random direction times a vignette,
    and a fifth of the time the soft-edged shadow of a hand or a phone across part of it."""
    y = (np.arange(shape[0], dtype=np.float32) / shape[0] - 0.5)[:, None]
    x = (np.arange(shape[1], dtype=np.float32) / shape[1] - 0.5)[None, :]
    direction = rng.uniform(0, 2 * np.pi)
    along = x * np.cos(direction) + y * np.sin(direction)  # -0.7..0.7 across the image
    gradient = 1 - rng.uniform(0, 0.25) * (along + 0.7) / 1.4
    vignette = 1 - rng.uniform(0, 0.25) * (x**2 + y**2) / 0.5
    light = rng.uniform(0.88, 1.05) * gradient * vignette
    if rng.random() < 0.2:
        angle = rng.uniform(0, 2 * np.pi)
        across = x * np.cos(angle) + y * np.sin(angle) - rng.uniform(-0.3, 0.3)
        edge = rng.uniform(0.02, 0.15)
        light = light * (1 - rng.uniform(0.2, 0.5) * np.clip(0.5 + across / edge, 0, 1))
    return light


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--count", type=int, default=400, help="images in all, over the kinds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mnist", type=Path, default=Path("data/mnist"), help="raw MNIST files")
    parser.add_argument(
        "--first-index", type=int, default=0, help="use only MNIST test digits from this index on"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    make_set(args.out, split_count(args.count), args.seed, args.mnist, args.first_index)


if __name__ == "__main__":
    main()
