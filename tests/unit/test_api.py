"""Every public and private route of the model service, and every way a request can be wrong."""

from __future__ import annotations

import math
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.support.service import (
    ADMIN_TOKEN,
    FEATURES,
    admin_headers,
    ingest_headers,
    logged_rows,
    metric_value,
    record,
)

SQLITE_ONLY = pytest.mark.parametrize("log_backend", ["sqlite"])  # about the data volume's own file


@pytest.fixture(params=["sqlite", "postgresql"])
def log_backend(request: pytest.FixtureRequest) -> str:
    """The whole API suite runs against both stores: SQLite (one node) and PostgreSQL (replicas on many nodes)."""
    return request.param


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "model_version": "v0001"}


def test_predict_returns_point_interval_and_version(client: TestClient) -> None:
    response = client.post("/predict", json={"features": record(), "confidence": 0.9})
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == "v0001"
    interval = body["interval"]
    assert interval["confidence"] == 0.9
    assert interval["lower"] < body["prediction"] < interval["upper"]
    assert body["out_of_distribution"] == {"flag": False, "reasons": []}
    assert len(body["prediction_id"]) == 32


def test_wider_confidence_gives_wider_interval(client: TestClient) -> None:
    widths = []
    for level in (0.5, 0.8, 0.95):
        interval = client.post("/predict", json={"features": record(), "confidence": level}).json()["interval"]
        widths.append(interval["upper"] - interval["lower"])
    assert widths == sorted(widths) and widths[0] < widths[-1]


def test_default_confidence_is_0_9(client: TestClient) -> None:
    assert client.post("/predict", json={"features": record()}).json()["interval"]["confidence"] == 0.9


def test_out_of_distribution_flag_names_feature_and_distance(client: TestClient) -> None:
    body = client.post("/predict", json={"features": record(bmi=5.0)}).json()
    assert body["out_of_distribution"]["flag"] is True
    [reason] = body["out_of_distribution"]["reasons"]
    assert reason["feature"] == "bmi"
    assert reason["value"] == 5.0
    assert reason["z_score"] > 4
    assert reason["train_min"] < reason["train_max"] < 5.0


def test_batch_matches_single_predictions(client: TestClient) -> None:
    rows = [record(), record(age=0.05), record(bmi=-0.03)]
    batch = client.post("/predict/batch", json={"records": rows, "confidence": 0.8}).json()
    assert batch["model_version"] == "v0001"
    assert len(batch["predictions"]) == 3
    for row, item in zip(rows, batch["predictions"], strict=True):
        single = client.post("/predict", json={"features": row, "confidence": 0.8}).json()
        assert math.isclose(single["prediction"], item["prediction"])
        assert math.isclose(single["interval"]["upper"], item["interval"]["upper"])


def test_model_reports_metrics_coverage_fingerprint_schema(client: TestClient) -> None:
    body = client.get("/model").json()
    assert body["version"] == "v0001"
    assert body["created_at"].endswith("+00:00")
    assert len(body["data_fingerprint"]) == 16
    assert [feature["name"] for feature in body["features"]] == list(FEATURES)
    assert set(body["metrics"]["coverage"]) == {"0.5", "0.8", "0.9", "0.95"}
    assert 0.7 <= body["metrics"]["coverage"]["0.9"] <= 1.0  # measured, not asserted to be exact
    assert body["metrics"]["rmse"] > 0
    assert "sha256" not in body


def test_openapi_docs_name_the_features(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert set(schema["components"]["schemas"]["Features"]["required"]) == set(FEATURES)


def test_metrics_expose_http_and_model_series(client: TestClient) -> None:
    client.post("/predict", json={"features": record(bmi=5.0)})
    text = client.get("/metrics").text
    assert metric_value(text, "mlapi_model_info", version="v0001", estimator="ridge") == 1.0
    assert metric_value(text, "mlapi_predictions_total", route="predict") == 1.0
    assert metric_value(text, "mlapi_ood_predictions_total") == 1.0
    assert metric_value(text, "http_requests_total", handler="/predict", method="POST", status="2xx") == 1.0


def test_predictions_are_logged_with_version_and_latency(client: TestClient, log_backend: str) -> None:
    client.post("/predict/batch", json={"records": [record(), record(bmi=5.0)]})
    log = client.app.state.service.prediction_log
    assert log.flush()
    rows = log._query("SELECT model_version, ood, latency_ms, lower < prediction, features FROM predictions")
    rows = sorted(((r[0], r[1], r[2], bool(r[3]), log.decode_features(r[4])) for r in rows), key=lambda r: r[1])
    assert [(r[0], r[1], r[3]) for r in rows] == [("v0001", 0, True), ("v0001", 1, True)]
    assert all(row[2] > 0 for row in rows)
    assert rows[1][4] == list(record(bmi=5.0).values())
    if log_backend == "sqlite":
        assert log._query("PRAGMA journal_mode")[0][0] == "wal"


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB filesystem (tmpfs), so "disk full" comes from the kernel, not from a mock."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    if result.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root and must be able to mount a tmpfs: {result.stderr}")
        pytest.skip(f"SKIPPED LOUDLY: cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@SQLITE_ONLY
def test_full_disk_degrades_logging_not_serving(make_client, tiny_disk: Path) -> None:
    client = make_client(data_dir=tiny_disk, min_free_mb=0)  # a truly full disk, not the floor (tested below)
    log = client.app.state.service.prediction_log
    assert client.post("/predict", json={"features": record()}).status_code == 200
    assert log.flush()
    filler = tiny_disk / "filler"
    with filler.open("wb") as handle:  # take every free block
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    rows = [record(age=float(i) / 1000) for i in range(2000)]
    for _ in range(3):
        response = client.post("/predict/batch", json={"records": rows})
        assert response.status_code == 200
    assert log.flush()
    dropped = metric_value(client.get("/metrics").text, "mlapi_prediction_log_dropped_total")
    assert dropped is not None and dropped > 0, "a full disk must show up as dropped log records"
    filler.unlink()  # space again: logging resumes by itself
    before = log.count_predictions()
    assert client.post("/predict", json={"features": record()}).status_code == 200
    assert log.flush()
    assert log.count_predictions() == before + 1


def test_observations_by_features_and_by_prediction_id(client: TestClient) -> None:
    prediction = client.post("/predict", json={"features": record()}).json()
    response = client.post(
        "/observations",
        headers=ingest_headers(),
        json={
            "observations": [
                {"prediction_id": prediction["prediction_id"], "target": 150.0},
                {"features": record(age=0.02), "target": 90.5},
            ]
        },
    )
    assert response.status_code == 201, response.text
    assert response.json() == {"stored": 2}
    X, y = client.app.state.service.prediction_log.observations()
    assert y.tolist() == [150.0, 90.5]
    assert np.allclose(X[0], list(record().values()))


# -- errors: every one is a 4xx that names the field -----------------------------------------------------------
def _fields(response) -> list[tuple]:
    assert 400 <= response.status_code < 500, response.text
    return [tuple(item["loc"]) for item in response.json()["detail"]]


def test_wrong_type_names_the_field(client: TestClient) -> None:
    response = client.post("/predict", json={"features": record(bmi="high")})
    assert response.status_code == 422
    assert ("body", "features", "bmi") in _fields(response)


def test_numeric_string_is_not_silently_coerced(client: TestClient) -> None:
    response = client.post("/predict", json={"features": record(bmi="0.03")})
    assert ("body", "features", "bmi") in _fields(response)


def test_missing_field_names_the_field(client: TestClient) -> None:
    features = record()
    del features["s3"]
    assert ("body", "features", "s3") in _fields(client.post("/predict", json={"features": features}))


def test_extra_field_names_the_field(client: TestClient) -> None:
    response = client.post("/predict", json={"features": {**record(), "colour": 1.0}})
    assert ("body", "features", "colour") in _fields(response)
    assert ("body", "extra") in _fields(client.post("/predict", json={"features": record(), "extra": 1}))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_inf_are_rejected(client: TestClient, literal: str) -> None:
    body = '{"features": {' + ", ".join(f'"{name}": {literal if name == "bp" else "0.01"}' for name in FEATURES) + "}}"
    response = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert ("body", "features", "bp") in _fields(response)


def test_confidence_outside_calibrated_levels(client: TestClient) -> None:
    response = client.post("/predict", json={"features": record(), "confidence": 0.42})
    assert ("body", "confidence") in _fields(response)
    assert "0.5, 0.8, 0.9, 0.95" in response.text


def test_malformed_json_is_422(client: TestClient) -> None:
    response = client.post("/predict", content="{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422


def test_oversized_batch_names_the_limit(make_client) -> None:
    client = make_client(max_batch_rows=5)
    response = client.post("/predict/batch", json={"records": [record()] * 6})
    assert ("body", "records") in _fields(response)
    assert "at most 5" in response.text
    assert client.post("/predict/batch", json={"records": [record()] * 5}).status_code == 200


def test_empty_batch_is_rejected(client: TestClient) -> None:
    assert ("body", "records") in _fields(client.post("/predict/batch", json={"records": []}))


def test_bad_record_in_batch_names_its_index(client: TestClient) -> None:
    response = client.post("/predict/batch", json={"records": [record(), record(age=None)]})
    assert ("body", "records", 1, "age") in _fields(response)


def test_observation_errors(client: TestClient) -> None:
    unknown = client.post(
        "/observations", headers=ingest_headers(), json={"observations": [{"prediction_id": "nope", "target": 1.0}]}
    )
    assert ("body", "observations", 0, "prediction_id") in _fields(unknown)
    both = client.post(
        "/observations",
        headers=ingest_headers(),
        json={"observations": [{"prediction_id": "x", "features": record(), "target": 1.0}]},
    )
    assert ("body", "observations", 0) in _fields(both)
    no_target = client.post("/observations", headers=ingest_headers(), json={"observations": [{"features": record()}]})
    assert ("body", "observations", 0, "target") in _fields(no_target)
    assert client.app.state.service.prediction_log.observations()[1].size == 0  # nothing half-stored


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/admin/retrain", None),
        ("get", "/admin/versions", None),
        ("post", "/admin/rollback", {"version": "v0001"}),
        ("get", "/admin/drift", None),
    ],
)
@pytest.mark.parametrize("headers", [{}, admin_headers("wrong"), {"Authorization": "Basic abc"}])
def test_admin_routes_need_the_token(client: TestClient, method, path, body, headers) -> None:
    response = client.request(method, path, json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "bearer token" in response.json()["detail"]


def test_admin_token_is_generated_into_data_dir_when_unset(make_client, tmp_path) -> None:
    client = make_client(admin_token=None)
    token_file = tmp_path / "data" / "admin-token"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    token = token_file.read_text()
    assert token != ADMIN_TOKEN and len(token) >= 32
    assert client.get("/admin/versions", headers=admin_headers(token)).status_code == 200
    assert client.get("/admin/versions", headers=admin_headers()).status_code == 401


def test_rollback_body_validation(client: TestClient) -> None:
    response = client.post("/admin/rollback", json={"version": "latest"}, headers=admin_headers())
    assert ("body", "version") in _fields(response)


def test_drift_shows_the_shifted_feature(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(200):
        row = record(**{name: float(rng.normal(0, 0.04)) for name in FEATURES})
        row["bmi"] = float(rng.normal(0.09, 0.01))  # far into the upper tail of the training data
        rows.append(row)
    client.post("/predict/batch", json={"records": rows})
    drift = client.get("/admin/drift?window=200", headers=admin_headers()).json()
    assert drift["window"] == 200
    psi = drift["psi"]
    assert psi["bmi"] > 1.0
    assert psi["bmi"] == max(psi.values())


def test_batch_response_matches_its_documented_schema(client: TestClient) -> None:
    """The batch route serializes plain dicts for speed; they must still be exactly the documented model."""
    from app.schemas import BatchResponse

    body = client.post("/predict/batch", json={"records": [record(), record(bmi=5.0)]}).json()
    parsed = BatchResponse.model_validate(body, strict=True)
    assert parsed.model_dump(mode="json") == body
    assert parsed.predictions[1].out_of_distribution.reasons[0].feature == "bmi"
    documented = client.get("/openapi.json").json()["paths"]["/predict/batch"]["post"]["responses"]["200"]
    assert documented["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/BatchResponse"}


def test_backup_gauges_come_from_the_hosts_status_file(client, tmp_path) -> None:
    from tests.support.service import metric_value

    before = client.get("/metrics").text
    assert metric_value(before, "mlapi_backup_last_success_timestamp_seconds") == 0
    (tmp_path / "data" / "backup-status.json").write_text(
        '{"last_success_unixtime": 1790000000.5, "snapshots": 12, "last_failure_unixtime": 1780000000}'
    )
    after = client.get("/metrics").text
    assert metric_value(after, "mlapi_backup_last_success_timestamp_seconds") == 1790000000.5
    assert metric_value(after, "mlapi_backup_snapshots") == 12
    assert metric_value(after, "mlapi_backup_last_failure_timestamp_seconds") == 1780000000
    (tmp_path / "data" / "backup-status.json").write_text("{not json")
    assert metric_value(client.get("/metrics").text, "mlapi_backup_snapshots") == 0  # unreadable: no crash


# -- bounded inputs (finite but extreme values, body sizes, what a 422 echoes) ---------------------------------------
@pytest.mark.parametrize("value", [1.79e308, 1e306, -1e200, 1e6])
def test_extreme_finite_features_get_a_422_naming_the_field(client: TestClient, value: float) -> None:
    single = client.post("/predict", json={"features": record(bmi=value)})
    assert single.status_code == 422, single.text
    [error] = single.json()["detail"]
    assert error["loc"] == ["body", "features", "bmi"] and "input" not in error
    batch = client.post("/predict/batch", json={"records": [record(), record(s5=value)]})
    assert batch.status_code == 422 and batch.json()["detail"][0]["loc"] == ["body", "records", 1, "s5"]
    observed = client.post(
        "/observations",
        headers=ingest_headers(),
        json={"observations": [{"features": record(age=value), "target": 1.0}]},
    )
    assert observed.status_code == 422 and observed.json()["detail"][0]["loc"][-1] == "age"


def test_the_accepted_range_is_wide_and_always_answers_finite(client: TestClient) -> None:
    """Far outside the training data but inside the accepted range: a finite prediction, flagged out of distribution."""
    schema = client.get("/openapi.json").json()["components"]["schemas"]["Features"]["properties"]["bmi"]
    for value in (schema["minimum"], schema["maximum"]):
        answer = client.post("/predict", json={"features": record(bmi=value)})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert all(math.isfinite(v) for v in (body["prediction"], body["interval"]["lower"], body["interval"]["upper"]))
        assert body["out_of_distribution"]["flag"] is True


def test_an_extreme_target_gets_a_422(client: TestClient) -> None:
    refused = client.post(
        "/observations", headers=ingest_headers(), json={"observations": [{"features": record(), "target": 1e308}]}
    )
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][-1] == "target"


def test_a_body_over_the_limit_gets_a_413_before_it_is_read(make_client) -> None:
    client = make_client(max_body_bytes=64 * 1024)
    declared = client.post("/predict/batch", content=b"x" * (65 * 1024), headers={"Content-Type": "application/json"})
    assert declared.status_code == 413 and "larger than 65536 bytes" in declared.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(100):
            yield b" " * 1024

    streamed = client.post("/predict/batch", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert client.post("/predict", json={"features": record()}).status_code == 200  # small bodies pass


def test_a_422_never_echoes_the_input(client: TestClient) -> None:
    records = [record(bmi=1e300 + i) for i in range(10_000)]  # ~2.5 MB of invalid input
    refused = client.post("/predict/batch", json={"records": records})
    assert refused.status_code == 422
    assert len(refused.content) < 8_000, len(refused.content)
    detail = refused.json()["detail"]
    assert len(detail) == 21 and detail[-1] == {
        "type": "too_many_errors",
        "loc": [],
        "msg": "9980 more errors not shown",
    }


# -- the volume never fills: retention, a free-space floor ------------------------------------------------------------
def test_the_prediction_log_is_pruned_by_age_and_by_rows(tmp_path, log_backend: str, request) -> None:
    from app.pglog import PostgresLog
    from app.predlog import Retention, SqliteLog

    retention = Retention(max_age_s=3600, max_rows=1000)
    if log_backend == "sqlite":
        log = SqliteLog(tmp_path / "log.sqlite3", 2**20, retention=retention).start()
    else:
        log = PostgresLog(request.getfixturevalue("postgres").database(), 2**20, retention=retention).start()
    now = time.time()

    log.record(logged_rows(10, now - 7200, [0.0], id_prefix="old-"))  # two hours old: beyond the retention
    log.record(logged_rows(1500, now - 1000, [0.0], id_prefix="new-"))
    assert log.flush()
    assert log.prune(now=now) == 10 + 500
    assert log.count_predictions() == 1000
    newest = log.recent_features(1)
    assert len(newest) == 1
    log.close()


def test_the_writer_prunes_a_chunk_a_pass_so_it_never_stalls(tmp_path, log_backend: str, request, monkeypatch) -> None:
    """Beyond the row cap by many chunks, the writer deletes one chunk of the oldest rows a pass, comes back for the
    next after its next write, and converges on the cap; a full prune (the admin's) takes the rest at once."""
    from app import predlog
    from app.pglog import PostgresLog

    monkeypatch.setattr(predlog, "PRUNE_CHUNK", 100)
    retention = predlog.Retention(max_age_s=3600, max_rows=1000, prune_every_s=3600)
    if log_backend == "sqlite":
        log = predlog.SqliteLog(tmp_path / "log.sqlite3", 2**20, retention=retention).start()
    else:
        log = PostgresLog(request.getfixturevalue("postgres").database(), 2**20, retention=retention).start()
    now = time.time()
    log.record(logged_rows(1500, now - 1000, [0.0], id_prefix="first-"))
    assert log.flush() and log.count_predictions() == 1500  # pruned at the first pass, before these rows
    assert log.prune(max_chunks=1) == 100 and log.count_predictions() == 1400  # one chunk, the oldest
    log._pruned_at = 0.0  # due now: the next writes each bring one chunk
    for call in range(3):
        log.record(logged_rows(1, now - 10 + call, [0.0], id_prefix=f"later-{call}-"))
        assert log.flush()
    assert log.count_predictions() == 1400 + 3 - 300
    assert log.prune() == 103 and log.count_predictions() == 1000
    assert log.export(now - 1000).__next__().id == "first-00000503"  # the oldest went first
    log.close()


@SQLITE_ONLY
def test_below_the_free_space_floor_observations_are_refused_and_predictions_go_on(make_client) -> None:
    client = make_client(min_free_mb=10**9)  # a floor no disk meets: the volume counts as full
    refused = client.post(
        "/observations", headers=ingest_headers(), json={"observations": [{"features": record(), "target": 1.0}]}
    )
    assert refused.status_code == 507 and "free" in refused.json()["detail"]
    assert client.post("/predict", json={"features": record()}).status_code == 200
    assert client.app.state.service.prediction_log.flush()
    dropped = metric_value(client.get("/metrics").text, "mlapi_prediction_log_dropped_total")
    assert dropped == 1.0
    assert client.app.state.service.prediction_log.count_predictions() == 0


def test_batches_wait_a_bounded_time_for_the_log_single_rows_never(tmp_path) -> None:
    """A writer slower than the calls, a queue that holds one call: calls that may wait (batches) are all written, at
    the writer's pace; calls that may not (single rows on the event loop) drop whole when it is full, counted; a call
    larger than the whole queue is taken when the queue is empty, without waiting."""
    from app.predlog import SqliteLog

    class SlowWriter(SqliteLog):
        def encode_matrix(self, features: np.ndarray) -> list[bytes]:
            time.sleep(0.05)
            return super().encode_matrix(features)

    dropped: list[int] = []
    one_call = logged_rows(100, 0.0, [0.0]).nbytes
    log = SlowWriter(tmp_path / "log.sqlite3", one_call, on_drop=dropped.append).start()
    now = time.time()
    for call in range(5):
        log.record(logged_rows(100, now, [0.0], id_prefix=f"wait-{call}-"), wait_s=2.0)
    assert log.flush() and log.count_predictions() == 500 and dropped == []
    for call in range(5):
        log.record(logged_rows(100, now, [0.0], id_prefix=f"now-{call}-"))
    assert log.flush() and sum(dropped) >= 300 and log.count_predictions() == 500 + 500 - sum(dropped)
    before, started = log.count_predictions(), time.monotonic()
    log.record(logged_rows(250, now, [0.0], id_prefix="large-"), wait_s=2.0)
    assert time.monotonic() - started < 1.0, "waited for room the queue can never have"
    assert log.flush() and log.count_predictions() == before + 250
    log.close()
