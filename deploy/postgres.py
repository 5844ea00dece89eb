"""A PostgreSQL server of our own in a folder, on loopback: for the tests and `make cluster-up`.

It runs Debian's `postgresql` binaries (initdb, pg_ctl) on a free 127.0.0.1 port with its socket
in its own folder, so it needs no system service and no root. PostgreSQL refuses to run as root;
as root it runs as the `postgres` user. Authentication is `trust`: fine on loopback for tests and
a one-machine demo, never for a shared server (README.md, "Running on many machines").
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from deploy.ports import free_port

SUPERUSER = "digitops"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL is not installed or cannot start; the message says what to do."""


def bin_dir() -> Path:
    """Where initdb and pg_ctl are: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if not versions:
        raise PostgresUnavailable(
            "PostgreSQL is not installed (no initdb): apt-get install postgresql"
        )
    return Path(versions[-1]).parent


def _version(path: str) -> float:
    return float(Path(path).parent.parent.name)


class LocalPostgres:
    """initdb (once) + pg_ctl start/stop for the cluster in `directory`."""

    def __init__(self, directory: Path, port: int | None = None):
        self.directory = Path(directory).resolve()
        self.data = self.directory / "data"
        self.port = port or free_port()
        self.bin = bin_dir()
        # As root, the server's files and process belong to `postgres`.
        self.user = "postgres" if os.geteuid() == 0 else None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 120) -> None:
        out = subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            user=self.user,
            cwd=self.directory,
        )
        if out.returncode != 0:
            raise PostgresUnavailable(
                f"{args[0]} failed ({out.returncode}): {(out.stderr or out.stdout).strip()[-2000:]}"
            )

    def start(self, fsync: bool = True) -> LocalPostgres:
        """Create the cluster if the folder has none, then start it and wait until it accepts
        connections. `fsync=False` is for throwaway test clusters only."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-instructions",
            )
        fsync_setting = "on" if fsync else "off"
        options = f"-h 127.0.0.1 -p {self.port} -k {self.directory} -c fsync={fsync_setting}"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.directory / "postgres.log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> str:
        """A new, empty database; its URL."""
        import psycopg  # only where PostgreSQL is used

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __enter__(self) -> LocalPostgres:  # with LocalPostgres(folder).start() as pg: ...
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
