"""The monitoring seen from inside the stack's overlay network, as an operator's tunnel would see it: Prometheus'
targets, and a webhook receiver (a tiny HTTP server in a container of ours) that records what Alertmanager sends."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import docker

from infra.local import images
from infra.spec.monitoring import PROMETHEUS_PORT, PROMETHEUS_SERVICE

RECEIVER = "mlapi-test-webhook"
RECEIVER_PORT = 8080
# One line per POST on stdout: the path, then the JSON body (re-encoded on one line).
RECEIVER_SCRIPT = (
    f"PORT = {RECEIVER_PORT}\n"
    """
import http.server, json, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            text = json.dumps(json.loads(body))
        except ValueError:
            text = json.dumps({"raw": body.decode(errors="replace")})
        sys.stdout.write(self.path + " " + text + "\\n")
        sys.stdout.flush()
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("", PORT), Handler).serve_forever()
"""
)


@dataclass
class WebhookReceiver:
    container: docker.models.containers.Container
    url: str

    def received(self) -> list[tuple[str, dict]]:
        """Every (path, body) posted so far, oldest first."""
        lines = self.container.logs(stdout=True, stderr=False).decode().splitlines()
        return [(path, json.loads(body)) for path, _, body in (line.partition(" ") for line in lines if line)]

    def alerts(self, name: str, status: str) -> list[dict]:
        """Alertmanager's notifications about alert ``name`` with ``status`` (firing | resolved)."""
        return [
            body
            for _, body in self.received()
            if body.get("status") == status and body.get("groupLabels", {}).get("alertname") == name
        ]


@contextlib.contextmanager
def webhook_receiver(client: docker.DockerClient, network: str) -> Iterator[WebhookReceiver]:
    with contextlib.suppress(docker.errors.NotFound):
        client.containers.get(RECEIVER).remove(force=True)
    container = client.containers.run(
        images.build_stack_images(client)["base"],  # all of them at once, as the stack's `up` builds them next
        ["python3", "-c", RECEIVER_SCRIPT],
        name=RECEIVER,
        network=network,
        detach=True,
    )
    try:
        yield WebhookReceiver(container, f"http://{RECEIVER}:{RECEIVER_PORT}/alerts")
    finally:
        container.remove(force=True)


def prometheus_query(client: docker.DockerClient, network: str, path: str) -> dict:
    """GET Prometheus' API at ``path`` from a throwaway container on the overlay (its port is published nowhere)."""
    script = (
        "import sys, urllib.request; "
        f"sys.stdout.write(urllib.request.urlopen('http://{PROMETHEUS_SERVICE}:{PROMETHEUS_PORT}{path}', "
        "timeout=10).read().decode())"
    )
    container = client.containers.run(
        images.build_base(client), ["python3", "-c", script], network=network, detach=True
    )
    try:
        exit_code = container.wait(timeout=60)["StatusCode"]
        output = container.logs(stdout=True, stderr=True).decode()
    finally:
        container.remove(force=True)
    if exit_code != 0:
        raise AssertionError(f"GET {path} from Prometheus failed: {output[-2000:]}")
    return json.loads(output)


def targets_by_job(client: docker.DockerClient, network: str) -> dict[str, list[str]]:
    """Each scrape job's targets' health (up, down, unknown)."""
    found: dict[str, list[str]] = {}
    for target in prometheus_query(client, network, "/api/v1/targets")["data"]["activeTargets"]:
        found.setdefault(target["labels"]["job"], []).append(target["health"])
    return found
