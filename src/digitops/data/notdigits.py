"""A held-out set of things that are not digits, to measure "that doesn't look like a digit".

Drawn the way users send digits (the web canvas, a photo of paper; `realworld`), from sources
the model never fits on: handwriting-font letters that can't be read as digits, scribbles,
shapes, blank and textured paper, noise. Pairs of MNIST test digits ("42") are a category of
their own: one digit too many, not none. Everything is derived from one seed.

    python -m digitops.data.notdigits --out DIR --count 700 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from digitops.data import mnist, realworld

log = logging.getLogger(__name__)

# Categories the not-a-digit score is judged on, and the one reported beside them.
CATEGORIES = ("letters", "scribbles", "shapes", "blank", "texture", "noise")
MULTI_DIGIT = "multi-digit"
# Letters no reader would take for a digit: no O/o/D/Q (0), I/l/i/j/L/T/J (1, 7), Z/z (2),
# S/s (5), G/b (6), B (8), g/q/a/P/y (9), U/u/V/v/Y/C (too close to open digits).
LETTERS = "AEFHKMNRWXehkmnrwx"
SHAPES = ("triangle", "square", "star", "plus", "arrow", "heart", "hash", "hexagon", "zigzag")
SIDE = 200  # strokes are drawn on a square of this many pixels, then rendered


def make_set(
    out_dir: Path, count: int, seed: int, mnist_dir: Path = Path("data/mnist")
) -> list[dict[str, str]]:
    """Write `count` images per category (and as many multi-digit pairs) and `labels.csv`
    (file,category,path) into `out_dir`. Returns the rows of `labels.csv`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fonts = realworld.find_fonts()
    digits = mnist.load(mnist_dir, "t10k")[0] if Path(mnist_dir).is_dir() else None
    rows = []
    for index, category in enumerate((*CATEGORIES, MULTI_DIGIT)):
        if category == "letters" and not fonts:
            log.warning("no handwriting fonts under %s: no letters", realworld.FONT_DIR)
            continue
        if category == MULTI_DIGIT and digits is None:
            log.warning("no MNIST under %s: no multi-digit inputs", mnist_dir)
            continue
        for i in range(count):
            rng = np.random.default_rng([seed, index, i])
            image, path = draw(category, rng, fonts, digits)
            name = f"{category}-{i:04d}." + ("png" if path == "canvas" else "jpg")
            if path == "canvas":
                image.save(out_dir / name, optimize=True)
            else:
                image.save(out_dir / name, quality=int(rng.integers(50, 91)), optimize=True)
            rows.append({"file": name, "category": category, "path": path})
    with open(out_dir / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "category", "path"])
        writer.writeheader()
        writer.writerows(rows)
    log.info("wrote %d not-a-digit images and labels.csv to %s", len(rows), out_dir)
    return rows


def draw(category: str, rng: np.random.Generator, fonts: list[Path], digits) -> tuple:
    """(image, 'canvas' or 'paper') of one input of `category`."""
    path = "canvas" if rng.random() < 0.5 else "paper"
    if category == "blank":
        if path == "canvas":
            return _blank_canvas(rng), path
        return realworld.photograph(np.zeros(realworld.paper_shape(rng)), rng), path
    if category == "texture":
        lines = realworld.paper_lines(realworld.paper_shape(rng), rng, creases=True)
        return realworld.photograph(lines, rng), "paper"
    if category == "noise":
        return _noise(rng), "canvas"
    if category == "letters":
        ink = realworld.font_glyph(fonts[rng.integers(len(fonts))], rng.choice(list(LETTERS)), rng)
    elif category == "scribbles":
        ink = _scribble(rng)
    elif category == "shapes":
        ink = _shape(SHAPES[rng.integers(len(SHAPES))], rng)
    else:  # two MNIST test digits side by side
        first, second = digits[rng.integers(len(digits), size=2)]
        ink = np.hstack([first, np.zeros((28, int(rng.integers(0, 6))), np.uint8), second])
    render = realworld.render_canvas if path == "canvas" else realworld.render_paper
    return render(ink, rng), path


def _blank_canvas(rng: np.random.Generator) -> Image.Image:
    """An untouched canvas as a browser exports it: black, or fully transparent."""
    size = (realworld.CANVAS_SIZE, realworld.CANVAS_SIZE)
    if rng.random() < 0.5:
        return Image.new("RGBA", size, (0, 0, 0, 0))
    return Image.new("RGB", size, 0)


def _noise(rng: np.random.Generator) -> Image.Image:
    """Pure noise: grey or colour, fine or blotchy, or salt and pepper."""
    size = int(rng.integers(28, 400))
    style = rng.integers(3)
    if style == 0:
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    elif style == 1:
        from scipy import ndimage

        blotches = ndimage.gaussian_filter(rng.standard_normal((size, size)), rng.uniform(1, 8))
        pixels = np.clip(128 + 60 * blotches / (blotches.std() + 1e-9), 0, 255).astype(np.uint8)
    else:
        pixels = np.where(rng.random((size, size)) < rng.uniform(0.02, 0.3), 255, 0)
        pixels = pixels.astype(np.uint8)
    return Image.fromarray(pixels)


def _polyline_ink(points: list, width: float, closed: bool = False) -> np.ndarray:
    image = Image.new("L", (SIDE, SIDE), 0)
    pen = ImageDraw.Draw(image)
    points = [tuple(map(float, p)) for p in points] + ([tuple(points[0])] if closed else [])
    pen.line(points, fill=255, width=round(width), joint="curve")
    return np.asarray(image)


def _scribble(rng: np.random.Generator) -> np.ndarray:
    """A tangle: a smooth random path through 8-16 points that crosses itself."""
    anchors = rng.uniform(30, SIDE - 30, (int(rng.integers(8, 17)), 2))
    t = np.linspace(0, 1, len(anchors))
    fine = np.linspace(0, 1, 40 * len(anchors))
    path = np.stack([np.interp(fine, t, anchors[:, k]) for k in range(2)], axis=1)
    from scipy import ndimage

    path = ndimage.gaussian_filter1d(path, 12, axis=0, mode="nearest")
    return _polyline_ink(path.tolist(), rng.uniform(8, 14))


def _shape(name: str, rng: np.random.Generator) -> np.ndarray:
    """An outline shape, slightly wobbly as drawn by hand."""
    c, r = SIDE / 2, SIDE * 0.38
    turn = rng.uniform(0, 2 * np.pi) if name in ("star", "hexagon") else rng.uniform(-0.2, 0.2)

    def ring(n: int, radii) -> list:
        angles = turn + np.arange(n) * 2 * np.pi / n
        radii = np.resize(radii, n)
        return [(c + q * np.sin(a), c - q * np.cos(a)) for q, a in zip(radii, angles, strict=True)]

    closed = name in ("triangle", "square", "star", "hexagon")
    if name == "triangle":
        points = ring(3, r)
    elif name == "square":
        points = ring(4, r)
    elif name == "star":
        points = ring(10, [r, 0.42 * r])
    elif name == "hexagon":
        points = ring(6, r)
    elif name == "plus":
        points = [(c, c - r), (c, c + r), (c, c), (c - r, c), (c + r, c)]
    elif name == "arrow":
        points = [(c - r, c), (c + r, c), (c + 0.4 * r, c - 0.5 * r), (c + r, c),
                  (c + 0.4 * r, c + 0.5 * r)]  # fmt: skip
    elif name == "heart":
        a = np.linspace(0, 2 * np.pi, 80)
        x, y = 16 * np.sin(a) ** 3, 13 * np.cos(a) - 5 * np.cos(2 * a) - 2 * np.cos(3 * a)
        points = list(zip(c + r * x / 17, c - r * y / 17, strict=True))
    elif name == "hash":
        d = 0.4 * r
        points = [(c - d, c - r), (c - d, c + r), (c + d, c + r), (c + d, c - r),
                  (c + r, c - r), (c + r, c - d), (c - r, c - d), (c - r, c + d),
                  (c + r, c + d)]  # fmt: skip
    else:  # zigzag
        xs = np.linspace(c - r, c + r, int(rng.integers(5, 9)))
        points = [(x, c + (r / 2 if k % 2 else -r / 2)) for k, x in enumerate(xs)]
    wobble = rng.normal(0, SIDE * 0.015, (len(points), 2))
    points = [(x + dx, y + dy) for (x, y), (dx, dy) in zip(points, wobble, strict=True)]
    return _polyline_ink(points, rng.uniform(8, 14), closed=closed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--count", type=int, default=100, help="images per category")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mnist", type=Path, default=Path("data/mnist"), help="raw MNIST files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    make_set(args.out, args.count, args.seed, args.mnist)


if __name__ == "__main__":
    main()
