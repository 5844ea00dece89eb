"""Load, models swapped under load, and a soak: does the service stay correct and its memory
flat? Writes load.json and load.md.

    python -m benchmarks.bench_load                       # 20,000 /predict at c=32 + mixed
    python -m benchmarks.bench_load --soak-minutes 10     # and a 10-minute soak (RSS)

tests/test_load.py runs the same functions, bounded, and asserts zero failed requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil

from digitops.data import mnist
from tests.conftest import canvas_png
from tests.servers import PROCESSES, bentoml_serve, store_model

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "load-test-token"
SHIPPED = ROOT / "models" / "default" / "model.pt"


@dataclass
class Load:
    """What a run of requests got back."""

    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # no HTTP reply at all
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())

    @property
    def failed(self) -> int:
        return self.requests - self.statuses.get(200, 0)

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_ms or [0.0])
        return {
            "requests": self.requests,
            "failed": self.failed,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(self.errors),
            "seconds": round(self.seconds, 1),
            "req_per_s": round(self.requests / max(self.seconds, 1e-9), 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
        }


Request = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


async def drive(
    base: str,
    request: Request,
    total: int,
    concurrency: int,
    until: float = float("inf"),
    stop: asyncio.Event | None = None,
) -> Load:
    """Send `total` requests (or as many as fit before time.monotonic() reaches `until`, or
    `stop` is set), `concurrency` at a time, over kept-alive connections."""
    load, next_index = Load(), iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def worker() -> None:
            for i in next_index:
                if time.monotonic() > until or (stop is not None and stop.is_set()):
                    return
                started = time.perf_counter()
                try:
                    reply = await request(client, i)
                except httpx.HTTPError as err:
                    load.errors[type(err).__name__] += 1
                    continue
                load.latencies_ms.append((time.perf_counter() - started) * 1000)
                load.statuses[reply.status_code] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        load.seconds = time.perf_counter() - started
    return load


def digits(count: int = 64) -> list[bytes]:
    """Canvas-sized (280x280) PNGs of real MNIST test digits (the committed fixture subset)."""
    with tempfile.TemporaryDirectory() as tmp:
        mnist._from_directory(ROOT / "tests" / "fixtures" / "mnist", Path(tmp))
        images, _ = mnist.load(Path(tmp), "t10k")
    return [canvas_png(pixels) for pixels in images[:count]]


def upload(png: bytes) -> dict:
    """httpx arguments that send `png` as the service takes an image: multipart field `image`."""
    return {"files": {"image": ("d.png", png, "image/png")}}


def predictions(base: str, total: int, concurrency: int = 32) -> Load:
    """`total` POST /predict of canvas PNGs."""
    pngs = digits()

    def predict(client: httpx.AsyncClient, i: int):
        return client.post("/predict", **upload(pngs[i % len(pngs)]))

    return asyncio.run(drive(base, predict, total, concurrency))


def mixed_with_reloads(
    base: str, bentoml_home: Path, total: int, reloads: int, concurrency: int = 16
) -> tuple[Load, list[int]]:
    """Predict, explain, feedback and review-queue calls at once while the model is reloaded
    `reloads` times (a new store entry each time): at least `total` calls, and calls until the
    last reload is over. Returns the load and the reload statuses."""
    pngs = digits()
    with httpx.Client(base_url=base, timeout=60) as c:
        ids = [c.post("/predict", **upload(p)).json()["prediction_id"] for p in pngs]
    rng = random.Random(0)
    kinds = rng.choices(["predict", "explain", "feedback", "review"], [5, 2, 2, 1], k=total)
    sent = 0

    def request(client: httpx.AsyncClient, i: int):
        nonlocal sent
        sent += 1
        i %= total
        png = upload(pngs[i % len(pngs)])
        if kinds[i] == "predict":
            return client.post("/predict", **png)
        if kinds[i] == "explain":
            return client.post("/explain", **png)
        if kinds[i] == "feedback":
            return client.post("/feedback", json={"prediction_id": ids[i % len(ids)], "label": 3})
        return client.get("/review_queue", params={"k": 10})

    reload_statuses: list[int] = []

    async def reload_repeatedly() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            for n in range(reloads):
                await asyncio.to_thread(
                    store_model, bentoml_home, SHIPPED.read_bytes(), {"load": f"v{n}"}
                )
                reply = await client.post(
                    "/admin/reload", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
                )
                reload_statuses.append(reply.status_code)

    async def both() -> Load:
        stop = asyncio.Event()

        async def reload_then_stop() -> None:
            await reload_repeatedly()
            while sent < total:
                await asyncio.sleep(0.05)
            stop.set()

        load, _ = await asyncio.gather(
            drive(base, request, 10**9, concurrency, stop=stop), reload_then_stop()
        )
        return load

    return asyncio.run(both()), reload_statuses


def server_rss_mb(base: str) -> float:
    """Resident memory of a running server's worker processes (not the supervisor; a server
    without workers, such as plain uvicorn, is its own worker), in MB."""
    root = psutil.Process(PROCESSES[base].pid)
    workers = [p for p in root.children(recursive=True) if "worker" in " ".join(p.cmdline())]
    return sum(p.memory_info().rss for p in workers or [root]) / 2**20


def soak(base: str, minutes: float, concurrency: int = 8) -> dict:
    """Steady /predict load for `minutes`, sampling the server's RSS. Memory is flat when the
    last sample is within 10% of the one after warm-up (the first minute, or a tenth)."""
    pngs = digits()
    samples: list[tuple[float, float]] = []
    deadline = time.monotonic() + minutes * 60

    async def run() -> Load:
        stop = asyncio.Event()

        async def sample() -> None:
            started = time.monotonic()
            while not stop.is_set():
                samples.append((time.monotonic() - started, server_rss_mb(base)))
                await asyncio.sleep(5)

        def predict(client: httpx.AsyncClient, i: int):
            return client.post("/predict", **upload(pngs[i % len(pngs)]))

        sampler = asyncio.create_task(sample())
        load = await drive(base, predict, 10**9, concurrency, until=deadline)
        stop.set()
        await sampler
        return load

    load = asyncio.run(run())
    warm = min(60.0, minutes * 6)
    baseline = next(rss for t, rss in samples if t >= warm)
    final = samples[-1][1]
    return {
        "load": load.summary(),
        "rss_mb": {
            "after_warmup": round(baseline, 1),
            "final": round(final, 1),
            "max": round(max(r for _, r in samples), 1),
        },  # fmt: skip
        "rss_growth_pct": round((final - baseline) / baseline * 100, 2),
        "samples": [(round(t), round(r, 1)) for t, r in samples],
    }


def report(results: dict, out: Path) -> str:
    lines = ["# Load", ""]
    lines += ["| run | requests | failed | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for name in ("predict", "mixed_with_reloads"):
        s = results[name]
        lines.append(
            f"| {name} | {s['requests']} | {s['failed']} | {s['req_per_s']} | {s['p50_ms']} | "
            f"{s['p99_ms']} |"
        )
    lines += ["", f"Reloads during the mixed run: {results['reloads']}"]
    if "soak" in results:
        s = results["soak"]
        lines += [
            "",
            f"Soak, {results['soak_minutes']} min: {s['load']['requests']} requests, "
            f"{s['load']['failed']} failed; worker RSS {s['rss_mb']['after_warmup']} MB after "
            f"warm-up, {s['rss_mb']['final']} MB at the end ({s['rss_growth_pct']:+.1f}%), "
            f"max {s['rss_mb']['max']} MB.",
        ]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.md").write_text(text)
    (out / "load.json").write_text(json.dumps(results, indent=2) + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--mixed", type=int, default=3_000)
    parser.add_argument("--soak-minutes", type=float, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = {"DIGITOPS_ADMIN_TOKEN": ADMIN_TOKEN, "DIGITOPS_FEEDBACK_PER_MINUTE": "1000000"}
        with bentoml_serve(Path(tmp), **settings) as (base, _):
            results = {"predict": predictions(base, args.requests).summary()}
            mixed, reloads = mixed_with_reloads(base, Path(tmp) / "bentoml_home", args.mixed, 5)
            results |= {"mixed_with_reloads": mixed.summary(), "reloads": reloads}
            if args.soak_minutes:
                results |= {
                    "soak": soak(base, args.soak_minutes),
                    "soak_minutes": args.soak_minutes,
                }
    print(report(results, args.out))


if __name__ == "__main__":
    main()
