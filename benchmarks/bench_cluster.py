"""Throughput with one node's worth of replicas against two nodes' worth, on a real two-node swarm of VM stand-ins
(not a test; prints numbers).

    python -m benchmarks.bench_cluster [--seconds 10] [--write]

Both stand-ins share this machine's cores, so this measures what the second node costs (the overlay's VXLAN hop
between nodes, PostgreSQL instead of SQLite for the log, a second engine), not what it adds: on separate VMs the
second node brings its own cores. Phases, each with wrk through Traefik on the manager (8 connections):

1. two nodes' worth: 4 replicas, 2 on each node;
2. one node's worth: 2 replicas, the worker drained and removed (both replicas on the manager).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

from benchmarks.bench_stack import publish
from benchmarks.loadgen import BENCH_PACKAGES, CONNECTIONS, Load
from infra.host.cluster_plan import render_node_drain
from infra.local import images
from infra.spec.stack import MODEL_SERVICE
from testbed.cluster import DOMAIN, two_node_cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each load phase")
    parser.add_argument("--write", action="store_true", help="add the table to docs/benchmarks.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mlapi-bench-cluster-") as tmp, two_node_cluster(Path(tmp)) as cluster:
        tool = images.build_base(cluster.client, BENCH_PACKAGES)
        load = Load(cluster.client, tool, Path(tmp), network=cluster.network, hosts={DOMAIN: cluster.manager.ip})
        url = f"https://{DOMAIN}:443/predict"  # the port spelled out: the tool image has no /etc/services

        def placed() -> str:
            return ", ".join(f"{node}: {len(ids)}" for node, ids in cluster.replicas_by_node().items())

        cluster.ssh(cluster.manager, f"docker service scale --detach=false {MODEL_SERVICE}=4 >/dev/null")
        time.sleep(5)  # Traefik's provider and health checks see the new tasks
        load.wrk([url], 3, post=True)
        two_nodes, two_latency = load.wrk([url], args.seconds, post=True)
        two_placed = placed()
        cluster.ssh(cluster.manager, f"docker service scale --detach=false {MODEL_SERVICE}=2 >/dev/null")
        cluster.ssh(cluster.manager, render_node_drain(cluster.worker_node_id))
        time.sleep(5)
        load.wrk([url], 3, post=True)
        one_node, one_latency = load.wrk([url], args.seconds, post=True)
        one_placed = placed()

    table = (
        f"## `python -m benchmarks.bench_cluster`, {datetime.date.today().isoformat()}: two VM stand-ins sharing "
        f"{os.cpu_count()} cores ({platform.machine()}), {CONNECTIONS} connections, {args.seconds:.0f} s a phase\n\n"
        "| replicas | placed | POST /predict through Traefik | p50 | p99 |\n|---|---|---|---|---|\n"
        f"| 4 (two nodes' worth) | {two_placed} | {two_nodes:,.0f} req/s | {two_latency.get('p50', 0):.1f} ms "
        f"| {two_latency.get('p99', 0):.1f} ms |\n"
        f"| 2 (one node's worth) | {one_placed} | {one_node:,.0f} req/s | {one_latency.get('p50', 0):.1f} ms "
        f"| {one_latency.get('p99', 0):.1f} ms |\n\n"
        f"Ratio two ÷ one: {two_nodes / one_node:.2f}. Both nodes run on the same cores here, so the second node "
        "cannot add capacity; the ratio shows its cost. On separate VMs each node brings its own cores.\n"
    )
    publish(table, write=args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
