"""An S3 endpoint on 127.0.0.1 for s3:// model data: moto's server over TLS (its own certificate), in a process of
its own, checking every request's signature against IAM after the setup: one user may write the bucket, the other
(the service's) may only read it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import boto3

from testbed.stack import free_port, wait_until
from tests.support.https_files import self_signed
from tests.support.projects import DATA_LINE, EXAMPLES, penguins_with_code

BUCKET = "model-data"
REGION = "eu-central-1"
# IAM calls made before moto starts checking signatures: two users, each with a policy and an access key.
SETUP_CALLS = 6
CONTAINER_PORT = 9443


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    certificate: Path
    writer: Any  # a boto3 S3 client allowed everything on BUCKET
    reader_keys: dict[str, str]  # aws_access_key_id / aws_secret_access_key of a user allowed GetObject only

    def put(self, key: str, body: bytes) -> None:
        self.writer.put_object(Bucket=BUCKET, Key=key, Body=body)

    def credentials_text(self, keys: dict[str, str] | None = None) -> str:
        """An AWS credentials file's text with the reader's keys (or ``keys``)."""
        chosen = keys or self.reader_keys
        return "[default]\n" + "".join(f"{name} = {value}\n" for name, value in chosen.items())

    def credentials_file(self, path: Path, keys: dict[str, str] | None = None) -> Path:
        """An AWS credentials file with the reader's keys (or ``keys``)."""
        path.write_text(self.credentials_text(keys))
        path.chmod(0o600)
        return path


def penguins_in_s3(directory: Path, server: S3Server, endpoint: str | None = None) -> Path:
    """``examples/penguins`` with its data uploaded to the bucket and read from there (``endpoint``: the one the
    project names, if not the server's address as seen from here)."""
    server.put("penguins/penguins.csv", (EXAMPLES / "penguins" / "data" / "penguins.csv").read_bytes())
    project = penguins_with_code(directory, {}, "")
    text = (project / "mlapi.toml").read_text()
    s3_data = (
        f'data = "s3://{BUCKET}/penguins/penguins.csv"\ndata_endpoint = "{endpoint or server.endpoint}"\n'
        f'data_region = "{REGION}"\n'
    )
    (project / "mlapi.toml").write_text(text.replace(DATA_LINE, s3_data))
    (project / "data" / "penguins.csv").unlink()  # the bucket's copy is the only one
    return project


def _user(iam: Any, name: str, actions: list[str]) -> dict[str, str]:
    iam.create_user(UserName=name)
    statement = {
        "Effect": "Allow",
        "Action": actions,
        "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"],
    }
    iam.put_user_policy(
        UserName=name, PolicyName="data", PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [statement]})
    )
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}


def _prepared(endpoint: str, certificate: Path) -> S3Server:
    """The two users and the bucket, made in the calls moto takes unsigned (SETUP_CALLS)."""
    anyone = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup", "region_name": REGION}
    iam = boto3.client("iam", endpoint_url=endpoint, verify=str(certificate), **anyone)
    writer_keys = _user(iam, "data-writer", ["s3:*"])
    reader_keys = _user(iam, "model-service", ["s3:GetObject"])
    writer = boto3.client("s3", endpoint_url=endpoint, verify=str(certificate), region_name=REGION, **writer_keys)
    writer.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    return S3Server(endpoint, certificate, writer, reader_keys)


def _listening(port: int) -> None:
    wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None, 30, "moto")


@contextmanager
def s3_server(directory: Path) -> Iterator[S3Server]:
    """moto in a process of this machine, on 127.0.0.1."""
    key, certificate = self_signed(directory)
    port = free_port()
    moto_server = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(
        [*moto_server, "-c", str(certificate), "-k", str(key)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_CALLS)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _listening(port)
        yield _prepared(f"https://127.0.0.1:{port}", certificate)
    finally:
        server.terminate()
        server.wait(timeout=10)


@contextmanager
def s3_container(client: Any, image: str, network: str, alias: str, directory: Path) -> Iterator[S3Server]:
    """moto in a container of ``image`` (a Python 3.11 with a venv at /opt/venv: the model image) on ``network`` as
    ``alias``:CONTAINER_PORT, with this venv's packages (moto's) mounted read-only, published on 127.0.0.1 for the
    setup. Its certificate names both."""
    import moto

    key, certificate = self_signed(directory, (alias,))
    directory.chmod(0o755)
    key.chmod(0o644)  # read by the container's user
    port = free_port()
    container = client.containers.run(
        image,
        ["/opt/venv/bin/python", "-m", "moto.server", "-H", "0.0.0.0", "-p", str(CONTAINER_PORT),
         "-c", "/tls/cert.pem", "-k", "/tls/key.pem"],
        entrypoint=[],
        detach=True,
        name=f"mlapi-test-s3-{port}",
        # Path-style only: moto would read the first label of its alias as a bucket name.
        environment={"PYTHONPATH": "/moto-site", "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_CALLS),
                     "S3_IGNORE_SUBDOMAIN_BUCKETNAME": "true"},
        volumes={str(Path(moto.__file__).parents[1]): {"bind": "/moto-site", "mode": "ro"},
                 str(directory): {"bind": "/tls", "mode": "ro"}},
        ports={f"{CONTAINER_PORT}/tcp": ("127.0.0.1", port)},
        network=network,
    )  # fmt: skip
    try:
        client.api.disconnect_container_from_network(container.id, network)
        client.api.connect_container_to_network(container.id, network, aliases=[alias])
        _listening(port)
        server = _prepared(f"https://127.0.0.1:{port}", certificate)
        yield replace(server, endpoint=f"https://{alias}:{CONTAINER_PORT}")
    finally:
        container.remove(force=True)
