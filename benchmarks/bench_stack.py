"""The stack's performance as ratios measured in one run against the real local stack (not a test; prints numbers).

    python -m benchmarks.bench_stack [--seconds 10] [--write]      # `make bench`

It starts its own local stack (isolated data in a temporary directory; the production names, so a running
`make local-up` is stopped first, its data kept) and measures, each against a baseline in the same run:

a. POST /predict through Traefik + TLS ÷ the same requests straight to the replicas (plain HTTP), same concurrency;
b. 10,000-row batches over HTTPS, as records and as columns, ÷ the same requests in-process (the ASGI app called
   directly: validation, predict, intervals, OOD, log, serialization; no socket, no TLS, no proxy);
c. `up` with cached images and nothing running → verified HTTPS 200 (on new data: trains the first model; and again
   on the data the first one left);
d. the model image's size;
f. POST /predict ÷ a trivial JSON route (GET /health) on the same replicas, same concurrency;
g. latency of single predictions through Traefik at half the throughput measured in (a): p50 and p99;
h. V2 inference (the Open Inference Protocol) through Traefik: single rows ÷ /predict's, and 10,000-row FP64 tensors
   over HTTPS (JSON and binary) ÷ the same rows as /predict/columns;
m. Prometheus and Alertmanager: their memory after the load, their CPU at idle and during the load of (a).

Load comes from wrk and hey (Debian's) in a container on the stack's overlay network, so "through Traefik" and
"direct" start from the same place; every run is bounded by time. ``--write`` adds the table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import docker
import httpx
import numpy as np
from sklearn.datasets import load_diabetes

from benchmarks.loadgen import BENCH_PACKAGES, CONNECTIONS, CpuMeter, Load, MonitoringMeter
from infra.local import images
from infra.local import stack as local
from infra.spec.stack import MODEL_PORT, MODEL_SERVICE, NETWORK
from infra.spec.traefik import WEBSECURE_PORT
from testbed.stack import free_port

BATCH_ROWS = 10_000
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def publish(table: str, *, write: bool) -> None:
    """Print a results table; with ``write``, also add it to docs/benchmarks.md."""
    print(table)
    if write:
        DOCS.write_text(DOCS.read_text().rstrip("\n") + "\n\n" + table)
        print(f"added to {DOCS}")


def task_addresses(client: docker.DockerClient) -> list[str]:
    addresses = []
    for task in client.api.tasks(filters={"service": MODEL_SERVICE, "desired-state": "running"}):
        for attachment in task.get("NetworksAttachments", []):
            if attachment["Network"]["Spec"]["Name"] == NETWORK:
                addresses.append(attachment["Addresses"][0].split("/")[0])
    return addresses


def batch_rows_per_second(post, body: bytes, seconds: float, calls: int) -> float:
    post(body)  # warm up
    done, started = 0, time.perf_counter()
    for _ in range(calls):
        response = post(body)
        if response.status_code != 200:
            raise SystemExit(f"batch call answered {response.status_code}: {response.text[:200]}")
        done += BATCH_ROWS
        if time.perf_counter() - started > seconds:
            break
    return done / (time.perf_counter() - started)


def in_process_batch(data_dir: Path, body: bytes, seconds: float, calls: int, path: str = "/predict/batch") -> float:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    with TestClient(create_app(Settings(data_dir=data_dir))) as client:
        headers = {"Content-Type": "application/json"}
        return batch_rows_per_second(lambda b: client.post(path, content=b, headers=headers), body, seconds, calls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each load phase")
    parser.add_argument("--calls", type=int, default=20, help="at most this many 10k-row batch calls per phase")
    parser.add_argument("--write", action="store_true", help="add the table to docs/benchmarks.md")
    parser.add_argument(
        "--results", type=Path, help="also write the figures bench_peer compares with MLServer (p3, p6, p7) as JSON"
    )
    args = parser.parse_args(argv)
    client = local.engine()
    data = load_diabetes()
    batch = json.dumps(
        {
            "records": [
                dict(zip(data.feature_names, data.data[i % len(data.data)].tolist(), strict=True))
                for i in range(BATCH_ROWS)
            ]
        }
    ).encode()
    columns = json.dumps(
        {
            "columns": list(data.feature_names),
            "rows": [data.data[i % len(data.data)].tolist() for i in range(BATCH_ROWS)],
        }
    ).encode()
    matrix = data.data[np.arange(BATCH_ROWS) % len(data.data)]
    tensor = {"name": "input-0", "datatype": "FP64", "shape": list(matrix.shape)}
    v2_json = json.dumps({"inputs": [{**tensor, "data": matrix.tolist()}]}).encode()
    v2_header = json.dumps(
        {"inputs": [{**tensor, "parameters": {"binary_data_size": matrix.nbytes}}]}
    ).encode()  # the binary tensor data extension, as tritonclient sends it
    v2_binary = v2_header + matrix.astype("<f8").tobytes()

    with tempfile.TemporaryDirectory(prefix="mlapi-bench-") as tmp:
        root = Path(tmp)
        tool = images.build_base(client, BENCH_PACKAGES)
        local.down(quiet=True)
        options = local.LocalOptions.isolated(root / "stack", free_port(), free_port())
        first = local.up(options, quiet=True)
        local.down(options, quiet=True)  # containers, service, network gone; images and data kept
        stack = local.up(options, quiet=True)
        try:
            load = Load(client, tool, root)
            domain = stack.options.domain
            edge = f"https://{domain}:{WEBSECURE_PORT}"
            replicas = [f"http://{ip}:{MODEL_PORT}" for ip in task_addresses(client)]
            load.wrk([f"{edge}/predict"], 3, post=True)  # warm up both paths and the connection pools
            watch = MonitoringMeter(client)
            idle = watch.measure(lambda: time.sleep(max(args.seconds, 30)))  # several scrapes and rule evaluations
            meter = CpuMeter(client, load)
            measured: dict[str, tuple] = {}
            loaded = watch.measure(
                lambda: measured.update(
                    proxied=meter.measure(lambda: load.wrk([f"{edge}/predict"], args.seconds, post=True), args.seconds)
                )
            )
            proxied, proxied_latency, proxied_cpu = measured["proxied"]
            direct, _, direct_cpu = meter.measure(
                lambda: load.wrk([f"{r}/predict" for r in replicas], args.seconds, post=True), args.seconds
            )
            trivial, _ = load.wrk([f"{r}/health" for r in replicas], args.seconds, post=False)
            steady = load.hey(f"{edge}/predict", domain, args.seconds, proxied / 2)
            v2_single, _ = load.wrk([f"{edge}/v2/models/diabetes/infer"], args.seconds, post=True, body="v2.lua")

            with httpx.Client(verify=str(stack.ca_root), timeout=120) as http:
                edge_url = f"https://127.0.0.1:{options.https_port}"
                headers = {"Host": domain, "Content-Type": "application/json"}

                def over_https(path: str, body: bytes, extra: dict[str, str] | None = None) -> float:
                    # httpx verifies the certificate for the URL's host: connect to 127.0.0.1, verify the domain.
                    sent = {**headers, **(extra or {})}
                    return batch_rows_per_second(
                        lambda b: http.post(
                            edge_url + path, content=b, headers=sent, extensions={"sni_hostname": domain}
                        ),
                        body,
                        args.seconds,
                        args.calls,
                    )

                records_https = over_https("/predict/batch", batch)
                columns_https = over_https("/predict/columns", columns)
                v2_json_https = over_https("/v2/models/diabetes/infer", v2_json)
                v2_binary_https = over_https(
                    "/v2/models/diabetes/infer", v2_binary, {"Inference-Header-Content-Length": str(len(v2_header))}
                )
            records_in_process = in_process_batch(root / "in-process", batch, args.seconds, args.calls)
            columns_in_process = in_process_batch(
                root / "in-process", columns, args.seconds, args.calls, "/predict/columns"
            )
            image_mb = client.images.get(stack.inputs.model_image).attrs["Size"] / 1e6
        finally:
            local.down(options, quiet=True)

    rows = [
        (
            "a",
            "POST /predict through Traefik + TLS ÷ direct to the replicas (plain HTTP)",
            f"{proxied:,.0f} ÷ {direct:,.0f} req/s",
            proxied / direct,
            "≥ 0.90",
        ),
        (
            "b",
            f"{BATCH_ROWS:,}-row batches (records) over HTTPS ÷ in-process (ASGI app, no socket)",
            f"{records_https:,.0f} ÷ {records_in_process:,.0f} rows/s",
            records_https / records_in_process,
            "≥ 0.50",
        ),
        (
            "b",
            f"{BATCH_ROWS:,}-row batches (columns) over HTTPS ÷ in-process (ASGI app, no socket)",
            f"{columns_https:,.0f} ÷ {columns_in_process:,.0f} rows/s",
            columns_https / columns_in_process,
            "≥ 0.50",
        ),
        (
            "c",
            "`up`, cached images, nothing running → verified HTTPS 200 (kept data; new data)",
            f"{stack.timings['total_s']:.1f} s ({first.timings['total_s']:.1f} s)",
            None,
            "< 12 s",
        ),
        ("d", "model image size", f"{image_mb:.0f} MB", None, "≤ 300 MB"),
        (
            "m",
            "Prometheus + Alertmanager + node exporter: memory after the load (anonymous), MB",
            " + ".join(f"{loaded[service][0]:.0f}" for service in MonitoringMeter.SERVICES),
            None,
            "≤ 250 MB together",
        ),
        (
            "m",
            "Prometheus + Alertmanager + node exporter: CPU at idle, then during the load of (a), % of one core",
            f"{sum(v[1] for v in idle.values()):.1f} %, {sum(v[1] for v in loaded.values()):.1f} %",
            None,
            "≤ 5 % at idle",
        ),
        (
            "f",
            "POST /predict ÷ GET /health, same replicas, same concurrency",
            f"{direct:,.0f} ÷ {trivial:,.0f} req/s",
            direct / trivial,
            "≥ 0.50",
        ),
        (
            "g",
            f"single predictions through Traefik at {steady['rate']:,.0f} req/s (half of a): p50, p99",
            f"{steady['p50']:.1f} ms, {steady['p99']:.1f} ms",
            steady["p99"] / steady["p50"],
            "p99 ≤ 3 x p50",
        ),
        (
            "h",
            "V2 infer, 1 row, through Traefik ÷ POST /predict through Traefik",
            f"{v2_single:,.0f} ÷ {proxied:,.0f} req/s",
            v2_single / proxied,
            "",
        ),
        (
            "h",
            f"V2 infer, {BATCH_ROWS:,}-row FP64 tensor over HTTPS, JSON ÷ /predict/columns",
            f"{v2_json_https:,.0f} ÷ {columns_https:,.0f} rows/s",
            v2_json_https / columns_https,
            "",
        ),
        (
            "h",
            f"V2 infer, {BATCH_ROWS:,}-row FP64 tensor over HTTPS, binary ÷ /predict/columns",
            f"{v2_binary_https:,.0f} ÷ {columns_https:,.0f} rows/s",
            v2_binary_https / columns_https,
            "",
        ),
    ]
    header = (
        f"## `make bench`, {datetime.date.today().isoformat()}: {os.cpu_count()} cores ({platform.machine()}), "
        f"Python {platform.python_version()}, {CONNECTIONS} connections, {args.seconds:.0f} s a phase\n\n"
        f"At full load through Traefik: p50 {proxied_latency.get('p50', 0):.1f} ms, "
        f"p99 {proxied_latency.get('p99', 0):.1f} ms.\n\n"
        "| | measure | measured | ratio | goal |\n|---|---|---|---|---|\n"
    )
    table = header + "".join(
        f"| {key} | {what} | {value} | {'' if ratio is None else f'{ratio:.2f}'} | {goal} |\n"
        for key, what, value, ratio, goal in rows
    )
    table += cpu_table(proxied_cpu, direct_cpu)
    publish(table, write=args.write)
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        figures = {
            "proxied_rps": proxied,
            "replicas": len(replicas),
            "p50_ms": steady["p50"],
            "p99_ms": steady["p99"],
            "steady_rps": steady["rate"],
            "image_mb": image_mb,
        }
        args.results.write_text(json.dumps(figures))
    return 0


def cpu_table(proxied: dict[str, float], direct: dict[str, float]) -> str:
    """Where a request's CPU goes on each path of (a), and the ratio the machine's cores allow: with every core busy,
    req/s is cores ÷ CPU per request, so the proxied path can reach at most direct's CPU ÷ its own."""
    parts = (
        ("traefik", "Traefik (TLS, routing, middlewares, access log, proxying)"),
        ("replicas", "model replicas (uvicorn + the app)"),
        ("load", "load generator (wrk; a TLS client on the proxied path)"),
        ("rest", "the rest: dockerd, the kernel's network path, other processes"),
    )
    lines = "".join(f"| {label} | {proxied[key]:,.0f} | {direct[key]:,.0f} |\n" for key, label in parts)
    total_proxied, total_direct = sum(proxied.values()), sum(direct.values())
    # In production the clients are elsewhere: what the server's own cores allow leaves the load generator out.
    server_proxied, server_direct = total_proxied - proxied["load"], total_direct - direct["load"]
    return (
        "\nCPU per request in (a), µs (cgroup counters and /proc/stat over each phase):\n\n"
        "| part | through Traefik | direct |\n|---|---|---|\n"
        f"{lines}| **total** | **{total_proxied:,.0f}** | **{total_direct:,.0f}** |\n\n"
        f"Bound on (a) when the cores are the limit: {total_direct:,.0f} ÷ {total_proxied:,.0f} = "
        f"{total_direct / total_proxied:.2f}; on a server whose clients are elsewhere (without the load generator): "
        f"{server_direct:,.0f} ÷ {server_proxied:,.0f} = {server_direct / server_proxied:.2f}.\n"
    )


if __name__ == "__main__":
    sys.exit(main())
