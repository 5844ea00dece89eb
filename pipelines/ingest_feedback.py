"""Job `ingest`: move validated user corrections into data/feedback and version them with DVC.

    python -m pipelines.ingest_feedback            # or: make ingest
    python -m pipelines.ingest_feedback store=/path/to/predictions.db version=false

Run it whenever you like (cron, CI, by hand); `dvc repro` then retrains on the new data.
"""

import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from digitops.ingest import ingest
from digitops.store import PredictionStore, StoreError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        store = PredictionStore(cfg.feedback.store)
    except StoreError as err:
        sys.exit(f"ingest: {err}")
    summary = ingest(store, Path(cfg.paths.feedback))
    print(f"ingest: {summary}")
    if cfg.feedback.version and summary.accepted:
        # data.dvc now names the new data; push so other machines can `dvc pull` it.
        for cmd in (["dvc", "add", "-q", cfg.paths.data], ["dvc", "push", "-q", "data.dvc"]):
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(
                    f"ingest: `{' '.join(cmd)}` failed: {result.stderr.strip().splitlines()[-1:]}"
                )
        print("ingest: data.dvc updated and pushed; commit it with git, then `dvc repro`")


if __name__ == "__main__":
    main()
