"""A team deployment on one machine: PostgreSQL, an MLflow server, N replicas of the service and
nginx in front of them, all on 127.0.0.1 (README.md, "Running on many machines").

    python -m deploy.cluster up [--replicas 2] [--workers 1] [--port 8080] [--dir DIR]
    python -m deploy.cluster status [--dir DIR]     # DIR: var/cluster by default
    python -m deploy.cluster down [--dir DIR]

Run it from the checkout's root: the replicas serve `serving.service:DigitService` from there and
nginx's config is rendered from deploy/nginx.conf. `up` leaves every process running on its own
(own session, log in <dir>/logs/) and records them in <dir>/cluster.json for `status` and `down`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

from deploy.ports import free_port
from deploy.postgres import LocalPostgres, PostgresUnavailable

SERVICE = "serving.service:DigitService"
NGINX_TEMPLATE = Path("deploy/nginx.conf")
STATE_FILE = "cluster.json"
# A replica imports torch and loads its model, N of them at once on few cores: minutes, not seconds.
READY_TIMEOUT_S = 300
STOP_TIMEOUT_S = 30
TOOLS = Path(sys.executable).parent  # bentoml and mlflow from the same environment as this


class ClusterError(RuntimeError):
    """A piece failed to start or to stop; the message says which, and where its log is."""


@dataclass
class Process:
    """A server the cluster started: what `status` and `down` need to find it again."""

    name: str
    port: int
    url: str
    pid: int
    created: float  # the process's start time, so a recycled pid is never taken for it
    log: str

    @classmethod
    def of(cls, name: str, port: int, url: str, pid: int, log: Path) -> Process:
        return cls(name, port, url, pid, psutil.Process(pid).create_time(), str(log))

    def handle(self) -> psutil.Process | None:
        """The live process, or None once it has exited (or its pid belongs to another)."""
        try:
            proc = psutil.Process(self.pid)
            if proc.create_time() == self.created and alive(proc):
                return proc
        except psutil.Error:
            pass
        return None


# The state file.
@dataclass
class State:
    """What `up` started, in <dir>/cluster.json."""

    port: int  # nginx's
    postgres: Process | None = None
    processes: list[Process] = field(default_factory=list)  # in the order they started


def save(directory: Path, state: State) -> None:
    (directory / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")


def load(directory: Path) -> State | None:
    try:
        raw = json.loads((directory / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    postgres = Process(**raw["postgres"]) if raw["postgres"] else None
    return State(raw["port"], postgres, [Process(**p) for p in raw["processes"]])


def everything(state: State | None) -> list[Process]:
    return [p for p in [state.postgres, *state.processes] if p] if state else []


def running(directory: Path) -> bool:
    return any(p.handle() for p in everything(load(directory)))


# Starting.
def launch(name: str, cmd: list[str], port: int, log: Path, env: dict) -> Process:
    """Start `cmd` detached: its own session, so it outlives `up` and ignores the terminal's ^C."""
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, "PATH": f"{TOOLS}:{os.environ.get('PATH', '')}", **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Process.of(name, port, f"http://127.0.0.1:{port}", proc.pid, log)


def wait_ready(process: Process, path: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Wait until GET `path` answers 200; a ClusterError with the log's tail if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(process.url + path, timeout=2).status_code == 200:
                return
        if process.handle() is None:
            raise ClusterError(f"{process.name} exited before it was ready{log_tail(process.log)}")
        if time.monotonic() > deadline:
            raise ClusterError(
                f"{process.name} not ready in {timeout:.0f} s at {process.url}{path}"
                f"{log_tail(process.log)}"
            )
        time.sleep(0.5)


def log_tail(log: str | Path, lines: int = 15) -> str:
    try:
        tail = Path(log).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"; no log at {log}"
    return f"; the end of {log}:\n" + "\n".join("    " + line for line in tail)


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def render(template: str, **fields: object) -> str:
    """`template` with each {{name}} filled in (a name without a value is a KeyError)."""
    return re.sub(r"\{\{(\w+)\}\}", lambda m: str(fields[m.group(1)]), template)


def nginx_config(port: int, replica_ports: list[int], run_dir: Path, log_dir: Path) -> str:
    # Imported here: they pull in torch, which only `up` needs.
    from digitops.inference.contract import MULTIPART_OVERHEAD
    from digitops.inference.preprocess import DEFAULT_MAX_BYTES

    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in replica_ports)
    return render(
        NGINX_TEMPLATE.read_text(),
        port=port,
        servers=servers,
        run_dir=run_dir,
        log_dir=log_dir,
        max_body_bytes=DEFAULT_MAX_BYTES + MULTIPART_OVERHEAD,
    )


def start_postgres(directory: Path) -> tuple[LocalPostgres, Process]:
    """PostgreSQL with the `digitops` (prediction store) and `mlflow` databases."""
    pg = LocalPostgres(directory).start()
    import psycopg  # only where PostgreSQL is used

    for database in ("digitops", "mlflow"):
        # A second `up` on the same folder finds them from the first.
        with contextlib.suppress(psycopg.errors.DuplicateDatabase):
            pg.create_database(database)
    pid = int((pg.data / "postmaster.pid").read_text().split()[0])
    log = directory / "postgres.log"
    return pg, Process.of("postgres", pg.port, pg.url("digitops"), pid, log)


def start_mlflow(pg: LocalPostgres, directory: Path, logs: Path) -> Process:
    """The tracking server and model registry: runs and registry in the `mlflow` database,
    artifacts in <dir>/mlartifacts, served through it (clients need no access to that folder)."""
    port = free_port()
    backend = pg.url("mlflow").replace("postgresql:", "postgresql+psycopg:")  # psycopg 3
    cmd = [
        str(TOOLS / "mlflow"), "server", "--backend-store-uri", backend,
        "--artifacts-destination", str(directory / "mlartifacts"),
        "--host", "127.0.0.1", "--port", str(port),
        # The replicas poll it every few seconds and training logs a run now and then.
        "--workers", "1",
    ]  # fmt: skip
    # MLflow's job runner (GenAI scorers, unused here) would be eight more Python processes.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return launch("mlflow", cmd, port, logs / "mlflow.log", env)


def start_replica(
    number: int, workers: int, pg: LocalPostgres, mlflow: Process, logs: Path
) -> Process:
    """`bentoml serve` on a port of its own, sharing the store and following the registry."""
    from digitops.inference.settings import KEEP_ALIVE_SECONDS

    port = free_port()
    cmd = [
        str(TOOLS / "bentoml"), "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port),
        # Idle connections from nginx must close on nginx's side first (deploy/nginx.conf).
        "--timeout-keep-alive", str(KEEP_ALIVE_SECONDS),
    ]  # fmt: skip
    env = {
        "DIGITOPS_PREDICTIONS_DB": pg.url("digitops"),
        # Each worker's predictions are journaled here before its reply (a local disk).
        "MLFLOW_TRACKING_URI": mlflow.url,
        "DIGITOPS_REGISTRY_POLL_SECONDS": os.environ.get("DIGITOPS_REGISTRY_POLL_SECONDS", "10"),
        "DIGITOPS_WORKERS": str(workers),
        # nginx logs every request, with the replica that answered and its time.
        "DIGITOPS_ACCESS_LOG": os.environ.get("DIGITOPS_ACCESS_LOG", "false"),
    }
    return launch(f"replica-{number}", cmd, port, logs / f"replica-{number}.log", env)


def start_nginx(nginx: str, port: int, replicas: list[Process], directory: Path) -> Process:
    run_dir, logs = directory / "nginx", directory / "logs"
    (run_dir / "temp").mkdir(parents=True, exist_ok=True)  # nginx makes only the last level
    config = run_dir / "nginx.conf"
    config.write_text(nginx_config(port, [r.port for r in replicas], run_dir, logs))
    # -e: the error log before the config is read (the compiled-in one is under /var/log).
    cmd = [nginx, "-p", str(run_dir), "-c", str(config), "-e", str(logs / "nginx.log")]
    return launch("nginx", cmd, port, logs / "nginx.log", {})


def up(directory: Path, replicas: int, workers: int, port: int) -> None:
    """Start everything, or nothing: a piece that fails stops the ones started before it."""
    for needed in (Path("serving/service.py"), NGINX_TEMPLATE):
        if not needed.exists():
            raise ClusterError(f"no {needed} here: run this from the digitops checkout's root")
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if nginx is None:
        raise ClusterError("nginx is not installed: apt-get install nginx")
    if running(directory):
        raise ClusterError(f"a cluster is already running from {directory}: `down` it first")
    if port_in_use(port):
        raise ClusterError(f"port {port} is in use: choose another with --port")
    down(directory, quiet=True)  # whatever a killed `up` left behind
    logs = directory / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    state = State(port)

    def record(process: Process) -> Process:  # at once, so `down` can stop a half-started cluster
        state.processes.append(process)
        save(directory, state)
        return process

    try:
        pg, state.postgres = start_postgres(directory / "postgres")
        save(directory, state)
        mlflow = record(start_mlflow(pg, directory, logs))
        wait_ready(mlflow, "/health")
        # All replicas at once: they load side by side.
        started = [
            record(start_replica(i, workers, pg, mlflow, logs)) for i in range(1, replicas + 1)
        ]
        for replica in started:
            wait_ready(replica, "/readyz")
        wait_ready(record(start_nginx(nginx, port, started, directory)), "/readyz", timeout=30)
    except BaseException:  # ^C included: nothing is left running half-started
        with contextlib.suppress(Exception):  # the error that stopped `up` is the one to see
            down(directory, quiet=True)
        raise


def table(state: State | None, probe: bool = False) -> str:
    """One line per process: name, (whether it is up,) URL, pid, log."""
    lines = []
    for p in everything(state):
        health = ""
        if probe:
            health = "stopped "
            if p.handle():
                health = "up      " if port_in_use(p.port) else "starting"
        lines.append(f"{p.name:<10} {health}{p.url:<47} pid {p.pid:<8} {p.log}")
    return "\n".join(lines)


# Stopping.
def stop(processes: list[Process], sig: int) -> list[str]:
    """Send `sig` to each (servers stop their own workers), SIGKILL whatever of their process
    trees is left after STOP_TIMEOUT_S; the names of those that needed it."""
    trees = {}
    for p in processes:
        proc = p.handle()
        if proc is None:
            continue
        # BentoML's workers run in sessions of their own: only the tree finds them all.
        with contextlib.suppress(psutil.Error):
            trees[p.name] = [proc, *proc.children(recursive=True)]
            proc.send_signal(sig)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    killed = []
    for name, tree in trees.items():
        while any(alive(t) for t in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [t for t in tree if alive(t)]
        for t in left:
            with contextlib.suppress(psutil.Error):
                t.kill()
        if left:
            killed.append(name)
    return killed


def alive(proc: psutil.Process) -> bool:
    try:  # a zombie has exited; only its parent's wait() is missing
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def down(directory: Path, quiet: bool = False) -> None:
    """Stop nginx first (it finishes the requests in flight), then the replicas and MLflow, then
    PostgreSQL. Safe to repeat: what is already stopped is skipped."""
    state = load(directory)
    if state is None:
        if not quiet:
            print(f"nothing was running from {directory}")
        return
    front = [p for p in state.processes if p.name == "nginx"]
    back = [p for p in state.processes if p.name != "nginx"]
    killed = stop(front, signal.SIGQUIT) + stop(back, signal.SIGTERM)
    if state.postgres is not None:
        LocalPostgres(directory / "postgres", state.postgres.port).stop()
    (directory / STATE_FILE).unlink()
    if not quiet:
        for name in killed:
            print(f"{name} did not stop within {STOP_TIMEOUT_S} s of its signal: killed")
        print("stopped " + ", ".join(p.name for p in [*front, *back, state.postgres] if p))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start PostgreSQL, MLflow, the replicas and nginx")
    start.add_argument("--replicas", type=int, default=2)
    start.add_argument("--workers", type=int, default=1, help="worker processes per replica")
    start.add_argument("--port", type=int, default=8080, help="nginx's port")
    commands.add_parser("status", help="what runs where, and whether it is up")
    commands.add_parser("down", help="stop everything `up` started")
    for command in commands.choices.values():
        command.add_argument("--dir", type=Path, default=Path("var/cluster"))
    args = parser.parse_args()
    directory = args.dir.resolve()
    try:
        if args.command == "up":
            if args.replicas < 1 or args.workers < 1:
                raise ClusterError("--replicas and --workers must be at least 1")
            up(directory, args.replicas, args.workers, args.port)
            print(table(load(directory)))
        elif args.command == "status":
            print(table(load(directory), probe=True) or f"nothing runs from {directory}")
            sys.exit(0 if running(directory) else 3)  # 3: not running, as service managers say
        else:
            down(directory)
    except (ClusterError, PostgresUnavailable) as err:
        sys.exit(f"cluster: {err}")


if __name__ == "__main__":
    main()
