"""Throughput of a classifier over mixed types against the regressor on numbers, same service, same load, one run
(not a test; prints numbers).

    python -m benchmarks.bench_projects [--requests 1500] [--seconds 30]

Each example project (examples/diabetes: ridge regression on 10 numbers; examples/penguins: logistic regression over
categories, integers and gaps, with the DataFrame step and APS sets) is served by ``python -m app serve`` on
127.0.0.1 and gets the same three loads: single-row ``POST /predict`` on one keep-alive connection, the same from 8
threads at once (the micro-batcher coalesces them), and ``POST /predict/batch`` with 1,000 rows a call. Each
penguins figure is also given as a ratio to the diabetes one. Bounded by count and by time.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pandas as pd

from benchmarks.bench_service import free_port, wait_ready

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
THREADS = 8
BATCH_ROWS = 1000


def records(project: str) -> list[dict]:
    """The project's own rows as a client sends them (nulls for gaps), without the target."""
    frame = pd.read_csv(EXAMPLES / project / "data" / f"{project}.csv")
    target = "species" if project == "penguins" else "target"
    features = frame.drop(columns=[target]).astype(object)
    rows = [{k: (None if pd.isna(v) else v) for k, v in row.items()} for row in features.to_dict("records")]
    for row in rows:  # CSV integers come back from pandas as floats where the column has gaps
        for name in ("flipper_length_mm", "body_mass_g", "year"):
            if isinstance(row.get(name), float):
                row[name] = int(row[name])
    return rows


def measure(project: str, requests: int, seconds: float) -> dict[str, float]:
    rows = records(project)
    with tempfile.TemporaryDirectory(prefix=f"mlapi-bench-{project}-") as tmp:
        port = free_port()
        env = {
            **os.environ,
            "MLAPI_DATA_DIR": tmp,
            "MLAPI_HOST": "127.0.0.1",
            "MLAPI_PORT": str(port),
            "MLAPI_MODEL_PROJECT": str(EXAMPLES / project),
            "MLAPI_MAX_BATCH_ROWS": str(BATCH_ROWS),
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=60) as client:
                wait_ready(client, 120, project)
                bodies = [{"features": rows[i % len(rows)]} for i in range(requests)]
                for body in bodies[:50]:  # warm up
                    assert client.post("/predict", json=body).status_code == 200
                started, done = time.perf_counter(), 0
                for body in bodies:
                    response = client.post("/predict", json=body)
                    assert response.status_code == 200, response.text
                    done += 1
                    if time.perf_counter() - started > seconds:
                        break
                single = done / (time.perf_counter() - started)

                batch = {"records": [rows[i % len(rows)] for i in range(BATCH_ROWS)]}
                started, calls = time.perf_counter(), 0
                while calls < 20 and time.perf_counter() - started < seconds:
                    response = client.post("/predict/batch", json=batch)
                    assert response.status_code == 200, response.text[:200]
                    calls += 1
                batch_rows = calls * BATCH_ROWS / (time.perf_counter() - started)

            share = requests // THREADS

            def worker(offset: int) -> int:
                with httpx.Client(base_url=base, timeout=60) as own:
                    for body in bodies[offset : offset + share]:
                        assert own.post("/predict", json=body).status_code == 200
                return share

            with ThreadPoolExecutor(THREADS) as pool:
                started = time.perf_counter()
                total = sum(pool.map(worker, range(0, share * THREADS, share)))
                concurrent = total / (time.perf_counter() - started)
        finally:
            server.terminate()
            server.wait(timeout=30)
    return {"single": single, "concurrent": concurrent, "batch_rows": batch_rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--seconds", type=float, default=30.0, help="time bound for each phase")
    args = parser.parse_args(argv)
    regressor = measure("diabetes", args.requests, args.seconds)
    classifier = measure("penguins", args.requests, args.seconds)
    print(
        f"# model projects benchmark ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()})\n"
    )
    print("| load | diabetes (regression, 10 numbers) | penguins (classification, mixed, gaps) | penguins ÷ diabetes |")
    print("|---|---|---|---|")
    for key, label, unit in (
        ("single", "POST /predict, 1 connection", "req/s"),
        ("concurrent", f"POST /predict, {THREADS} threads", "req/s"),
        ("batch_rows", f"POST /predict/batch, {BATCH_ROWS:,} rows a call", "rows/s"),
    ):
        ratio = classifier[key] / regressor[key]
        print(f"| {label} | {regressor[key]:,.0f} {unit} | {classifier[key]:,.0f} {unit} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
