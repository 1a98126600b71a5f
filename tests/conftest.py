"""Shared fixtures. Real-stack fixtures live in tests/stack.py (they need a Docker engine)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.support.postgres import PostgresServer, postgres_server
from tests.support.service import ADMIN_TOKEN, INGEST_TOKEN

warnings.filterwarnings("ignore", message=".*httpx2.*")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session; each test that uses it gets its own database."""
    with postgres_server() as server:
        yield server


PROJECT_DIR = Path(__file__).resolve().parents[1]


def places_tests_must_not_write() -> set[str]:
    """What a test that writes outside its temporary directories leaves behind: new entries at the filesystem root or
    in the home directory, and files in the project that git neither tracks nor ignores (state belongs in .local/)."""
    found = {f"/{entry.name}" for entry in Path("/").iterdir()} | {str(entry) for entry in Path.home().iterdir()}
    untracked = subprocess.run(
        ["git", "-C", str(PROJECT_DIR), "ls-files", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found | {f"{PROJECT_DIR}/{name}" for name in untracked.stdout.splitlines()}


# Taken when pytest loads this file: before any test module is imported (an import can start an app, as the fuzz's
# schema loading once did).
BEFORE_ANY_TEST = places_tests_must_not_write()


@pytest.fixture(scope="session", autouse=True)
def nothing_written_outside_temporary_directories() -> Iterator[None]:
    before = BEFORE_ANY_TEST
    yield
    written = sorted(places_tests_must_not_write() - before)
    assert not written, f"tests wrote outside tmp_path and the ignored state directories: {written}"


@pytest.fixture
def host_root() -> Iterator[Path]:
    """A directory as root holds one on the VM (0755): the containers' uids can traverse it, which pytest's tmp_path
    (0700) does not allow. For tests that run host scripts as root; CI runs as root, elsewhere they skip."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root: this test must run there")
        pytest.skip("needs root (chown and setpriv, as the deploy step on the VM)")
    base = Path(tempfile.mkdtemp(prefix="mlapi-host-"))
    try:
        base.chmod(0o755)
        yield base
    finally:
        shutil.rmtree(base)


@pytest.fixture
def log_backend() -> str:
    """Where the prediction log and observations live: "sqlite" by default; a module can parametrize it."""
    return "sqlite"


@pytest.fixture
def make_client(
    tmp_path: Path, log_backend: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., TestClient]]:
    opened: list[TestClient] = []
    database = request.getfixturevalue("postgres").database() if log_backend == "postgresql" else None

    def factory(**settings: object) -> TestClient:
        values = {
            "data_dir": tmp_path / "data",
            **({"database_url": database} if database else {}),
            "admin_token": ADMIN_TOKEN,
            "ingest_token": INGEST_TOKEN,
            "holdout_seed": 42,  # reproducible outcomes; the random default has its own test
            # Candidates train in this process (1.6 s less per retrain, and patches reach them); the child process
            # has its own tests (test_training_process.py), and every retrain of the stack tests runs in one.
            "retrain_isolation": False,
            **settings,
        }
        client = TestClient(create_app(Settings(**values)))
        client.__enter__()
        opened.append(client)
        return client

    yield factory
    for client in reversed(opened):
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def pytest_terminal_summary(terminalreporter) -> None:
    from testbed.stack import TIMINGS

    if TIMINGS:
        terminalreporter.section("measured stack timings")
        for line in TIMINGS:
            terminalreporter.write_line(line)
