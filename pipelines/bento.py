"""Stage `bento`: import the MLflow champion into the BentoML store and build the Bento."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from digitops.release.bento import build


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    result = build(cfg, root=Path.cwd())
    print(
        f"built {result['bento']} serving {result['model']} "
        f"(registry v{result['registered_version']}, test accuracy {result['test_accuracy']})"
    )


if __name__ == "__main__":
    main()
