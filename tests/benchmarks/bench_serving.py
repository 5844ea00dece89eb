"""Serving benchmark, side by side in one run: bare model, FastAPI baseline, naive BentoML, the
BentoML floor (upload read, fixed reply, no work), ours.

    python -m tests.benchmarks.bench_serving [--seconds 10] [--out artifacts/bench]

Each server runs alone (the 2 cores are not shared between servers); wrk, a C load generator,
drives it so the client steals little CPU. Writes report.json and report.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from digitops.data import mnist
from digitops.inference.served import load_served_model
from digitops.inference.settings import Settings
from tests.servers import free_port, running

SETTINGS = Settings.from_env()

ROOT = Path(__file__).resolve().parents[2]
# Worker processes per system: the baseline and the naive service as their defaults (one); ours
# as configured (DIGITOPS_WORKERS, default one), and the floor alike.
OURS = int(os.environ.get("DIGITOPS_WORKERS", "1"))
WORKERS = {"fastapi_baseline": 1, "naive_bentoml": 1, "bentoml_floor": OURS, "digitops": OURS}
SYSTEMS = tuple(WORKERS)
LUA = Path(__file__).with_name("post_image.lua")
TARGETS = {"predict_p50_ms": 5.0, "explain_p50_ms": 10.0, "throughput_vs_naive": 2.0}


def canvas_png(out: Path) -> Path:
    """A real test digit drawn as on the web page: 280x280, white on black."""
    images, _ = (
        mnist.load(ROOT / "data" / "mnist", "t10k")
        if (ROOT / "data/mnist").exists()
        else (None, None)
    )
    if images is None:
        fixture = out / "mnist"
        fixture.mkdir(parents=True, exist_ok=True)
        mnist._from_directory(ROOT / "tests" / "fixtures" / "mnist", fixture)
        images, _ = mnist.load(fixture, "t10k")
    buf = io.BytesIO()
    Image.fromarray(images[0]).resize((280, 280), Image.BICUBIC).save(buf, format="PNG")
    path = out / "digit.png"
    path.write_bytes(buf.getvalue())
    return path


def bare_model(seconds: float) -> dict:
    model = load_served_model(SETTINGS.model_tag, SETTINGS.shipped_model).model
    x1 = torch.zeros(1, 1, 28, 28)
    x32 = torch.zeros(32, 1, 28, 28)
    with torch.inference_mode():
        for _ in range(50):
            model(x1)
        times = []
        deadline = time.perf_counter() + seconds / 2
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            model(x1)
            times.append((time.perf_counter() - start) * 1000)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            model(x32)
            n += 32
        rate = n / (time.perf_counter() - start)
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p99_ms": float(np.percentile(times, 99)),
        "throughput_c32": rate,
    }


def wrk(
    port: int, path: str, image: Path, connections: int, seconds: float, warm_up: bool = True
) -> dict:
    env = {**os.environ, "BENCH_IMAGE": str(image), "BENCH_PATH": path}
    url = f"http://127.0.0.1:{port}{path}"
    if warm_up:  # first requests load lazily-initialised code paths
        subprocess.run(
            ["wrk", "-t1", f"-c{connections}", "-d2s", "-s", str(LUA), url],
            env=env,
            capture_output=True,
            timeout=60,
        )
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(LUA),
            url,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("JSON "))
    result = json.loads(line[5:])
    result["throughput"] = result["requests"] / result["seconds"]
    return result


def measure_server(name, cmd, port, endpoints, image, seconds, out, ready_path) -> dict:
    env = {"DIGITOPS_WORKERS": str(WORKERS[name])}
    with running(cmd, port, out / f"{name}.log", ready_path=ready_path, env=env) as base:
        # Check it answers correctly before timing it.
        files = {"image": ("d.png", image.read_bytes(), "image/png")}
        httpx.post(f"{base}/predict", files=files, timeout=30).raise_for_status()
        return {
            path: {
                "c1": wrk(port, path, image, 1, seconds),
                "c32": wrk(port, path, image, 32, seconds),
                # A lone client right after a burst: batching that learned to wait for company
                # under load must not keep making single requests wait.
                "c1_after_burst": wrk(port, path, image, 1, seconds, warm_up=False),
            }
            for path in endpoints
        }


def report(results: dict, out: Path) -> str:
    ours, naive = results["digitops"], results["naive_bentoml"]
    checks = {
        "predict_p50_ms": ours["/predict"]["c1"]["p50_ms"],
        "explain_p50_ms": ours["/explain"]["c1"]["p50_ms"],
        "throughput_vs_naive": ours["/predict"]["c32"]["throughput"]
        / naive["/predict"]["c32"]["throughput"],
    }
    verdicts = {
        k: (v >= TARGETS[k]) if k == "throughput_vs_naive" else (v <= TARGETS[k])
        for k, v in checks.items()
    }
    lines = [
        "# Serving benchmark",
        "",
        f"{results['machine']}; {results['seconds']} s per measurement; wrk on loopback.",
        "",
        "| system (worker processes) | endpoint | p50 c=1 (ms) | p99 c=1 (ms) | req/s c=32 "
        "| p99 c=32 (ms) | p50 c=1 after c=32 (ms) | errors |",
        "|---|---|---|---|---|---|---|---|",
        f"| bare model forward | - | {results['model']['p50_ms']:.2f} | "
        f"{results['model']['p99_ms']:.2f} | {results['model']['throughput_c32']:.0f} "
        "| - | - | - |",
    ]
    for system in SYSTEMS:
        for path, r in results[system].items():
            lines.append(
                f"| {system} ({WORKERS[system]}) | {path} | {r['c1']['p50_ms']:.2f} | "
                f"{r['c1']['p99_ms']:.2f} | "
                f"{r['c32']['throughput']:.0f} | {r['c32']['p99_ms']:.1f} | "
                f"{r['c1_after_burst']['p50_ms']:.2f} | "
                f"{sum(m['errors'] for m in r.values())} |"
            )
    floor = results["bentoml_floor"]["/predict"]["c1"]["p50_ms"]
    lines += [
        "",
        f"The BentoML floor on this machine is {floor:.2f} ms p50 at c=1: reading the upload and "
        "sending a reply through BentoML's HTTP stack, before any image or model work.",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for key, value in checks.items():
        goal = f">= {TARGETS[key]}x" if key == "throughput_vs_naive" else f"<= {TARGETS[key]} ms"
        lines.append(f"| {key} | {value:.2f} | {goal} | {'yes' if verdicts[key] else 'NO'} |")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(
        json.dumps({**results, "checks": checks, "met": verdicts}, indent=2) + "\n"
    )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    image = canvas_png(args.out)
    results = {
        "seconds": args.seconds,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "model": bare_model(args.seconds),
        "workers": WORKERS,
    }
    port = free_port()
    loopback = ["--host", "127.0.0.1", "--port", str(port)]
    systems = [
        # name, command, endpoints, the path that answers 200 once it is up
        (
            "fastapi_baseline",
            [
                "uvicorn",
                "tests.benchmarks.fastapi_baseline:app",
                *loopback,
                "--log-level",
                "warning",
            ],
            ["/predict"],
            "/docs",
        ),
        (
            "naive_bentoml",
            ["bentoml", "serve", "tests.benchmarks.naive_service:NaiveDigitService", *loopback],
            ["/predict"],
            "/readyz",
        ),
        (
            "bentoml_floor",
            ["bentoml", "serve", "tests.benchmarks.floor_service:FloorService", *loopback],
            ["/predict"],
            "/readyz",
        ),
        (
            "digitops",
            ["bentoml", "serve", "serving.service:DigitService", *loopback],
            ["/predict", "/explain"],
            "/readyz",
        ),
    ]
    # One at a time, so no server shares the cores with another.
    for name, cmd, endpoints, ready in systems:
        results[name] = measure_server(
            name, cmd, port, endpoints, image, args.seconds, args.out, ready
        )
    print(report(results, args.out))


if __name__ == "__main__":
    main()
