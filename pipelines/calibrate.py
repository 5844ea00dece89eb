"""Fit calibration, the not-a-digit score and the Monitor's reference into an existing
checkpoint, one trained before they existed (training fits them itself):

    python -m pipelines.calibrate +checkpoint=models/default/model.pt
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from digitops.checkpoint import CheckpointError
from digitops.training.train import refit_scoring


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    path = cfg.get("checkpoint")
    if not path:
        sys.exit("calibrate: name the checkpoint: +checkpoint=PATH")
    try:
        fitted = refit_scoring(cfg, Path(path))
    except (OSError, CheckpointError) as err:
        sys.exit(f"calibrate: {err}")
    print(
        f"{path}: temperature {fitted['temperature']:.3f}, not-a-digit threshold "
        f"{fitted['threshold']:.4f} (keeps {fitted['keep']:.1%} of validation digits)"
    )


if __name__ == "__main__":
    main()
