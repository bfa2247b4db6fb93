"""A real, throw-away PostgreSQL server for the tests (imported by test_owner_postgres.py; holds no test).

`initdb` into a fresh temporary directory and `pg_ctl start` listening only on a Unix socket in that
directory (`listen_addresses=''`): nothing else on the machine can reach it and no port can collide. As
root the server runs as the `postgres` OS user (`runuser -u postgres --`; PostgreSQL refuses to run as
root), otherwise as the current user. Binaries come from /usr/lib/postgresql/*/bin (Debian) or PATH.
Missing binaries FAIL the tests, never skip them: `./run` installs the Debian package `postgresql`.

Durability settings are off (fsync, synchronous_commit): the tests check concurrency, not crash safety
of PostgreSQL itself. Each test gets its own database (`server.new_database()`), so tests do not share
rows, locks or the audit chain.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

PG_USER = "postgres"
PG_PORT = 5432  # only names the socket file, inside a private directory


def find_pg_bin() -> Path | None:
    """The bin directory of the newest PostgreSQL server installed (Debian layout first, then PATH)."""

    def version(path: str) -> tuple[int, ...]:
        part = Path(path).parent.parent.name
        return tuple(int(x) for x in part.split(".") if x.isdigit())

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=version, reverse=True)
    for pg_ctl in candidates:
        bin_dir = Path(pg_ctl).parent
        if (bin_dir / "initdb").exists() and (bin_dir / "postgres").exists():
            return bin_dir
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    return None


class PostgresServer:
    """One running server; `dsn(db)` gives a libpq URL for a database on it."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.as_root = os.geteuid() == 0
        # Not under pytest's tmp dirs: those are 0700 root-owned, and the `postgres` user must reach it.
        self.base = Path(tempfile.mkdtemp(prefix="sevlaunch-pg-"))
        self.data = self.base / "data"
        self.socket_dir = self.base
        self.log = self.base / "server.log"
        self._names = itertools.count(1)
        self.start_seconds = 0.0
        if self.as_root:
            shutil.chown(self.base, PG_USER, PG_USER)

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        # cwd: the server user may not be able to read the current directory.
        result = subprocess.run(cmd, cwd=self.base, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(argv[:1])} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n{log}"
            )
        return result

    def start(self) -> None:
        started = time.monotonic()
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            PG_USER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        self._pg_start()
        self.start_seconds = time.monotonic() - started

    def _pg_start(self) -> None:
        options = " ".join(
            [
                "-c listen_addresses=''",
                f"-c unix_socket_directories='{self.socket_dir}'",
                f"-p {PG_PORT}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=300",
                "-c shared_buffers=32MB",
            ]
        )
        self._run(
            "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options
        )

    def halt(self) -> None:
        """Stops the server as an outage would, keeping its data: a fast shutdown, so every open
        transaction is rolled back and every connection dropped. (Not `immediate`: with the durability
        settings above off, a crash could lose commits a client already saw, which is a property of
        this test server, not of the code under test.)"""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60")

    def resume(self) -> None:
        """Starts the halted server again on the same data and socket."""
        self._pg_start()

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", check=False)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        return (
            f"postgresql://{PG_USER}@/{database}?host={quote(str(self.socket_dir), safe='')}&port={PG_PORT}"
        )

    def new_database(self, prefix: str = "t") -> str:
        """A fresh empty database; returns its DSN."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.dsn(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.fail(
            "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin or PATH: "
            "install the Debian package `postgresql` (./run installs it) to run the PostgreSQL store tests",
            pytrace=False,
        )
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.fail(
            "running as root, PostgreSQL needs `runuser` (util-linux) to start as postgres", pytrace=False
        )
    server = PostgresServer(bin_dir)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    print(
        f"\nPostgreSQL {bin_dir.parent.name} started in {server.start_seconds:.2f} s at {server.socket_dir}"
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_dsn(postgres_server: PostgresServer) -> str:
    """The DSN of a fresh database on the session's server."""
    return postgres_server.new_database()
