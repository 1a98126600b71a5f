"""Growing past one VM, for real: two VM stand-ins, each with its own Docker engine, on a Docker network that stands
in for the Hetzner private network. The manager's swarm moves onto it, a worker joins with the token on stdin, the
replicas spread over both, PostgreSQL holds models and logs, Traefik on the manager reaches the worker's tasks over
the overlay; a promotion reaches both nodes, and the worker is drained and removed under load without a failed
request. Every step runs the same rendered scripts the Pulumi program runs (infra/host/cluster_plan.py).
"""

from __future__ import annotations

import json
import shlex
import time

import pytest

from infra.host.backup import (
    BACKUP_COMMAND,
    ENV_FILE,
    INSTALL_CREDENTIALS,
    RESTORE_COMMAND,
    credentials_bundle,
    host_setup_parts,
)
from infra.host.cluster_plan import (
    JOIN_TOKEN_COMMAND,
    SwarmAddress,
    render_node_drain,
    render_swarm_address,
    render_worker_join,
)
from infra.host.setup import render_host_setup
from infra.spec.backup import BackupSettings
from infra.spec.postgres import POSTGRES_SERVICE
from infra.spec.stack import APP_COMMAND, SECRETS
from testbed.cluster import DATA_ROOT, DOMAIN, MANAGER, WORKER, Cluster, two_node_cluster
from testbed.stack import TIMINGS, fresh_observations, wait_until
from tests.support.load import WATCHING_RATE, Load

pytestmark = pytest.mark.standin


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with two_node_cluster(tmp_path_factory.mktemp("cluster")) as env:
        yield env


# 1
def test_the_swarm_runs_on_the_private_network_with_both_nodes_ready(cluster: Cluster) -> None:
    info = json.loads(cluster.ssh(cluster.manager, "docker info --format '{{json .Swarm}}'"))
    assert info["NodeAddr"] == cluster.manager.ip and info["Nodes"] == 2
    nodes = cluster.ssh(cluster.manager, "docker node ls --format '{{.Hostname}} {{.Status}} {{.Availability}}'")
    assert sorted(nodes.split("\n")[:-1]) == [f"{MANAGER} Ready Active", f"{WORKER} Ready Active"]
    labels = cluster.ssh(cluster.manager, f"docker node inspect --format '{{{{json .Spec.Labels}}}}' {WORKER}")
    assert json.loads(labels) == {"mlapi.node": WORKER}
    # A second run of every step changes nothing (a second `pulumi up`).
    private = SwarmAddress(cluster.manager.ip, f"{cluster.manager.ip}:2377", cluster.manager.ip)
    assert "moved" not in cluster.ssh(cluster.manager, render_swarm_address(private))
    token = cluster.ssh(cluster.manager, JOIN_TOKEN_COMMAND).strip()
    again = cluster.ssh(cluster.worker, render_worker_join(cluster.worker.ip, cluster.manager.ip), stdin=token)
    assert again.strip() == cluster.worker_node_id


# 2
def test_replicas_spread_over_both_nodes_and_traefik_reaches_both(cluster: Cluster) -> None:
    placed = cluster.replicas_by_node()
    assert len(placed[MANAGER]) == 1 and len(placed[WORKER]) == 1, placed
    postgres = cluster.ssh(cluster.manager, "docker ps -q --filter label=com.docker.swarm.service.name=mlapi-postgres")
    assert postgres.strip(), "PostgreSQL runs on the manager"
    answered = set(cluster.served())
    assert answered == placed[MANAGER] | placed[WORKER], (answered, placed)
    # The worker's replica keeps nothing of its own: models and logs are in the shared store.
    listing = cluster.ssh(cluster.worker, f"ls -A {DATA_ROOT}/model").split()
    assert "models" not in listing and not [name for name in listing if name.startswith("predictions")], listing


PROMETHEUS_API = (
    "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
    "'http://mlapi-prometheus:9090' + sys.argv[1], timeout=10).read().decode())"
)


def prometheus_api(cluster: Cluster, path: str) -> dict:
    """Prometheus' API on the manager, asked from a model replica there (its port is published nowhere)."""
    replica = cluster.ssh(cluster.manager, "docker ps -q --filter label=com.docker.swarm.service.name=mlapi-model")
    command = f"docker exec {replica.split()[0]} python -c {shlex.quote(PROMETHEUS_API)} {shlex.quote(path)}"
    return json.loads(cluster.ssh(cluster.manager, command))


# 2b
def test_prometheus_scrapes_the_host_of_both_nodes_and_postgresql(cluster: Cluster) -> None:
    """With a worker: a node exporter on each node, and PostgreSQL's exporter connected to the database."""

    def jobs() -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for target in prometheus_api(cluster, "/api/v1/targets?state=active")["data"]["activeTargets"]:
            found.setdefault(target["labels"]["job"], []).append(target["health"])
        return found

    wait_until(lambda: jobs().get("node") == ["up", "up"] and jobs().get("postgres") == ["up"], 120, "both exporters")
    [up] = prometheus_api(cluster, "/api/v1/query?query=pg_up")["data"]["result"]
    assert up["value"][1] == "1", up  # the exporter reached the database with the replicas' user and secret
    hosts = prometheus_api(cluster, "/api/v1/query?query=node_uname_info")["data"]["result"]
    assert len({series["metric"]["instance"] for series in hosts}) == 2, hosts  # one exporter a node


# 3
def test_a_promotion_reaches_the_replicas_on_both_nodes(cluster: Cluster) -> None:
    before = set(cluster.served().values())
    assert len(before) == 1
    ingest = cluster.tokens[SECRETS[1]]
    status, body = cluster.https("POST", "/observations", {"observations": fresh_observations(354, seed=7)}, ingest)
    assert status == 201, body
    outcome = json.loads(cluster.ssh(cluster.manager, f"{APP_COMMAND} retrain"))  # cron's command, on the manager
    assert outcome["outcome"] == "promoted", outcome
    promoted_at = time.monotonic()
    wait_until(
        lambda: set(cluster.served(10).values()) == {outcome["current_version"]} and len(cluster.served(20)) == 2,
        15,
        "both nodes' replicas to serve the promoted version",
    )
    TIMINGS.append(f"two-node cluster: promotion served by both nodes after {time.monotonic() - promoted_at:.1f} s")


# 4
def database_state(cluster: Cluster) -> tuple[str, ...]:
    """Versions, the current one, observations and history rows, read in PostgreSQL on the manager."""
    query = (
        "select string_agg(number::text, ',' order by number) from model_versions; "
        "select convert_from(value, 'UTF8') from registry_state where key = 'current'; "
        "select count(*) from observations; select count(*) from retrain_history;"
    )
    task = f"$(docker ps -q --filter label=com.docker.swarm.service.name={POSTGRES_SERVICE} | head -n 1)"
    output = cluster.ssh(cluster.manager, f'docker exec {task} psql -U mlapi -d mlapi -Atc "{query}"')
    return tuple(output.split())


def test_backup_and_restore_carry_the_database(cluster: Cluster) -> None:
    """With workers the models and logs are in PostgreSQL: the snapshot holds a pg_dump, and a restore puts the
    database back as it was (in one transaction), with the replicas serving the snapshot's current version."""
    settings = BackupSettings("/var/lib/mlapi-test-repository", "@daily")
    cluster.ssh(cluster.manager, render_host_setup(cluster.spec, *host_setup_parts(settings, DATA_ROOT)))
    bundle = credentials_bundle(settings, "correct horse battery staple", {}, None, None)
    cluster.ssh(cluster.manager, INSTALL_CREDENTIALS, stdin=bundle)
    snapshot = database_state(cluster)
    backed_up = cluster.ssh(cluster.manager, BACKUP_COMMAND)
    assert "snapshot saved" in backed_up
    listing = cluster.ssh(cluster.manager, f"set -a; . {ENV_FILE}; set +a; restic ls latest")
    assert "/postgres.dump" in listing
    ingest = cluster.tokens[SECRETS[1]]
    status, _ = cluster.https("POST", "/observations", {"observations": fresh_observations(100, seed=11)}, ingest)
    assert status == 201
    cluster.ssh(cluster.manager, f"{APP_COMMAND} retrain")
    assert database_state(cluster) != snapshot
    restored = cluster.ssh(cluster.manager, f"{RESTORE_COMMAND} latest")
    assert "restored the database" in restored, restored
    assert database_state(cluster) == snapshot
    current = snapshot[1]
    wait_until(lambda: set(cluster.served(10).values()) == {current}, 30, f"every replica to serve {current}")


# 5
def test_the_worker_is_drained_and_removed_under_load_without_a_failed_request(cluster: Cluster) -> None:
    with Load(
        DOMAIN,
        443,
        str(cluster.pebble_root),
        address=cluster.manager.ip,
        clients=4,
        max_seconds=180,
        rate=WATCHING_RATE,
    ) as load:
        load.wait_for_answers_after(load.report.started_at, count=50)
        drained_at = time.monotonic()
        output = cluster.ssh(cluster.manager, render_node_drain(cluster.worker_node_id))
        converged = time.monotonic()
        drain_s = converged - drained_at
        load.wait_for_answers_after(converged)
    report = load.report
    report.covers(drained_at, converged)
    assert "drained and removed" in output
    assert report.failed == [], report.summary()
    assert len(report.outcomes) > 100, report.summary()
    placed = cluster.replicas_by_node()
    assert len(placed[MANAGER]) == 2 and placed[WORKER] == set(), placed
    nodes = cluster.ssh(cluster.manager, "docker node ls --format '{{.Hostname}}'").split()
    assert nodes == [MANAGER]
    TIMINGS.append(f"two-node cluster: drain + node rm under load {drain_s:.1f} s; {report.summary()}")
