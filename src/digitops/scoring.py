"""How far to trust an answer: calibrated probabilities, and how much an input looks like a digit.

Both are fitted once, after training, on data the weights never saw or never changed for, and
travel in the checkpoint (`metadata["scoring"]`), so every place that turns the network's
output into an answer (the served ONNX graph, Grad-CAM's page, `evaluate`) applies the same:

- **temperature**: the logits are divided by one number, fitted to minimise the negative
  log-likelihood of the validation split. Label smoothing trains the network to say about 90%
  when it is sure; the temperature turns that back into how often it is right.
- **digit score**: how typical the input's activations are of MNIST digits. At three depths
  (conv2 and conv3 summarised by each channel's mean and max, and the features the classifier
  reads) the Mahalanobis distance to the nearest digit class, with class means and one shared
  covariance fitted on the training digits (Lee et al., 2018); each standardised on the
  validation digits, then summed. The served `digit_score` is that sum's rank among the
  validation digits: 0.3 means 30% of real digits look less like a digit than this input.
  An input is a digit when its score is at least `threshold`, the rank that keeps `keep` of
  the validation digits.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import optimize, stats

from digitops.model import DigitCNN, normalize

# Ridge added to each covariance, as a share of its mean variance: the max-pooled features
# include channels that are almost constant on digits, which would make the inverse explode.
SHRINKAGE = 0.01
LAYERS = ("conv2", "conv3", "features")


def descriptors(model: DigitCNN, x: torch.Tensor):
    """For normalised input x: (logits [N, 10], {layer: activations summarised [N, d]}, each
    conv block's activations [N, C, H, W])."""
    blocks = []
    for name in model.conv_layers:
        x = getattr(model, name)(x)
        blocks.append(x)
    features = model.classifier[:-1](x)
    summaries = {
        f"conv{i}": torch.cat([a.mean((2, 3)), a.amax((2, 3))], dim=1)
        for i, a in enumerate(blocks, start=1)
        if f"conv{i}" in LAYERS
    }
    summaries["features"] = features
    return model.classifier[-1](features), summaries, blocks


def nearest_class_distance(
    values: torch.Tensor, whitening: torch.Tensor, means_t: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """The squared Mahalanobis distance [N] of each row of `values` to the nearest class mean,
    in whitened coordinates z = xW: |z - mW|^2 = z'z - 2 z'(mW) + |mW|^2, with the whitened
    means as columns (`means_t`, [k, 10]) and their |mW|^2 (`offsets`, [10]) precomputed.
    Every term involves `values`: an exporter folds terms of weights alone into constants,
    which a new version's weights would not reach."""
    z = values @ whitening
    return ((z * z).sum(1, keepdim=True) - 2 * z @ means_t + offsets).amin(1)


def class_terms(means: torch.Tensor, whitening: torch.Tensor) -> dict[str, torch.Tensor]:
    """A layer's tensors as `nearest_class_distance` takes them."""
    whitened = means.float() @ whitening.float()
    return {
        "whitening": whitening.float(),
        "means_t": whitened.T.contiguous(),
        "offsets": (whitened * whitened).sum(1),
    }


class Scorer(torch.nn.Module):
    """A fitted scoring (`fit`'s dict) as a module: (logits, summaries) -> (calibrated
    probabilities [N, 10], typicality [N], digit score [N]). Its tensors are buffers, so an
    exported graph carries them as weights."""

    def __init__(self, scoring: dict):
        super().__init__()
        self.threshold = float(scoring["threshold"])
        self.register_buffer("temperature", torch.tensor(float(scoring["temperature"])))
        self.register_buffer("reference", scoring["reference"].float()[None, :])  # [1, R]
        for name in LAYERS:
            layer = scoring["layers"][name]
            for part, tensor in class_terms(layer["means"], layer["whitening"]).items():
                self.register_buffer(f"{name}_{part}", tensor)
            self.register_buffer(f"{name}_center", torch.tensor(float(layer["center"])))
            self.register_buffer(f"{name}_scale", torch.tensor(float(layer["scale"])))

    def forward(self, logits: torch.Tensor, summaries: dict[str, torch.Tensor]):
        typical = 0
        for name in LAYERS:
            terms = [
                getattr(self, f"{name}_{part}") for part in ("whitening", "means_t", "offsets")
            ]
            distance = nearest_class_distance(summaries[name], *terms)
            center, scale = getattr(self, f"{name}_center"), getattr(self, f"{name}_scale")
            typical = typical + (-distance - center) / scale
        score = (typical[:, None] > self.reference).float().mean(1)
        return torch.softmax(logits / self.temperature, dim=1), typical, score


@torch.inference_mode()
def outputs(model: DigitCNN, images: np.ndarray, batch_size: int = 1000) -> dict:
    """Logits and layer summaries (float64 numpy) of uint8 images [N, 28, 28]."""
    model.eval()
    logits, summaries = [], {name: [] for name in LAYERS}
    for start in range(0, len(images), batch_size):
        x = normalize(torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])))
        batch_logits, batch_summaries, _ = descriptors(model, x)
        logits.append(batch_logits)
        for name in LAYERS:
            summaries[name].append(batch_summaries[name])
    return {
        "logits": torch.cat(logits).double().numpy(),
        **{name: torch.cat(parts).double().numpy() for name, parts in summaries.items()},
    }


@torch.inference_mode()
def answers(model: DigitCNN, scoring: dict, images: np.ndarray, batch_size: int = 1000) -> dict:
    """What the served model answers for uint8 images [N, 28, 28]: `probabilities`
    (calibrated), `uncalibrated` ones, `typicality` and `digit_score`, and the `energy` score
    (the logits' temperature-scaled log-sum-exp; Liu et al., 2020), and the `features` the
    classifier reads, as numpy arrays."""
    model.eval()
    scorer, parts = Scorer(scoring), {}
    for start in range(0, max(len(images), 1), batch_size):  # an empty set: one empty batch
        x = normalize(torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])))
        logits, summaries, _ = descriptors(model, x)
        probabilities, typical, score = scorer(logits, summaries)
        batch = {"probabilities": probabilities, "uncalibrated": torch.softmax(logits, dim=1)}
        batch["energy"] = scorer.temperature * torch.logsumexp(logits / scorer.temperature, 1)
        batch |= {"typicality": typical, "digit_score": score, "features": summaries["features"]}
        for key, value in batch.items():
            parts.setdefault(key, []).append(value.numpy())
    return {key: np.concatenate(values) for key, values in parts.items()}


def fit(
    model: DigitCNN,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    keep: float = 0.993,
) -> dict:
    """The scoring of `model`: Mahalanobis statistics from `train` digits, the temperature,
    standardisation and threshold from `val` digits (uint8 images, labels)."""
    fitted, held_out = outputs(model, train[0]), outputs(model, val[0])
    temperature = fit_temperature(held_out["logits"], val[1])
    layers, typical = {}, 0
    for name in LAYERS:
        means, whitening = class_statistics(fitted[name], train[1])
        means, whitening = torch.from_numpy(means).float(), torch.from_numpy(whitening).float()
        values = torch.from_numpy(held_out[name]).float()
        distance = nearest_class_distance(values, **class_terms(means, whitening)).double()
        center, scale = float(-distance.mean()), float(distance.std())
        layers[name] = {"means": means, "whitening": whitening}
        layers[name] |= {"center": center, "scale": scale}
        typical = typical + (-distance - center) / scale
    reference = torch.sort(typical.float()).values
    rejected = int(np.floor((1 - keep) * len(reference)))
    return {
        "temperature": temperature,
        "layers": layers,
        "reference": reference,
        # The score of the validation digit below which lie (1 - keep) of them.
        "threshold": rejected / len(reference),
        "keep": keep,
    }


def class_statistics(values: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class means [10, d] and a whitening W [d, d] of the shared (shrunk) covariance: W W'
    is its inverse, so |(x - m) W|^2 is the Mahalanobis distance of x to a mean m."""
    means = np.stack([values[labels == c].mean(0) for c in range(10)])
    centred = values - means[labels]
    covariance = centred.T @ centred / len(values)
    ridge = SHRINKAGE * np.trace(covariance) / len(covariance)
    variances, directions = np.linalg.eigh(covariance + ridge * np.eye(len(covariance)))
    return means, directions / np.sqrt(variances)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of `labels`."""
    result = optimize.minimize_scalar(
        lambda t: nll(softmax(logits, t), labels), bounds=(0.05, 20), method="bounded"
    )
    return float(result.x)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(probabilities[np.arange(len(labels)), labels] + 1e-12).mean())


def calibration(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict:
    """Expected calibration error (equal-width confidence bins), NLL, Brier score, and the
    reliability diagram's bins (mean confidence, accuracy, count)."""
    labels = np.asarray(labels, dtype=np.int64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            gap = abs(correct[members].mean() - confidence[members].mean())
            ece += gap * members.mean()
            table.append(
                {
                    "bin": b,
                    "confidence": float(confidence[members].mean()),
                    "accuracy": float(correct[members].mean()),
                    "count": int(members.sum()),
                }
            )
    onehot = np.eye(probabilities.shape[1])[labels]
    return {
        "ece": float(ece),
        "nll": nll(probabilities, labels),
        "brier": float(((probabilities - onehot) ** 2).sum(axis=1).mean()),
        "bins": table,
    }


def auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a random positive outscores a random negative
    (ties count half)."""
    scores = np.concatenate([positives, negatives])
    ranks = stats.rankdata(scores)
    n_pos, n_neg = len(positives), len(negatives)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
