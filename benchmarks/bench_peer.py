"""Ours against MLServer, the Open Inference Protocol server a user would pick instead: same machine, same pipeline
(the default diabetes ridge), one process each, the same loads, measured in one run (issue 28: p1, p2, p4). Not a
test; prints numbers and ratios.

    python -m benchmarks.bench_peer [--seconds 10]

Ours is ``python -m app serve`` with everything on (intervals, OOD flags, the prediction log); MLServer is
``mlserver start`` with mlserver-sklearn from its own venv (``make .venv-peers``, requirements-peers.txt) and
``parallel_workers: 0`` (its worker pool dies on start with uvloop 0.23: "There is no current event loop"). Single
rows: hey (Debian) with 8 connections for a fixed time, ours ``POST /predict`` and MLServer's V2 infer with a
``[1, 10]`` FP64 tensor. Batches: 10,000 rows a call from one client for a fixed time, ours ``/predict/columns`` and
MLServer's V2 ``[10000, 10]``. Memory: each process's RSS after both loads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import joblib
import numpy as np
from sklearn.datasets import load_diabetes

from app.estimators import build_estimator
from benchmarks.bench_service import free_port, wait_ready

PROJECT_DIR = Path(__file__).resolve().parents[1]
PEERS_VENV = PROJECT_DIR / ".venv-peers"
CONNECTIONS = 8
BATCH_ROWS = 10_000
GOALS = {"p1": ("single-row req/s, ours ÷ MLServer", 1.5, "≥"), "p2": ("10k-row rows/s, ours ÷ MLServer", 1.0, "≥")}
GOALS["p2 V2"] = ("10k-row rows/s, ours V2 JSON ÷ MLServer", 1.0, "≥")
GOALS["p4"] = ("RSS after the loads, ours ÷ MLServer", 0.75, "≤")


def hey(url: str, body: Path, seconds: float) -> float:
    """Requests per second hey reached; every answer must be a 200."""
    report = subprocess.run(
        [
            "hey",
            "-z",
            f"{seconds:.0f}s",
            "-c",
            str(CONNECTIONS),
            "-m",
            "POST",
            "-T",
            "application/json",
            "-D",
            str(body),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    statuses = re.findall(r"\[(\d{3})\]\s+(\d+) responses", report)
    if not statuses or any(code != "200" for code, _ in statuses):
        raise SystemExit(f"bench_peer: {url} answered {statuses or 'nothing'}:\n{report[-2000:]}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", report).group(1))


def batches(client: httpx.Client, path: str, body: bytes, seconds: float) -> float:
    """Rows per second, 10,000-row calls one after another."""
    calls, deadline, started = 0, time.monotonic() + seconds, time.monotonic()
    while time.monotonic() < deadline:
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
        response.raise_for_status()
        calls += 1
    return calls * BATCH_ROWS / (time.monotonic() - started)


def log_dropped(client: httpx.Client) -> float:
    """Rows the prediction log dropped (its queue full): a batch figure that drops its log is not a fair one."""
    metrics = client.get("/metrics").text
    found = re.search(r"^mlapi_prediction_log_dropped_total ([0-9.e+]+)$", metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def start_mlserver(root: Path, port: int) -> subprocess.Popen:
    """The same estimator ours trains by default, fitted on the same data, saved the way MLServer loads it."""
    data = load_diabetes()
    model = build_estimator("ridge", seed=0).fit(data.data, data.target)
    folder = root / "diabetes"
    folder.mkdir(parents=True)
    joblib.dump(model, folder / "model.joblib")  # the peer's own format (ours never loads pickles)
    (folder / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "diabetes",
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib"},
            }
        )
    )
    settings = {
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": 0,
        "host": "127.0.0.1",
    }
    (root / "settings.json").write_text(json.dumps(settings))
    log = (root / "mlserver.log").open("w")
    return subprocess.Popen([str(PEERS_VENV / "bin" / "mlserver"), "start", str(root)], stdout=log, stderr=log)


def wait_v2_ready(client: httpx.Client, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get("/v2/models/diabetes/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"bench_peer: MLServer was not ready within {timeout_s:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="each load's duration")
    args = parser.parse_args()
    for tool, hint in (("hey", "apt-get install hey"), (str(PEERS_VENV / "bin" / "mlserver"), "make .venv-peers")):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench_peer: {tool} is missing ({hint})")
    data = load_diabetes()
    row = data.data[7].tolist()
    rows = np.resize(data.data, (BATCH_ROWS, data.data.shape[1]))
    with tempfile.TemporaryDirectory(prefix="mlapi-bench-peer-") as scratch:
        root = Path(scratch)
        ours_port, peer_port = free_port(), free_port()
        environment = {
            **os.environ,
            "MLAPI_DATA_DIR": str(root / "ours"),
            "MLAPI_HOST": "127.0.0.1",
            "MLAPI_PORT": str(ours_port),
            "MLAPI_HOLDOUT_SEED": "42",
        }
        ours = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"],
            env=environment,
            cwd=PROJECT_DIR,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        peer = start_mlserver(root / "mlserver", peer_port)
        try:
            with (
                httpx.Client(base_url=f"http://127.0.0.1:{ours_port}", timeout=120) as mine,
                httpx.Client(base_url=f"http://127.0.0.1:{peer_port}", timeout=120) as theirs,
            ):
                wait_ready(mine, 300, "ours")
                wait_v2_ready(theirs, 120)
                names = data.feature_names
                (root / "ours.json").write_text(json.dumps({"features": dict(zip(names, row, strict=True))}))
                single = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, len(row)], "data": row}]}
                (root / "peer.json").write_text(json.dumps(single))
                ours_single = hey(f"http://127.0.0.1:{ours_port}/predict", root / "ours.json", args.seconds)
                peer_single = hey(
                    f"http://127.0.0.1:{peer_port}/v2/models/diabetes/infer", root / "peer.json", args.seconds
                )
                columns = json.dumps({"columns": list(names), "rows": rows.tolist()}).encode()
                tensor = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": list(rows.shape)}]}
                tensor["inputs"][0]["data"] = rows.ravel().tolist()
                ours_batch = batches(mine, "/predict/columns", columns, args.seconds)
                ours_v2_batch = batches(mine, "/v2/models/diabetes/infer", json.dumps(tensor).encode(), args.seconds)
                peer_batch = batches(theirs, "/v2/models/diabetes/infer", json.dumps(tensor).encode(), args.seconds)
                ours_rss, peer_rss = rss_mb(ours.pid), rss_mb(peer.pid)
                dropped = log_dropped(mine)
        finally:
            for process in (ours, peer):
                process.terminate()
                process.wait(timeout=30)
    measured = {
        "p1": (ours_single, peer_single, "req/s"),
        "p2": (ours_batch, peer_batch, "rows/s"),
        "p2 V2": (ours_v2_batch, peer_batch, "rows/s"),
        "p4": (ours_rss, peer_rss, "MB"),
    }
    print(
        f"bench_peer on {platform.node()} ({os.cpu_count()} cores), {args.seconds:.0f} s a load, hey -c {CONNECTIONS}"
    )
    print(f"{'':4} {'measure':42} {'ours':>10} {'MLServer':>10} {'ratio':>7}  goal")
    for key, (mine_value, theirs_value, unit) in measured.items():
        what, goal, direction = GOALS[key]
        ratio = mine_value / theirs_value
        met = ratio >= goal if direction == "≥" else ratio <= goal
        print(
            f"{key:4} {what + f' ({unit})':42} {mine_value:10,.0f} {theirs_value:10,.0f} {ratio:7.2f}  "
            f"{direction} {goal} {'met' if met else 'NOT met'}"
        )
    print(f"prediction log: {dropped:,.0f} rows dropped (the queue was full), the rest written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
