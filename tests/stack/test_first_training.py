"""The first version of a project whose data is an s3:// object, trained for real on this engine by the spec's
one-shot job (an image never holds the credentials, so the build cannot): through the host script the program sends
(infra/host/scripts/run-job.sh, `pulumi up`'s step) and through the local engine's run_job (`make local-up`, the
stand-in), against moto in a container on the stack's network checking every signature. The job gets the data's
swarm secret and nothing else of the replica's; a wrong key fails the deploy with the store's answer and trains
nothing; a second run keeps the version it finds."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import docker
import pytest

from infra.host.jobs import run_job_command
from infra.local import images
from infra.local.engine import ensure_network, ensure_secret, ensure_swarm, remove_unused_secrets, run_job
from infra.local.stack import prepare_host
from infra.spec.data_access import DATA_CREDENTIALS_SECRET, FIRST_TRAINING_JOB
from infra.spec.inputs import StackInputs
from infra.spec.stack import NETWORK, build_stack
from infra.spec.types import Mount
from testbed.stack import docker_engine
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
    remove_unused_secrets(client, DATA_CREDENTIALS_SECRET, keep="")


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
    # Only here: this S3 has its own CA, which the job is told to trust.
    job = replace(
        spec.first_training,
        env={**spec.first_training.env, "AWS_CA_BUNDLE": "/tls/cert.pem"},
        mounts=(*spec.first_training.mounts, Mount(str(s3.certificate.parent), "/tls", read_only=True)),
    )
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
