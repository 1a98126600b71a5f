"""Data from an https:// URL (``model.data``): fetched at start and at each retrain over verified TLS, bounded in size
and time, its hash kept with each version and each retrain; a failed fetch keeps the served model and says so; a
restart while the data's host is down serves from the copy fetched last; credentials in the URL never reach a
message."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.data import DatasetError, load_project_dataset, refetched
from app.project import PROJECT_FILE, ProjectError, load_project
from app.registry import Registry
from app.settings import Settings
from app.training import development_and_holdout
from tests.support.demand import PROJECT, demand_csv, sha
from tests.support.https_files import Served, https_files
from tests.support.service import admin_headers, metric_value


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Served]]:
    with https_files(tmp_path / "tls") as (url, served, certificate):
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate))  # the fetch verifies: this is the server's own CA
        yield url, served


def project_at(directory: Path, url: str, more: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / PROJECT_FILE).write_text(PROJECT.format(url=url, more=more))
    return directory


def test_the_data_is_fetched_at_start_and_at_each_retrain(
    server: tuple[str, Served], make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    url, served = server
    first, second = demand_csv(300), demand_csv(400, seed=1)
    served.files["/demand.csv"] = first
    service = make_client(model_project=project_at(tmp_path / "demand", f"{url}/demand.csv"))
    card = service.get("/model").json()
    assert card["data_sha256"] == sha(first)
    assert served.requests == ["/demand.csv"]

    served.files["/demand.csv"] = second
    outcome = service.post("/admin/retrain", headers=admin_headers()).json()
    assert served.requests == ["/demand.csv", "/demand.csv"]
    assert outcome["outcome"] in ("promoted", "rejected"), outcome
    assert outcome["data_sha256"] == sha(second)
    if outcome["outcome"] == "promoted":
        assert service.get("/model").json()["data_sha256"] == sha(second)


def test_a_failed_fetch_keeps_the_served_model_and_says_so(
    server: tuple[str, Served], make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    url, served = server
    served.files["/demand.csv"] = demand_csv(300)
    service = make_client(model_project=project_at(tmp_path / "demand", f"{url}/demand.csv?X-Amz-Signature=s3cr3t"))
    served.status["/demand.csv"] = (503, "")
    outcome = service.post("/admin/retrain", headers=admin_headers()).json()
    assert outcome["outcome"] == "failed"
    assert f"{url}/demand.csv (query hidden) answered HTTP 503" in outcome["reason"]
    assert outcome["reason"].endswith("v0001 keeps serving") and "s3cr3t" not in outcome["reason"]
    answer = service.post("/predict", json={"features": {"temperature": 20.0, "weekday": "mon"}})
    assert answer.status_code == 200 and answer.json()["model_version"] == "v0001"
    assert metric_value(service.get("/metrics").text, "mlapi_retrains_total", outcome="failed") == 1.0


def test_a_restart_while_the_host_is_down_serves_the_copy_fetched_last(
    server: tuple[str, Served], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, served = server
    body = demand_csv(300)
    served.files["/demand.csv"] = body
    directory = project_at(tmp_path / "demand", f"{url}/demand.csv")
    cache = tmp_path / "data" / "data-cache"
    load_project_dataset(directory, cache)
    served.status["/demand.csv"] = (502, "")
    with caplog.at_level(logging.WARNING, logger="app.project"):
        restarted = load_project_dataset(directory, cache)
    assert restarted.data_sha256 == sha(body)
    assert "answered HTTP 502 Bad Gateway; serving from the copy fetched at" in caplog.text
    with pytest.raises(DatasetError, match=r"model.data: https://127.0.0.1:\d+/demand.csv answered HTTP 502"):
        load_project_dataset(directory, tmp_path / "a-new-volume")  # nothing fetched before: nothing to serve
    with pytest.raises(DatasetError, match=r"answered HTTP 502"):  # a retrain never trains on a stale copy
        refetched(restarted, directory, cache)


@pytest.mark.parametrize(
    ("more", "status", "delay_s", "says"),
    [
        ("data_max_mb = 0.001\n", None, 0.0, "MB, more than model.data_max_mb (0.000999 MB)"),
        ("data_timeout_s = 0.3\n", None, 0.1, "took longer than model.data_timeout_s (0.3 s)"),
        ("", (404, ""), 0.0, "answered HTTP 404 Not Found"),
        (
            "",
            (302, "http://127.0.0.1:9/demand.csv"),
            0.0,
            "redirects to http://127.0.0.1:9/demand.csv, which is not https",
        ),
    ],
)
def test_a_fetch_that_cannot_be_trusted_names_the_key(
    server: tuple[str, Served], tmp_path: Path, more: str, status: tuple[int, str] | None, delay_s: float, says: str
) -> None:
    url, served = server
    served.files["/demand.csv"] = demand_csv(2000)
    if status:
        served.status["/demand.csv"] = status
    served.delay_s = delay_s
    with pytest.raises(ProjectError) as refused:
        load_project(project_at(tmp_path / "demand", f"{url}/demand.csv", more))
    assert f"{PROJECT_FILE}: model.data: " in str(refused.value) and says in str(refused.value), str(refused.value)
    assert not list((Path("/tmp") / "mlapi-data").glob(".*.csv.*")), "a partial download was left behind"


def test_an_untrusted_certificate_is_refused(
    server: tuple[str, Served], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, served = server
    served.files["/demand.csv"] = demand_csv(300)
    monkeypatch.delenv("SSL_CERT_FILE")
    with pytest.raises(ProjectError, match=r"cannot be reached: .*CERTIFICATE_VERIFY_FAILED"):
        load_project(project_at(tmp_path / "demand", f"{url}/demand.csv"))


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://data.internal/d.csv", "plain http can be changed on the way: use https"),
        ("ftp://data:s3cr3t@files.internal/d.csv", "ftp:// is not fetched: use an https:// or s3:// URL"),
        ("data/d.feather", "data must be a CSV file (.csv) or a Parquet file (.parquet, .pq) in the project"),
    ],
)
def test_a_data_url_that_is_not_https_names_the_fix(tmp_path: Path, url: str, says: str) -> None:
    with pytest.raises(ProjectError) as refused:
        load_project(project_at(tmp_path / "demand", url))
    assert "model.data" in str(refused.value) and says in str(refused.value) and "s3cr3t" not in str(refused.value)


def test_rows_held_out_the_first_time_never_train_after_a_refetch(server: tuple[str, Served], tmp_path: Path) -> None:
    url, served = server
    served.files["/demand.csv"] = demand_csv(300)
    directory = project_at(tmp_path / "demand", f"{url}/demand.csv")
    settings = Settings(data_dir=tmp_path / "data", model_project=directory)
    dataset = load_project_dataset(directory, tmp_path / "cache")
    registry = Registry(tmp_path / "registry")
    _, holdout = development_and_holdout(settings, dataset, registry)

    served.files["/demand.csv"] = demand_csv(
        300, order=np.random.default_rng(5).permutation(300)
    )  # same rows, shuffled
    fresh = refetched(dataset, directory, tmp_path / "cache")
    development, judged_on = development_and_holdout(settings, fresh, registry)
    assert np.array_equal(judged_on.X, holdout.X)  # the fixed holdout
    assert len(development) == 300 - len(holdout)
    together = {row.tobytes() for row in np.column_stack([development.X, development.y])}
    assert not any(row.tobytes() in together for row in np.column_stack([holdout.X, holdout.y]))


def test_a_refetch_with_another_schema_is_refused_naming_what_changed(
    server: tuple[str, Served], tmp_path: Path
) -> None:
    url, served = server
    served.files["/demand.csv"] = demand_csv(300)
    directory = project_at(tmp_path / "demand", f"{url}/demand.csv")
    dataset = load_project_dataset(directory, tmp_path / "cache")
    served.files["/demand.csv"] = demand_csv(300).replace(b",mon,", b",holiday,")
    with pytest.raises(DatasetError, match=r"'holiday' in .* is not a category"):
        refetched(dataset, directory, tmp_path / "cache")
