"""The served model's forward pass on each runtime, side by side: torch eager, TorchScript
(frozen), torch.compile and ONNX Runtime, at batch 1 and 32, with the largest difference of
each one's probabilities from eager's.

    python -m benchmarks.bench_forward [--model PATH] [--threads N] [--out DIR]

Writes forward.json and forward.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import save_report
from digitops import checkpoint
from digitops.data import mnist
from digitops.inference.served import DIGIT_SCORE, PROBABILITIES, OnnxModel, _Outputs
from digitops.model import fold_batchnorm
from digitops.scoring import Scorer

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 32)


def timed(fn, x, seconds: float = 2.0) -> float:
    """Median milliseconds per call of fn(x), after a warm-up."""
    for _ in range(20):
        fn(x)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def runtimes(served: _Outputs, example: torch.Tensor) -> dict:
    """name -> callable(uint8 pixels numpy [N, 28, 28]) -> probabilities numpy [N, 10]: what
    the service needs from a forward pass, input scaling, calibration and digit score included."""

    def torch_runtime(module):
        def run(pixels: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(pixels))[0].numpy()

        return run

    with torch.inference_mode():
        scripted = torch.jit.freeze(torch.jit.trace(served, example, strict=False))
    compiled = torch.compile(served)
    onnx = OnnxModel(served.model, served.scorer, threads=torch.get_num_threads())
    return {
        "torch eager": torch_runtime(served),
        "TorchScript (frozen)": torch_runtime(scripted),
        "torch.compile": torch_runtime(compiled),
        "ONNX Runtime": lambda pixels: onnx.run(pixels, PROBABILITIES, DIGIT_SCORE)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default" / "model.pt")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, metadata = checkpoint.load(args.model)
    served = _Outputs(fold_batchnorm(model), Scorer(metadata["scoring"])).eval()
    with tempfile.TemporaryDirectory() as tmp:  # the test fixture's real digits, unpacked
        mnist._from_directory(ROOT / "tests" / "fixtures" / "mnist", Path(tmp))
        images, _ = mnist.load(Path(tmp), "t10k")
    inputs = images[:256]
    candidates = runtimes(served, torch.from_numpy(inputs[:1]))
    reference = candidates["torch eager"](inputs)
    rows = []
    for name, run in candidates.items():
        row = {"runtime": name, "max_abs_diff": float(np.abs(run(inputs) - reference).max())}
        for n in BATCHES:
            row[f"batch{n}_ms"] = round(timed(run, inputs[:n]), 3)
        rows.append(row)
        print(row, flush=True)
    lines = [
        f"# Forward pass ({args.threads} threads, {args.model.name}, BatchNorm folded)",
        "",
        "| runtime | batch 1 | batch 32 | img/s at 32 | max abs diff vs eager |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['runtime']} | {r['batch1_ms']} ms | {r['batch32_ms']} ms | "
            f"{32 / r['batch32_ms'] * 1000:.0f} | {r['max_abs_diff']:.1e} |"
        )
    save_report(args.out, "forward", rows, lines)


if __name__ == "__main__":
    main()
