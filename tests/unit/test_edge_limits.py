"""The edge's per-client limits with the real Traefik binary and real IPv6 clients: in a network namespace of the test's
own, several addresses of one /64 share one budget and another /64 has its own. The middlewares are the spec's own
labels (infra/spec/traefik.py), given to Traefik's file provider as the same keys."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from infra.local.images import traefik_binary
from infra.spec.inputs import StackInputs
from infra.spec.traefik import PREDICT_ROUTER, model_labels

SERVER = "fd00:64:9::1"  # Traefik and the backend
SAME_64 = ("fd00:64:1::1", "fd00:64:1::2", "fd00:64:1::ffff")  # one client's /64: three addresses
OTHER_64 = "fd00:64:2::1"
READY_PROBE = "fd00:64:3::1"  # its own /64: waiting for Traefik spends no budget the test counts
BURST = 3

CLIENT = """
import socket, sys
destination = sys.argv[1]
for source in sys.argv[2:]:
    with socket.create_connection((destination, 8080), timeout=5, source_address=(source, 0)) as connection:
        connection.sendall(b"GET /predict HTTP/1.1\\r\\nHost: api.test\\r\\nConnection: close\\r\\n\\r\\n")
        print(connection.recv(64).split(b" ")[1].decode(), flush=True)
"""

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 and os.environ.get("CI") != "true", reason="network namespaces need root (CI runs as root)"
)


def file_provider_config(labels: dict[str, str], router: str, backend: str) -> dict:
    """The middlewares of the spec's labels as Traefik's dynamic configuration (its label keys and file keys are one
    tree), and a router with the production chain of the prediction route minus retries and headers."""
    config: dict = {}
    for key, value in labels.items():
        if not key.startswith("traefik.http.middlewares."):
            continue
        node = config
        *parents, leaf = key.removeprefix("traefik.").split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    chain = labels[f"traefik.http.routers.{router}.middlewares"].split(",")
    config["http"]["routers"] = {
        "edge": {
            "rule": "PathPrefix(`/`)",
            "entryPoints": ["web"],
            "middlewares": [name for name in chain if not name.endswith(("-retry", "-headers"))],
            "service": "backend",
        }
    }
    config["http"]["services"] = {"backend": {"loadBalancer": {"servers": [{"url": backend}]}}}
    return config


def in_namespace(namespace: str, *command: str, **options: object) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", namespace, *command], check=True, **options)  # type: ignore[call-overload]


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[str]:
    namespace = f"mlapi-edge-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    processes: list[subprocess.Popen] = []
    try:
        in_namespace(namespace, "ip", "link", "set", "lo", "up")
        for address in (SERVER, *SAME_64, OTHER_64, READY_PROBE):
            in_namespace(namespace, "ip", "-6", "addr", "add", f"{address}/64", "dev", "lo", "nodad")
        labels = model_labels(
            StackInputs(domain="api.test", acme_email="ops@api.test", rate_limit_per_s=1, rate_limit_burst=BURST),
            "n",
            8081,
        )
        dynamic = tmp_path / "dynamic.yml"
        dynamic.write_text(yaml.safe_dump(file_provider_config(labels, PREDICT_ROUTER, f"http://[{SERVER}]:8081")))
        static = tmp_path / "traefik.yml"
        static.write_text(
            yaml.safe_dump(
                {
                    "entryPoints": {"web": {"address": f"[{SERVER}]:8080"}},
                    "providers": {"file": {"filename": str(dynamic)}},
                    "log": {"level": "ERROR"},
                }
            )
        )
        binary = tmp_path / "traefik"
        binary.write_bytes(traefik_binary())
        binary.chmod(0o755)
        (tmp_path / "www").mkdir()
        (tmp_path / "www" / "predict").write_text("ok")
        backend = ["ip", "netns", "exec", namespace, sys.executable, "-m", "http.server", "-b", SERVER, "8081"]
        processes.append(subprocess.Popen(backend, cwd=tmp_path / "www", stderr=subprocess.DEVNULL))
        log = (tmp_path / "traefik.log").open("w")
        command = ["ip", "netns", "exec", namespace, str(binary), f"--configFile={static}"]
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        (tmp_path / "client.py").write_text(CLIENT)
        deadline = time.monotonic() + 30
        while True:  # ready once a request goes through the whole chain to the backend
            probe = subprocess.run(
                ["ip", "netns", "exec", namespace, sys.executable, str(tmp_path / "client.py"), SERVER, READY_PROBE],
                capture_output=True,
                text=True,
            )
            if probe.stdout.strip() == "200":
                break
            assert time.monotonic() < deadline, (tmp_path / "traefik.log").read_text()
            time.sleep(0.3)
        time.sleep(1.5)  # the probes' bucket is their own; let every bucket start full
        yield namespace
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", namespace], check=False)


def requests_from(namespace: str, tmp_path: Path, *sources: str) -> list[str]:
    result = in_namespace(
        namespace, sys.executable, str(tmp_path / "client.py"), SERVER, *sources, capture_output=True, text=True
    )
    return result.stdout.split()


def test_addresses_of_one_ipv6_64_share_one_rate_budget(edge: str, tmp_path: Path) -> None:
    assert shutil.which("ip"), "iproute2"
    # The whole burst from three addresses of one /64, then one more from any of them: over the budget.
    sources = [SAME_64[i % len(SAME_64)] for i in range(BURST)] + [SAME_64[1]]
    assert requests_from(edge, tmp_path, *sources) == ["200"] * BURST + ["429"]
    assert requests_from(edge, tmp_path, OTHER_64) == ["200"]  # another /64: a budget of its own
