"""Scaling on this machine: one replica, one replica with two worker processes, and one and two
replicas behind nginx, under bench_serving's wrk load (/predict with a canvas PNG, c=32, kept-alive
connections). Writes cluster.json and cluster.md.

    python -m benchmarks.bench_cluster [--seconds 10] [--out artifacts/bench]

Every setup is a real `deploy.cluster` (PostgreSQL store, MLflow server), so a direct row
and its nginx row differ only in the path a request takes. How the load spreads is each worker
process's share of the workers' CPU time during the measurement.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
from pathlib import Path

import psutil

from benchmarks import save_report
from benchmarks.bench_serving import canvas_png, wrk
from deploy.cluster import Process, down, load, up
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
CONNECTIONS = 32
# (replicas, workers per replica): one cluster each, measured direct (one replica only) and
# through nginx.
CLUSTERS = [(1, 1), (1, 2), (2, 1)]


def workers(processes: list[Process]) -> dict[str, psutil.Process]:
    """Each replica's BentoML worker processes, as replica-N/worker-M."""
    found = {}
    for replica in processes:
        if not replica.name.startswith("replica"):
            continue
        for child in replica.handle().children(recursive=True):
            cmd = child.cmdline()
            if "_bentoml_impl.worker.service" in cmd:
                found[f"{replica.name}/worker-{cmd[cmd.index('--worker-id') + 1]}"] = child
    return found


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def measure(
    port: int, image: Path, seconds: float, processes: list[Process], new_connections: bool
) -> dict:
    """wrk's figures at c=32, and each worker's share of the workers' CPU time meanwhile."""
    wrk(port, "/predict", image, CONNECTIONS, 2, warm_up=False)  # lazily-initialised paths
    serving = workers(processes)
    before = {name: cpu_seconds(p) for name, p in serving.items()}
    result = wrk(
        port, "/predict", image, CONNECTIONS, seconds, False, new_connections=new_connections
    )
    spent = {name: cpu_seconds(p) - before[name] for name, p in serving.items()}
    total = sum(spent.values()) or 1.0
    result["cpu_share"] = {name: round(s / total, 3) for name, s in spent.items()}
    return result


def run_cluster(replicas: int, workers_each: int, image: Path, seconds: float) -> list[dict]:
    directory = Path(tempfile.mkdtemp(prefix="digitops-bench-cluster-"))
    directory.chmod(0o755)  # PostgreSQL runs as `postgres` when we are root
    port = free_port()
    try:
        up(directory, replicas, workers_each, port)
        processes = load(directory).processes
        paths = [("nginx", port, False)]
        if replicas == 1:  # and the same replica without nginx, kept-alive and not
            direct = next(p.port for p in processes if p.name == "replica-1")
            paths[:0] = [("direct", direct, False), ("direct, new connections", direct, True)]
        return [
            {
                "shape": f"{replicas} x {workers_each}",
                "path": path,
                **measure(target, image, seconds, processes, new_connections),
            }
            for path, target, new_connections in paths
        ]
    finally:
        down(directory, quiet=True)
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    image = canvas_png(args.out)
    # The cores are shared with whatever else runs: the load says how quiet the machine was.
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the start"
    )
    rows = [row for shape in CLUSTERS for row in run_cluster(*shape, image, args.seconds)]
    lines = [
        "# Replicas behind nginx",
        "",
        f"{machine}; wrk, {CONNECTIONS} connections (kept alive unless the row says otherwise), "
        f"{args.seconds} s per row, "
        "POST /predict with a canvas PNG; PostgreSQL store, MLflow server running.",
        "",
        "| replicas x workers | path | req/s | p50 (ms) | p99 (ms) | errors | workers' CPU share |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = ", ".join(f"{name} {s:.0%}" for name, s in r["cpu_share"].items())
        lines.append(
            f"| {r['shape']} | {r['path']} | {r['throughput']:.0f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['errors']} | {share} |"
        )
    save_report(
        args.out, "cluster", {"machine": machine, "seconds": args.seconds, "rows": rows}, lines
    )


if __name__ == "__main__":
    main()
