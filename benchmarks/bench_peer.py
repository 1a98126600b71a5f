"""Ours against MLServer, the Open Inference Protocol server a user would pick instead: same machine, same pipelines,
one process each, the same loads, measured in one run (issue 28: p1, p2, p4, p5). Not a test; prints numbers and
ratios.

    python -m benchmarks.bench_peer [--seconds 10]

Ours is ``python -m app serve`` as a replica runs it (its first version built beforehand, as the image build does)
with everything on: intervals or conformal sets, OOD flags, the prediction log (a run whose log dropped rows is
refused). MLServer is ``mlserver start`` with mlserver-sklearn from its own venv (``make .venv-peers``,
requirements-peers.txt) and ``parallel_workers: 0`` (its worker pool dies on start with uvloop 0.23: "There is no
current event loop"). Single rows: hey (Debian) with 8 connections for a fixed time, ours ``POST /predict`` and
MLServer's V2 infer. Batches: 10,000 rows a call from one client for a fixed time, ours ``/predict/columns`` and our
V2 infer, MLServer's V2 ``[10000, 10]`` FP64. Memory: each process's RSS after the diabetes loads, and its anonymous
part. The penguins classifier (p5): the same kind of pipeline for each (imputation and one-hot encoding in a
ColumnTransformer, logistic regression), MLServer's over a DataFrame through its pandas codec.
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
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import joblib
import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_diabetes
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from app.estimators import build_estimator
from benchmarks.bench_service import free_port, wait_ready

PENGUINS = Path(__file__).resolve().parents[1] / "examples" / "penguins"

PROJECT_DIR = Path(__file__).resolve().parents[1]
PEERS_VENV = PROJECT_DIR / ".venv-peers"
CONNECTIONS = 8
BATCH_ROWS = 10_000
GOALS: dict[str, tuple[str, float | None, str]] = {
    "p1": ("single-row req/s, ours ÷ MLServer, c=8", 1.5, "≥"),
    "p2": ("10k-row rows/s, ours /predict/columns ÷ MLServer V2", 1.0, "≥"),
    "p2 V2": ("10k-row rows/s, ours V2 JSON ÷ MLServer V2 JSON", 1.0, "≥"),
    "p4": ("RSS after the loads, ours ÷ MLServer", 0.75, "≤"),
    "p4 anon": ("of it anonymous (not shared between replicas)", None, ""),
    "p5": ("penguins single-row req/s, ours ÷ MLServer, c=8", 1.5, "≥"),
}


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


def memory_mb(pid: int) -> tuple[float, float]:
    """A process's resident memory and the anonymous part of it (what replicas on one host do not share: the rest is
    mostly the libraries' mapped files), in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss, anonymous = (int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) / 1024 for key in ("VmRSS", "RssAnon"))
    return rss, anonymous


def start_mlserver(root: Path, port: int, name: str, model: object) -> subprocess.Popen:
    """MLServer with mlserver-sklearn serving ``model``, saved the way MLServer loads it (joblib, its own format;
    ours never loads pickles)."""
    folder = root / name
    folder.mkdir(parents=True)
    joblib.dump(model, folder / "model.joblib")
    (folder / "model-settings.json").write_text(
        json.dumps(
            {"name": name, "implementation": "mlserver_sklearn.SKLearnModel", "parameters": {"uri": "./model.joblib"}}
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


def start_ours(root: Path, port: int, project: Path | None = None) -> subprocess.Popen:
    """``python -m app serve`` as a replica runs it: its first version built beforehand (``python -m app train
    --into``, as the image build does), so the serving process never trains."""
    # No pinned holdout seed: with one, a replica trains its own first version rather than import the built one.
    environment = dict(os.environ)
    if project is not None:
        environment["MLAPI_MODEL_PROJECT"] = str(project)
    first_version = root / "first-version"
    subprocess.run(
        [sys.executable, "-m", "app", "train", "--into", str(first_version)],
        env={**environment, "MLAPI_DATA_DIR": str(root / "build")},
        cwd=PROJECT_DIR,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    environment |= {
        "MLAPI_DATA_DIR": str(root / "data"),
        "MLAPI_FIRST_VERSION_DIR": str(first_version),
        "MLAPI_HOST": "127.0.0.1",
        "MLAPI_PORT": str(port),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "app", "serve"],
        env=environment,
        cwd=PROJECT_DIR,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def penguins_pipeline() -> tuple[object, dict, dict]:
    """What an MLServer user serves for the penguins: a scikit-learn Pipeline over the raw DataFrame (imputation and
    one-hot encoding in a ColumnTransformer, logistic regression, as our standard pipeline for the project), and one
    row without gaps as each server takes it: ours a JSON record, MLServer's V2 with its pandas codec."""
    frame = pd.read_csv(PENGUINS / "data" / "penguins.csv")
    features, target = frame.drop(columns=["species"]), frame["species"]
    categories = ["island", "sex"]
    numbers = [c for c in features.columns if c not in categories]
    model = make_pipeline(
        ColumnTransformer(
            [
                ("numbers", make_pipeline(SimpleImputer(), StandardScaler()), numbers),
                ("categories", make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder()), categories),
            ]
        ),
        LogisticRegression(max_iter=1000),
    ).fit(features, target)
    row = features.dropna().iloc[0]
    declared = tomllib.loads((PENGUINS / "mlapi.toml").read_text())["features"]
    integers = {name for name, spec in declared.items() if spec["type"] == "integer"}
    ours = {
        "features": {k: int(v) if k in integers else (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
    }
    inputs = []
    for name, value in ours["features"].items():
        if isinstance(value, str):
            inputs.append({"name": name, "datatype": "BYTES", "shape": [1], "data": [value],
                           "parameters": {"content_type": "str"}})  # fmt: skip
        else:
            inputs.append({"name": name, "datatype": "FP64", "shape": [1], "data": [float(value)]})
    return model, ours, {"parameters": {"content_type": "pd"}, "inputs": inputs}


def wait_v2_ready(client: httpx.Client, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get(f"/v2/models/{name}/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"bench_peer: MLServer was not ready within {timeout_s:.0f} s")


@contextmanager
def side_by_side(
    root: Path, name: str, model: object, project: Path | None = None
) -> Iterator[tuple[subprocess.Popen, subprocess.Popen, httpx.Client, httpx.Client]]:
    """Ours (the project, or the default) and MLServer serving ``model`` as ``name``, both ready; a client for each."""
    ours_port, peer_port = free_port(), free_port()
    ours = start_ours(root / f"ours-{name}", ours_port, project)
    peer = start_mlserver(root / f"mlserver-{name}", peer_port, name, model)
    try:
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{ours_port}", timeout=120) as mine,
            httpx.Client(base_url=f"http://127.0.0.1:{peer_port}", timeout=120) as theirs,
        ):
            wait_ready(mine, 300, f"ours ({name})")
            wait_v2_ready(theirs, name, 120)
            yield ours, peer, mine, theirs
    finally:
        for process in (ours, peer):
            process.terminate()
            process.wait(timeout=30)


def url(client: httpx.Client, path: str) -> str:
    return str(client.base_url).rstrip("/") + path


def diabetes_pair(root: Path, seconds: float) -> dict[str, tuple[float, float, str]]:
    """p1, p2 and p4: the default ridge on the diabetes data, ours and MLServer side by side."""
    data = load_diabetes()
    row = data.data[7].tolist()
    rows = np.resize(data.data, (BATCH_ROWS, data.data.shape[1]))
    names = data.feature_names
    (root / "ours.json").write_text(json.dumps({"features": dict(zip(names, row, strict=True))}))
    single = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, len(row)], "data": row}]}
    (root / "peer.json").write_text(json.dumps(single))
    columns = json.dumps({"columns": list(names), "rows": rows.tolist()}).encode()
    tensor = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": list(rows.shape)}]}
    tensor["inputs"][0]["data"] = rows.ravel().tolist()
    infer = "/v2/models/diabetes/infer"
    ridge = build_estimator("ridge", seed=0).fit(data.data, data.target)
    with side_by_side(root, "diabetes", ridge) as (ours, peer, mine, theirs):
        ours_single = hey(url(mine, "/predict"), root / "ours.json", seconds)
        peer_single = hey(url(theirs, infer), root / "peer.json", seconds)
        ours_batch = batches(mine, "/predict/columns", columns, seconds)
        ours_v2_batch = batches(mine, infer, json.dumps(tensor).encode(), seconds)
        peer_batch = batches(theirs, infer, json.dumps(tensor).encode(), seconds)
        (ours_rss, ours_anonymous), (peer_rss, peer_anonymous) = memory_mb(ours.pid), memory_mb(peer.pid)
        dropped = log_dropped(mine)
    if dropped:
        raise SystemExit(f"bench_peer: the prediction log dropped {dropped:,.0f} rows: the batch figures are not ours")
    return {
        "p1": (ours_single, peer_single, "req/s"),
        "p2": (ours_batch, peer_batch, "rows/s"),
        "p2 V2": (ours_v2_batch, peer_batch, "rows/s"),
        "p4": (ours_rss, peer_rss, "MB"),
        "p4 anon": (ours_anonymous, peer_anonymous, "MB"),
    }


def penguins_pair(root: Path, seconds: float) -> dict[str, tuple[float, float, str]]:
    """p5: the penguins classifier (categories, integers, gaps), ours with its conformal sets, single rows."""
    model, ours_body, peer_body = penguins_pipeline()
    (root / "ours-penguins.json").write_text(json.dumps(ours_body))
    (root / "peer-penguins.json").write_text(json.dumps(peer_body))
    with side_by_side(root, "penguins", model, PENGUINS) as (_, _, mine, theirs):
        ours_single = hey(url(mine, "/predict"), root / "ours-penguins.json", seconds)
        peer_single = hey(url(theirs, "/v2/models/penguins/infer"), root / "peer-penguins.json", seconds)
    return {"p5": (ours_single, peer_single, "req/s")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="each load's duration")
    parser.add_argument(
        "--stack-results",
        type=Path,
        help="bench_stack's --results from the same `make bench`: adds p3 (the production path ÷ MLServer), p6, p7",
    )
    args = parser.parse_args()
    for tool, hint in (("hey", "apt-get install hey"), (str(PEERS_VENV / "bin" / "mlserver"), "make .venv-peers")):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench_peer: {tool} is missing ({hint})")
    with tempfile.TemporaryDirectory(prefix="mlapi-bench-peer-") as scratch:
        measured = diabetes_pair(Path(scratch), args.seconds) | penguins_pair(Path(scratch), args.seconds)
    if args.stack_results is not None:
        stack = json.loads(args.stack_results.read_text())
        measured["p3"] = (stack["proxied_rps"], measured["p1"][1], "req/s")
        GOALS["p3"] = (f"through Traefik + TLS, {stack['replicas']} replicas ÷ one MLServer direct", 1.0, "≥")
        measured["p6"] = (stack["p99_ms"], stack["p50_ms"], "ms")
        GOALS["p6"] = (f"p99 ÷ p50 through Traefik at {stack['steady_rps']:,.0f} req/s (half load)", 3.0, "≤")
        measured["p7"] = (stack["image_mb"], 300.0, "MB")
        GOALS["p7"] = ("model image size ÷ the 300 MB budget", 1.0, "≤")
    print(
        f"bench_peer on {platform.node()} ({os.cpu_count()} cores), {args.seconds:.0f} s a load, hey -c {CONNECTIONS}"
    )
    print(f"{'':8} {'measure':52} {'ours':>10} {'MLServer':>10} {'ratio':>7}  goal")
    for key, (mine_value, theirs_value, unit) in measured.items():
        what, goal, direction = GOALS[key]
        ratio = mine_value / theirs_value
        verdict = ""
        if goal is not None:
            met = ratio >= goal if direction == "≥" else ratio <= goal
            verdict = f"{direction} {goal} {'met' if met else 'NOT met'}"
        print(f"{key:8} {what + f' ({unit})':52} {mine_value:10,.0f} {theirs_value:10,.0f} {ratio:7.2f}  {verdict}")
    print("prediction log: every answered row written (none dropped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
