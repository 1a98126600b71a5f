"""Growing past one VM under mocks: workers on a private network, joins with a secret token, drains before removal,
DNS-01 certificates with a scoped token, a load balancer with the PROXY protocol; and nothing of it with workers=0."""

from __future__ import annotations

import base64
import json

import pytest
import yaml

from infra.host.cluster_plan import JOIN_TOKEN_COMMAND, MANAGER_PRIVATE_IP, SWARM_PORTS
from infra.program.dns_challenge import DNS_WRITE, ZONE_READ
from tests.support.program import (
    CONTAINER,
    DNS,
    FIREWALL,
    LOCAL,
    REMOTE,
    SERVER,
    SERVICE,
    WORKERS,
    assert_config_refused,
)
from tests.support.pulumi_harness import (
    CLOUDFLARE_TOKEN,
    LOAD_BALANCER_IPS,
    VALID_CONFIG,
    Deployment,
    plaintext_strings,
    run_program,
)

NETWORK = "hcloud:index/network:Network"
SUBNET = "hcloud:index/networkSubnet:NetworkSubnet"
SERVER_NETWORK = "hcloud:index/serverNetwork:ServerNetwork"
LOAD_BALANCER = "hcloud:index/loadBalancer:LoadBalancer"
LB_NETWORK = "hcloud:index/loadBalancerNetwork:LoadBalancerNetwork"
LB_SERVICE = "hcloud:index/loadBalancerService:LoadBalancerService"
LB_TARGET = "hcloud:index/loadBalancerTarget:LoadBalancerTarget"
API_TOKEN = "cloudflare:index/apiToken:ApiToken"
CLUSTER_TYPES = {NETWORK, SUBNET, SERVER_NETWORK, LOAD_BALANCER, LB_NETWORK, LB_SERVICE, LB_TARGET, API_TOKEN}


@pytest.fixture(scope="module")
def cluster() -> Deployment:
    return run_program(WORKERS)


def graph(deployment: Deployment) -> list[tuple[str, str, str]]:
    return sorted((r.typ, r.name, json.dumps(r.inputs, sort_keys=True, default=str)) for r in deployment.resources)


def test_zero_workers_is_exactly_the_single_vm_graph() -> None:
    default, explicit = run_program(VALID_CONFIG), run_program({**VALID_CONFIG, "workers": "0"})
    assert graph(explicit) == graph(default)
    assert not {r.typ for r in default.resources} & CLUSTER_TYPES
    assert not [r for r in default.of_type(REMOTE) if "swarm join" in str(r.inputs.get("create"))]
    assert "placement" not in default.one(SERVICE, "-model").inputs["taskSpec"]


def test_workers_get_a_private_network_in_the_locations_zone(cluster: Deployment) -> None:
    network = cluster.one(NETWORK)
    assert network.inputs["ipRange"] == "10.44.0.0/16"
    subnet = cluster.one(SUBNET)
    assert subnet.inputs == {
        "networkId": int(network.id),
        "type": "cloud",
        "networkZone": "eu-central",  # nbg1
        "ipRange": "10.44.1.0/24",
    }
    manager = cluster.one(SERVER_NETWORK)
    assert manager.inputs["serverId"] == int(cluster.one(SERVER, "dev-server").id)
    assert manager.inputs["ip"] == MANAGER_PRIVATE_IP and manager.inputs["networkId"] == int(network.id)


def test_workers_are_servers_on_the_private_network_with_ssh_only(cluster: Deployment) -> None:
    workers = sorted((r for r in cluster.of_type(SERVER) if "-worker-" in r.name), key=lambda r: r.name)
    manager = cluster.one(SERVER, "dev-server")
    assert [w.inputs["name"] for w in workers] == ["mlapi-dev-worker-1", "mlapi-dev-worker-2"]
    firewall = cluster.one(FIREWALL, "worker-firewall")
    for index, worker in enumerate(workers):
        assert worker.inputs["serverType"] == "cx33"
        assert worker.inputs["location"] == manager.inputs["location"]
        assert worker.inputs["sshKeys"] == manager.inputs["sshKeys"]
        assert worker.inputs["networks"] == [{"networkId": int(cluster.one(NETWORK).id), "ip": f"10.44.1.{10 + index}"}]
        assert worker.inputs["firewallIds"] == [int(firewall.id)]
        assert worker.wire["userData"] and plaintext_strings(worker.wire["userData"]) == []  # the worker's host key
        assert "HC_Volume" not in worker.inputs["userData"]  # the data volume stays with the manager
    assert [(rule.get("port"), rule["protocol"]) for rule in firewall.inputs["rules"]] == [
        ("22", "tcp"),
        (None, "icmp"),
    ]
    # Swarm's ports are opened on no public interface, on no server.
    for each in cluster.of_type(FIREWALL):
        opened = {(rule.get("port"), rule["protocol"]) for rule in each.inputs["rules"]}
        assert not opened & set(SWARM_PORTS), each.name


def test_the_swarm_moves_to_the_private_address_and_back_when_the_last_worker_goes(cluster: Deployment) -> None:
    address = cluster.one(REMOTE, "swarm-address")
    assert f"ADVERTISE={MANAGER_PRIVATE_IP}\nLISTEN={MANAGER_PRIVATE_IP}:2377\n" in address.inputs["create"]
    assert "--force-new-cluster" in address.inputs["create"]
    assert "ADVERTISE=127.0.0.1\nLISTEN=127.0.0.1:2377\n" in address.inputs["delete"]
    assert address.opts.deleted_with._name == "mlapi-dev-server"  # a manager going away is not moved back


def test_workers_join_with_the_token_as_a_secret_and_drain_before_they_go(cluster: Deployment) -> None:
    token = cluster.one(REMOTE, "join-token")
    assert token.inputs["create"] == JOIN_TOKEN_COMMAND
    assert "stdout" in token.opts.additional_secret_outputs
    assert token.inputs["connection"]["host"] == cluster.exports["ipv4"]
    for index in (1, 2):
        join = cluster.one(REMOTE, f"worker-{index}-join")
        assert join.wire["stdin"] and plaintext_strings(join.wire["stdin"]) == []  # the token, marked secret
        assert "--token" not in join.inputs["create"]  # the engine's API, the request on stdin (no argv shows it)
        assert "--unix-socket /var/run/docker.sock" in join.inputs["create"]
        assert f"WORKER_IP=10.44.1.{9 + index}\n" in join.inputs["create"]  # what the join request advertises
        assert f"MANAGER_IP={MANAGER_PRIVATE_IP}\nSWARM_PORT=2377\n" in join.inputs["create"]
        assert join.inputs["connection"]["host"] == cluster.exports["workerIpv4s"][index - 1]
        node = cluster.one(REMOTE, f"worker-{index}-node")
        assert node.inputs["connection"]["host"] == cluster.exports["ipv4"]  # run on the manager
        assert f"LABEL=mlapi-dev-worker-{index}\nNODE_LABEL=mlapi.node\n" in node.inputs["create"]
        drain = node.inputs["delete"]
        assert drain.index("--availability drain") < drain.index("docker node rm")
        assert "grep -qE '^(Running|Starting|Preparing)'" in drain  # waits until the node's tasks have stopped
        assert {d._name for d in node.opts.depends_on} == {f"mlapi-dev-worker-{index}-join"}


def test_replicas_spread_over_the_nodes_once_they_have_joined(cluster: Deployment) -> None:
    service = cluster.one(SERVICE, "model")
    placement = service.inputs["taskSpec"]["placement"]
    assert placement == {"prefs": ["spread=node.labels.mlapi.node"], "maxReplicas": 2}  # 2 replicas, 3 nodes: 1 + 1
    host_setup = cluster.one(REMOTE, "host-setup")
    assert {"mlapi-dev-worker-1-node", "mlapi-dev-worker-2-node", "mlapi-dev-swarm-address"} <= {
        d._name for d in host_setup.opts.depends_on
    }


def test_workers_need_a_registry_image() -> None:
    config = {key: value for key, value in WORKERS.items() if key != "modelImage"}
    assert_config_refused(config, "modelImage", "required with workers > 0")


@pytest.mark.parametrize(("value", "says"), [("11", "0-10"), ("-1", "0-10"), ("two", "0-10")])
def test_invalid_workers_names_the_key(value: str, says: str) -> None:
    assert_config_refused({**WORKERS, "workers": value}, "workers", says)


# -- DNS-01 ------------------------------------------------------------------------------------------------------
def test_dns_challenge_creates_a_zone_scoped_token_and_never_shows_it() -> None:
    deployment = run_program({**VALID_CONFIG, "acmeChallenge": "dns", "dnsProxied": "true"})
    token = deployment.one(API_TOKEN)
    [policy] = token.inputs["policies"]
    assert policy["effect"] == "allow"
    assert {group["id"] for group in policy["permissionGroups"]} == {ZONE_READ, DNS_WRITE}
    assert json.loads(policy["resources"]) == {
        f"com.cloudflare.api.account.zone.{VALID_CONFIG['cloudflareZoneId']}": "*"
    }
    installer = deployment.one(REMOTE, "dns-token")
    assert installer.inputs["stdin"] == CLOUDFLARE_TOKEN and plaintext_strings(installer.wire["stdin"]) == []
    assert "setpriv --reuid=10002 --regid=10002" in installer.inputs["create"]  # written as Traefik, 0400
    assert installer.inputs["create"].rstrip().endswith("0400\necho dns token installed")
    for resource in deployment.resources:
        assert CLOUDFLARE_TOKEN not in "\n".join(plaintext_strings(resource.wire)), resource.name
    traefik = deployment.one(CONTAINER, "traefik")
    flags = traefik.inputs["command"]
    assert "--certificatesresolvers.letsencrypt.acme.dnschallenge.provider=cloudflare" in flags
    assert not [flag for flag in flags if "tlschallenge" in flag]
    # The token's file, and Go's collector tuned for the container's limit (256 MiB less the 64 MiB tmpfs and 32).
    assert traefik.inputs["envs"] == [
        "CF_DNS_API_TOKEN_FILE=/acme/cloudflare-dns-token",
        "GOGC=400",
        "GOMEMLIMIT=160MiB",
    ]
    assert "mlapi-dev-dns-token" in {d._name for d in traefik.opts.depends_on}
    assert all(record.inputs["proxied"] is True for record in deployment.of_type(DNS))


def test_dns_proxied_still_needs_the_dns_challenge() -> None:
    assert_config_refused({**VALID_CONFIG, "dnsProxied": "true"}, "dnsProxied", "acmeChallenge dns")
    assert_config_refused({**VALID_CONFIG, "acmeChallenge": "http"}, "acmeChallenge", "tls, dns")


# -- load balancer -----------------------------------------------------------------------------------------------
def test_a_load_balancer_passes_tcp_through_with_the_proxy_protocol() -> None:
    deployment = run_program({**VALID_CONFIG, "loadBalancer": "true"})
    balancer = deployment.one(LOAD_BALANCER)
    assert balancer.inputs["loadBalancerType"] == "lb11" and balancer.inputs["location"] == "nbg1"
    assert deployment.one(LB_NETWORK).inputs["ip"] == "10.44.1.5"
    services = sorted(deployment.of_type(LB_SERVICE), key=lambda r: r.inputs["listenPort"])
    assert [(s.inputs["listenPort"], s.inputs["destinationPort"]) for s in services] == [(80, 80), (443, 443)]
    assert all(s.inputs["protocol"] == "tcp" and s.inputs["proxyprotocol"] is True for s in services)
    target = deployment.one(LB_TARGET)
    assert target.inputs["serverId"] == int(deployment.one(SERVER).id) and target.inputs["usePrivateIp"] is True
    # Clients reach the load balancer; the server's public interface takes no web traffic any more.
    assert {r.inputs["content"] for r in deployment.of_type(DNS)} == set(LOAD_BALANCER_IPS)
    rules = deployment.one(FIREWALL).inputs["rules"]
    assert not [rule for rule in rules if rule.get("port") in ("80", "443")]
    flags = deployment.one(CONTAINER, "traefik").inputs["command"]
    assert "--entrypoints.websecure.proxyprotocol.trustedips=10.44.1.5/32" in flags
    assert "--entrypoints.web.proxyprotocol.trustedips=10.44.1.5/32" in flags
    assert f"--connect-to {LOAD_BALANCER_IPS[0]}" in deployment.one(LOCAL, "smoke-check").inputs["create"]
    assert deployment.exports["loadBalancerIpv4"] == LOAD_BALANCER_IPS[0]
    assert not [r for r in deployment.of_type(SERVER) if "-worker-" in r.name]


def test_a_preview_with_workers_evaluates_before_any_command_has_run() -> None:
    """In a preview the join's stdout (the node ID) is unknown: the program must still evaluate."""
    preview = run_program(WORKERS, preview=True)
    assert len([r for r in preview.of_type(REMOTE) if r.name.endswith("-node")]) == 2


SECRET_TYPE = "docker:index/secret:Secret"
RANDOM = "random:index/randomPassword:RandomPassword"


def test_with_workers_models_and_logs_live_in_postgresql_on_the_manager(cluster: Deployment) -> None:
    postgres = cluster.one(SERVICE, "postgres")
    task = postgres.inputs["taskSpec"]
    container = task["containerSpec"]
    assert task["placement"] == {"constraints": ["node.role==manager"]}  # the data volume is there
    assert container["user"] == "999:999" and container["readOnly"] is True
    # The image's own entrypoint and command (it initializes an empty data directory); its socket on a tmpfs.
    assert "commands" not in container and "args" not in container
    assert {"type": "tmpfs", "target": "/var/run/postgresql"}.items() <= container["mounts"][-1].items()
    assert container["mounts"][0] == {
        "type": "bind",
        "source": "/srv/mlapi/postgres",
        "target": "/var/lib/postgresql/data",
        "readOnly": False,
    }
    assert container["env"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "POSTGRES_PASSWORD" not in container["env"]
    assert postgres.inputs["updateConfig"]["order"] == "stop-first"  # never two servers on one data directory
    assert postgres.inputs["mode"]["replicated"]["replicas"] == 1
    model = cluster.one(SERVICE, "model").inputs["taskSpec"]["containerSpec"]
    assert model["env"]["MLAPI_DATABASE_URL_FILE"] == "/run/secrets/database_url"
    assert model["env"]["MLAPI_SEED_MARKER"] == "/data/holds-the-data-volume"
    assert {s["fileName"] for s in model["secrets"]} == {"admin_token", "ingest_token", "database_url"}
    pending = cluster.one(REMOTE, "postgres-pending-dump")
    assert "pg_restore" in pending.inputs["create"] and {d._name for d in pending.opts.depends_on} == {
        "mlapi-dev-postgres"
    }
    assert "mlapi-dev-postgres-pending-dump" in {d._name for d in cluster.one(SERVICE, "model").opts.depends_on}
    # One random password, in two secrets: the server's and the replicas' URL; neither in plaintext anywhere.
    password = cluster.one(RANDOM, "postgres-password").inputs
    assert password["special"] is False and password["length"] >= 32
    url_secret = cluster.one(SECRET_TYPE, "database-url-secret")
    assert url_secret.wire["data"] and plaintext_strings(url_secret.wire["data"]) == []
    assert "--force-new-cluster" in cluster.one(REMOTE, "swarm-address").inputs["create"]
    assert (
        "SEED_MARKER=/srv/mlapi/model/holds-the-data-volume\n" in cluster.one(REMOTE, "swarm-address").inputs["create"]
    )


def test_with_workers_prometheus_scrapes_postgresqls_exporter(cluster: Deployment) -> None:
    exporter = cluster.one(SERVICE, "postgres-exporter").inputs
    container = exporter["taskSpec"]["containerSpec"]
    assert container["image"].startswith("sha256:")  # the manager's pulled image: it runs there only
    assert "prometheuscommunity/postgres-exporter:v0.17.1" in {
        image.inputs["name"] for image in cluster.of_type("docker:index/remoteImage:RemoteImage")
    }
    # The replicas' user, the password from PostgreSQL's own secret (a file readable by the exporter's user only).
    assert container["env"] == {
        "DATA_SOURCE_URI": "mlapi-postgres:5432/mlapi?sslmode=disable",
        "DATA_SOURCE_USER": "mlapi",
        "DATA_SOURCE_PASS_FILE": "/run/secrets/postgres_password",
    }
    [secret] = container["secrets"]
    assert (secret["fileName"], secret["fileUid"], secret["fileMode"]) == ("postgres_password", "65534", 0o400)
    assert secret["secretName"].startswith("mlapi-postgres-password")
    assert container["user"] == "65534:65534" and container["readOnly"] is True
    assert exporter["taskSpec"]["placement"] == {"constraints": ["node.role==manager"]}
    assert "ports" not in exporter.get("endpointSpec", {})
    setup = cluster.one(REMOTE, "host-setup").inputs["create"]
    [line] = [row for row in setup.splitlines() if "/prometheus/config/prometheus.yml" in row and "base64 -d" in row]
    jobs = {job["job_name"]: job for job in yaml.safe_load(base64.b64decode(line.split()[1]))["scrape_configs"]}
    assert jobs["postgres"]["static_configs"] == [{"targets": ["mlapi-postgres-exporter:9187"]}]


def test_a_single_vm_has_no_postgresql() -> None:
    single = run_program(VALID_CONFIG)
    assert sorted(r.name for r in single.of_type(SERVICE)) == [
        "mlapi-dev-alertmanager",
        "mlapi-dev-model",
        "mlapi-dev-node-exporter",
        "mlapi-dev-prometheus",
    ]
    env = single.one(SERVICE, "-model").inputs["taskSpec"]["containerSpec"]["env"]
    assert "MLAPI_DATABASE_URL_FILE" not in env and "MLAPI_SEED_MARKER" not in env


def test_no_secret_of_the_cluster_in_plaintext(cluster: Deployment) -> None:
    generated = cluster.generated_secrets()  # the admin, ingest and PostgreSQL passwords, each its own value
    assert len(generated) == 3
    for resource in cluster.resources:
        shown = "\n".join(plaintext_strings(resource.wire))
        assert not [secret for secret in generated if secret in shown], resource.name
