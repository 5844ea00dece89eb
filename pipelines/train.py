"""Stage `train`: fit the CNN on MNIST + feedback, log the run to MLflow, write the checkpoint.

python -m pipelines.train
python -m pipelines.train model.dropout=0.3 trainer.max_epochs=2
python -m pipelines.train +experiment=fast logger=csv
"""

import hydra
from omegaconf import DictConfig

from digitops.training.train import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    metadata = train(cfg)
    if metadata is not None:  # None on DDP ranks other than 0
        print(
            f"checkpoint: {cfg.paths.checkpoint}  val acc {metadata['val_accuracy']:.4f}  "
            f"{metadata['train_seconds']:.0f}s  mlflow run {metadata['mlflow_run_id']}"
        )


if __name__ == "__main__":
    main()
