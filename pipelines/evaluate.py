"""Stage `evaluate`: score the checkpoint on the MNIST test set and the feedback hold-out,
write DVC metrics and plots, log them to the training run and register the model."""

import sys

import hydra
from omegaconf import DictConfig

from digitops.checkpoint import CheckpointError
from digitops.release.evaluate import evaluate_checkpoint
from digitops.tracking import TrackingError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        metrics = evaluate_checkpoint(cfg)
    except (TrackingError, CheckpointError) as err:  # one line, and nothing was changed
        sys.exit(f"evaluate: {err}")
    test, holdout = metrics["test"], metrics["feedback_holdout"]
    print(
        f"MNIST test accuracy {test['accuracy']:.4%} ({test['errors']} errors of {test['count']})"
    )
    for kind, r in metrics["realworld"]["per_kind"].items():
        print(
            f"real-world {kind}: {r['accuracy']:.2%} [{r['low']:.2%}, {r['high']:.2%}] "
            f"({r['errors']} errors of {r['count']})"
        )
    if holdout["count"]:
        print(f"feedback hold-out accuracy {holdout['accuracy']:.2%} of {holdout['count']}")


if __name__ == "__main__":
    main()
