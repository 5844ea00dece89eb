"""Stage `promote`: give the candidate the registry alias `champion` only if it is not worse."""

import sys

import hydra
from omegaconf import DictConfig

from digitops.checkpoint import CheckpointError
from digitops.release.promote import promote
from digitops.tracking import TrackingError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        decision = promote(cfg)
    except (TrackingError, CheckpointError) as err:  # one line, and nothing was changed
        sys.exit(f"promote: {err}")
    verdict = "PROMOTED" if decision["promoted"] else "kept the champion"
    print(f"{verdict}: candidate v{decision['candidate_version']} - {decision['reason']}")


if __name__ == "__main__":
    main()
