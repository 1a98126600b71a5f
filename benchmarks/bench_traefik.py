"""What each part of Traefik's configuration costs per request (not a test; prints numbers).

    python -m benchmarks.bench_traefik [--seconds 8] [--write]

The local stack is brought up once per variant, each time with one thing taken out of what infra/spec/stack.py declares
(a middleware of the prediction route, or the access log), and POST /predict is loaded through Traefik + TLS as in
`make bench` (a). The CPU per request of Traefik, the replicas, the load generator and the rest of the machine is
measured over each phase. The variants exist only here: the product always runs the full chain. The baseline runs
first and last, to show the drift between phases on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_stack import publish
from benchmarks.loadgen import BENCH_PACKAGES, CONNECTIONS, CpuMeter, Load
from infra.local import images
from infra.local import stack as local
from infra.spec import stack as spec
from infra.spec import traefik
from infra.spec.traefik import PREDICT_ROUTER, ROUTER, WEBSECURE_PORT
from testbed.stack import free_port

MIDDLEWARES = {
    f"{ROUTER}-limit": "buffering (request body limit)",
    f"{ROUTER}-ratelimit": "rate limit per client",
    f"{ROUTER}-inflight": "in-flight limit per client",
    f"{PREDICT_ROUTER}-retry": "retry (on a dead replica: connection errors, 502-504)",
    f"{ROUTER}-headers": "security headers (HSTS, nosniff, frame, referrer, CSP)",
}


RETRY = f"traefik.http.middlewares.{PREDICT_ROUTER}-retry.retry."


def without(
    middleware: str | None = None,
    access_log: bool = True,
    retry: dict[str, str | None] | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Make the spec declare the stack without one middleware on every router, or without the access log, or with
    the prediction route's retry options changed (None: the option left out), or with more in Traefik's environment."""

    def flags(inputs, network):
        return tuple(f for f in traefik.traefik_flags(inputs, network) if access_log or f != "--accesslog=true")

    def labels(inputs, network, port):
        declared = traefik.model_labels(inputs, network, port)
        for option, value in (retry or {}).items():
            declared.pop(RETRY + option, None)
            if value is not None:
                declared[RETRY + option] = value
        if middleware is None:
            return declared
        return {
            key: ",".join(m for m in value.split(",") if m != middleware) if key.endswith(".middlewares") else value
            for key, value in declared.items()
        }

    def runtime_env(memory_mb):
        return {**traefik.go_runtime_env(memory_mb), **(env or {})}

    spec.traefik_flags, spec.model_labels, spec.go_runtime_env = flags, labels, runtime_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each load phase")
    parser.add_argument("--write", action="store_true", help="add the table to docs/benchmarks.md")
    parser.add_argument("--only", help="run only the variants whose label contains this text")
    args = parser.parse_args(argv)
    variants = [
        ("everything (as deployed)", {}),
        *((f"without {what}", {"middleware": name}) for name, what in MIDDLEWARES.items()),
        ("without the access log", {"access_log": False}),
        ("retry on connection errors only (no status)", {"retry": {"status": None}}),
        ("retry with the default body limit (no maxrequestbodybytes)", {"retry": {"maxrequestbodybytes": None}}),
        ("retry of bodies up to 64 KiB", {"retry": {"maxrequestbodybytes": str(64 * 1024)}}),
        ("everything, with Go's default GC (GOGC=100)", {"env": {"GOGC": "100"}}),
        ("everything, again", {}),
    ]
    if args.only:
        variants = [variant for variant in variants if args.only in variant[0]]
    client = local.engine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlapi-bench-") as tmp:
        root = Path(tmp)
        load = Load(client, images.build_base(client, BENCH_PACKAGES), root)
        meter = CpuMeter(client, load)
        local.down(quiet=True)
        options = local.LocalOptions.isolated(root / "stack", free_port(), free_port())
        try:
            for label, variant in variants:
                without(**variant)
                stack = local.up(options, quiet=True)
                url = f"https://{stack.options.domain}:{WEBSECURE_PORT}/predict"
                load.wrk([url], 3, post=True)  # warm up
                rate, _, cpu = meter.measure(lambda u=url: load.wrk([u], args.seconds, post=True), args.seconds)
                rows.append((label, rate, cpu))
                print(f"{label}: {rate:,.0f} req/s, Traefik {cpu['traefik']:,.0f} µs a request", flush=True)
        finally:
            local.down(options, quiet=True)
    table = (
        f"## `python -m benchmarks.bench_traefik`, {datetime.date.today().isoformat()}: {os.cpu_count()} cores "
        f"({platform.machine()}), {CONNECTIONS} connections, {args.seconds:.0f} s a phase\n\n"
        "POST /predict through Traefik + TLS; CPU per request in µs.\n\n"
        "| Traefik runs | req/s | Traefik | replicas | load generator | rest |\n|---|---|---|---|---|---|\n"
        + "".join(
            f"| {label} | {rate:,.0f} | {cpu['traefik']:,.0f} | {cpu['replicas']:,.0f} | {cpu['load']:,.0f} | "
            f"{cpu['rest']:,.0f} |\n"
            for label, rate, cpu in rows
        )
    )
    publish(table, write=args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
