"""Data from an s3:// URL (``model.data``, with ``model.data_endpoint`` and ``model.data_region`` for an S3-compatible
store): fetched with the credentials in MLAPI_DATA_CREDENTIALS_FILE (else boto3's own chain) at start and at each
retrain, over verified TLS, bounded in size; its hash kept with each version; a refusal names the key and never a
secret. The image build leaves such a project's first version to the deploy's training job, which gets the
credentials as the replicas get them (a file: the swarm secret). The S3 here is moto's server, checking every
signature against IAM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.datasource import CREDENTIALS_ENV
from app.project import PROJECT_FILE, ProjectError, load_project
from tests.support.demand import PROJECT, demand_csv, sha
from tests.support.s3 import BUCKET, REGION, S3Server, s3_server
from tests.support.service import admin_headers

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def reader(s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The service's environment: the read-only user's credentials file, the server's CA, nothing else of AWS."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(s3.certificate))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-such-file"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-such-file"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    credentials = s3.credentials_file(tmp_path / "data-credentials")
    monkeypatch.setenv(CREDENTIALS_ENV, str(credentials))
    return credentials


def s3_project(directory: Path, s3: S3Server, key: str, more: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    where = f'data_endpoint = "{s3.endpoint}"\ndata_region = "{REGION}"\n{more}'
    (directory / PROJECT_FILE).write_text(PROJECT.format(url=f"s3://{BUCKET}/{key}", more=where))
    return directory


def test_s3_data_is_fetched_at_start_and_at_each_retrain(
    s3: S3Server, reader: Path, make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    first, second = demand_csv(300), demand_csv(400, seed=1)
    s3.put("daily/demand.csv", first)
    service = make_client(model_project=s3_project(tmp_path / "demand", s3, "daily/demand.csv"))
    card = service.get("/model").json()
    assert card["data_sha256"] == sha(first) and card["version"] == "v0001"

    s3.put("daily/demand.csv", second)
    outcome = service.post("/admin/retrain", headers=admin_headers()).json()
    assert outcome["outcome"] in ("promoted", "rejected"), outcome
    assert outcome["data_sha256"] == sha(second)


@pytest.mark.parametrize(
    ("key", "more", "credentials", "says"),
    [
        ("missing.csv", "", None, "s3://model-data/missing.csv answered HTTP 404 NoSuchKey"),
        ("demand.csv", "data_max_mb = 0.001\n", None, "MB, more than model.data_max_mb (0.000999 MB)"),
        ("demand.csv", "", "wrong-secret", "answered HTTP 403 SignatureDoesNotMatch"),
        ("demand.csv", "", "none", "no credentials for S3: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ("demand.csv", "", "empty", "the [default] section needs aws_access_key_id and aws_secret_access_key"),
        ("demand.csv", "", "untrusted", "cannot be fetched: SSL validation failed"),
    ],
)
def test_an_s3_fetch_that_fails_names_the_key_and_no_secret(
    s3: S3Server,
    reader: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    key: str,
    more: str,
    credentials: str | None,
    says: str,
) -> None:
    s3.put("demand.csv", demand_csv(2000))
    if credentials == "wrong-secret":
        s3.credentials_file(reader, {**s3.reader_keys, "aws_secret_access_key": "not-the-secret"})
    elif credentials == "none":
        monkeypatch.delenv(CREDENTIALS_ENV)
    elif credentials == "empty":
        reader.write_text("[default]\n")
    elif credentials == "untrusted":
        monkeypatch.delenv("AWS_CA_BUNDLE")
    with pytest.raises(ProjectError) as refused:
        load_project(s3_project(tmp_path / "demand", s3, key, more))
    message = str(refused.value)
    assert f"{PROJECT_FILE}: model.data: " in message and says in message, message
    assert s3.reader_keys["aws_secret_access_key"] not in message


@pytest.mark.parametrize(
    ("data", "more", "says"),
    [
        ("s3://model-data", "", "an S3 object is s3://<bucket>/<key>, with no query"),
        ("s3://model-data/d.csv?versionId=1", "", "an S3 object is s3://<bucket>/<key>, with no query"),
        ("s3://model-data/d.csv", 'data_endpoint = "http://minio.internal:9000"\n', "the S3 endpoint is an https URL"),
        ("s3://model-data/d.csv", 'data_endpoint = "https://s3.example.com/bucket"\n', "nothing after it"),
        ("data/d.csv", 'data_region = "eu-central-1"\n', "data_region apply to s3:// data only"),
        ("gs://bucket/d.csv", "", "gs:// is not fetched: use an https:// or s3:// URL"),
    ],
)
def test_an_inconsistent_s3_project_names_the_key(tmp_path: Path, data: str, more: str, says: str) -> None:
    directory = tmp_path / "demand"
    directory.mkdir()
    (directory / PROJECT_FILE).write_text(PROJECT.format(url=data, more=more))
    with pytest.raises(ProjectError, match="model") as refused:
        load_project(directory)
    assert says in str(refused.value), str(refused.value)


def test_the_image_build_leaves_s3_data_to_the_training_job_which_has_the_credentials(
    s3: S3Server, reader: Path, tmp_path: Path
) -> None:
    """The two commands of app/Dockerfile.project and of the deploy's training job (infra/spec/stack.py)."""
    body = demand_csv(300)
    s3.put("job/demand.csv", body)
    project = s3_project(tmp_path / "demand", s3, "job/demand.csv")
    env = {**os.environ, "MLAPI_MODEL_PROJECT": str(project), "MLAPI_DATA_DIR": str(tmp_path / "data")}
    env.pop(CREDENTIALS_ENV)

    def app(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app", *args], env=env, capture_output=True, text=True, cwd=REPO)

    at_build = app("train", "--at-build", "--into", str(tmp_path / "image"))
    assert at_build.returncode == 0, at_build.stderr
    assert "s3:// data needs credentials, which an image must never hold" in at_build.stderr
    assert not (tmp_path / "image").exists()

    job = app("train", "--into", str(tmp_path / "data"))
    assert job.returncode == 2 and "no credentials for S3" in job.stderr  # a job without the secret
    env[CREDENTIALS_ENV] = str(reader)
    job = app("train", "--into", str(tmp_path / "data"))
    assert job.returncode == 0, job.stderr
    assert json.loads(job.stdout)["version"] == "v0001"
    again = app("train", "--into", str(tmp_path / "data"))  # a second deploy: kept
    assert again.returncode == 0 and json.loads(again.stdout)["version"] == "v0001"


def test_init_infers_the_schema_of_an_s3_object_and_writes_where_it_is(
    s3: S3Server, reader: Path, tmp_path: Path
) -> None:
    """`python -m app init s3://…`: the object fetched once, as the service will, to infer the schema; mlapi.toml
    names the URL and the store, and the project it describes passes `check`."""
    s3.put("init/demand.csv", demand_csv(200))
    project = tmp_path / "demand"
    env = {**os.environ, "MLAPI_DATA_DIR": str(tmp_path / "data")}

    def app(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app", *args], env=env, capture_output=True, text=True, cwd=REPO)

    url = f"s3://{BUCKET}/init/demand.csv"
    nowhere = app("init", url, "--target", "demand")
    assert nowhere.returncode == 1 and "--project: name the directory mlapi.toml goes to" in nowhere.stderr
    written = app("init", url, "--project", str(project), "--target", "demand",
                  "--data-endpoint", s3.endpoint, "--data-region", REGION)  # fmt: skip
    assert written.returncode == 0, written.stderr
    toml = (project / PROJECT_FILE).read_text()
    assert f'data = "{url}"\ndata_endpoint = "{s3.endpoint}"\ndata_region = "{REGION}"\n' in toml, toml
    assert 'task = "regression"' in toml and '"temperature" = { type = "number" }' in toml
    assert '"weekday" = { type = "category", values = ["fri", "mon", "sat", "sun", "thu", "tue", "wed"] }' in toml
    env["MLAPI_MODEL_PROJECT"] = str(project)
    checked = app("check")
    assert checked.returncode == 0 and "demand: regression, 200 rows" in checked.stdout, checked.stderr
    missing = app("init", f"s3://{BUCKET}/init/none.csv", "--project", str(tmp_path / "other"), "--target", "demand",
                  "--data-endpoint", s3.endpoint, "--data-region", REGION)  # fmt: skip
    assert missing.returncode == 1 and "init/none.csv answered HTTP 404 NoSuchKey" in missing.stderr, missing.stderr
