"""The hand-off from training to serving: weights + constructor arguments + metadata.

`load` rebuilds the network from the file alone; serving never needs the training config.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from digitops.model import DigitCNN

FORMAT_VERSION = 1


def save(path: str | Path, model: DigitCNN, model_args: dict, metadata: dict[str, Any]) -> Path:
    """Write atomically, so a killed run never leaves a half checkpoint under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "format_version": FORMAT_VERSION,
        "model_args": dict(model_args),
        "state_dict": state,
        "metadata": dict(metadata),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; servers may run as another user
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[DigitCNN, dict]:
    """(model in eval mode, metadata) from a checkpoint file."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model = DigitCNN(**payload["model_args"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    metadata = dict(payload.get("metadata", {}))
    metadata["model_args"] = payload["model_args"]
    return model, metadata
