"""Helpers for tests that run real containers: engine detection, free ports, HTTPS to the local stack."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import pytest

from infra.local import stack as local
from infra.local.pebble import PEBBLE_CONTAINER
from infra.local.stack import LocalStack
from infra.spec.stack import MODEL_SERVICE

TIMINGS: list[str] = []  # printed at the end of the run (tests/conftest.py: pytest_terminal_summary)


def docker_engine() -> docker.DockerClient:
    """The engine, or a loud skip outside CI; in CI a missing engine is a failure, never a skip."""
    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except docker.errors.DockerException as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-stack tests but no Docker engine answers: {exc}")
        pytest.skip(f"SKIPPED LOUDLY: no Docker engine ({exc}); start dockerd to run the real-stack tests")
    return client


# Below the kernel's ephemeral range (32768-60999), where Docker also picks the host ports it publishes on its own:
# a port the kernel handed out here could be taken by another lane's container before the stack binds it ("port is
# already allocated", seen once in CI).
FREE_PORTS = range(20000, 32000)


def free_port() -> int:
    """A port free on 127.0.0.1 now, outside the range Docker and the kernel allocate from."""
    for port in random.sample(FREE_PORTS, 50):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {FREE_PORTS.start}-{FREE_PORTS.stop - 1} on 127.0.0.1")


def tls_context(stack: LocalStack) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(stack.ca_root))


def https(
    stack: LocalStack, method: str, path: str, body: Any = None, headers: dict | None = None, timeout: float = 30
) -> tuple[int, dict[str, str], bytes]:
    """A request to the stack over verified HTTPS, dialing 127.0.0.1 with the domain as SNI and Host."""
    domain, port = stack.options.domain, stack.options.https_port
    context = tls_context(stack)
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    connection = http.client.HTTPSConnection(domain, port, timeout=timeout, context=context)
    connection.sock = context.wrap_socket(raw, server_hostname=domain)
    payload = json.dumps(body).encode() if body is not None else None
    all_headers = {"Host": domain, **({"Content-Type": "application/json"} if payload else {}), **(headers or {})}
    try:
        connection.request(method, path, body=payload, headers=all_headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def peer_certificate(stack: LocalStack) -> dict:
    context = tls_context(stack)
    with (
        socket.create_connection(("127.0.0.1", stack.options.https_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=stack.options.domain) as tls,
    ):
        return tls.getpeercert()


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# Run inside the model container (`python -c`): how many predictions the log on the data volume holds.
COUNT_PREDICTIONS = (
    "import sqlite3; "
    "print(sqlite3.connect('/data/predictions.sqlite3').execute('select count(*) from predictions').fetchone()[0])"
)


def fresh_observations(n: int, seed: int) -> list[dict]:
    """New ground truth from the same process as the bundled data: rows near real ones, targets from a model fitted
    on all of it. Not equal or near to any row (the holdout is random per installation and quarantined)."""
    import numpy as np
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    data = load_diabetes()
    rng = np.random.default_rng(seed)
    truth = Ridge(alpha=0.01).fit(data.data, data.target)
    rows = data.data[rng.integers(0, len(data.data), n)] + rng.normal(0, 0.005, (n, data.data.shape[1]))
    return [
        {"features": dict(zip(data.feature_names, row.tolist(), strict=True)), "target": float(target)}
        for row, target in zip(rows, truth.predict(rows), strict=True)
    ]


def pin_holdout_seed(data_root: Path, seed: int = 42) -> None:
    """Before the first start: the installation's holdout split is this one, not a random draw (one draw in about
    eight is a split where more data from the same process does not lower the holdout RMSE, and a test's promotion
    must not depend on luck). The random default has its own test (tests/unit/test_retrain.py)."""
    seed_file = data_root / "model" / "holdout-seed"
    seed_file.parent.mkdir(parents=True, exist_ok=True)
    seed_file.write_text(str(seed))
    seed_file.chmod(0o644)


def promote_with_fresh_data(post: Callable[[list[dict]], int], retrain: Callable[[], dict], attempts: int = 6) -> dict:
    """Send fresh observations and retrain until a candidate is promoted. More data from the same process makes a
    better model on the pinned holdout (pin_holdout_seed); a few attempts cover an unlucky batch."""
    outcomes = []
    for attempt in range(attempts):
        assert post(fresh_observations(354, seed=attempt)) == 201
        outcome = retrain()
        if outcome["outcome"] == "promoted":
            return outcome
        outcomes.append(outcome["reason"])
    raise AssertionError(f"no promotion in {attempts} attempts: {outcomes}")


def pebble_orders(client, name: str = PEBBLE_CONTAINER) -> int:
    logs = client.containers.get(name).logs().decode(errors="replace")
    return len(re.findall(r"Added order", logs))


def tasks(client) -> list:
    return client.containers.list(filters={"label": f"com.docker.swarm.service.name={MODEL_SERVICE}"})


def app_command(stack: local.LocalStack, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`mlapi-app …` exactly as installed on the host (the script the deploy step writes), run on this host."""
    return subprocess.run(
        ["sh", "-s", *args], input=stack.spec.app_script, capture_output=True, text=True, timeout=timeout
    )


def promote(stack: local.LocalStack) -> dict:
    """Fresh ground truth through the edge with the ingest token, retrains by the host command, until promoted."""
    ingest = {"Authorization": f"Bearer {(stack.options.state_dir / 'ingest-token').read_text().strip()}"}
    return promote_with_fresh_data(
        lambda rows: https(stack, "POST", "/observations", {"observations": rows}, headers=ingest)[0],
        lambda: json.loads(app_command(stack, "retrain").stdout),
    )
