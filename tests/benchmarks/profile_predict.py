"""Where a /predict request's CPU time goes, from py-spy samples of the serving worker under
load: a flame graph, and the samples grouped into the steps of a request.

Used by bench_serving on the digitops server; py-spy (dev extra) samples another process
without changing it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import psutil

# (step, what marks a stack frame as that step), checked from the innermost frame outwards:
# the first frame that matches names the step the sample was spent in.
STEPS = (
    ("forward pass", ("onnxruntime", "runtime.py", "served.py:probabilities")),
    ("decode", ("PIL/", "preprocess.py:decode", "preprocess.py:_shrink")),
    ("preprocessing", ("preprocess.py", "scipy/")),
    ("prediction log", ("store.py", "sqlite3")),
    ("reply encoding", ("files.py", "json/", "base64", "http.py:prediction_payload")),
    ("multipart parsing", ("multipart", "formparsers")),
)
# Installed beside this interpreter by the dev extra, whether or not the venv is on PATH.
PY_SPY = str(Path(sys.executable).with_name("py-spy"))
FRAMEWORK = "framework (BentoML, Starlette, uvicorn, asyncio, threads)"


def busiest_worker(server_pid: int) -> psutil.Process:
    """The child of a `bentoml serve` process that has used the most CPU: the one serving."""
    children = psutil.Process(server_pid).children(recursive=True)
    return max(children, key=lambda p: sum(p.cpu_times()[:2]))


def step_of(stack: str) -> str:
    """The step a collapsed stack ('fn (file:line);fn (file:line)...', outermost first) is in."""
    for frame in reversed(stack.split(";")):  # innermost first
        match = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame)
        where = f"{match[2]}:{match[1]}" if match else frame  # 'path/file.py:function'
        for step, marks in STEPS:
            if any(mark in where for mark in marks):
                return step
    return FRAMEWORK


def record(pid: int, seconds: int, out: Path, fmt: str) -> subprocess.Popen:
    options = ["--duration", str(seconds), "--rate", "250", "--nonblocking", "--format", fmt]
    return subprocess.Popen(
        [PY_SPY, "record", "--pid", str(pid), *options, "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


def profile(server_pid: int, load, seconds: int, out: Path) -> dict:
    """Sample the serving worker while `load()` runs twice (once for the flame graph, once for
    the collapsed stacks); return each step's share of the samples and of the CPU time per
    request."""
    worker = busiest_worker(server_pid)
    flame = out / "predict_flamegraph.svg"
    spy = record(worker.pid, seconds, flame, "flamegraph")
    load()
    spy.wait(timeout=seconds + 60)
    raw = out / "predict_profile.txt"
    cpu_before = sum(worker.cpu_times()[:2])
    spy = record(worker.pid, seconds, raw, "raw")
    result = load()
    spy.wait(timeout=seconds + 60)
    cpu_seconds = sum(worker.cpu_times()[:2]) - cpu_before
    samples: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples[step_of(stack)] += int(count)
    total = sum(samples.values()) or 1
    cpu_ms = cpu_seconds * 1000 / max(result["requests"], 1)
    return {
        "flame_graph": flame.name,
        "requests": result["requests"],
        "cpu_ms_per_request": round(cpu_ms, 3),
        "steps": {
            step: {"share": round(n / total, 3), "cpu_ms": round(cpu_ms * n / total, 3)}
            for step, n in samples.most_common()
        },
    }
