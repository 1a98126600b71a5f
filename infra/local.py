"""The production stack on a local Docker engine: ``python -m infra.local {up,down,status}`` (``make local-up``).

It runs the same spec as `pulumi up` (infra/spec.py → build_stack). The local differences, and only these
(tests/test_stack.py checks that nothing else differs):

- ACME: Pebble (Let's Encrypt's test CA) at https://pebble:14000/dir instead of Let's Encrypt, and Traefik trusts
  Pebble's listener CA (one extra read-only mount plus the `acme.cacertificates` flag);
- domain: api.localtest; Traefik carries it as a network alias so Pebble's validation reaches it;
- host ports: 127.0.0.1:8080/8443 instead of every interface on 80/443;
- images: built here (infra/images.py) instead of pulled or built on the VM;
- data root: .local/data instead of /srv/mlapi on the Hetzner volume.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import docker
from docker.types import Healthcheck, Mount

from infra import images
from infra.cloud_init import _prepare_host_script
from infra.smoke import wait_healthy
from infra.spec import (
    MODEL_CONTAINER,
    NETWORK,
    TRAEFIK_CONTAINER,
    ContainerSpec,
    StackInputs,
    StackSpec,
    build_stack,
)

PROJECT_DIR = Path(__file__).resolve().parents[1]
LOCAL_DIR = PROJECT_DIR / ".local"
PEBBLE_CONTAINER = "mlapi-pebble"
PEBBLE_DIRECTORY = "https://pebble:14000/dir"
HASH_LABEL = "mlapi.local.config-hash"  # lets `up` keep a container whose definition has not changed
NANOSECONDS = 1_000_000_000


class LocalStackError(RuntimeError):
    """The local stack cannot start; the message says what to do."""


@dataclass(frozen=True)
class LocalOptions:
    domain: str = "api.localtest"
    acme_email: str = "ops@example.com"
    http_port: int = 8080
    https_port: int = 8443
    data_root: Path = LOCAL_DIR / "data"
    state_dir: Path = LOCAL_DIR / "state"


@dataclass
class LocalStack:
    spec: StackSpec
    inputs: StackInputs
    options: LocalOptions
    ca_root: Path
    url: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def curl(self) -> str:
        o = self.options
        return (
            f"curl --cacert {shlex.quote(str(self.ca_root))} --resolve {o.domain}:{o.https_port}:127.0.0.1 "
            f"{self.url}/health"
        )


def engine() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except docker.errors.DockerException as exc:
        raise LocalStackError(
            f"no Docker engine answers ({exc}). Start one (e.g. `dockerd &` as root, or your Docker Desktop) "
            "and try again."
        ) from None
    return client


def local_inputs(options: LocalOptions, model_image: str, traefik_image: str, ca_bundle: Path) -> StackInputs:
    """Production inputs with exactly the documented local differences applied."""
    production = StackInputs(domain=options.domain, acme_email=options.acme_email)
    return production.model_copy(
        update={
            "acme_ca_server": PEBBLE_DIRECTORY,
            "acme_ca_bundle": str(ca_bundle),
            "publish_ips": ("127.0.0.1",),
            "http_port": options.http_port,
            "https_port": options.https_port,
            "traefik_aliases": (production.domain,),
            "model_image": model_image,
            "traefik_image": traefik_image,
            "data_root": str(options.data_root),
        }
    )


# -- Pebble -----------------------------------------------------------------------------------------------------
def pebble_files(state_dir: Path, extra_ips: tuple[str, ...] = ()) -> Path:
    """A throwaway CA and listener certificate for Pebble's own HTTPS API, plus its config (made once)."""
    directory = state_dir / "pebble"
    if (directory / "config.json").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    run = lambda *args: subprocess.run(args, cwd=directory, check=True, capture_output=True)  # noqa: E731
    run(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "3650",
        "-subj",
        "/CN=mlapi local Pebble listener CA",
    )
    run(
        "openssl",
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "key.pem",
        "-out",
        "cert.csr",
        "-subj",
        "/CN=pebble",
    )
    names = ["DNS:pebble", f"DNS:{PEBBLE_CONTAINER}", "DNS:localhost", "IP:127.0.0.1"]
    names += [f"IP:{ip}" for ip in extra_ips]
    (directory / "san.ext").write_text(f"subjectAltName={','.join(names)}\n")
    run(
        "openssl",
        "x509",
        "-req",
        "-in",
        "cert.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "3650",
        "-extfile",
        "san.ext",
    )
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (directory / name).chmod(0o644)  # read by Pebble's and Traefik's users inside their containers
    (directory / "config.json").write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": "0.0.0.0:14000",
                    "managementListenAddress": "0.0.0.0:15000",
                    "certificate": "/pebble/cert.pem",
                    "privateKey": "/pebble/key.pem",
                    "httpPort": 80,  # validation goes to the real ports Traefik listens on
                    "tlsPort": 443,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                }
            },
            indent=2,
        )
    )
    return directory


def fetch_pebble_root(
    client: docker.DockerClient, pebble_dir: Path, target: Path, timeout: float = 60, name: str = PEBBLE_CONTAINER
) -> Path:
    """Pebble makes a new root at every start: fetch it from its management API after each start."""
    container = client.containers.get(name)
    context = ssl.create_default_context(cafile=str(pebble_dir / "ca.pem"))
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        container.reload()
        bindings = container.attrs["NetworkSettings"]["Ports"].get("15000/tcp") or []
        if bindings:
            url = f"https://127.0.0.1:{bindings[0]['HostPort']}/roots/0"
            try:
                with urllib.request.urlopen(url, context=context, timeout=5) as response:
                    target.write_bytes(response.read())
                    return target
            except OSError as exc:
                last = str(exc)
        time.sleep(0.2)
    raise LocalStackError(f"Pebble's root could not be fetched: {last}; see `docker logs {name}`")


def run_pebble(
    client: docker.DockerClient,
    image: str,
    pebble_dir: Path,
    network: str,
    *,
    name: str = PEBBLE_CONTAINER,
    ip: str | None = None,
):
    """Pebble on the stack's network as `pebble`; its management port is published on 127.0.0.1 only."""
    args = {
        "image": image,
        "command": ["-config", "/pebble/config.json", "-strict"],
        # No artificial validation delay, and no random nonce rejections: tests stay deterministic.
        "environment": {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"},
        "mounts": [Mount(target="/pebble", source=str(pebble_dir), type="bind", read_only=True)],
        "ports": {"15000/tcp": ("127.0.0.1", None)},
        "restart_policy": {"Name": "unless-stopped"},
        "network": network,
        "networking_config": {network: client.api.create_endpoint_config(aliases=["pebble"], ipv4_address=ip)},
    }
    return _ensure(
        client, name, _config_hash(args["command"], args["environment"], ip, client.images.get(image).id), args
    )


# -- containers -------------------------------------------------------------------------------------------------
def _config_hash(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _ensure(client: docker.DockerClient, name: str, digest: str, create: dict) -> docker.models.containers.Container:
    """Keep a running container whose definition is unchanged; otherwise replace it (idempotent `up`)."""
    try:
        existing = client.containers.get(name)
    except docker.errors.NotFound:
        existing = None
    if existing is not None:
        if existing.labels.get(HASH_LABEL) == digest:
            if existing.status != "running":
                existing.start()
            return existing
        existing.remove(force=True)
    create["labels"] = {**create.get("labels", {}), HASH_LABEL: digest}
    container = client.containers.create(name=name, detach=True, **create)
    container.start()
    return container


def container_create_args(client: docker.DockerClient, spec: ContainerSpec, network: str) -> dict:
    """One spec container as docker-py arguments: every field comes from the spec, nothing is added here."""
    check = spec.healthcheck
    ports: dict[str, list[tuple[str, int]]] = {}
    for port in spec.ports:
        ports.setdefault(f"{port.container_port}/tcp", []).append((port.host_ip, port.host_port))
    return {
        "image": spec.image,
        "command": list(spec.command),
        "environment": dict(spec.env),
        "labels": dict(spec.labels),
        "mounts": [Mount(target=m.target, source=m.source, type="bind", read_only=m.read_only) for m in spec.mounts],
        "ports": ports,
        "healthcheck": Healthcheck(
            test=list(check.test),
            interval=check.interval_s * NANOSECONDS,
            timeout=check.timeout_s * NANOSECONDS,
            retries=check.retries,
            start_period=check.start_period_s * NANOSECONDS,
        ),
        "restart_policy": {"Name": spec.restart},
        "network": network,
        "networking_config": {network: client.api.create_endpoint_config(aliases=list(spec.aliases))},
    }


def run_spec_container(client: docker.DockerClient, spec: ContainerSpec, network: str):
    args = container_create_args(client, spec, network)
    image_id = client.images.get(spec.image).id
    return _ensure(
        client,
        spec.name,
        _config_hash(
            args["command"],
            args["environment"],
            args["labels"],
            spec.mounts,
            spec.ports,
            spec.aliases,
            spec.healthcheck,
            spec.restart,
            image_id,
        ),
        args,
    )


def ensure_network(client: docker.DockerClient, name: str) -> None:
    try:
        client.networks.get(name)
    except docker.errors.NotFound:
        client.networks.create(name, driver="bridge")


def run_stack(client: docker.DockerClient, spec: StackSpec) -> None:
    """Deploy the spec's network and containers onto an engine: this machine's, or a host's over ssh://."""
    ensure_network(client, spec.network)
    for container_spec in spec.containers:
        run_spec_container(client, container_spec, spec.network)


def prepare_host(client: docker.DockerClient, spec: StackSpec, data_root: Path, base_image: str) -> None:
    """The cloud-init host-preparation script itself, run as root in a throwaway container (no sudo needed)."""
    data_root.mkdir(parents=True, exist_ok=True)
    script = _prepare_host_script(spec, str(data_root), volume_device=None)
    client.containers.run(
        base_image,
        ["sh", "-c", script],
        remove=True,
        mounts=[Mount(target=str(data_root), source=str(data_root), type="bind")],
    )


def up(options: LocalOptions | None = None, *, quiet: bool = False) -> LocalStack:
    options = options or LocalOptions()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    client = engine()
    started = time.monotonic()
    say("building images (cached after the first run)…")
    base = images.build_base(client)
    built = {
        "traefik": images.build_traefik(client),
        "pebble": images.build_pebble(client, base),
        "model": images.build_model(client, base),
    }
    images_ready = time.monotonic()

    options.state_dir.mkdir(parents=True, exist_ok=True)
    pebble_dir = pebble_files(options.state_dir)
    inputs = local_inputs(options, built["model"], built["traefik"], pebble_dir / "ca.pem")
    spec = build_stack(inputs)
    ensure_network(client, spec.network)
    run_pebble(client, built["pebble"], pebble_dir, spec.network)
    ca_root = fetch_pebble_root(client, pebble_dir, options.state_dir / "pebble-root.pem")
    # The root the certificates in acme.json chain to, recorded after the last verified start.
    store_root = options.state_dir / "acme-store-root.pem"
    if not store_root.exists() or store_root.read_bytes() != ca_root.read_bytes():
        # Pebble makes a new root at every start (after `local-down`, a reboot): certificates Traefik kept chain
        # to a root that no longer exists. Drop them and the Traefik serving them; it obtains a new certificate.
        with contextlib.suppress(docker.errors.NotFound):
            client.containers.get(TRAEFIK_CONTAINER).remove(force=True)
        remove_as_root(client, options.data_root, "traefik/acme.json")

    prepare_host(client, spec, options.data_root, base)
    run_stack(client, spec)

    url = f"https://{spec.domain}:{options.https_port}"
    ok, message = wait_healthy(
        f"{url}/health", attempts=240, delay=0.5, cacert=str(ca_root), connect_to="127.0.0.1", timeout=5
    )
    if not ok:
        logs = f"`docker logs {TRAEFIK_CONTAINER}`, `docker logs {PEBBLE_CONTAINER}`"
        raise LocalStackError(f"{message}\n(locally: {logs})")
    store_root.write_bytes(ca_root.read_bytes())
    finished = time.monotonic()
    stack = LocalStack(
        spec,
        inputs,
        options,
        ca_root,
        url,
        {
            "images_s": round(images_ready - started, 2),
            "stack_s": round(finished - images_ready, 2),
            "total_s": round(finished - started, 2),
        },
    )
    say(f"\nmlapi is up at {url} (Traefik with a certificate from Pebble, the local Let's Encrypt stand-in)")
    say(f"CA root saved at {ca_root}")
    say(f"try:  {stack.curl}")
    say('      add /docs, /model, or POST /predict with {"features": {...}}')
    say(
        f"timings: images {stack.timings['images_s']} s, stack to first verified HTTPS 200 "
        f"{stack.timings['stack_s']} s, total {stack.timings['total_s']} s"
    )
    return stack


def down(options: LocalOptions | None = None, *, delete_data: bool = False, quiet: bool = False) -> None:
    options = options or LocalOptions()
    client = engine()
    for name in (MODEL_CONTAINER, TRAEFIK_CONTAINER, PEBBLE_CONTAINER):
        with contextlib.suppress(docker.errors.NotFound):
            client.containers.get(name).remove(force=True)
    with contextlib.suppress(docker.errors.NotFound):
        client.networks.get(NETWORK).remove()
    if delete_data:
        delete_data_root(client, options.data_root)
        shutil.rmtree(options.state_dir, ignore_errors=True)
    if not quiet:
        print(
            "local stack stopped" + (" and its data deleted" if delete_data else f"; data kept in {options.data_root}")
        )


def remove_as_root(client: docker.DockerClient, directory: Path, relative: str) -> None:
    """rm -rf directory/relative, as root in a throwaway container: the files belong to the services' users."""
    if not directory.exists():
        return
    client.containers.run(
        images.build_base(client),
        ["rm", "-rf", f"/target/{relative}"],
        remove=True,
        mounts=[Mount(target="/target", source=str(directory), type="bind")],
    )


def delete_data_root(client: docker.DockerClient, data_root: Path) -> None:
    """Remove the data root itself, whatever its name (and nothing beside it)."""
    if data_root.exists():
        remove_as_root(client, data_root.parent, data_root.name)


def status(options: LocalOptions | None = None) -> int:
    options = options or LocalOptions()
    client = engine()
    running = 0
    for name in (TRAEFIK_CONTAINER, MODEL_CONTAINER, PEBBLE_CONTAINER):
        try:
            container = client.containers.get(name)
        except docker.errors.NotFound:
            print(f"{name:15} absent")
            continue
        health = container.attrs["State"].get("Health", {}).get("Status", "-")
        print(f"{name:15} {container.status:10} health={health}")
        running += container.status == "running"
    if running:
        print(f"url: https://{options.domain}:{options.https_port}  (CA root: {options.state_dir / 'pebble-root.pem'})")
    return 0 if running == 3 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="build and start the stack (idempotent)")
    stop = commands.add_parser("down", help="stop the stack, keep its data")
    stop.add_argument("--delete-data", action="store_true", help="also delete models, logs and certificates")
    commands.add_parser("status", help="show the containers and the URL")
    args = parser.parse_args(argv)
    options = LocalOptions(
        http_port=int(os.environ.get("MLAPI_LOCAL_HTTP_PORT", "8080")),
        https_port=int(os.environ.get("MLAPI_LOCAL_HTTPS_PORT", "8443")),
    )
    try:
        if args.command == "up":
            up(options)
            return 0
        if args.command == "down":
            down(options, delete_data=args.delete_data)
            return 0
        return status(options)
    except (LocalStackError, images.BuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
