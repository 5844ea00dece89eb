"""Serving benchmark, side by side in one run: bare model, FastAPI baseline, naive BentoML, the
FastAPI and BentoML floors (upload read, fixed reply, no work), ours, and ours doing only the
baseline's work (no access line, no prediction log).

    python -m benchmarks.bench_serving [--seconds 5] [--rounds 5] [--out artifacts/bench]

All servers start together and take turns, round after round; only the one under load uses
the cores. wrk, a C load generator, drives it so the client steals little CPU. Writes
report.json and report.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import operator
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from benchmarks.bench_load import server_rss_mb
from benchmarks.profile_predict import profile
from digitops.data import mnist
from digitops.inference.served import load_served_model
from digitops.inference.settings import KEEP_ALIVE_SECONDS, Settings
from tests.servers import PROCESSES, free_port, running, serve_command

SETTINGS = Settings.from_env()

ROOT = Path(__file__).resolve().parents[1]
# Worker processes per system: the baseline and the naive service as their defaults (one); ours
# as configured (DIGITOPS_WORKERS, default one per core), and the floor alike; and ours with one
# worker, to show what one process does.
OURS = SETTINGS.workers
WORKERS = {
    "fastapi_floor": 1,
    "fastapi_baseline": 1,
    "naive_bentoml": 1,
    "bentoml_floor": OURS,
    "digitops": OURS,
    "digitops_one_worker": 1,
    "digitops_baseline_work": OURS,
}
# Ours doing only the baseline's work: no access line (uvicorn's is off at the baseline's log
# level) and no prediction log (form field `log=false`). Beside `digitops`, it prices those two.
# An endpoint is a path, then any form fields sent beside the image: "/predict log=false".
BASELINE_WORK = "/predict log=false"
ENV = {"digitops_baseline_work": {"DIGITOPS_ACCESS_LOG": "false"}}
SYSTEMS = tuple(WORKERS)
LUA = Path(__file__).with_name("post_image.lua")


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
    """The served forward pass alone (uint8 pixels in, probabilities and digit scores out), in
    process."""
    served = load_served_model(SETTINGS.model_tag, SETTINGS.shipped_model)
    x1 = np.zeros((1, 28, 28), dtype=np.uint8)
    x32 = np.zeros((32, 28, 28), dtype=np.uint8)
    for _ in range(50):
        served.answers(x1)
    times = []
    deadline = time.perf_counter() + seconds / 2
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        served.answers(x1)
        times.append((time.perf_counter() - start) * 1000)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds / 2:
        served.answers(x32)
        n += 32
    rate = n / (time.perf_counter() - start)
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p99_ms": float(np.percentile(times, 99)),
        "throughput_c32": rate,
    }


def form_fields(endpoint: str) -> tuple[str, dict[str, str]]:
    """An endpoint's path and the form fields it sends beside the image."""
    path, *fields = endpoint.split()
    return path, dict(field.split("=", 1) for field in fields)


def wrk(
    port: int,
    endpoint: str,
    image: Path,
    connections: int,
    seconds: float,
    warm_up: bool = True,
    new_connections: bool = False,
) -> dict:
    """wrk's figures for `endpoint` (a path and form fields, as BASELINE_WORK);
    `new_connections` opens a connection per request (Connection: close) instead of keeping
    each one open."""
    path, fields = form_fields(endpoint)
    env = {
        **os.environ,
        "BENCH_IMAGE": str(image),
        "BENCH_PATH": path,
        "BENCH_FIELDS": "&".join(f"{k}={v}" for k, v in fields.items()),
    }
    url = f"http://127.0.0.1:{port}{path}"
    close = ["-H", "Connection: close"] if new_connections else []
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
            *close,
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


def start_servers(stack: contextlib.ExitStack, systems: list, image: Path, out: Path) -> dict:
    """Start every system at once, each on a port of its own and logging into a new store of
    its own (deleted afterwards: the project's store, grown by earlier runs, would make runs
    differ for reasons of their own). Checks each answers correctly. Returns name -> (base URL,
    port)."""
    bases = {}
    for name, command, _, ready_path in systems:
        port = free_port()
        store = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-{name}-")))
        env = {
            "DIGITOPS_WORKERS": str(WORKERS[name]),
            "DIGITOPS_PREDICTIONS_DB": str(store / "predictions.db"),
            **ENV.get(name, {}),
        }
        log = out / f"{name}.log"
        base = stack.enter_context(
            running(command(port), port, log, ready_path=ready_path, env=env)
        )
        files = {"image": ("d.png", image.read_bytes(), "image/png")}
        httpx.post(f"{base}/predict", files=files, timeout=30).raise_for_status()
        bases[name] = base, port
    return bases


def measure_servers(systems: list, image: Path, seconds: int, rounds: int, out: Path):
    """wrk's figures per system and endpoint, the median of `rounds` rounds; the workers'
    resident memory when warmed up and after the last c=32 run; where digitops' /predict CPU
    time goes.

    Every round runs every system in turn, all of them started before the first: this VM's
    speed drifts by a third from minute to minute, and a slow minute then falls on every system
    alike instead of on whichever ran in it. An idle server uses next to no CPU."""
    runs: dict = {name: {path: {} for path in endpoints} for name, _, endpoints, _ in systems}
    memory: dict = {}
    with contextlib.ExitStack() as stack:
        bases = start_servers(stack, systems, image, out)
        for round_ in range(rounds):
            first = round_ == 0  # the first round warms every code path up
            for name, _, endpoints, _ in systems:
                base, port = bases[name]
                for path in endpoints:
                    measured = runs[name][path]
                    measured.setdefault("c1", []).append(
                        wrk(port, path, image, 1, seconds, warm_up=first)
                    )
                    if first and path == endpoints[0]:  # warmed up: every code path has run
                        memory[name] = {"idle_mb": server_rss_mb(base)}
                    measured.setdefault("c32", []).append(
                        wrk(port, path, image, 32, seconds, warm_up=first)
                    )
                    # A lone client right after a burst must not pay for it (a collector
                    # walking what the burst allocated, a checkpoint of its writes).
                    measured.setdefault("c1_after_burst", []).append(
                        wrk(port, path, image, 1, seconds, warm_up=False)
                    )
        for name, (base, _) in bases.items():
            memory[name]["after_c32_mb"] = server_rss_mb(base)
        # Sampled under the c=32 load: one process, one profile.
        base, port = bases["digitops_one_worker"]
        load = lambda: wrk(port, "/predict", image, 32, seconds, warm_up=False)  # noqa: E731
        spent = profile(PROCESSES[base].pid, load, seconds, out)
    results = {
        name: {
            path: {kind: median_of(kind_runs) for kind, kind_runs in kinds.items()}
            for path, kinds in paths.items()
        }
        for name, paths in runs.items()
    }
    return results, spent, memory


def median_of(runs: list[dict]) -> dict:
    """One measurement's figures over rounds: the median of each, errors and requests summed,
    and the rounds' own figures beside them."""
    figures = {
        key: float(np.median([r[key] for r in runs])) for key in ("p50_ms", "p99_ms", "throughput")
    }
    totals = {key: sum(r[key] for r in runs) for key in ("errors", "requests")}
    return {**figures, **totals, "rounds": runs}


def paired(ours: dict, theirs: dict, key: str, compare: Callable[[float, float], float]) -> float:
    """The median over rounds of `compare(ours, theirs)` for `key`, each round with itself.

    Both ran in the same round, a minute apart at most, and this VM's speed drifts by 2x from
    one minute to the next: a slow round slows both alike, so each round's comparison holds
    where comparing two medians, possibly taken in different rounds, need not."""
    return float(
        np.median(
            [compare(a[key], b[key]) for a, b in zip(ours["rounds"], theirs["rounds"], strict=True)]
        )
    )


def targets(results: dict) -> list[tuple[str, float, str, bool]]:
    """(target, measured, goal, met) for each of the serving issue's targets."""
    ours, naive = results["digitops"], results["naive_bentoml"]
    floor = results["bentoml_floor"]["/predict"]
    predict, explain = ours["/predict"], ours["/explain"]
    errors = sum(
        m["errors"] for system in SYSTEMS for r in results[system].values() for m in r.values()
    )
    over_floor = paired(predict["c1"], floor["c1"], "p50_ms", operator.sub)
    vs_floor = paired(predict["c32"], floor["c32"], "throughput", operator.truediv)
    vs_naive = paired(predict["c32"], naive["/predict"]["c32"], "throughput", operator.truediv)
    explain_extra = paired(explain["c1"], predict["c1"], "p50_ms", operator.sub)
    tail = predict["c1"]["p99_ms"] / predict["c1"]["p50_ms"]
    memory = results["memory"]["digitops"]
    growth = memory["after_c32_mb"] / memory["idle_mb"] - 1
    return [
        ("/predict p50 c=1 minus the floor's", over_floor, "<= 1.5 ms", over_floor <= 1.5),
        ("/predict req/s c=32 / the floor's", vs_floor, ">= 0.5", vs_floor >= 0.5),
        ("/predict req/s c=32 / naive BentoML's", vs_naive, ">= 2.5", vs_naive >= 2.5),
        ("/explain p50 c=1 minus /predict's", explain_extra, "<= 2.0 ms", explain_extra <= 2.0),
        ("/predict p99 c=1 / its p50", tail, "<= 3.0", tail <= 3.0),
        ("errors, every measurement", errors, "0", errors == 0),
        ("worker memory growth, idle to after c=32", growth, "< 0.10", growth < 0.10),
    ]


def gap_at_c1(results: dict) -> list[tuple[str, float]]:
    """Where /predict's p50 at c=1 stands against the FastAPI baseline's, in parts (each paired
    within rounds): what the framework adds under the same upload and reply, and what the work
    costs on each side of it."""
    p50 = {
        name: results[name]["/predict"]["c1"]
        for name in ("fastapi_floor", "fastapi_baseline", "bentoml_floor")
    }
    ours = results["digitops"]["/predict"]["c1"]
    baseline_work = results["digitops_baseline_work"][BASELINE_WORK]["c1"]
    return [
        (
            "BentoML floor minus FastAPI floor: BentoML's stack",
            paired(p50["bentoml_floor"], p50["fastapi_floor"], "p50_ms", operator.sub),
        ),
        (
            "FastAPI baseline minus FastAPI floor: its work (preprocessing, model, reply)",
            paired(p50["fastapi_baseline"], p50["fastapi_floor"], "p50_ms", operator.sub),
        ),
        (
            "/predict minus the BentoML floor: ours (the same work, log, input PNG, metrics)",
            paired(ours, p50["bentoml_floor"], "p50_ms", operator.sub),
        ),
        (
            "/predict minus the FastAPI baseline",
            paired(ours, p50["fastapi_baseline"], "p50_ms", operator.sub),
        ),
        (
            "/predict doing only the baseline's work minus the FastAPI baseline",
            paired(baseline_work, p50["fastapi_baseline"], "p50_ms", operator.sub),
        ),
        (
            "/predict minus /predict doing only the baseline's work: the access line and the "
            "prediction log",
            paired(ours, baseline_work, "p50_ms", operator.sub),
        ),
    ]


def report(results: dict, out: Path) -> str:
    checks = targets(results)
    gap = gap_at_c1(results)
    lines = [
        "# Serving benchmark",
        "",
        f"{results['machine']}; wrk on loopback. Each figure is the median of "
        f"{results['rounds']} rounds of {results['seconds']} s, every round running every "
        "system in turn.",
        "",
        "| system (worker processes) | endpoint | p50 c=1 (ms) | p99 c=1 (ms) | req/s c=32 "
        "| p99 c=32 (ms) | p50 c=1 after c=32 (ms) | errors |",
        "|---|---|---|---|---|---|---|---|",
        f"| served forward pass (in process) | - | {results['model']['p50_ms']:.2f} | "
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
        "| system | worker RSS warmed up (MB) | after the /predict c=32 run (MB) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {system} | {m['idle_mb']:.0f} | {m['after_c32_mb']:.0f} |"
        for system, m in results["memory"].items()
    ]
    lines += [
        "",
        f"The BentoML floor on this machine is {floor:.2f} ms p50 at c=1: reading the upload and "
        "sending a reply through BentoML's HTTP stack, before any image or model work.",
        "",
        "A target that compares two measurements takes the median over rounds of each round's "
        "own comparison: both ran in the same round, and this VM's speed drifts from minute to "
        "minute.",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for name, value, goal, met in checks:
        lines.append(f"| {name} | {value:.2f} | {goal} | {'met' if met else 'NOT met'} |")
    lines += ["", "p50 at c=1, in parts (paired within rounds):", "", "| part | ms |", "|---|---|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in gap]
    spent = results["predict_profile"]
    lines += [
        "",
        f"Where `/predict`'s CPU time goes at c=32 (py-spy samples of the worker, "
        f"{spent['requests']} requests, {spent['cpu_ms_per_request']} ms of worker CPU per "
        f"request, {spent['loop_thread_cpu_ms_per_request']} ms of it on the event loop's "
        f"thread; flame graph: `{spent['flame_graph']}`):",
        "",
        "| step | share of samples | CPU ms per request |",
        "|---|---|---|",
    ]
    lines += [
        f"| {step} | {v['share']:.1%} | {v['cpu_ms']:.3f} |" for step, v in spent["steps"].items()
    ]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    summary = {
        name: {"measured": value, "goal": goal, "met": met} for name, value, goal, met in checks
    }
    document = {**results, "targets": summary, "gap_at_c1_ms": dict(gap)}
    (out / "report.json").write_text(json.dumps(document, indent=2) + "\n")
    return text


def uvicorn_command(app: str, port: int) -> list[str]:
    """A plain FastAPI app under uvicorn, one worker, no access log (uvicorn's at this level)."""
    return [
        "uvicorn",
        app,
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--timeout-keep-alive", str(KEEP_ALIVE_SECONDS)),
        *("--log-level", "warning"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="of every measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    image = canvas_png(args.out)
    results = {
        "seconds": args.seconds,
        "rounds": args.rounds,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "model": bare_model(args.seconds),
        "workers": WORKERS,
    }
    systems = [
        # name, command on a port, endpoints, the path that answers 200 once it is up
        (
            "fastapi_floor",
            partial(uvicorn_command, "benchmarks.fastapi_floor:app"),
            ["/predict"],
            "/docs",
        ),
        (
            "fastapi_baseline",
            partial(uvicorn_command, "benchmarks.fastapi_baseline:app"),
            ["/predict"],
            "/docs",
        ),
        (
            "naive_bentoml",
            partial(serve_command, "benchmarks.naive_service:NaiveDigitService"),
            ["/predict"],
            "/readyz",
        ),
        (
            "bentoml_floor",
            partial(serve_command, "benchmarks.floor_service:FloorService"),
            ["/predict"],
            "/readyz",
        ),
        (
            "digitops",
            partial(serve_command, "serving.service:DigitService"),
            ["/predict", "/explain"],
            "/readyz",
        ),
        (
            "digitops_one_worker",
            partial(serve_command, "serving.service:DigitService"),
            ["/predict"],
            "/readyz",
        ),
        (
            "digitops_baseline_work",
            partial(serve_command, "serving.service:DigitService"),
            [BASELINE_WORK],
            "/readyz",
        ),
    ]
    measured, results["predict_profile"], results["memory"] = measure_servers(
        systems, image, args.seconds, args.rounds, args.out
    )
    results.update(measured)
    print(report(results, args.out))


if __name__ == "__main__":
    main()
