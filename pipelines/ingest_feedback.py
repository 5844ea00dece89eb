"""Job `ingest`: move validated user corrections into data/feedback and version them with DVC.

    python -m pipelines.ingest_feedback                     # or: make ingest
    python -m pipelines.ingest_feedback feedback.store=/srv/predictions.db feedback.version=false

Run it whenever you like (cron, CI, by hand); `dvc repro` then retrains on the new data.
"""

import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from digitops.data.ingest import IngestBusy, ingest
from digitops.inference.store import PredictionStore, StoreError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        summary = ingest(PredictionStore(cfg.feedback.store), Path(cfg.paths.feedback))
    except (StoreError, IngestBusy) as err:
        sys.exit(f"ingest: {err}")
    print(f"ingest: {summary}")
    if not cfg.feedback.version:
        return
    # Always, not only when something was accepted: a run killed after ingesting but before
    # pushing leaves nothing pending, and this is what catches up. Both are no-ops otherwise.
    for cmd in (["dvc", "add", "-q", cfg.paths.data], ["dvc", "push", "-q", "data.dvc"]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            sys.exit(f"ingest: `{' '.join(cmd)}` failed: {reason}")
    print("ingest: data.dvc is up to date and pushed; commit it with git, then run `dvc repro`")


if __name__ == "__main__":
    main()
