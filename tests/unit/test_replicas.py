"""Several replicas on one data volume: one registry writer at a time, every replica follows promotions and
rollbacks, a fresh volume gets exactly one first version, the admin token fails closed, and SIGTERM drains."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.lifecycle import DRAINING
from testbed.stack import free_port, wait_until
from tests.support.service import admin_headers, ingest_headers, record, write_csv


@pytest.fixture
def base_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "base.csv", list(range(0, 120)))


def test_promotion_and_rollback_reach_every_replica(make_client, base_csv: Path) -> None:
    settings = {"dataset": str(base_csv), "estimator": "hist_gradient_boosting", "reload_interval_s": 0.1}
    a, b = make_client(**settings), make_client(**settings)
    assert a.get("/model").json()["version"] == b.get("/model").json()["version"] == "v0001"
    from tests.support.service import FRESH_ROWS, fresh_observations

    assert (
        a.post(
            "/observations", headers=ingest_headers(), json={"observations": fresh_observations(FRESH_ROWS)}
        ).status_code
        == 201
    )
    outcome = a.post("/admin/retrain", headers=admin_headers()).json()
    assert outcome["outcome"] == "promoted", outcome
    new = outcome["current_version"]
    wait_until(lambda: b.get("/model").json()["version"] == new, 5, f"replica b to serve {new}", interval=0.05)
    assert b.post("/predict", json={"features": record()}).json()["model_version"] == new

    assert b.post("/admin/rollback", headers=admin_headers(), json={"version": "v0001"}).status_code == 200
    wait_until(lambda: a.get("/model").json()["version"] == "v0001", 5, "replica a to follow the rollback", 0.05)


def test_replicas_starting_on_an_empty_volume_train_one_first_version(tmp_path: Path, base_csv: Path) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", dataset=str(base_csv), admin_token="replica-admin-token-0123")
    clients = [TestClient(create_app(settings)) for _ in range(3)]
    threads = [threading.Thread(target=client.__enter__) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert sorted(p.name for p in (tmp_path / "data" / "models").glob("v*")) == ["v0001"]
        assert {client.get("/model").json()["version"] for client in clients} == {"v0001"}
    finally:
        for client in clients:
            client.__exit__(None, None, None)


def test_admin_token_from_a_file_and_an_empty_one_refuses_to_start(make_client, tmp_path: Path) -> None:
    token_file = tmp_path / "admin_token"
    token_file.write_text("from-a-swarm-secret\n")
    client = make_client(admin_token=None, admin_token_file=token_file)
    assert client.get("/admin/versions", headers=admin_headers("from-a-swarm-secret")).status_code == 200
    assert client.get("/admin/versions", headers=admin_headers("")).status_code == 401
    token_file.write_text("")
    with pytest.raises(RuntimeError, match="empty"):
        make_client(admin_token=None, admin_token_file=token_file)
    with pytest.raises(RuntimeError, match="empty"):
        make_client(admin_token="  ")
    with pytest.raises(RuntimeError, match="ingest token from MLAPI_INGEST_TOKEN is shorter than 16 characters"):
        make_client(ingest_token="short")
    with pytest.raises(RuntimeError, match=r"admin token from .* is shorter than 16"):
        token_file.write_text("short\n")
        make_client(admin_token=None, admin_token_file=token_file)


def test_draining_replica_fails_health_but_still_serves(client) -> None:
    DRAINING.set()
    try:
        assert client.get("/health").status_code == 503
        assert client.get("/ready").status_code == 503
        assert client.post("/predict", json={"features": record()}).status_code == 200
    finally:
        DRAINING.clear()
    assert client.get("/health").status_code == 200


def test_sigterm_drains_then_shuts_down_gracefully(tmp_path: Path, base_csv: Path) -> None:
    """The real server process: after SIGTERM it keeps answering predictions while /health says 503, for the drain
    window, then exits on its own."""
    port = free_port()
    env = {
        **os.environ,
        "MLAPI_DATA_DIR": str(tmp_path / "data"),
        "MLAPI_DATASET": str(base_csv),
        "MLAPI_HOST": "127.0.0.1",
        "MLAPI_PORT": str(port),
        "MLAPI_ADMIN_TOKEN": "sigterm-admin-token-0123",
        "MLAPI_DRAIN_SECONDS": "2",
    }
    server = subprocess.Popen([sys.executable, "-m", "app", "serve"], env=env, cwd=Path(__file__).parents[2])

    def call(method: str, path: str, body: dict | None = None) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            headers = {"Content-Type": "application/json"} if body else {}
            connection.request(method, path, body=json.dumps(body) if body else None, headers=headers)
            return connection.getresponse().status
        finally:
            connection.close()

    try:
        wait_until(lambda: call("GET", "/ready") == 200, 60, "the server to be ready", 0.1)
        server.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        # Health turns 503 first (Traefik stops routing there), and predictions are still served meanwhile.
        wait_until(lambda: call("GET", "/health") == 503, 1.5, "/health to answer 503 inside the drain window", 0.02)
        assert call("POST", "/predict", {"features": record()}) == 200
        assert time.monotonic() - sent < 1.9, "checked inside the drain window"
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)
        assert time.monotonic() - sent >= 1.9, "it must not stop before the drain window ends"
    finally:
        if server.poll() is None:
            server.kill()
