"""Preprocessing, step by step: what a canvas drawing and a 12-megapixel phone photo cost on
top of their decode, and the decoders side by side (libspng, OpenCV, Pillow).

    python -m benchmarks.bench_preprocess [--out DIR]

Writes preprocess.json and preprocess.md. Most figures are the best of several rounds of many
calls, in microseconds: on a busy machine the best round is the one the others disturbed least.
A step repeated in a loop runs with its code and data in the CPU's caches, which a request does
not find them in, so the drawing's steps are also timed in request order: once per request,
between the other steps of its request, after a pause as between a lone client's requests.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np
import pyspng
from PIL import Image

from benchmarks import save_report
from digitops.data import mnist, realworld
from digitops.files import png
from digitops.inference import preprocess as pp
from digitops.inference.served import load_served_model
from digitops.inference.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DRAWING_TARGET_US = 400  # on top of the decode
PHOTO_TARGET_MS = 25
PREPROCESSING = ("decode + luminance", "shrink", "flat background", "ink", "centre")
STEP_NAMES = {
    "ink": "ink (strokes, specks, edges)",
    "centre": "crop, resize to 20 px, centre",
}


def best_us(fn, calls: int, rounds: int = 7) -> float:
    return min(timeit.repeat(fn, number=calls, repeat=rounds)) / calls * 1e6


def in_request_order(data: bytes, served, requests: int = 1000, pause_s: float = 0.002) -> dict:
    """Median microseconds of each step of a drawing's request, timed as the request meets it:
    the preprocessing steps, the forward pass and the input's PNG, once each per request, with
    `pause_s` between requests."""
    limits = (pp.DEFAULT_MAX_BYTES, pp.DEFAULT_MAX_PIXELS)
    steps: dict[str, list[float]] = {}

    def timed(step: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        steps.setdefault(step, []).append(time.perf_counter() - start)
        return result

    for _ in range(requests):
        time.sleep(pause_s)
        gray = timed("decode + luminance", pp._plain_png, data, *limits)
        small, edge = timed("shrink", pp._drawing_size, gray)
        background = timed("flat background", pp._flat_background, small)
        ink = timed("ink", pp._drawn_ink, small, background, edge)
        pixels = timed("centre", pp._center, ink)
        timed("forward pass", served.answers, pixels[None])
        timed("input PNG", png, pixels)
    return {step: float(np.median(times[requests // 10 :])) * 1e6 for step, times in steps.items()}


def drawings(mode: str = "L", count: int = 10) -> list[bytes]:
    """Real MNIST test digits drawn on a 280x280 canvas, as PNG: grey ("L"), or RGBA, which is
    what a browser's canvas export is (the web page's)."""
    with tempfile.TemporaryDirectory() as tmp:
        mnist._from_directory(ROOT / "tests" / "fixtures" / "mnist", Path(tmp))
        images, _ = mnist.load(Path(tmp), "t10k")
    out = []
    for pixels in images[:count]:
        buf = io.BytesIO()
        canvas = Image.fromarray(pixels).resize((280, 280), Image.BICUBIC)
        canvas.convert(mode).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def phone_photo(seed: int = 0) -> bytes:
    """A digit in pen on paper (the real-world set's renderer) at a phone camera's 4032x3024,
    with sensor noise, as JPEG quality 90."""
    rng = np.random.default_rng(seed)
    fonts = realworld.find_fonts()
    if fonts:
        ink = realworld.font_digit(fonts[0], 7, rng)
    else:  # no handwriting fonts installed: a drawn MNIST digit instead
        ink = np.asarray(Image.open(io.BytesIO(drawings(count=1)[0])).convert("L"))
    paper = realworld.render_paper(ink, rng).resize((4032, 3024), Image.BICUBIC)
    noisy = np.asarray(paper, np.float32) + rng.normal(0, 2, (3024, 4032, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def measure() -> dict:
    import cv2  # a dependency of the service's preprocessing

    cv2.setNumThreads(1)  # as a request runs: one core each

    def cv_decode(data: bytes, flags=cv2.IMREAD_UNCHANGED):
        return cv2.imdecode(np.frombuffer(data, np.uint8), flags)

    results: dict = {"opencv": cv2.__version__}
    # A plain PNG's decode is libspng's (pp._plain_png); OpenCV's and Pillow's are for comparison.
    steps = {
        "decode": pyspng.load,
        "opencv_decode": cv_decode,
        "pillow_decode": pp.decode,
        "preprocess": pp.preprocess,
    }
    for name, pngs in (("drawing", drawings()), ("canvas_rgba", drawings("RGBA"))):
        for step, fn in steps.items():
            calls = lambda fn=fn, pngs=pngs: [fn(d) for d in pngs]  # noqa: E731
            results[f"{name}_{step}_us"] = best_us(calls, 20) / len(pngs)
    pngs = drawings(count=1)
    limits = (pp.DEFAULT_MAX_BYTES, pp.DEFAULT_MAX_PIXELS)
    gray = pp._plain_png(pngs[0], *limits)
    small, edge = pp._drawing_size(gray)
    background = pp._flat_background(small)
    ink = pp._drawn_ink(small, background, edge)
    results["drawing_shrunk_to"] = f"{small.shape[1]}x{small.shape[0]}"
    results["drawing_steps_us"] = {
        "decode + luminance": best_us(lambda: pp._plain_png(pngs[0], *limits), 200),
        "shrink": best_us(lambda: pp._drawing_size(gray), 200),
        "flat background": best_us(lambda: pp._flat_background(small), 200),
        "ink": best_us(lambda: pp._drawn_ink(small, background, edge), 200),
        "centre": best_us(lambda: pp._center(ink), 200),
    }
    settings = Settings.from_env()
    served = load_served_model(settings.model_tag, settings.shipped_model)
    pixels = pp._center(ink)
    results["drawing_steps_us"]["forward pass"] = best_us(lambda: served.answers(pixels[None]), 200)
    results["drawing_steps_us"]["input PNG"] = best_us(lambda: png(pixels), 200)
    results["drawing_request_order_us"] = in_request_order(pngs[0], served)
    photo = phone_photo()
    results["photo_bytes"] = len(photo)
    results["photo_decode_ms"] = best_us(lambda: pp.decode(photo, draft_side=pp.WORK_SIDE), 3) / 1e3
    results["photo_preprocess_ms"] = best_us(lambda: pp.preprocess(photo), 3) / 1e3
    results["photo_full_decode_ms"] = best_us(lambda: pp.decode(photo), 2, rounds=3) / 1e3
    # IMREAD_REDUCED_GRAYSCALE_8 is OpenCV's DCT-scaled decode, like Pillow's draft.
    results["photo_opencv_decode_ms"] = (
        best_us(lambda: cv_decode(photo, cv2.IMREAD_REDUCED_GRAYSCALE_8), 3) / 1e3
    )
    return results


def report(r: dict) -> list[str]:
    over = r["drawing_preprocess_us"] - r["drawing_decode_us"]
    names = {**STEP_NAMES, "shrink": f"shrink to {r['drawing_shrunk_to']} (block means)"}
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines = [
        "# Preprocessing",
        "",
        "Best of 7 rounds, one thread. A canvas drawing is a 280x280 PNG of an MNIST test digit;",
        f"the photo a pen digit on paper at 4032x3024, JPEG ({r['photo_bytes'] / 1e6:.1f} MB).",
        "",
        "| step | libspng | OpenCV | Pillow |",
        "|---|---|---|---|",
    ]
    for name, what in (("drawing", "drawing (grey)"), ("canvas_rgba", "canvas export (RGBA)")):
        lines += [
            f"| {what}: decode | {r[f'{name}_decode_us']:.0f} us (used) | "
            f"{r[f'{name}_opencv_decode_us']:.0f} us | {r[f'{name}_pillow_decode_us']:.0f} us |",
            f"| {what}: whole preprocessing | {r[f'{name}_preprocess_us']:.0f} us | | |",
        ]
        if name == "drawing":
            steps = [(k, v) for k, v in r["drawing_steps_us"].items() if k in PREPROCESSING]
            lines += [f"| - {names.get(step, step)} | {us:.0f} us | | |" for step, us in steps]
    lines += [
        f"| photo: decode at 1/8 scale (JPEG draft) | | {r['photo_opencv_decode_ms']:.1f} ms | "
        f"{r['photo_decode_ms']:.1f} ms (used) |",
        f"| photo: full-size decode (for scale) | | | {r['photo_full_decode_ms']:.1f} ms |",
        f"| photo: whole preprocessing | | | {r['photo_preprocess_ms']:.1f} ms |",
        "",
        f"- Drawing, preprocessing on top of its decode: {over:.0f} us "
        f"(target <= {DRAWING_TARGET_US} us: {met(over <= DRAWING_TARGET_US)})",
        f"- 12-megapixel photo, whole preprocessing: {r['photo_preprocess_ms']:.1f} ms "
        f"(target < {PHOTO_TARGET_MS} ms: {met(r['photo_preprocess_ms'] < PHOTO_TARGET_MS)})",
        "",
        "The grey drawing's request, step by step: the best round of a loop of each step alone,",
        "and the median as a request meets it (once each per request, 2 ms between requests):",
        "",
        "| step | in a loop of itself | in request order |",
        "|---|---|---|",
    ]
    loop, order = r["drawing_steps_us"], r["drawing_request_order_us"]
    for step, us in order.items():
        lines.append(f"| {names.get(step, step)} | {loop[step]:.0f} us | {us:.0f} us |")
    lines.append(
        f"| preprocessing, decode included | {sum(loop[s] for s in PREPROCESSING):.0f} us | "
        f"{sum(order[s] for s in PREPROCESSING):.0f} us |"
    )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    args = parser.parse_args(argv)
    results = measure()
    save_report(args.out, "preprocess", results, report(results))


if __name__ == "__main__":
    main()
