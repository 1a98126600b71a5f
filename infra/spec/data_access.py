"""A model project whose data needs credentials (s3://): the credentials reach the replicas as a swarm secret (each
retrain fetches the data), and the first version is trained by a one-shot swarm job with the same secret, network,
volume, user and limits as a replica, before the replicas start (an image never holds credentials, so the build
cannot train it)."""

from __future__ import annotations

from dataclasses import replace

from infra.spec.types import RestartPolicy, SecretFile, ServiceSpec

DATA_CREDENTIALS_SECRET = "mlapi-data-credentials"  # noqa: S105 — a secret's base name
DATA_CREDENTIALS_FILE = "data_credentials"  # /run/secrets/data_credentials in a task
FIRST_TRAINING_JOB = "mlapi-first-training"
FIRST_TRAINING_TIMEOUT_S = 1800  # a first version that trains longer is a project to train on a bigger machine


def credentials_file_text(access_key_id: str, secret_access_key: str, session_token: str | None = None) -> str:
    """An AWS credentials file (what app/datasource.py reads from MLAPI_DATA_CREDENTIALS_FILE)."""
    token = f"aws_session_token = {session_token}\n" if session_token else ""
    return f"[default]\naws_access_key_id = {access_key_id}\naws_secret_access_key = {secret_access_key}\n{token}"


def with_data_credentials(model: ServiceSpec, uid: int) -> ServiceSpec:
    """The model service reading the data's credentials from the swarm secret, and never asking a cloud's metadata
    service for others (a Hetzner VM has none, and the probe costs a timeout per fetch)."""
    return replace(
        model,
        env={
            **model.env,
            "MLAPI_DATA_CREDENTIALS_FILE": f"/run/secrets/{DATA_CREDENTIALS_FILE}",
            "AWS_EC2_METADATA_DISABLED": "true",
        },
        secrets=(*model.secrets, SecretFile(DATA_CREDENTIALS_SECRET, DATA_CREDENTIALS_FILE, uid)),
    )


def first_training_job(model: ServiceSpec, data_dir: str) -> ServiceSpec:
    """`python -m app train` into the data volume's registry as a replica would see it, run once to completion
    (swarm's replicated-job) where the volume is; a registry that has a version already is left as it is. It gets
    the data's credentials and nothing else of the replica's (no token, no database)."""
    kept = ("MLAPI_DATA_DIR", "MLAPI_PROCESS_LIMIT", "MLAPI_DATA_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED")
    return replace(
        model,
        name=FIRST_TRAINING_JOB,
        command=("python", "-m", "app", "train", "--into", data_dir),
        env={key: value for key, value in model.env.items() if key in kept},
        secrets=tuple(item for item in model.secrets if item.secret == DATA_CREDENTIALS_SECRET),
        labels={},
        healthcheck=None,
        replicas=1,
        restart=RestartPolicy(condition="none"),
        job=True,
        placement_prefs=(),
        max_replicas_per_node=None,
        constraints=("node.role==manager",),
    )
