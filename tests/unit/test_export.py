"""The prediction log's export (GET /admin/predictions, `python -m app predictions`): rows as the client sent them,
the answer, the ground truth joined, a time window, and memory that does not grow with the log."""

from __future__ import annotations

import csv
import io
import json
import math
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.export import export_lines
from app.predlog import SqliteLog
from app.tabular import Schema
from tests.support.service import FEATURES, admin_headers, ingest_headers, logged_rows, record

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(params=["sqlite", "postgresql"])
def log_backend(request: pytest.FixtureRequest) -> str:
    return request.param


def exported(client: TestClient, fmt: str, since: float = 0.0) -> str:
    response = client.get(f"/admin/predictions?format={fmt}&since={since}", headers=admin_headers())
    assert response.status_code == 200, response.text
    return response.text


def test_the_export_has_what_was_sent_what_was_answered_and_what_was_observed(client: TestClient) -> None:
    sent = [record(age=0.01 * i) for i in range(5)]
    answers = [client.post("/predict", json={"features": row}).json() for row in sent]
    observed = answers[2]["prediction_id"]
    stored = client.post(
        "/observations", headers=ingest_headers(), json={"observations": [{"prediction_id": observed, "target": 99.5}]}
    )
    assert stored.status_code == 201, stored.text

    lines = [json.loads(line) for line in exported(client, "jsonl").splitlines()]
    assert [line["id"] for line in lines] == [answer["prediction_id"] for answer in answers]
    for line, row, answer in zip(lines, sent, answers, strict=True):
        assert line["features"] == row
        assert line["prediction"] == answer["prediction"]
        assert (line["lower"], line["upper"]) == (answer["interval"]["lower"], answer["interval"]["upper"])
        assert line["model_version"] == answer["model_version"] and line["confidence"] == 0.9
        assert line["ood"] is False
    assert [line["observed"] for line in lines] == [None, None, 99.5, None, None]

    table = list(csv.DictReader(io.StringIO(exported(client, "csv"))))
    assert [row["id"] for row in table] == [line["id"] for line in lines]
    assert [float(row["age"]) for row in table] == [row["age"] for row in sent]
    assert list(table[0])[: len(FEATURES) + 10][-len(FEATURES) :] == list(FEATURES)
    assert [row["observed"] for row in table] == ["", "", "99.5", "", ""]


def test_since_leaves_out_what_was_logged_before(client: TestClient) -> None:
    client.post("/predict", json={"features": record()})
    client.app.state.service.prediction_log.flush()
    cut = time.time()
    later = client.post("/predict", json={"features": record(bmi=0.02)}).json()
    lines = exported(client, "jsonl", since=cut).splitlines()
    assert [json.loads(line)["id"] for line in lines] == [later["prediction_id"]]
    assert exported(client, "csv", since=time.time() + 60).count("\n") == 1  # the header alone


def test_a_classifiers_export_has_labels_categories_and_gaps_as_sent(make_client: Callable[..., TestClient]) -> None:
    penguins = make_client(model_project=EXAMPLES / "penguins")
    row = {
        "island": "Dream",
        "bill_length_mm": None,
        "bill_depth_mm": 17.9,
        "flipper_length_mm": 190,
        "body_mass_g": 3700,
        "sex": None,
        "year": 2009,
    }
    answer = penguins.post("/predict", json={"features": row}).json()
    penguins.post(
        "/observations",
        headers=ingest_headers(),
        json={"observations": [{"prediction_id": answer["prediction_id"], "target": "Chinstrap"}]},
    )
    (line,) = [json.loads(text) for text in exported(penguins, "jsonl").splitlines()]
    assert line["features"] == row
    assert line["label"] == answer["label"] and line["observed"] == "Chinstrap"
    assert line["probability"] == pytest.approx(answer["probabilities"][answer["label"]])
    (table_row,) = csv.DictReader(io.StringIO(exported(penguins, "csv")))
    assert table_row["island"] == "Dream" and table_row["sex"] == "" and table_row["bill_length_mm"] == ""
    assert table_row["label"] == answer["label"] and table_row["observed"] == "Chinstrap"


def test_the_export_needs_the_admin_token(client: TestClient) -> None:
    assert client.get("/admin/predictions").status_code == 401
    assert client.get("/admin/predictions?format=xml", headers=admin_headers()).status_code == 422


def test_a_feature_named_like_an_answer_column_keeps_both() -> None:
    schema = Schema.numbers(["prediction", "x"])
    header = next(export_lines([], schema, "csv"))
    assert header.strip().split(",")[-2:] == ["feature:prediction", "x"]
    assert header.count("prediction") == 2


def export_peak(log: SqliteLog, since: float, schema: Schema) -> tuple[int, int, int]:
    """Lines, characters and the peak of Python allocations while exporting from ``since``."""
    tracemalloc.start()
    try:
        size = count = 0
        for line in export_lines(log.export(since), schema, "csv"):
            size += len(line)
            count += 1
        return count, size, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_large_log_streams_in_bounded_memory(tmp_path: Path) -> None:
    """100,000 logged rows exported page by page: the peak allocation is that of a 10,000-row export, not ten times
    it, and a fraction of the text, so neither a replica nor the laptop holds the log in memory."""
    log = SqliteLog(tmp_path / "predictions.sqlite3", queue_bytes=2**26).start()
    rows = 100_000
    features = [0.01] * len(FEATURES)
    log.record(logged_rows(rows, 1000.0, features))
    assert log.flush(timeout=60)
    schema = Schema.numbers(FEATURES)
    try:
        small_count, _, small_peak = export_peak(log, 1000.0 + rows - 10_000, schema)
        count, size, peak = export_peak(log, 0.0, schema)
    finally:
        log.close()
    assert (small_count, count) == (10_001, rows + 1)
    assert peak < 1.5 * small_peak, f"100k rows peaked at {peak / 2**20:.1f} MiB, 10k at {small_peak / 2**20:.1f}"
    assert peak < size / 4, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB export"


def test_a_log_written_as_json_text_reads_beside_new_binary_rows(tmp_path: Path) -> None:
    """Logs from before features were stored as float64 bytes kept JSON text in the same column: a replica of this
    version on the old volume reads both, and a gap (NaN) survives the new form."""
    import sqlite3

    path, now = tmp_path / "predictions.sqlite3", time.time()  # within the retention
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE predictions (id TEXT PRIMARY KEY, ts REAL NOT NULL, model_version TEXT NOT NULL, "
        "features TEXT NOT NULL, prediction REAL NOT NULL, lower REAL NOT NULL, upper REAL NOT NULL, "
        "confidence REAL NOT NULL, ood INTEGER NOT NULL, latency_ms REAL NOT NULL);"
    )
    with old:
        old.execute(
            "INSERT INTO predictions VALUES (?,?,?,?,?,?,?,?,?,?)",
            ("old", now - 20, "v0001", json.dumps([0.25, -1.5]), 1.0, 0.5, 1.5, 0.9, 0, 1.0),
        )
    old.close()
    log = SqliteLog(path, queue_bytes=2**20).start()
    log.record(logged_rows(2, now - 10, [0.125, float("nan")]))
    assert log.flush()
    exported = list(log.export(now - 30))
    log.close()
    assert [row.id for row in exported] == ["old", "00000000", "00000001"]
    assert exported[0].features == [0.25, -1.5]
    assert exported[1].features[0] == 0.125 and math.isnan(exported[1].features[1])
