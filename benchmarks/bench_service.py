"""Throughput of the model service, measured in one run on the same data (not a test; prints numbers).

    python -m benchmarks.bench_service [--requests 2000] [--batches 20] [--seconds 60]

1. raw in-process ``Predictor.predict`` (point + interval + nothing else), rows/s: the baseline;
2. single-row ``POST /predict`` over HTTP on 127.0.0.1 (one keep-alive connection), req/s with p50/p99 latency;
3. ``POST /predict/batch`` with 10,000 rows a call, rows/s.
Every HTTP figure is also given as a ratio against the raw rows/s. Loops are bounded by count and by time.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client import CollectorRegistry
from sklearn.datasets import load_diabetes

from app.data import load_configured
from app.metrics import ServiceMetrics
from app.service import ModelService
from app.settings import Settings

BATCH_ROWS = 10_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(client: httpx.Client, timeout_s: float, what: str) -> None:
    """Poll /ready until the service answers 200; exit naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.get("/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: the service did not become ready within {timeout_s:.0f} s")
        time.sleep(0.2)


def rows(n: int) -> np.ndarray:
    data = load_diabetes().data
    return data[np.arange(n) % len(data)]


def raw_rows_per_second(data_dir: Path, seconds: float) -> float:
    settings = Settings(data_dir=data_dir)
    service = ModelService(settings, ServiceMetrics(CollectorRegistry()), load_configured(settings))
    service.start()
    predictor = service.current
    X = rows(BATCH_ROWS)
    predictor.predict(X, 0.9)  # warm up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds and done < 200 * BATCH_ROWS:
        predictor.predict(X, 0.9)
        done += len(X)
    elapsed = time.perf_counter() - started
    service.close()
    return done / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0, help="time bound for each phase")
    args = parser.parse_args(argv)

    names = load_diabetes().feature_names
    with tempfile.TemporaryDirectory(prefix="mlapi-bench-") as tmp:
        data_dir = Path(tmp)
        raw = raw_rows_per_second(data_dir, min(args.seconds, 5.0))

        port = free_port()
        env = {**os.environ, "MLAPI_DATA_DIR": str(data_dir), "MLAPI_HOST": "127.0.0.1", "MLAPI_PORT": str(port)}
        server = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                wait_ready(client, 60, "diabetes")

                single = [dict(zip(names, row.tolist(), strict=True)) for row in rows(args.requests)]
                for body in single[:50]:  # warm up
                    client.post("/predict", json={"features": body})
                latencies = []
                started = time.perf_counter()
                for body in single:
                    t0 = time.perf_counter()
                    response = client.post("/predict", json={"features": body})
                    latencies.append(time.perf_counter() - t0)
                    assert response.status_code == 200, response.text
                    if time.perf_counter() - started > args.seconds:
                        break
                single_elapsed = time.perf_counter() - started

                batch = {"records": [dict(zip(names, row.tolist(), strict=True)) for row in rows(BATCH_ROWS)]}
                client.post("/predict/batch", json=batch)  # warm up
                done, started = 0, time.perf_counter()
                for _ in range(args.batches):
                    response = client.post("/predict/batch", json=batch)
                    assert response.status_code == 200, response.text[:200]
                    done += BATCH_ROWS
                    if time.perf_counter() - started > args.seconds:
                        break
                batch_elapsed = time.perf_counter() - started
        finally:
            server.terminate()
            server.wait(timeout=30)

    req_s = len(latencies) / single_elapsed
    batch_rows_s = done / batch_elapsed
    quantiles = statistics.quantiles(latencies, n=100)
    print(
        f"# mlapi service benchmark ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()})\n"
    )
    print("| measurement | rate | vs raw rows/s |")
    print("|---|---|---|")
    print(f"| raw in-process predict (10k-row calls) | {raw:,.0f} rows/s | 1.000 |")
    print(
        f"| HTTP POST /predict, 1 row, 1 connection ({len(latencies)} requests) | {req_s:,.0f} req/s "
        f"(p50 {quantiles[49] * 1000:.2f} ms, p99 {quantiles[98] * 1000:.2f} ms) | {req_s / raw:.5f} |"
    )
    print(
        f"| HTTP POST /predict/batch, {BATCH_ROWS:,} rows a call ({done // BATCH_ROWS} calls) | "
        f"{batch_rows_s:,.0f} rows/s | {batch_rows_s / raw:.3f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
