"""A model project's data from an https:// URL (``model.data``): fetched at start and at each retrain, bounded in size
and time, over verified TLS only, its content hash recorded with each version trained on it."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

CHUNK = 1 << 20


class FetchError(RuntimeError):
    """The data could not be fetched; the message names the URL without its credentials and what went wrong."""


def is_url(value: str) -> bool:
    return "://" in value


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


def fetch(url: str, destination: Path, *, max_bytes: int, timeout_s: float) -> str:
    """Download ``url`` to ``destination`` (replaced whole, or left as it was) and return the content's sha256.
    ``timeout_s`` bounds the whole download, not only each read."""
    label = redacted(url)
    if urllib.parse.urlsplit(url).scheme != "https":
        raise FetchError(f"{label}: only https:// URLs are fetched")
    opener = urllib.request.build_opener(_HttpsOnlyRedirects())
    request = urllib.request.Request(url, headers={"User-Agent": "mlapi (model data)"})  # noqa: S310 (https only)
    deadline = time.monotonic() + timeout_s
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    try:
        with os.fdopen(handle, "wb") as out, opener.open(request, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                size_mb, limit_mb = int(declared) / 2**20, max_bytes / 2**20
                raise FetchError(f"{label} is {size_mb:.3g} MB, more than model.data_max_mb ({limit_mb:.3g} MB)")
            digest, size = hashlib.sha256(), 0
            while chunk := response.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError(f"{label} is larger than model.data_max_mb ({max_bytes / 2**20:.3g} MB)")
                if time.monotonic() > deadline:
                    raise FetchError(f"{label} took longer than model.data_timeout_s ({timeout_s:g} s)")
                digest.update(chunk)
                out.write(chunk)
        os.replace(partial, destination)
        return digest.hexdigest()
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
    finally:
        Path(partial).unlink(missing_ok=True)
