"""The PostgreSQL store as the replicas of several nodes use it: one store for all of them, a database restart that
costs log records but no prediction and no silently lost observation, and configuration errors that name the key."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.pglog import PostgresLog
from app.settings import Settings
from app.stores import StoreConfigError, database_url
from tests.support.postgres import PostgresServer, postgres_server, wait_for
from tests.support.service import admin_headers, ingest_headers, metric_value, record


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A server of this test's own: it is stopped and started again, which the shared one must not be."""
    with postgres_server() as server:
        yield server


def observe(client: TestClient, rows: list[dict]) -> object:
    return client.post("/observations", headers=ingest_headers(), json={"observations": rows})


def test_replicas_on_different_nodes_share_one_store(make_client, postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.database()
    # Two replicas with nothing on disk in common (two nodes), one database.
    first = make_client(data_dir=tmp_path / "node-1", database_url=url)
    second = make_client(data_dir=tmp_path / "node-2", database_url=url)
    predicted = first.post("/predict", json={"features": record()}).json()
    assert first.app.state.service.prediction_log.flush()
    # Ground truth for a prediction the other replica made: found by its id.
    stored = observe(second, [{"prediction_id": predicted["prediction_id"], "target": 151.0}])
    assert stored.status_code == 201, stored.text
    assert observe(first, [{"features": record(age=0.03), "target": 75.0}]).status_code == 201
    for client in (first, second):
        X, y = client.app.state.service.prediction_log.observations()
        assert y.tolist() == [151.0, 75.0]
        assert X[0].tolist() == list(record().values())
    assert second.app.state.service.prediction_log.count_predictions() == 1
    outcome = second.post("/admin/retrain", headers=admin_headers()).json()
    # Both rows reached the retrain (one may be quarantined: the bundled first row can be a holdout row).
    assert outcome["n_observations"] + outcome["quarantined"] == 2, outcome


def test_a_database_restart_costs_log_records_never_a_prediction(make_client, own_postgres: PostgresServer) -> None:
    client = make_client(database_url=own_postgres.database())
    log = client.app.state.service.prediction_log
    assert client.post("/predict", json={"features": record()}).status_code == 200
    assert log.flush()
    assert log.count_predictions() == 1

    own_postgres.stop()
    for _ in range(5):
        assert client.post("/predict", json={"features": record()}).status_code == 200
    assert log.flush()
    assert metric_value(client.get("/metrics").text, "mlapi_prediction_log_dropped_total") == 5.0
    refused = observe(client, [{"features": record(), "target": 1.0}])
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "5"
    assert "nothing was stored" in refused.json()["detail"]
    assert "127.0.0.1" not in refused.text  # the reason (hosts, ports) goes to the log, not to the client

    own_postgres.start()  # the same data: both the writer and the shared connection reconnect by themselves
    assert observe(client, [{"features": record(), "target": 2.0}]).status_code == 201
    assert client.post("/predict", json={"features": record()}).status_code == 200
    assert log.flush()
    assert log.count_predictions() == 2
    assert log.observations()[1].tolist() == [2.0]


def test_replicas_starting_together_create_the_schema_once(postgres: PostgresServer) -> None:
    url = postgres.database()
    failures: list[BaseException] = []
    logs: list[PostgresLog] = []

    def start() -> None:
        try:
            logs.append(PostgresLog(url, 2**20).start())
        except BaseException as exc:  # collected and asserted below
            failures.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(logs) == 6 and all(log.count_predictions() == 0 for log in logs)
    for log in logs:
        log.close()


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        ({"database_url": "mysql://db/mlapi"}, "MLAPI_DATABASE_URL"),
        ({"database_url_file": "/nonexistent/database-url"}, "MLAPI_DATABASE_URL_FILE"),
    ],
)
def test_a_wrong_database_setting_is_a_startup_error_naming_it(settings: dict, names: str, tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError, match=names):
        database_url(Settings(data_dir=tmp_path, **settings))


def test_the_url_file_is_read_like_a_swarm_secret(tmp_path: Path) -> None:
    secret = tmp_path / "database_url"
    secret.write_text("postgresql://mlapi:pw@mlapi-postgres:5432/mlapi\n")
    assert database_url(Settings(data_dir=tmp_path, database_url_file=secret)).endswith("/mlapi")
    assert database_url(Settings(data_dir=tmp_path)) is None  # SQLite, the single-node default


# -- the shared registry: one set of models for replicas on every node --------------------------------------------
def served_version(client: TestClient) -> str:
    return client.get("/ready").json().get("model_version", "")


def test_a_promotion_reaches_replicas_on_other_nodes(make_client, postgres: PostgresServer, tmp_path: Path) -> None:
    from tests.support.service import BASE_ROWS, FRESH_ROWS, fresh_observations, write_csv

    url = postgres.database()
    base = str(write_csv(tmp_path / "base.csv", BASE_ROWS))
    options = {"database_url": url, "dataset": base, "estimator": "hist_gradient_boosting", "reload_interval_s": 0.2}
    manager = make_client(data_dir=tmp_path / "manager", max_observation_ratio=10.0, **options)
    worker = make_client(data_dir=tmp_path / "worker", **options)
    assert served_version(manager) == served_version(worker) == "v0001"  # one first version, not one per node
    assert not (tmp_path / "worker" / "models" / "CURRENT").exists()  # nothing of it on the worker's disk
    assert observe(worker, fresh_observations(FRESH_ROWS)).status_code == 201
    outcome = manager.post("/admin/retrain", headers=admin_headers()).json()
    assert outcome["outcome"] == "promoted", outcome
    wait_for(lambda: served_version(worker) == "v0002", 10, "the other node's replica to serve v0002")
    history = worker.get("/admin/versions", headers=admin_headers()).json()
    assert [item["version"] for item in history["versions"]] == ["v0001", "v0002"], history
    # Rolled back on the worker: the manager follows too.
    assert worker.post("/admin/rollback", headers=admin_headers(), json={"version": "v0001"}).status_code == 200
    wait_for(lambda: served_version(manager) == "v0001", 10, "the manager's replica to follow the rollback")


def test_a_retrain_on_one_node_makes_another_node_wait(make_client, postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.database()
    first = make_client(data_dir=tmp_path / "a", database_url=url)
    second = make_client(data_dir=tmp_path / "b", database_url=url)
    with second.app.state.service.registry.lock(blocking=False):
        busy = first.post("/admin/retrain", headers=admin_headers())
    assert busy.status_code == 409 and "already running" in busy.text
    assert first.post("/admin/retrain", headers=admin_headers()).status_code == 200


def test_a_single_vm_registry_is_imported_when_the_stack_grows(make_client, postgres: PostgresServer, tmp_path) -> None:
    from app.registry import Registry

    single = make_client(data_dir=tmp_path / "volume", holdout_seed=None)  # files, as on one VM
    assert single.post("/admin/retrain", headers=admin_headers()).status_code == 200
    files = Registry(tmp_path / "volume")
    before = (files.version_names(), files.current(), files.holdout_seed(), len(files.history(100)))
    prediction = single.post("/predict", json={"features": record()}).json()

    url = postgres.database()
    marker = tmp_path / "volume" / "holds-the-data-volume"
    marker.touch()
    grown = make_client(data_dir=tmp_path / "volume", database_url=url, holdout_seed=None, seed_marker=marker)
    shared = grown.app.state.service.registry
    assert (shared.version_names(), shared.current(), shared.holdout_seed(), len(shared.history(100))) == before
    again = grown.post("/predict", json={"features": record()}).json()
    assert again["prediction"] == prediction["prediction"]  # the same model, byte for byte


def test_a_replica_without_the_marker_waits_for_the_first_version(
    make_client, postgres: PostgresServer, tmp_path: Path
) -> None:
    url = postgres.database()
    marker = tmp_path / "manager" / "holds-the-data-volume"
    waiting = make_client(data_dir=tmp_path / "worker", database_url=url, seed_marker=marker, reload_interval_s=0.2)
    assert waiting.get("/ready").status_code == 503  # it trained nothing of its own
    assert waiting.app.state.service.registry.version_names() == []
    marker.parent.mkdir(parents=True)
    marker.touch()
    seeding = make_client(data_dir=tmp_path / "manager", database_url=url, seed_marker=marker)
    assert served_version(seeding) == "v0001"
    wait_for(lambda: served_version(waiting) == "v0001", 10, "the waiting replica to serve the seeded version")


def test_a_tampered_model_in_the_database_is_refused(make_client, postgres: PostgresServer, tmp_path: Path) -> None:
    import psycopg

    url = postgres.database()
    client = make_client(database_url=url)
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("UPDATE model_versions SET model = model || '\\x00'::bytea WHERE number = 1")
    restarted = make_client(data_dir=tmp_path / "other", database_url=url)
    assert restarted.get("/ready").status_code == 503
    assert "sha256" in (restarted.app.state.service.load_error or "")
    assert client.get("/ready").status_code == 200  # the replica that loaded it before keeps serving
