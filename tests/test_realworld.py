"""The real-world image generator, and the set made with it under tests/fixtures/realworld.

The committed set was written by

    python -m digitops.data.realworld --out tests/fixtures/realworld --count 400 --seed 0 \
        --mnist data/mnist --first-index 5000
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digitops.data import realworld

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "tests" / "fixtures" / "realworld"
SMALL = {"canvas": 3, "paper": 3, "font-canvas": 2, "font-paper": 2}


def read_labels(directory: Path) -> list[dict[str, str]]:
    with open(directory / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small_set(mnist_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("realworld")
    realworld.make_set(out, SMALL, seed=7, mnist_dir=mnist_dir, first_index=100)
    return out


def test_same_seed_writes_the_same_bytes(small_set, mnist_dir, tmp_path):
    realworld.make_set(tmp_path, SMALL, seed=7, mnist_dir=mnist_dir, first_index=100)
    names = sorted(p.name for p in small_set.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert (small_set / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_another_seed_draws_other_images(small_set, mnist_dir, tmp_path):
    realworld.make_set(tmp_path, {"canvas": 1}, seed=8, mnist_dir=mnist_dir, first_index=100)
    assert (tmp_path / "canvas-0000.png").read_bytes() != (
        small_set / "canvas-0000.png"
    ).read_bytes()


def test_labels_csv_matches_the_files(small_set):
    rows = read_labels(small_set)
    assert {row["file"] for row in rows} == {p.name for p in small_set.iterdir()} - {"labels.csv"}
    for row in rows:
        if row["kind"].startswith("font"):
            assert re.fullmatch(r"font:\S+", row["source"]), row
        else:
            index = int(row["source"].removeprefix("mnist-t10k:"))
            assert index >= 100, "digits before first_index must stay unused"
    # Labels cycle through the digits within each kind.
    assert [row["label"] for row in rows if row["kind"] == "canvas"] == ["0", "1", "2"]
    styles = {"": "0123456789", "flagged-1": "1", "flagged-footed-1": "1", "crossed-7": "7"}
    assert all(row["label"] in styles[row["style"]] for row in rows)


def test_european_ones_get_a_flag_and_sevens_a_bar(mnist_dir):
    from digitops.data import mnist

    images, labels = mnist.load(mnist_dir, "t10k")
    one, seven = images[list(labels).index(1)], images[list(labels).index(7)]
    styles = set()
    for seed in range(8):
        for digit, image in ((1, one), (7, seven)):
            ink, style = realworld.european(image, digit, np.random.default_rng(seed))
            styles.add(style)
            plain = np.asarray(Image.fromarray(image).resize(ink.shape[::-1], Image.BICUBIC)) > 128
            rows, cols = np.nonzero((ink > 128) & ~plain)
            top, bottom = np.nonzero(plain)[0].min(), np.nonzero(plain)[0].max()
            height = bottom - top
            assert len(rows) > 50, "the added stroke is a stroke"
            if digit == 1:  # the flag hangs from the top, down to the left of it
                head = np.nonzero(plain[top : top + height // 10 + 1])[1].mean()
                assert rows.min() <= top + 0.1 * height
                assert cols.min() < head - 0.1 * height
            else:  # the bar crosses the middle of the stem
                assert top + 0.3 * height < rows.mean() < top + 0.75 * height
    assert styles == {"flagged-1", "flagged-footed-1", "crossed-7"}


def test_every_kind_is_made_and_decodes(small_set):
    if not realworld.find_fonts():
        pytest.skip(
            f"handwriting fonts not installed: apt-get install {' '.join(realworld.FONT_PACKAGES)}"
        )
    rows = read_labels(small_set)
    assert {row["kind"] for row in rows} == set(realworld.KINDS)
    for row in rows:
        with Image.open(small_set / row["file"]) as image:
            image.load()
            if row["kind"].endswith("canvas"):
                assert image.format == "PNG" and image.size == (280, 280)
            else:
                assert image.format == "JPEG" and image.mode == "RGB"
                assert 150 <= max(image.size) <= 1600


def test_canvas_is_light_on_dark_and_paper_dark_on_light(mnist_dir):
    from digitops.data import mnist

    digit = mnist.load(mnist_dir, "t10k")[0][0]
    for seed in range(4):
        canvas = realworld.render_canvas(digit, np.random.default_rng(seed))
        transparent = canvas.mode == "RGBA" and canvas.getextrema()[3][0] == 0
        ink = np.asarray(canvas.getchannel("A") if transparent else canvas.convert("L"))
        assert np.median(ink) == 0 and ink.max() == 255
        paper = np.asarray(realworld.render_paper(digit, np.random.default_rng(seed)).convert("L"))
        assert np.median(paper) > 150 and paper.min() < 100


def test_missing_fonts_skip_the_font_kinds_with_a_warning(mnist_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(realworld, "find_fonts", lambda: [])
    rows = realworld.make_set(tmp_path, SMALL, seed=7, mnist_dir=mnist_dir)
    assert {row["kind"] for row in rows} == {"canvas", "paper"}
    assert "apt-get install fonts-comic-neue" in caplog.text


def test_committed_set_lists_existing_images_with_digit_labels():
    rows = read_labels(COMMITTED)
    assert len(rows) == 400
    for row in rows:
        assert (COMMITTED / row["file"]).is_file(), row["file"]
        assert row["label"] in set("0123456789")
    counts = {kind: sum(row["kind"] == kind for row in rows) for kind in realworld.KINDS}
    assert counts == realworld.split_count(400)
    indices = [
        int(row["source"].split(":")[1]) for row in rows if row["source"].startswith("mnist")
    ]
    assert min(indices) >= 5000 and len(set(indices)) == len(indices)
    total = sum(p.stat().st_size for p in COMMITTED.iterdir())
    assert total < 6_000_000


def test_ci_installs_every_font_the_generator_uses():
    ci = (ROOT / ".ci" / "run").read_text()
    listed = re.search(r"^fonts=\((.*)\)$", ci, flags=re.M).group(1).split()
    assert sorted(listed) == sorted(realworld.FONT_PACKAGES)
