"""End-to-end accuracy through POST /predict: the held-out real-world set, and the MNIST test
set sent as PNGs (train/serve parity on the data the model was scored on).

    python -m benchmarks.bench_accuracy [--set DIR] [--mnist N] [--out artifacts/bench]

The real-world set is the `evalsets` stage's (`dvc repro evalsets`: 2,000 images of each kind),
else the 400 committed under tests/fixtures/realworld. Writes realworld.json and realworld.md:
accuracy overall, per kind and per European style with 95% Wilson intervals, and every miss.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

from digitops.stats import wilson

ROOT = Path(__file__).resolve().parents[1]
REALWORLD = ROOT / "tests" / "fixtures" / "realworld"
EVALSET = ROOT / "artifacts" / "evalsets" / "images" / "realworld"


def score_through_api(client, directory: Path = REALWORLD) -> dict:
    """POST every image of a labels.csv set to /predict with `client` (any httpx-like client)."""
    with open(directory / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # right, sent, taken as digits
    per_style: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    misses = []
    for row in rows:
        data = (directory / row["file"]).read_bytes()
        # Not logged: scoring must not fill the service's review queue.
        files = {"image": (row["file"], data, "application/octet-stream")}
        r = client.post("/predict", files=files, data={"log": "false"})
        body = r.json()
        predicted = body.get("digit") if r.status_code == 200 else None
        hit = predicted == int(row["label"])
        taken = r.status_code == 200 and body["is_digit"]
        for group in (per_kind[row["kind"]], per_style[row.get("style") or "plain"]):
            group[0] += hit
            group[1] += 1
            group[2] += taken
        if not hit:
            misses.append(
                {
                    **row,
                    "predicted": predicted,
                    "status": r.status_code,
                    "confidence": body.get("confidence"),
                    "is_digit": body.get("is_digit"),
                    "error": body.get("error"),
                    "inverted": body.get("inverted"),
                }
            )
    correct = sum(c for c, _, _ in per_kind.values())
    return {
        "count": len(rows),
        "accuracy": correct / len(rows),
        "accepted": sum(a for _, _, a in per_kind.values()) / len(rows),  # is_digit true
        "per_kind": _report(per_kind),
        "per_style": _report(per_style),
        "misses": misses,
    }


def _report(groups: dict[str, list[int]]) -> dict:
    report = {}
    for name, (correct, n, accepted) in sorted(groups.items()):
        low, high = wilson(correct, n)
        report[name] = {"accuracy": correct / n, "low": low, "high": high,
                        "accepted": accepted / n, "count": n}  # fmt: skip
    return report


def score_mnist_through_api(client, mnist_dir: Path, count: int | None = None) -> dict:
    """POST the first `count` MNIST test digits (all by default), each a 28x28 PNG, to /predict."""
    from digitops.data import mnist
    from digitops.files import png

    images, labels = mnist.load(mnist_dir, "t10k")
    images, labels = images[:count], labels[:count]
    correct = accepted = 0
    for pixels, label in zip(images, labels, strict=True):
        files = {"image": ("d.png", png(pixels), "image/png")}
        r = client.post("/predict", files=files, data={"log": "false"})
        ok = r.status_code == 200
        correct += ok and r.json()["digit"] == int(label)
        accepted += ok and r.json()["is_digit"]
    count = len(labels)
    return {"count": count, "accuracy": correct / count, "accepted": accepted / count}


def main() -> None:
    from starlette.testclient import TestClient

    from serving.service import DigitService

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=Path, default=EVALSET if EVALSET.is_dir() else REALWORLD)
    parser.add_argument(
        "--mnist", type=int, default=10_000, help="MNIST test digits to send (0: none)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    args = parser.parse_args()
    mnist_dir = ROOT / "data" / "mnist"
    with TestClient(DigitService.to_asgi()) as client:
        result = score_through_api(client, args.set)
        result["model"] = client.get("/model").json()
        if args.mnist and (mnist_dir / "t10k-labels-idx1-ubyte").exists():
            result["mnist_test"] = score_mnist_through_api(client, mnist_dir, args.mnist)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "realworld.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Real-world accuracy: {result['accuracy']:.2%} of {result['count']}",
        "",
        f"Taken as digits (`is_digit`): {result['accepted']:.2%}",
        "",
        f"Set: {args.set}",
        "",
        "| kind or style | accuracy | 95% interval | taken as digits | count |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {v['accuracy']:.2%} | {v['low']:.2%}-{v['high']:.2%} | {v['accepted']:.2%} "
        f"| {v['count']} |"
        for k, v in (result["per_kind"] | result["per_style"]).items()
    ]
    if "mnist_test" in result:
        m = result["mnist_test"]
        lines += [
            "",
            f"MNIST test set as PNGs through /predict: {m['accuracy']:.2%} of {m['count']}, "
            f"{m['accepted']:.2%} taken as digits",
        ]
    model = result["model"]
    lines += ["", f"Model: {model['name']} v{model['version']} ({model['source']})"]
    lines += [
        "",
        "| file | label | predicted | confidence | is_digit | inverted | source |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {m['file']} | {m['label']} | {m['predicted']} | {m['confidence']} | "
        f"{m['is_digit']} | {m['inverted']} | {m['source']} |"
        for m in result["misses"]
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "realworld.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
