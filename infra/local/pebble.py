"""Pebble, Let's Encrypt's test CA, as the local stand-in for Let's Encrypt (Debian's `pebble` package).

A throwaway CA for Pebble's own HTTPS listener is made once; Pebble makes a new root for the certificates it issues
at every start, so that root is fetched from its management API after each start.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import docker
from docker.types import Mount

from infra.local.engine import config_hash, ensure_container

PEBBLE_CONTAINER = "mlapi-pebble"
PEBBLE_DIRECTORY = "https://pebble:14000/dir"


class PebbleError(RuntimeError):
    """Pebble did not come up; the message says where to look."""


def pebble_files(
    state_dir: Path,
    validation_ports: tuple[int, int],
    extra_ips: tuple[str, ...] = (),
    names: tuple[str, ...] = ("pebble", PEBBLE_CONTAINER),
) -> Path:
    """A throwaway CA and listener certificate for Pebble's own HTTPS API (made once), and its config: validation
    goes to ``validation_ports`` (HTTP, TLS) where Pebble reaches Traefik (its container's ports, or the host's)."""
    directory = state_dir / "pebble"
    if (directory / "key.pem").exists():
        for name in ("ca.key", "key.pem"):  # a state dir from before the keys were made private
            (directory / name).chmod(0o600)
        _write_config(directory, validation_ports)
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
    sans = [*(f"DNS:{name}" for name in names), "DNS:localhost", "IP:127.0.0.1", *(f"IP:{ip}" for ip in extra_ips)]
    (directory / "san.ext").write_text(f"subjectAltName={','.join(sans)}\n")
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
    for name in ("ca.pem", "cert.pem"):
        (directory / name).chmod(0o644)  # public: Traefik's container trusts ca.pem
    for name in ("ca.key", "key.pem"):
        (directory / name).chmod(0o600)  # private keys: only their owner (Pebble runs as root in its container)
    _write_config(directory, validation_ports)
    return directory


def _write_config(directory: Path, validation_ports: tuple[int, int]) -> None:
    http_port, tls_port = validation_ports
    (directory / "config.json").write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": "0.0.0.0:14000",
                    "managementListenAddress": "0.0.0.0:15000",
                    "certificate": "/pebble/cert.pem",
                    "privateKey": "/pebble/key.pem",
                    "httpPort": http_port,
                    "tlsPort": tls_port,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                }
            },
            indent=2,
        )
    )


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
    raise PebbleError(f"Pebble's root could not be fetched: {last}; see `docker logs {name}`")


def run_pebble(
    client: docker.DockerClient,
    image: str,
    pebble_dir: Path,
    network: str,
    *,
    name: str = PEBBLE_CONTAINER,
    ip: str | None = None,
    alias: str = "pebble",
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
        "networking_config": {network: client.api.create_endpoint_config(aliases=[alias], ipv4_address=ip)},
    }
    config = (pebble_dir / "config.json").read_text()
    return ensure_container(
        client, name, config_hash(args["command"], args["environment"], ip, config, client.images.get(image).id), args
    )
