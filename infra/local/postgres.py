"""PostgreSQL for replicas on several nodes: the swarm service's spec values, and the local image that stands in for
the official `postgres` image where no registry is reachable (the VM stand-ins, the two-node test).

The stand-in's entrypoint does what the official image's does for this stack, with the same environment: on an empty
PGDATA, `initdb` with POSTGRES_USER and the password from POSTGRES_PASSWORD_FILE, password (scram) authentication
for TCP, POSTGRES_DB created; then `postgres` in the foreground. Both run as uid 999 (the official image's
`postgres` user), so the data directory on the volume has one owner whichever image wrote it.
"""

from __future__ import annotations

from pathlib import Path

import docker

from infra.local.images import SUITE, content_hash, debootstrap_image, has_image, run_step
from infra.spec.postgres import POSTGRES_UID, POSTGRES_VERSION

ENTRYPOINT = f"""#!/bin/sh
# Stands in for the official postgres image's docker-entrypoint.sh (infra/local/postgres.py): same variables and result.
set -eu
BIN=/usr/lib/postgresql/{POSTGRES_VERSION}/bin
if [ "${{1:-postgres}}" != postgres ]; then exec "$@"; fi
[ $# -gt 0 ] && shift  # what follows `postgres` goes to the server, as in the official image
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA" && chmod 0700 "$PGDATA"
  "$BIN/initdb" -D "$PGDATA" --username="$POSTGRES_USER" --pwfile="$POSTGRES_PASSWORD_FILE" \\
    --auth-local=trust --auth-host=scram-sha-256 -E UTF8 >/dev/null
  echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  "$BIN/pg_ctl" -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  if [ "$POSTGRES_DB" != postgres ]; then "$BIN/createdb" -U "$POSTGRES_USER" "$POSTGRES_DB"; fi
  "$BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
  echo "initialized $PGDATA"
fi
exec "$BIN/postgres" -D "$PGDATA" "$@"
"""


# The socket directory as in the official image: its owner's, 3777 (a tmpfs mounted there takes this mode).
SOCKET_DIRECTORY = "mkdir -p /run/postgresql && chown postgres:postgres /run/postgresql && chmod 3777 /run/postgresql"


def _customize(rootfs: Path) -> None:
    """uid 999 for `postgres`, as in the official image (initdb needs a passwd entry for the running uid); the
    binaries on PATH; no default cluster; the socket directory; the entrypoint."""
    for command in (
        ["usermod", "-u", str(POSTGRES_UID), "postgres"],
        ["groupmod", "-g", str(POSTGRES_UID), "postgres"],
    ):
        run_step(["chroot", str(rootfs), *command], f"{command[0]} in the postgres image")
    run_step(["chroot", str(rootfs), "sh", "-c", "rm -rf /var/lib/postgresql/*"], "removing the default cluster")
    run_step(["chroot", str(rootfs), "sh", "-c", SOCKET_DIRECTORY], "the socket directory")
    bindir = rootfs / f"usr/lib/postgresql/{POSTGRES_VERSION}/bin"
    for binary in bindir.iterdir():
        link = rootfs / "usr/local/bin" / binary.name
        link.unlink(missing_ok=True)
        link.symlink_to(f"/usr/lib/postgresql/{POSTGRES_VERSION}/bin/{binary.name}")
    entrypoint = rootfs / "usr/local/bin/docker-entrypoint.sh"
    entrypoint.write_text(ENTRYPOINT)
    entrypoint.chmod(0o755)


def build_postgres(client: docker.DockerClient) -> str:
    packages = (f"postgresql-{POSTGRES_VERSION}",)
    inputs = content_hash(SUITE, *packages, ENTRYPOINT, SOCKET_DIRECTORY, str(POSTGRES_UID))
    tag = f"mlapi-postgres:{POSTGRES_VERSION}-{inputs}"
    if not has_image(client, tag):
        debootstrap_image(
            tag, packages, '["postgres"]', customize=_customize, entrypoint='["/usr/local/bin/docker-entrypoint.sh"]'
        )
    return tag
