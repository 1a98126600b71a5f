"""A model project's data from an https:// or s3:// URL (``model.data``): fetched at start and at each retrain, bounded
in size and time, over verified TLS only, its content hash recorded with each version trained on it."""

from __future__ import annotations

import configparser
import hashlib
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
# An AWS credentials file ([default] aws_access_key_id, aws_secret_access_key, optional aws_session_token) for s3://
# data: a swarm secret in the stack (the replicas and the first-training job mount it). Unset: boto3's own chain (the
# environment, ~/.aws, a profile), which is what a laptop has.
CREDENTIALS_ENV = "MLAPI_DATA_CREDENTIALS_FILE"


class FetchError(RuntimeError):
    """The data could not be fetched; the message names the URL without its credentials and what went wrong."""


def is_url(value: str) -> bool:
    return "://" in value


def needs_credentials(url: str) -> bool:
    """Data read with credentials of the stack's own (an s3:// object), not from the URL alone."""
    return urllib.parse.urlsplit(url).scheme == "s3"


def redacted(url: str) -> str:
    """The URL without a user, password or query: presigned URLs carry their credentials there."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    hidden = " (query hidden)" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", "")) + hidden


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to another https:// URL: a downgrade to plain http would let anyone on the way change
    the training data."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme != "https":
            raise FetchError(f"{redacted(req.full_url)} redirects to {redacted(newurl)}, which is not https")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@dataclass(frozen=True)
class S3Location:
    """Where s3:// data is served from: AWS by default, or an S3-compatible store (``model.data_endpoint``, such as
    Hetzner's or Cloudflare's object storage, addressed path-style) in ``model.data_region``."""

    endpoint: str | None = None
    region: str | None = None


def fetch(url: str, destination: Path, *, max_bytes: int, timeout_s: float, s3: S3Location | None = None) -> str:
    """Download ``url`` to ``destination`` (replaced whole, or left as it was) and return the content's sha256.
    ``timeout_s`` bounds the whole download, not only each read."""
    if needs_credentials(url):
        return _fetch_s3(url, destination, max_bytes, timeout_s, s3 or S3Location())
    if urllib.parse.urlsplit(url).scheme != "https":
        raise FetchError(f"{redacted(url)}: only https:// and s3:// URLs are fetched")
    return _fetch_https(url, destination, max_bytes, timeout_s)


def _too_large(label: str, size: int, max_bytes: int) -> FetchError:
    return FetchError(f"{label} is {size / 2**20:.3g} MB, more than model.data_max_mb ({max_bytes / 2**20:.3g} MB)")


def _write_bounded(chunks: Iterator[bytes], destination: Path, label: str, max_bytes: int, timeout_s: float) -> str:
    """Write ``chunks`` beside ``destination``, then rename it into place; stop at ``max_bytes`` or after
    ``timeout_s`` (the whole download, not only each read). Returns the content's sha256."""
    deadline = time.monotonic() + timeout_s
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            digest, size = hashlib.sha256(), 0
            for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError(f"{label} is larger than model.data_max_mb ({max_bytes / 2**20:.3g} MB)")
                if time.monotonic() > deadline:
                    raise FetchError(f"{label} took longer than model.data_timeout_s ({timeout_s:g} s)")
                digest.update(chunk)
                out.write(chunk)
        os.replace(partial, destination)
        return digest.hexdigest()
    finally:
        Path(partial).unlink(missing_ok=True)


def _fetch_https(url: str, destination: Path, max_bytes: int, timeout_s: float) -> str:
    label = redacted(url)
    opener = urllib.request.build_opener(_HttpsOnlyRedirects())
    request = urllib.request.Request(url, headers={"User-Agent": "mlapi (model data)"})  # noqa: S310 (https only)
    try:
        with opener.open(request, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise _too_large(label, int(declared), max_bytes)
            return _write_bounded(iter(lambda: response.read(CHUNK), b""), destination, label, max_bytes, timeout_s)
    except urllib.error.HTTPError as exc:
        raise FetchError(f"{label} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, FetchError):
            raise reason from None
        raise FetchError(f"{label} cannot be reached: {reason}") from None
    except TimeoutError:
        raise FetchError(f"{label} did not answer within model.data_timeout_s ({timeout_s:g} s)") from None
    except OSError as exc:
        raise FetchError(f"{label}: {exc}") from None


def s3_object(url: str) -> tuple[str, str]:
    """The bucket and key of an s3:// URL; ValueError saying what is missing."""
    parts = urllib.parse.urlsplit(url)
    key = parts.path.lstrip("/")
    if not parts.netloc or not key or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: an S3 object is s3://<bucket>/<key>, with no query")
    return parts.netloc, urllib.parse.unquote(key)


def data_credentials(path: Path) -> dict[str, str]:
    """boto3's keyword arguments from an AWS credentials file's [default] section."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(path.read_text(), source=str(path))
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise FetchError(f"{CREDENTIALS_ENV}={path}: cannot be read as an AWS credentials file: {exc}") from None
    section = parser["default"] if parser.has_section("default") else {}
    missing = [key for key in ("aws_access_key_id", "aws_secret_access_key") if not section.get(key)]
    if missing:
        raise FetchError(f"{CREDENTIALS_ENV}={path}: the [default] section needs {' and '.join(missing)}")
    names = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
    return {name: section[name].strip() for name in names if section.get(name)}


def _fetch_s3(url: str, destination: Path, max_bytes: int, timeout_s: float, where: S3Location) -> str:
    import boto3  # only a project with s3:// data pays for importing it
    import botocore.config
    import botocore.exceptions

    label = redacted(url)
    bucket, key = s3_object(url)
    credentials_file = os.environ.get(CREDENTIALS_ENV)
    credentials = data_credentials(Path(credentials_file)) if credentials_file else {}
    config = botocore.config.Config(
        connect_timeout=min(timeout_s, 10),
        read_timeout=timeout_s,
        retries={"max_attempts": 2, "mode": "standard"},
        s3={"addressing_style": "path"} if where.endpoint else {},
        user_agent_extra="mlapi-model-data",
    )
    session = boto3.session.Session(region_name=where.region, **credentials)
    client = session.client("s3", endpoint_url=where.endpoint, config=config)
    body: Any = None
    try:
        answer = client.get_object(Bucket=bucket, Key=key)
        body = answer["Body"]
        if answer.get("ContentLength", 0) > max_bytes:
            raise _too_large(label, answer["ContentLength"], max_bytes)
        return _write_bounded(body.iter_chunks(CHUNK), destination, label, max_bytes, timeout_s)
    except botocore.exceptions.NoCredentialsError:
        raise FetchError(
            f"{label}: no credentials for S3: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile) here; "
            "on a stack, pulumi config set dataAccessKeyId <id> and pulumi config set --secret dataSecretAccessKey"
        ) from None
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        said = f"{error.get('Code', '')}: {error.get('Message', '')}"
        raise FetchError(f"{label} answered HTTP {status} {said}") from None
    except (botocore.exceptions.BotoCoreError, OSError) as exc:
        raise FetchError(f"{label} cannot be fetched: {exc}") from None
    finally:
        if body is not None:
            body.close()
