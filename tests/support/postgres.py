"""A real PostgreSQL server for the tests: Debian's binaries, a cluster in a temporary directory, TCP on 127.0.0.1.

initdb refuses to run as root, so as root (CI) the cluster belongs to the `postgres` user the package creates.
Outside CI a machine without PostgreSQL skips these tests loudly; in CI that is a failure (the install is missing).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def _binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One cluster: ``start``, ``stop`` (fast shutdown, like a restart of the database container), ``database``."""

    def __init__(self, root: Path) -> None:
        binaries = _binaries()
        if binaries is None:
            message = "PostgreSQL is not installed (apt-get install postgresql)"
            if os.environ.get("CI"):
                pytest.fail(f"CI must have PostgreSQL for the store tests: {message}")
            pytest.skip(f"SKIPPED LOUDLY: {message}")
        self.binaries = binaries
        self.root = root
        self.data = root / "cluster"
        self.port = _free_port()
        self._as_owner: list[str] = []
        if os.geteuid() == 0:
            self._as_owner = ["runuser", "-u", "postgres", "--"]
            shutil.chown(root, "postgres")
        self._run(["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])

    def _run(self, command: list[str]) -> None:
        result = subprocess.run(
            [*self._as_owner, str(self.binaries / command[0]), *command[1:]],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise AssertionError(f"{command[0]} exited {result.returncode}: {result.stdout}{result.stderr}")

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._run(["pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start"])

    def stop(self) -> None:
        self._run(["pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new, empty database: each test gets its own, so none sees another's rows."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    root = Path(tempfile.mkdtemp(prefix="mlapi-pg-"))
    root.chmod(0o755)
    server = PostgresServer(root)
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(AssertionError):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
