"""Stage `renders`: every MNIST training digit drawn once the way users send digits - on the
web canvas or photographed on paper, 1s and 7s often the European way (digitops.data.realworld)
- and turned back into a model input by the service's own preprocessing.

Training mixes these with the plain digits (`data.rendered_share`), so that what the model
learns from and what it is served come from one distribution. Same data and seed, same bytes;
the one-off cost (minutes) is cached by DVC.
"""

import io
import multiprocessing
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from digitops.data import mnist, realworld
from digitops.inference.preprocess import Options, prepare


def render(image: np.ndarray, label: int, seed: int, index: int) -> tuple[np.ndarray, bool]:
    """(The model input the service makes of digit `index` drawn on a canvas or on paper,
    whether it was the canvas). Its own generator: the same whatever the number of processes."""
    rng = np.random.default_rng([seed, index])
    canvas = rng.random() < 0.5
    if label in (1, 7) and rng.random() < realworld.EUROPEAN_SHARE:
        image, _ = realworld.european(image, label, rng)
    buffer = io.BytesIO()
    if canvas:
        realworld.render_canvas(image, rng).save(buffer, "PNG")
    else:
        realworld.render_paper(image, rng).save(buffer, "JPEG", quality=int(rng.integers(50, 91)))
    return prepare(buffer.getvalue(), Options()).pixels, canvas


def write(out: Path, mnist_dir: Path, seed: int, processes: int | None = None) -> int:
    """Render every training digit into `out`/train.npz (pixels, canvas); how many."""
    images, labels = mnist.load(mnist_dir, "train")
    jobs = ((images[i], int(labels[i]), seed, i) for i in range(len(labels)))
    # Rendering is CPU-bound Python: one process per core divides the wall time by the cores.
    with multiprocessing.Pool(processes) as pool:
        results = pool.starmap(render, jobs, chunksize=64)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out / "train.npz",
        pixels=np.stack([pixels for pixels, _ in results]),
        canvas=np.array([canvas for _, canvas in results]),
    )
    return len(results)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    start = time.perf_counter()
    count = write(Path(cfg.paths.renders), Path(cfg.paths.mnist), cfg.renders.seed)
    print(f"rendered {count} training digits in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
