"""The first version of a project whose data is an s3:// object, trained for real on this engine by the spec's
one-shot job (an image never holds the credentials, so the build cannot): through the host script the program sends
(infra/host/scripts/run-job.sh, `pulumi up`'s step) and through the local engine's run_job (`make local-up`, the
stand-in), against moto in a container on the stack's network checking every signature. The job gets the data's
swarm secret and nothing else of the replica's; a wrong key fails the deploy with the store's answer and trains
nothing; a second run keeps the version it finds. Then the model service starts from that version (no replica
trains) and a retrain, asked for the way the host's cron asks (`mlapi-app retrain`), fetches the object again with
the secret the replicas mount."""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import docker
import pytest

from infra.host.jobs import run_job_command
from infra.local import images
from infra.local.engine import (
    apply_service,
    ensure_network,
    ensure_secret,
    ensure_swarm,
    remove_service,
    remove_unused_secrets,
    run_job,
)
from infra.local.stack import prepare_host
from infra.spec.data_access import DATA_CREDENTIALS_SECRET, FIRST_TRAINING_JOB
from infra.spec.inputs import StackInputs
from infra.spec.stack import ADMIN_SECRET, INGEST_SECRET, MODEL_SERVICE, NETWORK, build_stack
from infra.spec.types import Mount, ServiceSpec
from testbed.stack import docker_engine
from tests.support.projects import EXAMPLES
from tests.support.s3 import S3Server, penguins_in_s3, s3_container

pytestmark = pytest.mark.stack
S3_ALIAS = "s3.mlapi.test"
Engine = tuple[docker.DockerClient, dict[str, str]]  # the client and the stack's images


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    client = docker_engine()
    ensure_swarm(client)
    ensure_network(client, NETWORK)
    yield client, images.build_stack_images(client)
    remove_service(client, MODEL_SERVICE)
    for base in (DATA_CREDENTIALS_SECRET, ADMIN_SECRET, INGEST_SECRET):
        remove_unused_secrets(client, base, keep="")


@pytest.fixture(scope="module")
def s3(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    client, built = engine
    with s3_container(client, built["model"], NETWORK, S3_ALIAS, tmp_path_factory.mktemp("s3-tls")) as server:
        yield server


def test_the_first_training_job_trains_from_s3_with_the_data_secret_only(
    engine: Engine, s3: S3Server, tmp_path: Path
) -> None:
    client, built = engine
    project = penguins_in_s3(tmp_path / "penguins", s3)
    image = images.build_project_image(client, built["model"], built["base"], project)  # trains nothing: s3 data
    data_root = tmp_path / "data"
    spec = build_stack(
        StackInputs(
            domain="api.mlapi.dev",
            acme_email="ops@mlapi.dev",
            data_credentials=True,
            model_image=image,
            data_root=str(data_root),
        )
    )
    prepare_host(client, spec, data_root, built["base"])
    assert spec.first_training is not None

    def trusting_s3(workload: ServiceSpec) -> ServiceSpec:
        """Only here: this S3 has its own CA, which the job and the replicas are told to trust."""
        return replace(
            workload,
            env={**workload.env, "AWS_CA_BUNDLE": "/tls/cert.pem"},
            mounts=(*workload.mounts, Mount(str(s3.certificate.parent), "/tls", read_only=True)),
        )

    job = trusting_s3(spec.first_training)
    registry = data_root / "model" / "projects"

    wrong = ensure_secret(
        client, DATA_CREDENTIALS_SECRET, s3.credentials_text({**s3.reader_keys, "aws_secret_access_key": "wrong"})
    )
    script = run_job_command(job, image, NETWORK, {DATA_CREDENTIALS_SECRET: wrong[1]}, 300)
    refused = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=400)
    said = refused.stdout + refused.stderr
    assert refused.returncode == 1, said
    assert "penguins/penguins.csv answered HTTP 403 SignatureDoesNotMatch" in said, said
    assert f"{FIRST_TRAINING_JOB} did not complete" in refused.stderr
    assert not registry.exists() or not any(registry.iterdir()), "a refused fetch trained something"

    right = ensure_secret(client, DATA_CREDENTIALS_SECRET, s3.credentials_text())
    output = run_job(client, job, NETWORK, {DATA_CREDENTIALS_SECRET: right}, 300)
    trained = json.loads(output[output.index("{") :])
    assert trained["version"] == "v0001" and trained["metrics"]["accuracy"] > 0.9, output
    [store] = list(registry.iterdir())
    assert store.name.startswith("penguins-")

    again = subprocess.run(
        ["sh", "-c", run_job_command(job, image, NETWORK, {DATA_CREDENTIALS_SECRET: right[1]}, 300)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert again.returncode == 0 and f"{FIRST_TRAINING_JOB}: complete" in again.stdout, again.stdout + again.stderr
    assert '"version": "v0001"' in again.stdout  # kept, not trained again
    assert not client.services.list(filters={"name": FIRST_TRAINING_JOB})  # each run removed its service

    # The replicas: they start from the job's version, and retrain from the object with the secret they mount.
    remove_service(client, MODEL_SERVICE)
    tokens = {ADMIN_SECRET: secrets.token_urlsafe(24), INGEST_SECRET: secrets.token_urlsafe(24)}
    mounted = {base: ensure_secret(client, base, value) for base, value in tokens.items()}
    model = replace(trusting_s3(spec.model), replicas=1)
    assert apply_service(client, model, NETWORK, {**mounted, DATA_CREDENTIALS_SECRET: right}).action == "created"
    logs = b"".join(client.services.get(MODEL_SERVICE).logs(stdout=True, stderr=True)).decode()
    assert "in the serving process" not in logs, logs[-2000:]

    def mlapi_app(*arguments: str) -> subprocess.CompletedProcess[str]:
        """The host's `mlapi-app` (spec.app_script), as cron runs it."""
        return subprocess.run(
            ["sh", "-s", "--", *arguments], input=spec.app_script, capture_output=True, text=True, timeout=600
        )

    versions = json.loads(mlapi_app("versions").stdout)
    assert versions["current"] == "v0001" and [v["version"] for v in versions["versions"]] == ["v0001"], versions
    fewer = b"".join((EXAMPLES / "penguins" / "data" / "penguins.csv").read_bytes().splitlines(keepends=True)[:300])
    s3.put("penguins/penguins.csv", fewer)
    retrained = mlapi_app("retrain")
    outcome = json.loads(retrained.stdout)
    assert outcome["data_sha256"] == hashlib.sha256(fewer).hexdigest(), retrained.stdout + retrained.stderr
    assert outcome["outcome"] in ("promoted", "rejected"), outcome
