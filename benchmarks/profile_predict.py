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

# (step, what marks a stack frame as that step): the first step with a frame anywhere on the
# stack names the step the sample was spent in (so Pillow encoding the reply's PNG counts as
# reply encoding, and decoding inside `preprocess` as decoding).
STEPS = (
    ("reply encoding", ("files.py", "predictor.py:prediction_payload", "JSONResponse.render")),
    ("decode", ("preprocess.py:decode", "preprocess.py:_plain_png")),
    ("forward pass", ("served.py:OnnxModel.run", "served.py:ServedModel.probabilities")),
    ("prediction log", ("store.py", "journal.py")),
    ("metrics", ("metrics.py", "prometheus_client")),
    ("preprocessing", ("preprocess.py",)),
    ("multipart parsing", ("multipart", "formparsers")),
)
# A sample whose innermost frame is one of these is a thread waking another, or waiting to run:
# the cost of handing a request between threads, not work.
HAND_OFFS = ("_write_to_self", "_read_from_self", "Condition.wait", "Queue.get", "select")
HAND_OFF = "thread hand-offs (waking the loop or a thread, waiting for the GIL)"
# Installed beside this interpreter by the dev extra, whether or not the venv is on PATH.
PY_SPY = str(Path(sys.executable).with_name("py-spy"))
FRAMEWORK = "framework (BentoML, Starlette, uvicorn, asyncio, threads)"


def busiest_worker(server_pid: int) -> psutil.Process:
    """The child of a `bentoml serve` process that has used the most CPU: the one serving."""
    children = psutil.Process(server_pid).children(recursive=True)
    return max(children, key=lambda p: sum(p.cpu_times()[:2]))


def loop_thread_cpu(worker: psutil.Process) -> float:
    """CPU seconds of the worker's main thread, which runs its event loop."""
    main = next(t for t in worker.threads() if t.id == worker.pid)
    return main.user_time + main.system_time


def step_of(stack: str) -> str:
    """The step a collapsed stack ('fn (file:line);fn (file:line)...', outermost first) is in."""
    frames = []
    for frame in stack.split(";"):
        match = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame)
        frames.append(f"{match[2]}:{match[1]}" if match else frame)  # 'path/file.py:function'
    if frames and any(frames[-1].endswith(name) for name in HAND_OFFS):
        return HAND_OFF
    for step, marks in STEPS:
        if any(mark in where for where in frames for mark in marks):
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
    loop_before = loop_thread_cpu(worker)
    spy = record(worker.pid, seconds, raw, "raw")
    result = load()
    spy.wait(timeout=seconds + 60)
    cpu_seconds = sum(worker.cpu_times()[:2]) - cpu_before
    loop_seconds = loop_thread_cpu(worker) - loop_before
    samples: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples[step_of(stack)] += int(count)
    total = sum(samples.values()) or 1
    requests = max(result["requests"], 1)
    cpu_ms = cpu_seconds * 1000 / requests
    return {
        "flame_graph": flame.name,
        "requests": result["requests"],
        "cpu_ms_per_request": round(cpu_ms, 3),
        # The event loop's thread runs the framework; the others, the request's own work.
        "loop_thread_cpu_ms_per_request": round(loop_seconds * 1000 / requests, 3),
        "steps": {
            step: {"share": round(n / total, 3), "cpu_ms": round(cpu_ms * n / total, 3)}
            for step, n in samples.most_common()
        },
    }
