"""Where the service's secrets and stores come from: the bearer tokens (a swarm secret, a variable, or generated
once), and the prediction log's store (SQLite on the data volume, or PostgreSQL when replicas span nodes)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

if TYPE_CHECKING:
    from app.pgregistry import SharedRegistry

from app.predlog import PredictionLog, Retention, SqliteLog
from app.registry import Registry, generated_once
from app.settings import Settings


class TokenError(RuntimeError):
    """A bearer token (admin or ingest) is unreadable, empty or short: refuse to start rather than fail open."""


MIN_TOKEN_LENGTH = 16


def load_token(settings: Settings, kind: str) -> str:
    """The ``kind`` ("admin" or "ingest") bearer token: from MLAPI_<KIND>_TOKEN, MLAPI_<KIND>_TOKEN_FILE (a swarm
    secret), or generated once into the data directory (<kind>-token).

    An empty or short token is a startup error, never "no authentication": an empty file (a full disk, a race) must
    not open /admin or /observations."""
    value: SecretStr | None = getattr(settings, f"{kind}_token")
    file: Path | None = getattr(settings, f"{kind}_token_file")
    variable = f"MLAPI_{kind.upper()}_TOKEN"
    if value is not None:
        token, source = value.get_secret_value().strip(), variable
    elif file is not None:
        try:
            token, source = file.read_text().strip(), str(file)
        except OSError as exc:
            raise TokenError(f"{variable}_FILE: cannot read {file}: {exc}") from exc
    else:
        generated = settings.data_dir / f"{kind}-token"
        token, source = generated_once(generated, lambda: secrets.token_urlsafe(32)), str(generated)
    if not token:
        raise TokenError(f"the {kind} token from {source} is empty: set a non-empty token")
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenError(f"the {kind} token from {source} is shorter than {MIN_TOKEN_LENGTH} characters")
    return token


class StoreConfigError(RuntimeError):
    """MLAPI_DATABASE_URL(_FILE) is unreadable or not a PostgreSQL URL."""


def database_url(settings: Settings) -> str | None:
    """PostgreSQL's URL from MLAPI_DATABASE_URL or MLAPI_DATABASE_URL_FILE (a swarm secret); None: SQLite."""
    if settings.database_url is not None:
        url, source = settings.database_url.get_secret_value().strip(), "MLAPI_DATABASE_URL"
    elif settings.database_url_file is not None:
        try:
            url, source = settings.database_url_file.read_text().strip(), str(settings.database_url_file)
        except OSError as exc:
            raise StoreConfigError(f"MLAPI_DATABASE_URL_FILE: cannot read {settings.database_url_file}: {exc}") from exc
    else:
        return None
    if not url.startswith(("postgresql://", "postgres://")):
        raise StoreConfigError(f"the database URL from {source} must start with postgresql:// (got {url[:13]!r}…)")
    return url


def open_stores(
    settings: Settings, on_drop: Callable[[int], None], store: str = "", trusted: frozenset[str] = frozenset()
) -> tuple[Registry | SharedRegistry, PredictionLog]:
    """The model registry and the prediction log: in PostgreSQL when a database URL is configured (replicas on
    several nodes; start-up waits for it; a model project's tables in a namespace of its own), else the file
    registry and SQLite in ``store`` under the data dir (a model project's own directory). The log is started."""
    retention = Retention(
        max_age_s=settings.log_retention_days * 86400,
        max_rows=settings.log_max_rows,
        min_free_bytes=settings.min_free_mb * 2**20,
    )
    queue_bytes = settings.log_queue_mb * 2**20
    url = database_url(settings)
    if url is None:
        directory = settings.data_dir / store
        directory.mkdir(parents=True, exist_ok=True)
        log = SqliteLog(directory / "predictions.sqlite3", queue_bytes, on_drop=on_drop, retention=retention)
        return Registry(directory, trusted), log.start()
    from app.pglog import PostgresLog, namespace_of, wait_for_database  # only where PostgreSQL is used
    from app.pgregistry import SharedRegistry

    wait_for_database(url, settings.database_wait_s)
    namespace = namespace_of(store)  # a project's tables in a namespace of their own, like its directory
    log = PostgresLog(url, queue_bytes, namespace=namespace, on_drop=on_drop, retention=retention)
    return SharedRegistry(url, namespace=namespace, trusted=trusted), log.start()
