"""Stage `evalsets`: the held-out sets `evaluate` scores besides MNIST test, made the way users
send digits (canvas drawings, photos of paper) and turned into model inputs by the service's
own preprocessing:

- `realworld.npz`: digits (digitops.data.realworld), for accuracy and calibration;
- `notdigits.npz`: not-digits (digitops.data.notdigits), for "that doesn't look like a digit".

The images stay beside them (`images/`) to look at. Same config, same bytes.
"""

from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from digitops.data import notdigits, realworld
from digitops.inference.preprocess import Options, prepare


def preprocessed(folder: Path, rows: list[dict]) -> np.ndarray:
    """Each listed image as the model sees it (uint8 [N, 28, 28])."""
    return np.stack(
        [prepare((folder / row["file"]).read_bytes(), Options()).pixels for row in rows]
    )


def _mnist_index(source: str) -> int:
    return int(source.removeprefix("mnist-t10k:")) if source.startswith("mnist-t10k:") else -1


def write(out: Path, mnist_dir: Path, spec) -> tuple[int, int]:
    """Make both sets under `out` as `spec` (the config's `evalsets`) says; their sizes."""
    digits_dir, others_dir = out / "images" / "realworld", out / "images" / "notdigits"
    counts = dict.fromkeys(realworld.KINDS, spec.realworld_per_kind)
    digits = realworld.make_set(digits_dir, counts, spec.seed, mnist_dir)
    np.savez_compressed(
        out / "realworld.npz",
        pixels=preprocessed(digits_dir, digits),
        labels=np.array([int(row["label"]) for row in digits]),
        kinds=np.array([row["kind"] for row in digits]),
        styles=np.array([row["style"] for row in digits]),
        # The MNIST test digit each was drawn from, -1 for font digits.
        mnist_index=np.array([_mnist_index(row["source"]) for row in digits]),
        files=np.array([f"images/realworld/{row['file']}" for row in digits]),
    )
    others = notdigits.make_set(others_dir, spec.notdigits_per_category, spec.seed, mnist_dir)
    np.savez_compressed(
        out / "notdigits.npz",
        pixels=preprocessed(others_dir, others),
        categories=np.array([row["category"] for row in others]),
        paths=np.array([row["path"] for row in others]),
    )
    return len(digits), len(others)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    digits, others = write(Path(cfg.paths.evalsets), Path(cfg.paths.mnist), cfg.evalsets)
    print(f"real-world digits: {digits}; not digits: {others}")


if __name__ == "__main__":
    main()
