"""The Open Inference Protocol (V2) with the real client people use: tritonclient's HTTP client against the service
served by uvicorn on 127.0.0.1, with binary and with JSON tensors; answers equal /predict's for the same rows."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from sklearn.datasets import load_diabetes
from tritonclient.utils import InferenceServerException

from app.settings import Settings
from tests.support.peers import kserve_infer
from tests.support.service import ADMIN_TOKEN, FEATURES, INGEST_TOKEN, metric_value, served_app

ROWS = load_diabetes().data[:25]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("v2") / "data",
        admin_token=ADMIN_TOKEN,
        ingest_token=INGEST_TOKEN,
        holdout_seed=42,
    )
    with served_app(settings) as address:
        yield address


@pytest.fixture(scope="module")
def client(served: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(served)


def predicted_by_rest(served: str, rows: np.ndarray, confidence: float) -> list[dict]:
    body = {"columns": list(FEATURES), "rows": rows.tolist(), "confidence": confidence}
    answer = httpx.post(f"http://{served}/predict/columns", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["predictions"]


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("diabetes")
    assert not client.is_model_ready("penguins")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("diabetes")
    assert metadata["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, len(FEATURES)]}]
    assert [o["name"] for o in metadata["outputs"]] == ["predict", "lower", "upper", "out_of_distribution"]
    assert metadata["parameters"]["features"] == list(FEATURES)


@pytest.mark.parametrize("binary", [True, False], ids=["binary tensors", "JSON tensors"])
def test_infer_equals_predict(client: triton.InferenceServerClient, served: str, binary: bool) -> None:
    tensor = triton.InferInput("input-0", list(ROWS.shape), "FP64")
    tensor.set_data_from_numpy(ROWS, binary_data=binary)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("predict", "lower", "upper")]
    result = client.infer("diabetes", [tensor], outputs=outputs, request_id="r-1", parameters={"confidence": 0.8})
    rest = predicted_by_rest(served, ROWS, 0.8)
    np.testing.assert_allclose(result.as_numpy("predict"), [p["prediction"] for p in rest], rtol=1e-12)
    np.testing.assert_allclose(result.as_numpy("lower"), [p["interval"]["lower"] for p in rest], rtol=1e-12)
    np.testing.assert_allclose(result.as_numpy("upper"), [p["interval"]["upper"] for p in rest], rtol=1e-12)
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_name"] == "diabetes"
    assert response["model_version"] == "v0001"


@pytest.mark.parametrize("binary", [True, False])
def test_kserves_own_client_gets_the_answers_predict_gives(served: str, binary: bool) -> None:
    """kserve.InferenceRESTClient (protocol v2), from its own venv: health, readiness, and inference equal to
    /predict's, with JSON and with binary tensors."""
    tensor = {"name": "input-0", "datatype": "FP64", "shape": list(ROWS.shape), "data": ROWS.tolist()}
    answer = kserve_infer(
        {"base_url": f"http://{served}", "model": "diabetes", "inputs": [tensor], "binary": binary,
         "parameters": {"confidence": 0.8}}
    )  # fmt: skip
    assert answer["live"] and answer["ready"] and answer["model_ready"] and answer["id"] == "kserve-1"
    rest = predicted_by_rest(served, ROWS, 0.8)
    outputs = answer["outputs"]
    np.testing.assert_allclose(outputs["predict"]["data"], [p["prediction"] for p in rest], rtol=1e-12)
    np.testing.assert_allclose(outputs["lower"]["data"], [p["interval"]["lower"] for p in rest], rtol=1e-12)
    np.testing.assert_allclose(outputs["upper"]["data"], [p["interval"]["upper"] for p in rest], rtol=1e-12)


def test_a_single_row_is_coalesced_like_a_predict(client: triton.InferenceServerClient, served: str) -> None:
    """One-row V2 requests go through the same micro-batcher as /predict (counted by its histogram); batches not."""

    def coalesced_calls() -> float:
        exposition = httpx.get(f"http://{served}/metrics", timeout=10).text
        return metric_value(exposition, "mlapi_predict_coalesced_rows_count") or 0.0

    before = coalesced_calls()
    one = triton.InferInput("input-0", [1, len(FEATURES)], "FP64")
    one.set_data_from_numpy(ROWS[:1])
    client.infer("diabetes", [one])
    assert coalesced_calls() == before + 1
    many = triton.InferInput("input-0", list(ROWS.shape), "FP64")
    many.set_data_from_numpy(ROWS)
    client.infer("diabetes", [many])
    assert coalesced_calls() == before + 1


def test_one_tensor_per_feature_and_every_output_by_default(client: triton.InferenceServerClient) -> None:
    tensors = []
    for index, name in enumerate(FEATURES):
        tensor = triton.InferInput(name, [len(ROWS)], "FP64")
        tensor.set_data_from_numpy(np.ascontiguousarray(ROWS[:, index]), binary_data=index % 2 == 0)
        tensors.append(tensor)
    result = client.infer("diabetes", tensors, parameters={"content_type": "pd"})
    matrix = triton.InferInput("input-0", list(ROWS.shape), "FP64")
    matrix.set_data_from_numpy(ROWS)
    np.testing.assert_array_equal(result.as_numpy("predict"), client.infer("diabetes", [matrix]).as_numpy("predict"))
    assert result.as_numpy("out_of_distribution").dtype == np.bool_


def test_errors_are_v2_shaped_and_name_what_is_allowed(client: triton.InferenceServerClient, served: str) -> None:
    tensor = triton.InferInput("input-0", [1, len(FEATURES)], "FP64")
    tensor.set_data_from_numpy(ROWS[:1])
    with pytest.raises(InferenceServerException, match="model 'penguins' is not served here"):
        client.infer("penguins", [tensor])
    with pytest.raises(InferenceServerException, match=r"parameters.confidence 0.42: one of \[0.5, 0.8, 0.9, 0.95\]"):
        client.infer("diabetes", [tensor], parameters={"confidence": 0.42})
    far = ROWS[:1].copy()
    far[0, 2] = 1e9
    tensor.set_data_from_numpy(far)
    with pytest.raises(InferenceServerException, match=r"feature 'bmi' row 0: 1000000000\.0 is outside the accepted"):
        client.infer("diabetes", [tensor])
    narrow = triton.InferInput("input-0", [1, 3], "FP64")
    narrow.set_data_from_numpy(ROWS[:1, :3])
    with pytest.raises(InferenceServerException, match=r"shape \[1, 3\]; expected \[N, 10\]"):
        client.infer("diabetes", [narrow])
    answer = httpx.post(f"http://{served}/v2/models/diabetes/versions/v0099/infer", json={"inputs": []})
    assert answer.status_code == 404 and answer.json() == {"error": "version 'v0099' of 'diabetes' is not loaded; "
                                                                    "loaded: ['v0001']"}  # fmt: skip


def test_a_gzip_body_and_the_curl_form(served: str) -> None:
    request = {
        "inputs": [{"name": "input-0", "shape": [2, len(FEATURES)], "datatype": "FP64", "data": ROWS[:2].tolist()}]
    }
    plain = httpx.post(f"http://{served}/v2/models/diabetes/infer", json=request).json()
    packed = httpx.post(
        f"http://{served}/v2/models/diabetes/infer",
        content=gzip.compress(json.dumps(request).encode()),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    ).json()
    assert plain["outputs"] == packed["outputs"] and plain["outputs"][0]["shape"] == [2]
    bomb = gzip.compress(b" " * (5 * 2**20))  # 5 MiB of spaces in a few KiB: over the 4 MiB body limit inflated
    refused = httpx.post(
        f"http://{served}/v2/models/diabetes/infer", content=bomb, headers={"Content-Encoding": "gzip"}
    )
    assert refused.status_code == 413 and "decompressed body is over" in refused.json()["error"]


def test_the_infer_calls_are_logged_like_predict(served: str, tmp_path: Path) -> None:
    metrics = httpx.get(f"http://{served}/metrics").text
    assert 'mlapi_predictions_total{route="v2_infer"}' in metrics
