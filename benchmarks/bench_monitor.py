"""The Monitor at scale: GET /monitor with a million logged predictions, on SQLite and on
PostgreSQL alike, in process (`monitor.report`) and through a real `bentoml serve`. Writes
monitor.json and monitor.md; exits 1 if the default query's p50 over HTTP is over 200 ms on
either engine.

    python -m benchmarks.bench_monitor [--rows 1000000] [--requests 20] [--out artifacts/bench]

Each engine gets a store seeded with `--rows` predictions spread over the last 30 days (the
default 24 h window holds a thirtieth of them), built by `PredictionStore.record` and logged by
`PredictionStore.insert` in batches, as the service logs them, so that the Monitor's per-minute
totals are filled as in production; `upkeep()` runs between batches, as the journal's writer
runs it between commits. The newest 12 hours were answered by the served model's version (the
shipped model's), the rest by an older one, so that the drift test finds the served version's
newest inputs as it does in production; about 1% are stress tests (noise added); a few
thousand predictions carry a feedback label. Every row holds the same small 28x28 input PNG and
no original upload. PostgreSQL gets the VACUUM ANALYZE its autovacuum would run after such a
load; SQLite the ANALYZE the store's retention runs every 1,000 predictions. This
process freezes what it loaded out of the garbage collector's sight, as each server worker
does once started.

Every measurement takes turns: round after round, each engine (in alternating order) answers
each query a few times, so that this VM's drifting speed falls on both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import sqlalchemy as sa

from benchmarks import save_report
from digitops import checkpoint, monitoring
from digitops.files import png
from digitops.inference import monitor
from digitops.inference.served import ServedModel
from digitops.inference.store import PredictionStore, feedback
from digitops.inference.store import monitor as monitor_minutes
from digitops.model import fold_batchnorm
from tests.servers import free_port, postgres_server, running, serve_command

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "default" / "model.pt"
DAYS = 30
# The served version answered the newest hours; an older version everything before.
SWITCH_HOURS = 12
OLDER_VERSION = "0"
BATCH = 5_000
FEEDBACK_LABELS = 3_000
STRESS_SHARE = 0.01  # stress tests: noise added, left out of the Monitor's totals
NOT_DIGIT_SHARE = 0.03
INVERTED_SHARE = 0.05
TARGET_MS = 200.0
# (name, hours, bucket minutes); the first is GET /monitor without parameters.
QUERIES = [
    ("24 h / 60 min (default)", 24, 60),
    ("7 d / 60 min", 168, 60),
    ("30 d / 1440 min", 720, 1440),
]
ENGINES = ("sqlite", "postgresql")
ROUNDS = 4
# The version of a model just rolled out, which has logged nothing yet.
ROLLED_OUT = "999"
PARTS = ("monitor_totals", "labelled", "recent_inputs", "drift_test")


def served_model(version: str | None = None) -> ServedModel:
    """The shipped model, as tests/test_monitor.py builds it; `version` overrides the version
    its metadata names (a model just rolled out, with nothing logged yet)."""
    model, metadata = checkpoint.load(SHIPPED)
    if version is not None:
        metadata["registered_version"] = version
    return ServedModel(fold_batchnorm(model), metadata, f"shipped {SHIPPED}")


class Traffic:
    """Realistic rows for `record`: pools of answers, embeddings and statistics drawn once,
    combined at random row after row."""

    POOL = 4096

    def __init__(self, served: ServedModel, rng: np.random.Generator):
        n = self.POOL
        digits = rng.integers(0, 10, n)
        confidence = np.clip(rng.beta(12, 0.6, n), 0.2, 1.0)  # mostly sure, a tail of doubt
        rest = rng.dirichlet(np.ones(9), n) * (1 - confidence)[:, None]
        self.probabilities = []
        for i in range(n):
            p = np.insert(rest[i], digits[i], confidence[i])
            self.probabilities.append(p.tolist())
        reference = served.reference
        picks = rng.integers(0, len(reference.embeddings), n)
        embeddings = reference.embeddings[picks] + rng.normal(
            0, 0.05, (n, monitoring.EMBEDDING_DIMS)
        )
        self.embeddings = embeddings.tolist()
        self.stats = reference.stats.T[picks].tolist()
        self.digit_scores = rng.normal(4.0, 1.5, n).tolist()
        pixels = np.pad(np.full((16, 3), 255, np.uint8), ((6, 6), (12, 13)))  # a "1"
        self.input_png = png(pixels)
        self.rng = rng

    def rows(
        self, store: PredictionStore, times: np.ndarray, versions: list[str | None]
    ) -> list[dict]:
        rng, n = self.rng, len(times)
        pick = rng.integers(0, self.POOL, n).tolist()
        stress = (rng.random(n) < STRESS_SHARE).tolist()
        not_digit = (rng.random(n) < NOT_DIGIT_SHARE).tolist()
        inverted = (rng.random(n) < INVERTED_SHARE).tolist()
        noise = rng.choice([0.1, 0.2, 0.3, 0.5], n).tolist()
        tails = rng.bytes(10 * n).hex()
        rows = []
        for j in range(n):
            at, i = float(times[j]), pick[j]
            # Time-ordered ids, as predictor.new_prediction_id makes them.
            prediction_id = f"{int(at * 1000):012x}{tails[20 * j : 20 * j + 20]}"
            row = store.record(
                prediction_id,
                self.input_png,
                self.probabilities[i],
                inverted[j],
                versions[j],
                None,
                noise[j] if stress[j] else 0.0,
                self.digit_scores[i] - (6.0 if not_digit[j] else 0.0),
                not not_digit[j],
                self.embeddings[i],
                self.stats[i],
            )
            row["created_at"] = at
            rows.append(row)
        return rows


def seed(store: PredictionStore, served: ServedModel, rows: int, now: float) -> dict:
    """Log `rows` predictions over the last DAYS days through `insert`, then label a few
    thousand of them; how long each part took."""
    rng = np.random.default_rng(0)
    traffic = Traffic(served, rng)
    times = np.sort(rng.uniform(now - DAYS * 86400, now, rows))
    switch = now - SWITCH_HOURS * 3600
    current = served.identity()["version"]
    labelled = set(rng.choice(rows, min(FEEDBACK_LABELS, rows), replace=False).tolist())
    chosen: list[dict] = []
    spent = {"record": 0.0, "insert": 0.0, "upkeep": 0.0}
    started = time.perf_counter()
    for first in range(0, rows, BATCH):
        at = times[first : first + BATCH]
        versions = [current if t >= switch else OLDER_VERSION for t in at.tolist()]
        t0 = time.perf_counter()
        batch = traffic.rows(store, at, versions)
        t1 = time.perf_counter()
        store.insert(batch)
        t2 = time.perf_counter()
        store.upkeep()  # the checkpoint (SQLite) and retention, as the journal's writer runs
        t3 = time.perf_counter()
        spent["record"] += t1 - t0
        spent["insert"] += t2 - t1
        spent["upkeep"] += t3 - t2
        chosen += [r for k, r in enumerate(batch, first) if k in labelled]
    logged = time.perf_counter() - started
    t0 = time.perf_counter()
    labels = []
    for k, r in enumerate(chosen):
        right = rng.random() < 0.95
        label = r["digit"] if right and r["is_digit"] else int(rng.integers(0, 11))
        labels.append(
            {
                "id": f"f{k:031x}",
                "prediction_id": r["id"],
                "label": label,
                "comment": None,
                "client": "bench",
                "status": ("pending", "ingested", "merged", "rejected")[k % 4],
                "reason": None,
                "created_at": r["created_at"] + 30,
                "updated_at": r["created_at"] + 30,
            }
        )
    with store.engine.begin() as conn:
        for first in range(0, len(labels), BATCH):
            conn.execute(feedback.insert(), labels[first : first + BATCH])
    spent["feedback"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if store.engine.dialect.name == "postgresql":  # what autovacuum does after such a load
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    else:  # the statistics the store's next retention pass gathers (within 1,000 predictions)
        with store.engine.begin() as conn:
            conn.exec_driver_sql("PRAGMA analysis_limit=1000")
            conn.exec_driver_sql("ANALYZE")
    spent["settle"] = time.perf_counter() - t0
    with store.engine.connect() as conn:
        minutes = conn.execute(sa.select(sa.func.count()).select_from(monitor_minutes)).scalar()
    return {
        "rows": rows,
        "seconds": logged,
        "rows_per_s": rows / logged,
        "seconds_in": {k: round(v, 2) for k, v in spent.items()},
        "feedback_labels": len(labels),
        "monitor_minutes_rows": minutes,
    }


def store_bytes(store: PredictionStore, location: str) -> int:
    """The database's size on disk (SQLite: the file and its write-ahead log)."""
    if store.engine.dialect.name == "postgresql":
        with store.engine.connect() as conn:
            return conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar()
    path = Path(location)
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def store_calls(
    store: PredictionStore, served: ServedModel, hours: float, bucket_minutes: int
) -> dict:
    """Each of `report`'s store reads, and its drift test, timed alone (ms)."""
    since = time.time() - hours * 3600
    version = served.identity()["version"]
    timed = {}
    t0 = time.perf_counter()
    totals = store.monitor_totals(since, bucket_minutes)
    timed["monitor_totals"] = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    labelled = store.labelled(since)
    timed["labelled"] = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    rows = store.recent_inputs(version, since, monitoring.WINDOW)
    timed["recent_inputs"] = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    if len(rows) >= monitor.MIN_DRIFT_INPUTS:
        embeddings = np.array([json.loads(r["embedding"]) for r in rows])
        stats = np.array([[r[name] for name in monitoring.IMAGE_STATS] for r in rows])
        served.reference.drift(embeddings, stats)
    timed["drift_test"] = (time.perf_counter() - t0) * 1000
    timed["rows"] = {"totals": len(totals), "labelled": len(labelled), "recent": len(rows)}
    return timed


def summary(times: list[float]) -> dict:
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p95_ms": float(np.percentile(times, 95)),
        "max_ms": float(max(times)),
        "n": len(times),
    }


def alternate(engines: list[str], rounds: int, measure: Callable[[str, int], None]) -> None:
    """`measure(engine, round)` for every engine, round after round, the order alternating."""
    for round_ in range(rounds):
        for engine in engines if round_ % 2 == 0 else engines[::-1]:
            measure(engine, round_)


def in_process(stores: dict, served: ServedModel, requests: int) -> dict:
    """`monitor.report` per engine and case (ms), and its parts. The cases: QUERIES, then the
    default and the widest window just after a rollout (the served version has logged nothing
    yet, so the drift test's look-up of its newest inputs finds none), timed fewer times."""
    fresh = served_model(ROLLED_OUT)
    cases = [(name, hours, bucket, served, requests // ROUNDS) for name, hours, bucket in QUERIES]
    cases += [
        (f"{name}, just after a rollout", hours, bucket, fresh, 1)
        for name, hours, bucket in (QUERIES[0], QUERIES[-1])
    ]
    times = {e: {case[0]: [] for case in cases} for e in stores}
    parts = {e: {case[0]: [] for case in cases} for e in stores}
    for store in stores.values():  # warm-up: caches, first-use code paths
        for _, hours, bucket, model, _ in cases:
            monitor.report(store, model, hours, bucket)

    def measure(engine: str, _round: int) -> None:
        store = stores[engine]
        for name, hours, bucket, model, repeats in cases:
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                monitor.report(store, model, hours, bucket)
                times[engine][name].append((time.perf_counter() - t0) * 1000)
            parts[engine][name].append(store_calls(store, model, hours, bucket))

    alternate(list(stores), ROUNDS, measure)
    return {
        e: {
            name: {
                **summary(times[e][name]),
                "parts_ms": {key: float(np.median([p[key] for p in ps])) for key in PARTS},
                "rows_read": ps[-1]["rows"],
            }
            for name, ps in parts[e].items()
        }
        for e in stores
    }


@contextlib.contextmanager
def servers(locations: dict, rows: int, logs: Path) -> Iterator[dict]:
    """A `bentoml serve` per engine (as `make serve`: the default workers, one per core),
    serving the shipped model from a BentoML home of its own, logging to the seeded store."""
    with contextlib.ExitStack() as stack:
        bases = {}
        for engine, location in locations.items():
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-bento-")))
            port = free_port()
            env = {
                "BENTOML_HOME": str(home),
                "DIGITOPS_PREDICTIONS_DB": location,
                "DIGITOPS_MAX_PREDICTIONS": str(max(rows, 100_000)),
            }
            log = logs / f"monitor-{engine}.log"
            bases[engine] = stack.enter_context(
                running(serve_command("serving.service:DigitService", port), port, log, env=env)
            )
        yield bases


def over_http(bases: dict, requests: int) -> dict:
    """GET /monitor per engine and query (ms, client side, kept-alive connection)."""
    clients = {e: httpx.Client(base_url=b, timeout=60) for e, b in bases.items()}
    times = {e: {q[0]: [] for q in QUERIES} for e in bases}

    def get(engine: str, hours: float, bucket: int) -> float:
        params = (
            {} if (hours, bucket) == QUERIES[0][1:] else {"hours": hours, "bucket_minutes": bucket}
        )
        t0 = time.perf_counter()
        reply = clients[engine].get("/monitor", params=params)
        spent = (time.perf_counter() - t0) * 1000
        reply.raise_for_status()
        return spent

    for engine, client in clients.items():  # the server reads the seeded store
        figures = client.get("/monitor").raise_for_status().json()
        logged = sum(v["predictions"] for v in figures["versions"])
        if not logged or (figures["drift"] or {}).get("inputs") != monitoring.WINDOW:
            raise RuntimeError(f"{engine}: GET /monitor does not see the seeded store: {figures}")
    for engine in bases:  # warm-up: each worker's first requests, the caches
        for _, hours, bucket in QUERIES:
            for _ in range(4):
                get(engine, hours, bucket)

    def measure(engine: str, _round: int) -> None:
        for name, hours, bucket in QUERIES:
            for _ in range(max(1, requests // ROUNDS)):
                times[engine][name].append(get(engine, hours, bucket))

    alternate(list(bases), ROUNDS, measure)
    for client in clients.values():
        client.close()
    return {e: {name: summary(t) for name, t in q.items()} for e, q in times.items()}


def report_lines(results: dict) -> list[str]:
    rows = results["rows"]
    lines = [
        f"# The Monitor with {rows:,} logged predictions",
        "",
        f"{results['machine']}. {rows:,} predictions over the last {DAYS} days in each store "
        f"(SQLite file; PostgreSQL {results['postgres_version']} on loopback, fsync off); "
        f"whole run {results['total_seconds']:.0f} s.",
        "",
        "Seeding, through `PredictionStore.insert` in batches of "
        f"{BATCH:,} (`upkeep()` between them):",
        "",
        "| engine | rows/s | total (s) | record() (s) | insert() (s) | upkeep() (s) "
        "| feedback (s) | VACUUM ANALYZE (PostgreSQL) / ANALYZE (SQLite) (s) "
        "| monitor_minutes rows | size (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for engine, s in results["seeding"].items():
        spent = s["seconds_in"]
        lines.append(
            f"| {engine} | {s['rows_per_s']:,.0f} | {s['seconds']:.0f} | {spent['record']:.0f} "
            f"| {spent['insert']:.0f} | {spent['upkeep']:.0f} | {spent['feedback']:.1f} "
            f"| {spent['settle']:.1f} | {s['monitor_minutes_rows']:,} "
            f"| {s['bytes'] / 1e6:,.0f} |"
        )
    lines += [
        "",
        "GET /monitor (ms): `monitor.report` in process, and over HTTP against `bentoml serve` "
        "(client side, kept-alive connection):",
        "",
        "| engine | query | in process p50 | p95 | max | n | HTTP p50 | p95 | max | n |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for engine in ENGINES:
        for name, a in results["in_process"][engine].items():
            h = results["http"][engine].get(name)
            over_http = (
                f"{h['p50_ms']:.1f} | {h['p95_ms']:.1f} | {h['max_ms']:.1f} | {h['n']}"
                if h
                else "- | - | - | -"
            )
            lines.append(
                f"| {engine} | {name} | {a['p50_ms']:.1f} | {a['p95_ms']:.1f} | "
                f"{a['max_ms']:.1f} | {a['n']} | {over_http} |"
            )
    lines += [
        "",
        "Where `report`'s time goes (in process, each store read timed alone, ms, median over "
        "rounds; rows read):",
        "",
        "| engine | query | monitor_totals | labelled | recent_inputs | drift test | rows "
        "(totals / labelled / recent) |",
        "|---|---|---|---|---|---|---|",
    ]
    for engine in ENGINES:
        for name, a in results["in_process"][engine].items():
            p, r = a["parts_ms"], a["rows_read"]
            lines.append(
                f"| {engine} | {name} | {p['monitor_totals']:.1f} | {p['labelled']:.1f} | "
                f"{p['recent_inputs']:.1f} | {p['drift_test']:.1f} | "
                f"{r['totals']:,} / {r['labelled']:,} / {r['recent']:,} |"
            )
    lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
    for engine, (value, met) in results["targets"].items():
        lines.append(
            f"| GET /monitor (default) p50 over HTTP, {engine} | {value:.1f} ms | "
            f"<= {TARGET_MS:.0f} ms | {'met' if met else 'NOT met'} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="predictions per store")
    parser.add_argument("--requests", type=int, default=20, help="per query and engine")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the start"
    )
    served = served_model()
    # As each server worker does once started (serving/service.py): what is loaded by now
    # lives as long as the process, out of the collector's sight.
    gc.collect()
    gc.freeze()
    folder = Path(tempfile.mkdtemp(prefix="bench-monitor-"))
    try:
        with postgres_server() as pg:
            locations = {
                "sqlite": str(folder / "predictions.db"),
                "postgresql": pg.create_database("monitor"),
            }
            stores = {
                e: PredictionStore(loc, max_predictions=args.rows) for e, loc in locations.items()
            }
            with stores["postgresql"].engine.connect() as conn:
                pg_version = conn.exec_driver_sql("SHOW server_version").scalar()
            now = time.time()
            seeding = {}
            for engine, store in stores.items():
                print(f"seeding {args.rows:,} predictions into {engine}...", flush=True)
                seeding[engine] = seed(store, served, args.rows, now)
                seeding[engine]["bytes"] = store_bytes(store, locations[engine])
                print(f"  {seeding[engine]}", flush=True)
            print("monitor.report in process...", flush=True)
            local = in_process(stores, served, args.requests)
            for store in stores.values():
                store.close()
            print("GET /monitor over HTTP...", flush=True)
            try:
                with servers(locations, args.rows, args.out) as bases:
                    http = over_http(bases, args.requests)
            finally:  # the servers' journal folder for the URL store (journal.open_log), empty
                url = locations["postgresql"]
                journal = ROOT / "var/journal" / hashlib.sha256(url.encode()).hexdigest()[:16]
                shutil.rmtree(journal, ignore_errors=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results = {
        "machine": machine,
        "postgres_version": pg_version,
        "rows": args.rows,
        "days": DAYS,
        "requests": args.requests,
        "queries": [{"name": n, "hours": h, "bucket_minutes": b} for n, h, b in QUERIES],
        "seeding": seeding,
        "in_process": local,
        "http": http,
    }
    default = QUERIES[0][0]
    results["targets"] = {
        e: (http[e][default]["p50_ms"], http[e][default]["p50_ms"] <= TARGET_MS) for e in ENGINES
    }
    results["total_seconds"] = time.perf_counter() - started
    save_report(args.out, "monitor", results, report_lines(results))
    if not all(met for _, met in results["targets"].values()):
        sys.exit(f"GET /monitor (default) p50 over HTTP is over {TARGET_MS:.0f} ms")


if __name__ == "__main__":
    main()
