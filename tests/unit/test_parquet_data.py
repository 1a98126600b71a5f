"""Training data in Parquet (issue 23, `model.data`): a Parquet file, in the project or at an https:// URL, gives the
project its CSV would give (same schema inferred, same typed columns, same model), because its values go through
the same schema path as a CSV's text. pyarrow reads it; the model image carries pyarrow only for a project that pins
it, so a Parquet project without the pin is refused before anything is built, naming the key and the line to add."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from packaging.requirements import Requirement

from app.data import fingerprint, load_project_dataset
from app.project import PARQUET_READER, PROJECT_FILE, ProjectError, open_project, read_raw
from tests.support.https_files import https_files

ROOT = Path(__file__).resolve().parents[2]
PENGUINS = ROOT / "examples" / "penguins"
INTEGERS = ("flipper_length_mm", "body_mass_g", "year")


def penguins_table() -> pd.DataFrame:
    """The penguins CSV as a user's pandas code would keep it: nullable integers, a categorical column, NaN gaps."""
    frame = pd.read_csv(PENGUINS / "data" / "penguins.csv", dtype={name: "Int64" for name in INTEGERS})
    frame["island"] = frame["island"].astype("category")  # a dictionary column in Parquet
    return frame


def parquet_project(directory: Path, frame: pd.DataFrame | None = None, pinned: bool = True) -> Path:
    """The penguins example with its data as Parquet (and pyarrow pinned in its requirements, unless not)."""
    (directory / "data").mkdir(parents=True)
    (frame if frame is not None else penguins_table()).to_parquet(directory / "data" / "penguins.parquet")
    toml = (PENGUINS / PROJECT_FILE).read_text().replace('data = "data/penguins.csv"', 'data = "data/penguins.parquet"')
    if pinned:
        (directory / "requirements.txt").write_text(f"{PARQUET_READER}\n")
        toml = toml.replace("[features]", 'requirements = "requirements.txt"\n\n[features]', 1)
    (directory / PROJECT_FILE).write_text(toml)
    return directory


def test_a_parquet_file_gives_the_project_its_csv_gives(tmp_path: Path) -> None:
    from_csv, csv_data = open_project(PENGUINS)
    from_parquet, parquet_data = open_project(parquet_project(tmp_path / "penguins"))
    assert from_parquet.features == from_csv.features
    pd.testing.assert_frame_equal(parquet_data.features, csv_data.features)
    pd.testing.assert_series_equal(parquet_data.target, csv_data.target)
    csv_set, parquet_set = load_project_dataset(PENGUINS), load_project_dataset(tmp_path / "penguins")
    assert fingerprint(parquet_set.X, parquet_set.y) == fingerprint(csv_set.X, csv_set.y)


def test_init_infers_from_parquet_what_it_infers_from_the_csv(tmp_path: Path) -> None:
    directory = parquet_project(tmp_path / "penguins")
    (directory / PROJECT_FILE).unlink()
    (directory / "requirements.txt").unlink()
    data = directory / "data" / "penguins.parquet"
    command = [sys.executable, "-m", "app", "init", str(data), "--project", str(directory), "--target", "species"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    written = (directory / PROJECT_FILE).read_text()
    expected = (
        (PENGUINS / PROJECT_FILE)
        .read_text()
        .replace(
            'data = "data/penguins.csv"\n',
            'data = "data/penguins.parquet"\nrequirements = "requirements.txt"  # extra packages for the model image\n',
        )
    )
    assert written == expected
    assert (directory / "requirements.txt").read_text().startswith(f"{PARQUET_READER}  #")
    assert f"wrote {directory / 'requirements.txt'}" in result.stdout
    open_project(directory)  # what init wrote is a project that opens as it is


def test_parquet_types_become_the_text_a_csv_would_hold(tmp_path: Path) -> None:
    """Booleans, timestamps, dictionary strings, floats that are whole, nulls, NaN and the project's missing
    values in text columns: each as a CSV cell of it would read."""
    table = pa.table({
        "flag": pa.array([True, False, None] * 8),
        "when": pa.array([pd.Timestamp("2024-05-01T13:00:00Z")] * 24, type=pa.timestamp("us", tz="UTC")),
        "kind": pa.array(["a", "b", "NA"] * 8).dictionary_encode(),
        "size": pa.array([1.0, 2.5, float("nan")] * 8),
        "count": pa.array([3, None, 5] * 8, type=pa.int64()),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "mixed.parquet")
    frame = read_raw(tmp_path / "mixed.parquet")
    assert list(frame.columns) == ["flag", "when", "kind", "size", "count"]
    assert frame.iloc[:3].to_dict("list") == {
        "flag": ["true", "false", None],
        "when": ["2024-05-01T13:00:00+00:00"] * 3,
        "kind": ["a", "b", None],
        "size": ["1.0", "2.5", None],
        "count": ["3", None, "5"],
    }


def test_a_parquet_project_without_pyarrow_pinned_is_refused_naming_the_key(tmp_path: Path) -> None:
    directory = parquet_project(tmp_path / "penguins", pinned=False)
    with pytest.raises(ProjectError, match=rf"mlapi.toml: model.data: .*Parquet.* add {PARQUET_READER} .*model\.req"):
        open_project(directory)
    environment = {"MLAPI_MODEL_PROJECT": str(directory), "PATH": "/usr/bin:/bin"}
    served = subprocess.run([sys.executable, "-m", "app", "check"], cwd=ROOT, capture_output=True, text=True,
                            env=environment, timeout=120)  # fmt: skip
    assert served.returncode != 0 and PARQUET_READER in served.stderr and "Traceback" not in served.stderr


def test_without_pyarrow_the_error_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pq.write_table(pa.table({"x": list(range(30))}), tmp_path / "x.parquet")
    for module in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails, as in an image without it
    with pytest.raises(ProjectError, match=rf"x.parquet: a Parquet file needs pyarrow.*pip install {PARQUET_READER}"):
        read_raw(tmp_path / "x.parquet")


@pytest.mark.parametrize("body", [b"", b"PAR1 not really", b"species,island\nAdelie,Dream\n"])
def test_a_file_that_is_not_parquet_is_named(tmp_path: Path, body: bytes) -> None:
    (tmp_path / "broken.parquet").write_bytes(body)
    with pytest.raises(ProjectError, match=r"broken.parquet: not a readable Parquet file"):
        read_raw(tmp_path / "broken.parquet")


@pytest.mark.parametrize("data", ["data/penguins.feather", "data/penguins", "data/penguins.xlsx"])
def test_another_format_names_the_ones_read(tmp_path: Path, data: str) -> None:
    directory = parquet_project(tmp_path / "penguins")
    toml = (directory / PROJECT_FILE).read_text()
    (directory / PROJECT_FILE).write_text(toml.replace('"data/penguins.parquet"', f'"{data}"'))
    with pytest.raises(ProjectError, match=r"model\.data.*a CSV file \(\.csv\) or a Parquet file \(\.parquet, \.pq\)"):
        open_project(directory)


def test_parquet_from_an_https_url_is_fetched_and_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = parquet_project(tmp_path / "local")
    with https_files(tmp_path / "tls") as (url, served, certificate):
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate))
        served.files["/exports/penguins.parquet"] = (local / "data" / "penguins.parquet").read_bytes()
        remote = tmp_path / "remote"
        remote.mkdir()
        (remote / "requirements.txt").write_text(f"{PARQUET_READER}\n")
        toml = (local / PROJECT_FILE).read_text()
        (remote / PROJECT_FILE).write_text(toml.replace('"data/penguins.parquet"', f'"{url}/exports/penguins.parquet"'))
        _, data = open_project(remote, cache_dir=tmp_path / "cache")
    assert served.requests == ["/exports/penguins.parquet"]
    assert [path.suffix for path in (tmp_path / "cache").iterdir()] == [".parquet"]
    pd.testing.assert_frame_equal(data.features, open_project(local)[1].features)


def test_a_parquet_project_serves_the_answers_of_its_csv(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    bird = {"island": "Dream", "bill_length_mm": 46.1, "bill_depth_mm": 17.8, "flipper_length_mm": 196,
            "body_mass_g": None, "sex": "female", "year": 2008}  # fmt: skip
    answers = []
    for name, project in (("csv", PENGUINS), ("parquet", parquet_project(tmp_path / "penguins"))):
        service = make_client(model_project=project, data_dir=tmp_path / f"data-{name}")
        answer = service.post("/predict", json={"features": bird, "confidence": 0.9})
        assert answer.status_code == 200, answer.text
        answers.append(answer.json())
    assert answers[1]["label"] == answers[0]["label"] and answers[1]["prediction_set"] == answers[0]["prediction_set"]
    np.testing.assert_allclose(list(answers[1]["probabilities"].values()), list(answers[0]["probabilities"].values()))


def test_the_pyarrow_init_pins_is_the_one_the_tests_read_parquet_with() -> None:
    pins = [Requirement(line.split("#")[0]) for line in (ROOT / "requirements.in").read_text().splitlines()
            if line.startswith("pyarrow")]  # fmt: skip
    assert [f"{pin.name}{pin.specifier}" for pin in pins] == [PARQUET_READER]
    assert pa.__version__ == PARQUET_READER.split("==")[1]
