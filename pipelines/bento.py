"""Stage `bento`: import the MLflow champion into the BentoML store and build the Bento."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from digitops.checkpoint import CheckpointError
from digitops.release.bento import build
from digitops.tracking import TrackingError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    # The checkout keeps its own BentoML store unless told otherwise (the Makefile says the
    # same): what `make serve` serves is this checkout's champion, never what another clone
    # on the machine imported last into ~/bentoml.
    os.environ.setdefault("BENTOML_HOME", str(Path.cwd() / "bentoml_home"))
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
