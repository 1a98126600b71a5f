"""Load generation for the stack benchmarks: wrk and hey in a container on the stack's network, and where the CPU
goes while they run."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import docker
from docker.types import Mount
from sklearn.datasets import load_diabetes

from infra.spec.monitoring import ALERTMANAGER_SERVICE, NODE_EXPORTER_SERVICE, PROMETHEUS_SERVICE
from infra.spec.stack import MODEL_SERVICE, NETWORK, TRAEFIK_CONTAINER

CONNECTIONS = 8  # wrk/hey connections: 4 per replica when direct
BENCH_PACKAGES = ("wrk", "hey")


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
        self.last_cpu_seconds = 0.0
        body = json.dumps({"features": features()})
        (workdir / "body.json").write_text(body)
        row = list(features().values())
        v2 = json.dumps({"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, len(row)], "data": [row]}]})
        content_type = 'wrk.headers["Content-Type"] = "application/json"\n'
        for script, text in (("post.lua", body), ("v2.lua", v2)):  # the same row: /predict's and V2's form
            (workdir / script).write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(text)}\n{content_type}')

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

    def wrk(
        self, urls: list[str], seconds: float, *, post: bool, body: str = "post.lua"
    ) -> tuple[float, dict[str, float]]:
        """Requests/s summed over one wrk per URL (the connections split between them), and the first's latency
        percentiles (ms). ``body``: post.lua (/predict's record) or v2.lua (the same row as a V2 tensor)."""
        per_url = max(1, CONNECTIONS // len(urls))
        script = " & ".join(
            f"wrk -t1 -c{per_url} -d{seconds:.0f}s --latency {f'-s /bench/{body} ' if post else ''}{url} "
            f"> /tmp/wrk{index}.txt"
            for index, url in enumerate(urls)
        )
        # `times`: the CPU the shell's children (the wrk processes) used, for the breakdown of (a).
        output = self.run(f"{script} & wait; times; for f in /tmp/wrk*.txt; do cat $f; echo ===; done")
        user_min, user_s, system_min, system_s = re.findall(r"(\d+)m([\d.]+)s (\d+)m([\d.]+)s", output)[1]
        self.last_cpu_seconds = int(user_min) * 60 + float(user_s) + int(system_min) * 60 + float(system_s)
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


def _busy_seconds() -> float:
    """CPU time the whole machine spent busy (all cores, /proc/stat), in seconds."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Where the CPU goes during a load phase: Traefik, the model replicas, and the rest of the machine (the load
    generator, dockerd, the kernel's network path). From the containers' cgroup counters and /proc/stat."""

    def __init__(self, client: docker.DockerClient, load: Load) -> None:
        self.client, self.load = client, load

    def _container_seconds(self) -> dict[str, float]:
        replicas = self.client.containers.list(filters={"label": f"com.docker.swarm.service.name={MODEL_SERVICE}"})
        used = {"traefik": 0.0, "replicas": 0.0}
        for role, containers in (("traefik", [self.client.containers.get(TRAEFIK_CONTAINER)]), ("replicas", replicas)):
            for container in containers:
                stats = self.client.api.stats(container.id, stream=False, one_shot=True)
                used[role] += stats["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9
        return used

    def measure(self, phase: Callable[[], tuple[float, dict]], seconds: float) -> tuple[float, dict, dict[str, float]]:
        """Runs ``phase`` (returns req/s and latencies) and adds the CPU microseconds per request of each part."""
        before, busy = self._container_seconds(), _busy_seconds()
        rate, latency = phase()
        after, busy = self._container_seconds(), _busy_seconds() - busy
        requests = rate * seconds
        used = {role: after[role] - before[role] for role in before}
        used["load"] = self.load.last_cpu_seconds
        used["rest"] = max(0.0, busy - sum(used.values()))
        return rate, latency, {role: value / requests * 1e6 for role, value in used.items()}


class MonitoringMeter:
    """What Prometheus, Alertmanager and the node exporter take on the stack (issue 27's goal: at most 250 MB
    together, at most 5 % of a core at idle): each container's memory (its cgroup's anonymous memory, what the kernel
    cannot drop) and the CPU its cgroup used between two readings."""

    SERVICES = (PROMETHEUS_SERVICE, ALERTMANAGER_SERVICE, NODE_EXPORTER_SERVICE)  # one node: one exporter

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client

    def _stats(self) -> dict[str, dict]:
        found = {}
        for service in self.SERVICES:
            (container,) = self.client.containers.list(filters={"label": f"com.docker.swarm.service.name={service}"})
            found[service] = self.client.api.stats(container.id, stream=False, one_shot=True)
        return found

    def measure(self, during: Callable[[], object]) -> dict[str, tuple[float, float]]:
        """Runs ``during`` and returns, per service, (MB of anonymous memory after it, % of one core during it)."""
        before, started = self._stats(), time.monotonic()
        during()
        after, seconds = self._stats(), time.monotonic() - started
        measured = {}
        for service in self.SERVICES:
            used = (
                after[service]["cpu_stats"]["cpu_usage"]["total_usage"]
                - before[service]["cpu_stats"]["cpu_usage"]["total_usage"]
            )
            memory = after[service]["memory_stats"]
            anonymous = memory.get("stats", {}).get("anon", memory.get("usage", 0))
            measured[service] = (anonymous / 2**20, used / 1e9 / seconds * 100)
        return measured
