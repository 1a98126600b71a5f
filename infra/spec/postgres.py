"""PostgreSQL's service values, free of Docker and Pulumi imports (the spec and the Pulumi program read them)."""

from __future__ import annotations

POSTGRES_VERSION = "15"  # Debian bookworm's; the official image is pinned to the same major version
POSTGRES_IMAGE = f"postgres:{POSTGRES_VERSION}-bookworm"
POSTGRES_UID = 999
POSTGRES_SERVICE = "mlapi-postgres"
POSTGRES_PORT = 5432
POSTGRES_USER = "mlapi"
POSTGRES_DB = "mlapi"
DATA_MOUNT = "/var/lib/postgresql/data"
PGDATA = f"{DATA_MOUNT}/pgdata"  # a directory of its own below the mount, as the official image recommends
# The server's socket directory, the images' default (the official entrypoint's own psql calls expect it there): a
# tmpfs, since the root filesystem is read-only.
SOCKET_DIR = "/var/run/postgresql"


def database_url(password: str) -> str:
    """What the replicas connect with (a swarm secret): the service's name on the overlay network."""
    return f"postgresql://{POSTGRES_USER}:{password}@{POSTGRES_SERVICE}:{POSTGRES_PORT}/{POSTGRES_DB}"
