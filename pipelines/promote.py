"""Stage `promote`: give the candidate the registry alias `champion` only if it is not worse."""

import hydra
from omegaconf import DictConfig

from digitops.release.promote import promote


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    decision = promote(cfg)
    verdict = "PROMOTED" if decision["promoted"] else "kept the champion"
    print(f"{verdict}: candidate v{decision['candidate_version']} - {decision['reason']}")


if __name__ == "__main__":
    main()
