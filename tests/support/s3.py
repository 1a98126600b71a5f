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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

from testbed.stack import free_port, wait_until
from tests.support.https_files import self_signed

BUCKET = "model-data"
REGION = "eu-central-1"
# IAM calls made before moto starts checking signatures: two users, each with a policy and an access key.
SETUP_CALLS = 6


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    certificate: Path
    writer: Any  # a boto3 S3 client allowed everything on BUCKET
    reader_keys: dict[str, str]  # aws_access_key_id / aws_secret_access_key of a user allowed GetObject only

    def put(self, key: str, body: bytes) -> None:
        self.writer.put_object(Bucket=BUCKET, Key=key, Body=body)

    def credentials_file(self, path: Path, keys: dict[str, str] | None = None) -> Path:
        """An AWS credentials file with the reader's keys (or ``keys``)."""
        chosen = keys or self.reader_keys
        path.write_text("[default]\n" + "".join(f"{name} = {value}\n" for name, value in chosen.items()))
        path.chmod(0o600)
        return path


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


@contextmanager
def s3_server(directory: Path) -> Iterator[S3Server]:
    key, certificate = self_signed(directory)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            str(port),
            "-c",
            str(certificate),
            "-k",
            str(key),
        ],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_CALLS)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None, 30, "moto")
        endpoint = f"https://127.0.0.1:{port}"
        anyone = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup", "region_name": REGION}
        iam = boto3.client("iam", endpoint_url=endpoint, verify=str(certificate), **anyone)
        writer_keys = _user(iam, "data-writer", ["s3:*"])
        reader_keys = _user(iam, "model-service", ["s3:GetObject"])
        writer = boto3.client("s3", endpoint_url=endpoint, verify=str(certificate), region_name=REGION, **writer_keys)
        writer.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        yield S3Server(endpoint, certificate, writer, reader_keys)
    finally:
        server.terminate()
        server.wait(timeout=10)
