"""The stack's performance as ratios measured in one run against the real local stack (not a test; prints numbers).

    python -m benchmarks.bench_stack [--seconds 10] [--write]      # `make bench`

It starts its own local stack (isolated data in a temporary directory; the production names, so a running
`make local-up` is stopped first, its data kept) and measures, each against a baseline in the same run:

a. POST /predict through Traefik + TLS ÷ the same requests straight to the replicas (plain HTTP), same concurrency;
b. 10,000-row batches over HTTPS ÷ the same requests in-process (the ASGI app called directly: validation, predict,
   intervals, OOD, log, serialization; no socket, no TLS, no proxy);
c. `up` with cached images and nothing running → verified HTTPS 200 (on new data: trains the first model; and again
   on the data the first one left);
d. the model image's size;
f. POST /predict ÷ a trivial JSON route (GET /health) on the same replicas, same concurrency;
g. latency of single predictions through Traefik at half the throughput measured in (a): p50 and p99.

Load comes from wrk and hey (Debian's) in a container on the stack's overlay network, so "through Traefik" and
"direct" start from the same place; every run is bounded by time. ``--write`` adds the table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import docker
import httpx
from docker.types import Mount
from sklearn.datasets import load_diabetes

from infra import images, local
from infra.spec import MODEL_PORT, MODEL_SERVICE, NETWORK, WEBSECURE_PORT
from tests.stack_support import free_port

BATCH_ROWS = 10_000
CONNECTIONS = 8  # wrk/hey connections: 4 per replica when direct
BENCH_PACKAGES = ("wrk", "hey")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def publish(table: str, *, write: bool) -> None:
    """Print a results table; with ``write``, also add it to docs/benchmarks.md."""
    print(table)
    if write:
        DOCS.write_text(DOCS.read_text().rstrip("\n") + "\n\n" + table)
        print(f"added to {DOCS}")


def features() -> dict[str, float]:
    data = load_diabetes()
    return dict(zip(data.feature_names, data.data[7].tolist(), strict=True))


class Load:
    """wrk and hey in a throwaway container on the overlay network, with the request body in a mounted file."""

    def __init__(
        self,
        client: docker.DockerClient,
        image: str,
        workdir: Path,
        network: str = NETWORK,
        hosts: dict[str, str] | None = None,
    ) -> None:
        """``network``: where the load container runs; ``hosts``: names it resolves to given addresses."""
        self.client, self.image, self.workdir = client, image, workdir
        self.network, self.hosts = network, hosts or {}
        body = json.dumps({"features": features()})
        (workdir / "body.json").write_text(body)
        (workdir / "post.lua").write_text(
            f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\nwrk.headers["Content-Type"] = "application/json"\n'
        )

    def run(self, script: str) -> str:
        return self.client.containers.run(
            self.image,
            ["sh", "-c", script],
            network=self.network,
            extra_hosts=self.hosts,
            mounts=[Mount(target="/bench", source=str(self.workdir), type="bind", read_only=True)],
            stderr=True,  # wrk's and hey's errors (a refused connection, a TLS failure) say why a report is missing
            remove=True,
        ).decode()

    def wrk(self, urls: list[str], seconds: float, *, post: bool) -> tuple[float, dict[str, float]]:
        """Requests/s summed over one wrk per URL (the connections split between them), and the first's latency
        percentiles (ms)."""
        per_url = max(1, CONNECTIONS // len(urls))
        script = " & ".join(
            f"wrk -t1 -c{per_url} -d{seconds:.0f}s --latency {'-s /bench/post.lua ' if post else ''}{url} "
            f"> /tmp/wrk{index}.txt"
            for index, url in enumerate(urls)
        )
        output = self.run(f"{script} & wait; for f in /tmp/wrk*.txt; do cat $f; echo ===; done")
        if "Requests/sec" not in output:
            output += self.run(f"wrk -t1 -c1 -d1s {urls[0]} 2>&1 | tail -5")  # one short run, to show the error
        reports = [part for part in output.split("===") if "Requests/sec" in part]
        if len(reports) != len(urls):
            raise SystemExit(f"wrk did not report for every URL:\n{output}")
        for report in reports:
            errors = re.search(r"Non-2xx or 3xx responses: (\d+)", report)
            if errors or "Socket errors" in report:
                raise SystemExit(f"wrk saw failed requests:\n{report}")
        rate = sum(float(re.search(r"Requests/sec:\s+([\d.]+)", report).group(1)) for report in reports)
        return rate, _wrk_percentiles(reports[0])

    def hey(self, url: str, host: str, seconds: float, rate: float) -> dict[str, float]:
        """A fixed request rate (hey's per-worker limit times workers) for ``seconds``: latency percentiles (ms).
        ``host``: the Host header, which hey also sends as SNI (the URL's would carry the port)."""
        per_worker = max(1.0, rate / CONNECTIONS)
        output = self.run(
            f"hey -z {seconds:.0f}s -c {CONNECTIONS} -q {per_worker:.1f} -m POST -T application/json "
            f"-D /bench/body.json -host {host} {url}"
        )
        statuses = re.findall(r"\[(\d{3})\]\s+(\d+) responses", output)
        if not statuses or any(code != "200" for code, _ in statuses):
            raise SystemExit(f"hey saw answers other than 200:\n{output}")
        found = dict(re.findall(r"\s(\d+)%+ in ([\d.]+) secs", output))
        return {
            "p50": float(found["50"]) * 1000,
            "p99": float(found["99"]) * 1000,
            "rate": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
        }


def _wrk_percentiles(report: str) -> dict[str, float]:
    units = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    found = {}
    for percent, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", report, re.M):
        found[f"p{percent}"] = float(value) * units[unit]
    return found


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


def in_process_batch(data_dir: Path, body: bytes, seconds: float, calls: int) -> float:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    with TestClient(create_app(Settings(data_dir=data_dir))) as client:
        headers = {"Content-Type": "application/json"}
        return batch_rows_per_second(
            lambda b: client.post("/predict/batch", content=b, headers=headers), body, seconds, calls
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each load phase")
    parser.add_argument("--calls", type=int, default=20, help="at most this many 10k-row batch calls per phase")
    parser.add_argument("--write", action="store_true", help="add the table to docs/benchmarks.md")
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
            proxied, proxied_latency = load.wrk([f"{edge}/predict"], args.seconds, post=True)
            direct, _ = load.wrk([f"{r}/predict" for r in replicas], args.seconds, post=True)
            trivial, _ = load.wrk([f"{r}/health" for r in replicas], args.seconds, post=False)
            steady = load.hey(f"{edge}/predict", domain, args.seconds, proxied / 2)

            with httpx.Client(verify=str(stack.ca_root), timeout=120) as http:
                url = f"https://127.0.0.1:{options.https_port}/predict/batch"
                headers = {"Host": domain, "Content-Type": "application/json"}
                # httpx verifies the certificate for the URL's host: connect to 127.0.0.1, verify the domain.
                over_https = batch_rows_per_second(
                    lambda b: http.post(url, content=b, headers=headers, extensions={"sni_hostname": domain}),
                    batch,
                    args.seconds,
                    args.calls,
                )
            in_process = in_process_batch(root / "in-process", batch, args.seconds, args.calls)
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
            f"{BATCH_ROWS:,}-row batches over HTTPS ÷ in-process (ASGI app, no socket)",
            f"{over_https:,.0f} ÷ {in_process:,.0f} rows/s",
            over_https / in_process,
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
    publish(table, write=args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
