"""The hand-off from training to serving: weights + constructor arguments + metadata.

`load` rebuilds the network from the file alone; serving never needs the training config.
The same file travels everywhere: as a DVC output, as the MLflow run's artifact
`checkpoint/model.pt`, and as the one file of the BentoML store model `digit-cnn`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from digitops.files import atomic_write
from digitops.model import DigitCNN

FORMAT_VERSION = 1
FILE_NAME = "model.pt"
BENTO_MODEL = "digit-cnn"  # the BentoML model store entry the bento stage writes and serving reads


def save(path: str | Path, model: DigitCNN, model_args: dict, metadata: dict[str, Any]) -> Path:
    """Write atomically, so a killed run never leaves a half checkpoint under the real name."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "format_version": FORMAT_VERSION,
        "model_args": dict(model_args),
        "state_dict": state,
        "metadata": dict(metadata),
    }
    with atomic_write(path) as f:
        torch.save(payload, f)
    return path


class CheckpointError(ValueError):
    """A file that is not a whole, loadable digitops checkpoint; the message says which and why."""


def load(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[DigitCNN, dict]:
    """(model in eval mode, metadata) from a checkpoint file.

    `weights_only`: tensors and plain containers are read, and no pickled object is ever
    constructed, so a tampered file cannot run code here.
    """
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
        model = DigitCNN(**payload["model_args"])
        model.load_state_dict(payload["state_dict"])
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated, corrupt, tampered, or another format
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise CheckpointError(f"{path} is not a loadable digitops checkpoint: {reason}") from err
    model.eval()
    metadata = dict(payload.get("metadata", {}))
    metadata["model_args"] = payload["model_args"]
    return model, metadata
