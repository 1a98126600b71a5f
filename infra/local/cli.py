"""The local stack's command line: ``python -m infra.local {up,down,status,backup,restore}`` (the make targets).

Orchestration lives in infra/local/stack.py and infra/local/backup.py; this module parses arguments, prints status and
turns known failures into one-line errors.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import docker

from infra.local import backup as local_backup
from infra.local import images
from infra.local.engine import RolloutFailed
from infra.local.pebble import PEBBLE_CONTAINER, PebbleError
from infra.local.stack import LocalOptions, LocalStackError, down, engine, up
from infra.spec.docker_api import DOCKER_API_CONTAINER
from infra.spec.stack import MODEL_SERVICE, TRAEFIK_CONTAINER


def chosen_project(state_dir: Path, given: str | None) -> Path | None:
    """The model project to serve: the one given, else the one the last `up` was given (kept in the state dir, so
    a plain `make local-up` does not roll the stack back to the bundled model); `default` forgets it."""
    kept = state_dir / "model-project"
    if given is None:
        return Path(kept.read_text().strip()) if kept.is_file() else None
    return None if given == "default" else Path(given).resolve()


def remember_project(state_dir: Path, project: Path | None) -> None:
    """After an `up` that served it: the next plain `up` keeps serving this project."""
    kept = state_dir / "model-project"
    if project is None:
        kept.unlink(missing_ok=True)
    else:
        kept.write_text(f"{project}\n")


def status(options: LocalOptions | None = None) -> int:
    options = options or LocalOptions()
    client = engine()
    healthy = 0
    for name in (TRAEFIK_CONTAINER, DOCKER_API_CONTAINER, PEBBLE_CONTAINER):
        try:
            container = client.containers.get(name)
        except docker.errors.NotFound:
            print(f"{name:16} absent")
            continue
        health = container.attrs["State"].get("Health", {}).get("Status", "-")
        print(f"{name:16} {container.status:10} health={health}")
        healthy += container.status == "running"
    try:
        service = client.api.inspect_service(MODEL_SERVICE)
    except docker.errors.APIError:
        print(f"{MODEL_SERVICE:16} absent (no swarm service)")
    else:
        tasks = client.api.tasks(filters={"service": MODEL_SERVICE, "desired-state": "running"})
        running = sum(task["Status"]["State"] == "running" for task in tasks)
        wanted = service["Spec"]["Mode"]["Replicated"]["Replicas"]
        update = (service.get("UpdateStatus") or {}).get("State", "-")
        print(f"{MODEL_SERVICE:16} service    replicas={running}/{wanted} last-update={update}")
        healthy += running == wanted
    if healthy:
        print(f"url: https://{options.domain}:{options.https_port}  (CA root: {options.state_dir / 'pebble-root.pem'})")
    backups = local_backup.LocalBackupOptions.from_environment(options.backup_dir)
    print(f"backups: {local_backup.last_backup(options.data_root)}; repository {backups.where}")
    print("         `make local-backup`, `make local-restore [SNAPSHOT=<id>]`")
    return 0 if healthy == 4 else 1


def backup_or_restore(options: LocalOptions, command: str, snapshot: str = "latest") -> int:
    backups = local_backup.LocalBackupOptions.from_environment(options.backup_dir)
    client = engine()
    if command == "backup":
        if not (options.data_root / "model").is_dir():
            raise LocalStackError(f"nothing to back up: {options.data_root} holds no data (run `make local-up`)")
        print(local_backup.backup(client, backups, options.data_root, options.state_dir).strip())
        return 0
    ready = f"https://{options.domain}:{options.https_port}/ready"
    for line in local_backup.restore_and_check(client, backups, options.data_root, options.state_dir, snapshot, ready):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="build and start the stack, or roll out what changed (idempotent)")
    start.add_argument(
        "--model",
        help="a model project directory to serve; kept for the next `up` (`--model default`: the bundled model)",
    )
    stop = commands.add_parser("down", help="stop the stack, keep its data")
    stop.add_argument("--delete-data", action="store_true", help="also delete models, logs and certificates")
    commands.add_parser("status", help="show the containers, the service's replicas, the URL and the last backup")
    commands.add_parser("backup", help="snapshot the data into the local restic repository (or the one configured)")
    restore = commands.add_parser("restore", help="restore the data from a snapshot; the stack is stopped meanwhile")
    restore.add_argument("snapshot", nargs="?", default="latest", help="snapshot id (`restic snapshots`) or latest")
    args = parser.parse_args(argv)
    options = LocalOptions.from_environment()
    if args.command == "up":
        options = replace(options, model_project=chosen_project(options.state_dir, args.model))
    try:
        if args.command == "up":
            up(options)
            remember_project(options.state_dir, options.model_project)
            return 0
        if args.command == "down":
            down(options, delete_data=args.delete_data)
            return 0
        if args.command in ("backup", "restore"):
            return backup_or_restore(options, args.command, getattr(args, "snapshot", "latest"))
        return status(options)
    except (
        LocalStackError,
        images.BuildError,
        PebbleError,
        RolloutFailed,
        local_backup.LocalBackupError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
