"""POST /predict/columns: the columnar batch form gives what the record form gives, and refuses what it refuses."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.datasets import load_diabetes

from app.limits import MAX_ERRORS
from tests.support.service import FEATURES


def columnar(rows: np.ndarray, columns: list[str] | tuple[str, ...] = FEATURES, **extra: object) -> dict:
    order = [FEATURES.index(name) for name in columns]
    return {"columns": list(columns), "rows": rows[:, order].tolist(), **extra}


def inputs() -> np.ndarray:
    rows = load_diabetes().data[:200].copy()
    rows[3, 2] = 0.5  # bmi far outside its training range: flagged out of distribution, but accepted
    rows[7, 0] = -0.3
    return rows


@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_columns_give_the_record_paths_answers_in_any_column_order(client: TestClient, confidence: float) -> None:
    rows = inputs()
    records = [dict(zip(FEATURES, row.tolist(), strict=True)) for row in rows]
    by_records = client.post("/predict/batch", json={"records": records, "confidence": confidence}).json()
    for columns in (FEATURES, tuple(reversed(FEATURES)), (*FEATURES[5:], *FEATURES[:5])):
        response = client.post("/predict/columns", json=columnar(rows, columns, confidence=confidence))
        assert response.status_code == 200, response.text
        by_columns = response.json()
        assert by_columns["model_version"] == by_records["model_version"]
        assert len(by_columns["predictions"]) == len(rows)
        for got, want in zip(by_columns["predictions"], by_records["predictions"], strict=True):
            # Same model, same row; a matrix product's summation order may differ in the last bit.
            assert got["prediction"] == pytest.approx(want["prediction"], rel=1e-12, abs=1e-9)
            for bound in ("lower", "upper"):
                assert got["interval"][bound] == pytest.approx(want["interval"][bound], rel=1e-12, abs=1e-9)
            assert got["interval"]["confidence"] == confidence
            assert got["out_of_distribution"] == want["out_of_distribution"]
    flagged = [p["out_of_distribution"]["flag"] for p in by_columns["predictions"]]
    assert flagged[3] and flagged[7] and sum(flagged) < len(rows) / 2


def test_columnar_predictions_are_logged_like_the_others(client: TestClient) -> None:
    answer = client.post("/predict/columns", json=columnar(inputs()[:5])).json()
    service = client.app.state.service
    service.prediction_log.flush()
    ids = [p["prediction_id"] for p in answer["predictions"]]
    known = service.prediction_log.prediction_features(ids)
    assert set(known) == set(ids)
    assert known[ids[0]] == pytest.approx(inputs()[0].tolist())


def error_of(response) -> list[dict]:
    assert response.status_code == 422, response.text
    return response.json()["detail"]


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        ([*FEATURES[:-1], "height"], "missing: ['s6']; unknown: ['height']"),
        ([*FEATURES[:-1], FEATURES[0]], "missing: ['s6']; repeated: ['age']"),
    ],
)
def test_columns_must_name_each_feature_once(client: TestClient, columns: list[str], expected: str) -> None:
    body = {"columns": columns, "rows": [[0.0] * len(FEATURES)]}
    (error,) = error_of(client.post("/predict/columns", json=body))
    assert error["loc"] == ["body", "columns"] and expected in error["msg"]


def test_rows_of_the_wrong_length_or_type_are_named(client: TestClient) -> None:
    body = {"columns": list(FEATURES), "rows": [[0.0] * len(FEATURES), [0.0] * (len(FEATURES) - 1)]}
    (error,) = error_of(client.post("/predict/columns", json=body))
    assert error["loc"] == ["body", "rows", 1] and error["type"] == "too_short"
    for bad in ("0.1", True, None):
        row = [0.0] * len(FEATURES)
        row[4] = bad
        errors = error_of(client.post("/predict/columns", json={"columns": list(FEATURES), "rows": [row]}))
        assert [e["loc"] for e in errors] == [["body", "rows", 0, 4]], bad


@pytest.mark.parametrize("body", [b"{not json", b'{"columns": ["age"], "rows": [[NaN]]}', b"[]"])
def test_a_body_that_is_not_a_columnar_batch_is_refused(client: TestClient, body: bytes) -> None:
    assert error_of(client.post("/predict/columns", content=body, headers={"content-type": "application/json"}))


def test_a_value_outside_its_range_names_row_and_column_as_sent(client: TestClient) -> None:
    rows = inputs()[:3]
    rows[2, FEATURES.index("bp")] = 1e6
    columns = tuple(reversed(FEATURES))
    errors = error_of(client.post("/predict/columns", json=columnar(rows, columns)))
    assert len(errors) == 1
    assert errors[0]["loc"] == ["body", "rows", 2, columns.index("bp")]
    assert errors[0]["type"] == "less_than_equal" and "'bp'" in errors[0]["msg"]
    # The record form refuses the same value, with the same kind of error.
    record = dict(zip(FEATURES, rows[2].tolist(), strict=True))
    (by_record,) = error_of(client.post("/predict/batch", json={"records": [record]}))
    assert by_record["type"] == errors[0]["type"] and by_record["ctx"] == errors[0]["ctx"]


def test_many_bad_values_give_the_first_ones_and_a_count(client: TestClient) -> None:
    rows = np.full((50, len(FEATURES)), -1e6)
    errors = error_of(client.post("/predict/columns", json=columnar(rows)))
    assert len(errors) == MAX_ERRORS + 1
    assert [e["loc"][2:] for e in errors[:3]] == [[0, 0], [0, 1], [0, 2]]
    assert errors[-1] == {
        "type": "too_many_errors",
        "loc": [],
        "msg": f"{50 * len(FEATURES) - MAX_ERRORS} more errors not shown",
    }


def test_the_batch_limit_and_the_confidence_levels_hold(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_batch_rows=10)
    (error,) = error_of(client.post("/predict/columns", json=columnar(inputs()[:11])))
    assert error["loc"] == ["body", "rows"] and error["type"] == "too_long"
    (error,) = error_of(client.post("/predict/columns", json=columnar(inputs()[:2], confidence=0.42)))
    assert error["loc"] == ["body", "confidence"]
    assert client.post("/predict/columns", json=columnar(inputs()[:10])).status_code == 200


def test_the_columnar_form_is_documented(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/predict/columns"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["columns", "rows"] and json.dumps(schema).count("maxItems") >= 2
    assert {"200", "413", "422"} <= set(operation["responses"])


def test_prediction_ids_are_uuid7s_in_time_then_call_order() -> None:
    """The batch path's ids (one read of the OS's randomness): valid version-7 UUIDs (RFC 9562) carrying the
    millisecond, sorting in the call's row order and after an earlier call's, distinct between calls."""
    import uuid

    from app.routes.predict import prediction_ids

    ids = prediction_ids(10_000, now_ms=1_700_000_000_123)
    assert len(set(ids)) == 10_000 and ids == sorted(ids)
    parsed = [uuid.UUID(hex=i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 and u.hex == i for u, i in zip(parsed, ids, strict=True))
    assert {int.from_bytes(u.bytes[:6], "big") for u in parsed} == {1_700_000_000_123}
    later = prediction_ids(3, now_ms=1_700_000_000_124)
    assert min(later) > max(ids)
    same_millisecond = [prediction_ids(100, now_ms=1_700_000_000_123) for _ in range(50)]
    assert len({i for call in same_millisecond for i in call} | set(ids)) == 10_000 + 50 * 100
    assert prediction_ids(0) == []


def test_out_of_distribution_flags_every_value_in_row_then_feature_order() -> None:
    """The batch path's OOD (Python objects only for flagged values) names exactly what a row-by-row check names."""
    from app.model import FeatureProfile, out_of_distribution

    rng = np.random.default_rng(3)
    profiles = [
        FeatureProfile(
            name=f"f{i}",
            type="category" if i == 2 else "number",
            mean=0.0,
            std=1.0,
            min=-2.0,
            max=2.0,
            bin_edges=[0.0],
            bin_fractions=[0.5, 0.5],
        )
        for i in range(4)
    ]
    X = rng.normal(0, 2.5, size=(500, 4))
    found = out_of_distribution(X, profiles, z_threshold=3.0, range_tolerance=0.1)
    for row, reasons in zip(X, found, strict=True):
        expected = [
            profile.name
            for value, profile in zip(row, profiles, strict=True)
            if profile.numeric and (value < -2.4 or value > 2.4 or abs(value) > 3.0)
        ]
        assert [reason.feature for reason in reasons] == expected
    assert any(len(reasons) > 1 for reasons in found) and any(not reasons for reasons in found)
