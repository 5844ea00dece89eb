"""The plain-torch network and its self-describing checkpoint."""

from pathlib import Path

import torch
import yaml

from digitops import checkpoint
from digitops.model import DigitCNN, fold_batchnorm

ROOT = Path(__file__).resolve().parents[1]


def test_output_shape_and_named_conv_blocks():
    model = DigitCNN().eval()
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    shapes = {}
    x = torch.zeros(1, 1, 28, 28)
    for name in DigitCNN.conv_layers:
        x = getattr(model, name)(x)
        shapes[name] = tuple(x.shape)
    assert shapes == {"conv1": (1, 32, 14, 14), "conv2": (1, 64, 7, 7), "conv3": (1, 128, 7, 7)}


def test_parameter_count_of_reference_architecture():
    # conv 32/64/128 (3x3, no bias, BatchNorm), dense 6272->128, 128->10.
    convs = 1 * 32 * 9 + 32 * 64 * 9 + 64 * 128 * 9
    norms = 2 * (32 + 64 + 128)
    dense = 128 * 7 * 7 * 128 + 128 + 128 * 10 + 10
    assert sum(p.numel() for p in DigitCNN().parameters()) == convs + norms + dense == 897_130


def test_widths_and_dropout_are_constructor_arguments():
    model = DigitCNN(channels=(8, 16, 24), hidden=32, dropout=0.1)
    assert model.conv3[0].out_channels == 24
    assert model.classifier[3].p == 0.1
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_checkpoint_rebuilds_model_without_config(tmp_path):
    args = {"channels": [16, 32, 64], "hidden": 64, "dropout": 0.2}
    model = DigitCNN(**args).eval()
    path = checkpoint.save(tmp_path / "m.pt", model, args, {"test_accuracy": 0.99})
    loaded, metadata = checkpoint.load(path)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert metadata["test_accuracy"] == 0.99 and metadata["model_args"] == args
    assert not list(tmp_path.glob("*.part")), "atomic save must not leave temp files"


def test_folded_batchnorm_computes_the_same_function():
    torch.manual_seed(0)
    model = DigitCNN()
    with torch.no_grad():  # BatchNorm statistics as after training, not the identity defaults
        for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    model.eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(8, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
        for name in DigitCNN.conv_layers:  # feature maps and Grad-CAM read the blocks' outputs
            x_model, x_folded = getattr(model, name)(x), getattr(folded, name)(x)
            torch.testing.assert_close(x_folded, x_model, atol=1e-4, rtol=1e-4)
            x = x_model
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # original intact


def default_network_args() -> dict:
    return yaml.safe_load((ROOT / "conf" / "model" / "cnn.yaml").read_text())


def test_the_default_network_keeps_three_7x7_conv_blocks_and_is_small():
    """The training recipe's network: a 5x5 conv, pooled features read out linearly. Grad-CAM
    and the feature maps still get three named blocks, the last at 7x7."""
    model = DigitCNN(**default_network_args()).eval()
    x = torch.zeros(1, 1, 28, 28)
    for name in DigitCNN.conv_layers:
        x = getattr(model, name)(x)
    assert tuple(x.shape[-2:]) == (7, 7)
    assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)
    size_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    assert size_bytes < 5 * 2**20
    folded = fold_batchnorm(model)
    x = torch.randn(8, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


def test_checkpoints_written_before_the_newer_options_load_as_trained(tmp_path):
    old_args = {"channels": [32, 64, 128], "hidden": 128, "dropout": 0.5}  # the seed's
    model = DigitCNN(**old_args).eval()
    loaded, _ = checkpoint.load(checkpoint.save(tmp_path / "old.pt", model, old_args, {}))
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert sum(p.numel() for p in loaded.parameters()) == 897_130
