"""A classifier over mixed types, served for real: examples/penguins (categories, integers, gaps, three species)
through the API as a client sends it; the DataFrame the user's pipeline sees; retraining judged by log-loss; drift
over category shares; V2 for a classifier."""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_iris
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder
from tritonclient.utils import InferenceServerException

from app.data import load_project_dataset, split_holdout
from app.model import train
from app.project import PROJECT_FILE, open_project
from app.registry import RegistryError
from app.service import check_sklearn_version
from app.settings import Settings
from app.tabular import frame_of_codes
from tests.support.peers import kserve_infer
from tests.support.service import ADMIN_TOKEN, admin_headers, ingest_headers, served_app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CLASSES = ["Adelie", "Chinstrap", "Gentoo"]
LEVELS = (0.5, 0.8, 0.9, 0.95)
PENGUIN = {
    "island": "Biscoe",
    "bill_length_mm": 45.2,
    "bill_depth_mm": 14.8,
    "flipper_length_mm": 212,
    "body_mass_g": 5200,
    "sex": "female",
    "year": 2008,
}


@pytest.fixture(params=["sqlite", "postgresql"])
def log_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def penguins(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(model_project=EXAMPLES / "penguins")


def penguin_records(n: int) -> list[dict]:
    """The example's first ``n`` rows as a client sends them: JSON nulls where the data has gaps."""
    _, data = open_project(EXAMPLES / "penguins")
    frame = data.features.head(n).astype(object)
    return [{k: (None if pd.isna(v) else v) for k, v in row.items()} for row in frame.to_dict("records")]


def check_answer(answer: dict, confidence: float) -> None:
    probabilities = answer["probabilities"]
    assert list(probabilities) == CLASSES
    assert math.isclose(sum(probabilities.values()), 1.0, abs_tol=1e-9)
    assert answer["label"] == max(probabilities, key=probabilities.get)
    assert answer["label"] in answer["prediction_set"] and set(answer["prediction_set"]) <= set(CLASSES)
    assert answer["confidence"] == confidence


def test_an_answer_has_the_label_the_probabilities_and_a_conformal_set(penguins: TestClient) -> None:
    sizes = []
    ambiguous = {**PENGUIN, "bill_length_mm": None, "bill_depth_mm": None, "flipper_length_mm": None, "sex": None}
    for confidence in LEVELS:
        response = penguins.post("/predict", json={"features": PENGUIN, "confidence": confidence})
        assert response.status_code == 200, response.text
        check_answer(response.json(), confidence)
        assert response.json()["label"] == "Gentoo"  # a heavy Biscoe bird with a long flipper
        unsure = penguins.post("/predict", json={"features": ambiguous, "confidence": confidence}).json()
        check_answer(unsure, confidence)
        sizes.append(len(unsure["prediction_set"]))
    assert sizes == sorted(sizes)  # a higher confidence never gives a smaller set


def test_a_classifier_is_ready_and_says_so(penguins: TestClient) -> None:
    ready = penguins.get("/ready")
    assert ready.status_code == 200 and ready.json()["model_version"] == "v0001"
    assert penguins.get("/v2/models/penguins/ready").status_code == 200


def test_null_is_accepted_exactly_where_the_project_allows_gaps(penguins: TestClient) -> None:
    gaps = {**PENGUIN, "bill_length_mm": None, "sex": None, "body_mass_g": None}
    assert penguins.post("/predict", json={"features": gaps}).status_code == 200
    for name in ("island", "year"):  # declared without nullable = true
        response = penguins.post("/predict", json={"features": {**PENGUIN, name: None}})
        assert response.status_code == 422
        assert [e["loc"] for e in response.json()["detail"]] == [["body", "features", name]]


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("island", "Mars", "Input should be 'Biscoe', 'Dream' or 'Torgersen'"),
        ("sex", "MALE", "Input should be 'female' or 'male'"),
        ("flipper_length_mm", 212.5, "Input should be a valid integer"),
        ("year", "2008", "Input should be a valid integer"),
        ("bill_length_mm", 1e6, "Input should be less than or equal to"),
    ],
)
def test_a_value_outside_the_schema_is_a_422_naming_the_field_and_what_is_allowed(
    penguins: TestClient, name: str, value: object, says: str
) -> None:
    response = penguins.post("/predict", json={"features": {**PENGUIN, name: value}})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "features", name] and says in error["msg"], error


def test_records_batches_and_columns_give_the_same_answers(penguins: TestClient) -> None:
    records = penguin_records(40)  # rows 4 and 340-ish of the data have gaps; take ones that do
    records[1] = {**records[1], "sex": None, "bill_depth_mm": None}
    singles = [penguins.post("/predict", json={"features": r, "confidence": 0.9}).json() for r in records]
    batch = penguins.post("/predict/batch", json={"records": records, "confidence": 0.9}).json()["predictions"]
    order = ["year", "sex", "island", "body_mass_g", "bill_depth_mm", "flipper_length_mm", "bill_length_mm"]
    columns = penguins.post(
        "/predict/columns",
        json={"columns": order, "rows": [[r[name] for name in order] for r in records], "confidence": 0.9},
    ).json()["predictions"]

    def exact(answer: dict) -> dict:  # all but the id and the probabilities' last digits (BLAS sums by batch size)
        return {k: v for k, v in answer.items() if k not in ("prediction_id", "model_version", "probabilities")}

    for answers in (batch, columns):
        assert [exact(a) for a in answers] == [exact(a) for a in singles]
        for one, other in zip(answers, singles, strict=True):
            assert one["probabilities"] == pytest.approx(other["probabilities"], rel=1e-9, abs=1e-12)


def test_columns_errors_name_the_row_and_the_column_as_sent(penguins: TestClient) -> None:
    order = list(PENGUIN)[::-1]
    rows = [[PENGUIN[name] for name in order] for _ in range(3)]
    rows[2][order.index("island")] = "Mars"
    rows[1][order.index("year")] = None
    response = penguins.post("/predict/columns", json={"columns": order, "rows": rows})
    assert response.status_code == 422
    located = {tuple(e["loc"]): e["msg"] for e in response.json()["detail"]}
    assert set(located) == {("body", "rows", 1, order.index("year")), ("body", "rows", 2, order.index("island"))}


def test_the_model_card_lists_classes_and_holdout_metrics_never_training_statistics(penguins: TestClient) -> None:
    card = penguins.get("/model").json()
    assert card["task"] == "classification" and card["classes"] == CLASSES and card["promotion_metric"] == "log_loss"
    metrics = card["metrics"]
    assert set(metrics) == {"accuracy", "macro_f1", "log_loss", "coverage", "mean_set_size"}
    assert metrics["accuracy"] > 0.9 and metrics["log_loss"] < 0.3
    island = next(f for f in card["features"] if f["name"] == "island")
    assert island == {
        "name": "island",
        "type": "category",
        "nullable": False,
        "values": ["Biscoe", "Dream", "Torgersen"],
    }
    assert not any(word in str(card) for word in ("'mean'", "'std'", "bin_fractions", "'missing'"))
    assert card["sklearn_version"]
    n, accuracy, loss = card["n_holdout"], metrics["accuracy"], metrics["log_loss"]
    print(f"\npenguins holdout (n={n}): accuracy {accuracy:.3f}, log-loss {loss:.3f}")
    for level in LEVELS:
        key = f"{level:g}"
        coverage, size = metrics["coverage"][key], metrics["mean_set_size"][key]
        print(
            f"  confidence {key}: measured coverage {coverage:.3f} ({coverage - level:+.3f}), mean set size {size:.2f}"
        )
        assert coverage >= level - 0.1  # conformal: at least the level, up to the holdout's sampling noise
        assert 1.0 <= size <= len(CLASSES)  # APS with the top label: never empty


def test_ground_truth_is_a_label_and_a_better_model_is_promoted_by_log_loss(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    """The project starts from every other bird; the others arrive as labelled feedback: the candidate trained on
    them too beats the first model's log-loss on the fixed holdout, so it is promoted."""
    project = tmp_path / "penguins"
    shutil.copytree(EXAMPLES / "penguins", project)
    path = project / "data" / "penguins.csv"
    with path.open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    first = rows[::2]
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *first])
    service = make_client(model_project=project)
    wrong = service.post(
        "/observations",
        json={"observations": [{"features": PENGUIN, "target": "Emperor"}]},
        headers=ingest_headers(),
    )
    assert wrong.status_code == 422 and "Input should be 'Adelie', 'Chinstrap' or 'Gentoo'" in wrong.text
    assert service.post("/admin/retrain", headers=admin_headers()).json()["outcome"] == "rejected"  # nothing new

    targets = pd.read_csv(EXAMPLES / "penguins" / "data" / "penguins.csv")["species"].tolist()
    feedback = [{"features": f, "target": t} for f, t in zip(penguin_records(400), targets, strict=True)][1::2]
    stored = service.post("/observations", json={"observations": feedback}, headers=ingest_headers())
    assert stored.status_code == 201, stored.text
    outcome = service.post("/admin/retrain", headers=admin_headers()).json()
    assert outcome["outcome"] == "promoted", outcome
    assert "candidate holdout log-loss" in outcome["reason"]
    assert outcome["candidate_metrics"]["log_loss"] < outcome["current_metrics"]["log_loss"]
    assert service.get("/model").json()["version"] == "v0002"


def test_drift_compares_category_shares(penguins: TestClient) -> None:
    torgersen = {**PENGUIN, "island": "Torgersen", "sex": None}
    penguins.post("/predict/batch", json={"records": [torgersen] * 60})
    psi = penguins.get("/admin/drift", headers=admin_headers()).json()["psi"]
    assert psi["island"] > 0.25  # every bird from the smallest island: drift
    assert set(psi) == set(PENGUIN)


def test_the_users_pipeline_receives_the_declared_names_and_dtypes() -> None:
    """The service keeps rows as codes; the pipeline's first step gives the estimator the DataFrame a user trains on
    in a notebook, so a ColumnTransformer that selects columns by name works unchanged."""
    project, data = open_project(EXAMPLES / "penguins")
    dataset = load_project_dataset(EXAMPLES / "penguins")
    frame = frame_of_codes(dataset.X, **dataset.schema.transformer_arguments())
    assert list(frame.columns) == list(project.features)
    assert {name: str(dtype) for name, dtype in frame.dtypes.items()} == {
        "island": "object",
        "bill_length_mm": "float64",
        "bill_depth_mm": "float64",
        "flipper_length_mm": "Int64",
        "body_mass_g": "Int64",
        "sex": "object",
        "year": "Int64",
    }
    expected = data.features.astype(object).where(data.features.notna(), None)
    assert frame.astype(object).where(frame.notna(), None).equals(expected.reset_index(drop=True))
    users_own = make_pipeline(
        ColumnTransformer(
            [
                ("cat", make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder()), ["island", "sex"]),
                ("num", SimpleImputer(), ["bill_length_mm", "flipper_length_mm"]),
            ]
        ),
        LogisticRegression(max_iter=1000),
    )
    assert users_own.fit(frame, dataset.y).score(frame, dataset.y) > 0.9


def test_one_pass_sets_are_mapies_own() -> None:
    """Predictor.classify hands the probabilities of its one pipeline pass to MAPIE's set function: the sets equal
    SplitConformalClassifier.predict_set's (which runs the pipeline again) at every level, on every row."""
    dataset = load_project_dataset(EXAMPLES / "penguins")
    development, holdout = split_holdout(dataset, 7)
    predictor = train(development, holdout, estimator="ridge", levels=list(LEVELS), seed=42)
    labels, reference = predictor.conformal.predict_set(dataset.X)
    for index, level in enumerate(LEVELS):
        probabilities, sets = predictor.classify(dataset.X, level)
        assert (sets == reference[:, :, index]).all(), level
        assert (np.array(CLASSES)[probabilities.argmax(axis=1)] == labels).all()


def test_a_version_trained_under_another_scikit_learn_minor_is_refused_naming_both() -> None:
    import sklearn

    major, minor = sklearn.__version__.split(".")[:2]
    check_sklearn_version("v0001", f"{major}.{minor}.0")
    check_sklearn_version("v0001", "")  # versions from before it was recorded
    with pytest.raises(
        RegistryError, match=rf"trained with scikit-learn 1\.2\.2, this service runs {sklearn.__version__}"
    ):
        check_sklearn_version("v0001", "1.2.2")


# -- V2 for a classifier ---------------------------------------------------------------------------------------------
def iris_project(directory: Path) -> Path:
    iris = load_iris()
    (directory / "data").mkdir(parents=True)
    names = [name.replace(" (cm)", "").replace(" ", "_") for name in iris.feature_names]
    with (directory / "data" / "iris.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*names, "species"])
        for row, target in zip(iris.data, iris.target, strict=True):
            writer.writerow([*row.tolist(), iris.target_names[target]])
    (directory / PROJECT_FILE).write_text(
        '[model]\nname = "iris"\ntask = "classification"\ntarget = "species"\ndata = "data/iris.csv"\n'
    )
    return directory


def test_v2_answers_a_classifier_with_labels_probabilities_and_sets(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    iris = make_client(model_project=iris_project(tmp_path / "iris"))
    metadata = iris.get("/v2/models/iris").json()
    assert [o["name"] for o in metadata["outputs"]] == [
        "label",
        "probabilities",
        "prediction_set",
        "out_of_distribution",
    ]
    assert metadata["parameters"]["classes"] == ["setosa", "versicolor", "virginica"]
    rows = load_iris().data[[0, 60, 120]].tolist()
    body = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [3, 4], "data": rows}]}
    answer = iris.post("/v2/models/iris/infer", json=body).json()
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["label"]["datatype"] == "BYTES" and outputs["label"]["data"] == ["setosa", "versicolor", "virginica"]
    probabilities = np.array(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
    assert np.allclose(probabilities.sum(axis=1), 1.0)
    names = metadata["parameters"]["features"]
    same = iris.post("/predict/batch", json={"records": [dict(zip(names, r, strict=True)) for r in rows]}).json()
    assert [p["label"] for p in same["predictions"]] == outputs["label"]["data"]
    assert np.allclose([list(p["probabilities"].values()) for p in same["predictions"]], probabilities)
    sets = np.array(outputs["prediction_set"]["data"]).reshape(3, 3)
    assert [[c for c, m in zip(metadata["parameters"]["classes"], s, strict=True) if m] for s in sets] == [
        p["prediction_set"] for p in same["predictions"]
    ]
    binary = {**body, "parameters": {"binary_data_output": True}}
    raw = iris.post("/v2/models/iris/infer", json=binary)
    header_length = int(raw.headers["inference-header-content-length"])
    header = json.loads(raw.content[:header_length])
    first = header["outputs"][0]
    assert first["name"] == "label" and first["parameters"]["binary_data_size"] > 0
    labels, chunk = [], raw.content[header_length : header_length + first["parameters"]["binary_data_size"]]
    while chunk:
        size = int.from_bytes(chunk[:4], "little")
        labels.append(chunk[4 : 4 + size].decode())
        chunk = chunk[4 + size :]
    assert labels == ["setosa", "versicolor", "virginica"]


@pytest.fixture(scope="module")
def penguins_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("v2-penguins"),
        admin_token=ADMIN_TOKEN,
        holdout_seed=42,
        model_project=EXAMPLES / "penguins",
    )
    with served_app(settings) as address:
        yield address


def typed_inputs(records: list[dict], binary: bool) -> list[triton.InferInput]:
    """One tensor per feature, as tritonclient sends a DataFrame: categories BYTES ("" for a gap), numbers FP64 (NaN
    for a gap), integers INT64 where the column has no gap."""
    frame = pd.DataFrame(records)
    inputs = []
    for name in frame.columns:
        column = frame[name]
        if name in ("island", "sex"):
            values = np.array([["" if pd.isna(v) else v] for v in column], dtype=object)
            datatype = "BYTES"
        elif name == "year":
            values, datatype = column.to_numpy(dtype=np.int64).reshape(-1, 1), "INT64"
        else:
            values, datatype = column.to_numpy(dtype=np.float64, na_value=np.nan).reshape(-1, 1), "FP64"
        tensor = triton.InferInput(name, list(values.shape), datatype)
        tensor.set_data_from_numpy(values, binary_data=binary)
        inputs.append(tensor)
    return inputs


@pytest.mark.parametrize("binary", [True, False])
def test_v2_takes_categories_and_gaps_as_tensors_per_feature(penguins_served: str, binary: bool) -> None:
    """tritonclient, the real client: BYTES categories, FP64 numbers with NaN gaps; the answers equal /predict's."""
    client = triton.InferenceServerClient(penguins_served)
    metadata = client.get_model_metadata("penguins")
    assert {i["name"]: i["datatype"] for i in metadata["inputs"]} == {
        "island": "BYTES", "bill_length_mm": "FP64", "bill_depth_mm": "FP64", "flipper_length_mm": "INT64",
        "body_mass_g": "INT64", "sex": "BYTES", "year": "INT64",
    }  # fmt: skip
    records = penguin_records(30)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("label", "probabilities")]
    result = client.infer("penguins", typed_inputs(records, binary), outputs=outputs, parameters={"confidence": 0.9})
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label").reshape(-1)]
    rest = httpx.post(f"http://{penguins_served}/predict/batch", json={"records": records, "confidence": 0.9}).json()
    assert labels == [answer["label"] for answer in rest["predictions"]]
    expected = [list(answer["probabilities"].values()) for answer in rest["predictions"]]
    assert np.allclose(result.as_numpy("probabilities"), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("binary", [True, False])
def test_kserves_own_client_sends_categories_and_gaps(penguins_served: str, binary: bool) -> None:
    """kserve.InferenceRESTClient from its own venv: BYTES categories ("" for a gap), FP64 numbers with NaN gaps,
    INT64 where a column has none; labels and probabilities equal /predict's."""
    records = [r for r in penguin_records(40) if r["flipper_length_mm"] is not None][:20]
    records[0] = {**records[0], "sex": None, "bill_depth_mm": None}
    inputs = []
    for name in PENGUIN:
        column = [record[name] for record in records]
        if name in ("island", "sex"):
            data, datatype = ["" if value is None else value for value in column], "BYTES"
        elif name in ("flipper_length_mm", "body_mass_g", "year"):
            data, datatype = column, "INT64"
        else:
            data, datatype = [float("nan") if value is None else value for value in column], "FP64"
        inputs.append({"name": name, "datatype": datatype, "shape": [len(records), 1], "data": data})
    answer = kserve_infer(
        {"base_url": f"http://{penguins_served}", "model": "penguins", "inputs": inputs, "binary": binary,
         "parameters": {"content_type": "pd", "confidence": 0.9}}
    )  # fmt: skip
    rest = httpx.post(f"http://{penguins_served}/predict/batch", json={"records": records, "confidence": 0.9}).json()
    assert answer["outputs"]["label"]["data"] == [p["label"] for p in rest["predictions"]]
    expected = [list(p["probabilities"].values()) for p in rest["predictions"]]
    np.testing.assert_allclose(
        np.reshape(answer["outputs"]["probabilities"]["data"], (len(records), 3)), expected, rtol=1e-9, atol=1e-12
    )
    sets = np.reshape(answer["outputs"]["prediction_set"]["data"], (len(records), 3))
    assert [[c for c, m in zip(CLASSES, row, strict=True) if m] for row in sets] == [
        p["prediction_set"] for p in rest["predictions"]
    ]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"island": "Mars"}, "input 'island' row 0: 'Mars' is not one of ['Biscoe', 'Dream', 'Torgersen']"),
        ({"island": None}, "input 'island' row 0: '' is not one of"),  # not nullable: "" is no gap here
        ({"sex": "MALE"}, "'MALE' is not one of ['female', 'male'], or \"\" for a gap"),
        ({"bill_length_mm": 1e9}, "feature 'bill_length_mm' row 0: 1000000000.0 is outside the accepted range"),
    ],
)
def test_v2_refuses_a_value_outside_the_schema_naming_input_row_and_allowed(
    penguins_served: str, change: dict, says: str
) -> None:
    client = triton.InferenceServerClient(penguins_served)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("penguins", typed_inputs([{**PENGUIN, **change}], binary=True))
    assert says in str(refused.value), str(refused.value)


def test_v2_a_typed_model_takes_no_matrix(penguins: TestClient) -> None:
    body = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 7], "data": [[0, 1, 2, 3, 4, 5, 6]]}]}
    response = penguins.post("/v2/models/penguins/infer", json=body)
    assert response.status_code == 400
    assert "one tensor per feature, named as in the metadata ['island', 'bill_length_mm'" in response.json()["error"]


def test_check_describes_the_task_classes_and_typed_features(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "app", "check"],
        env={"MLAPI_MODEL_PROJECT": str(EXAMPLES / "penguins"), "MLAPI_DATA_DIR": str(tmp_path), "PATH": "/usr/bin"},
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "penguins: classification into ['Adelie', 'Chinstrap', 'Gentoo'], 344 rows" in result.stdout
    assert "island (category), bill_length_mm (number, nullable)" in result.stdout
