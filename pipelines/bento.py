"""Stage `bento`: import the MLflow champion into the BentoML store and build the Bento."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from digitops.checkpoint import CheckpointError
from digitops.release.bento import build
from digitops.tracking import TrackingError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        result = build(cfg, root=Path.cwd())
    except (TrackingError, CheckpointError) as err:  # one line, and nothing was changed
        sys.exit(f"bento: {err}")
    print(
        f"built {result['bento']} serving {result['model']} "
        f"(registry v{result['registered_version']}, test accuracy {result['test_accuracy']})"
    )


if __name__ == "__main__":
    main()
