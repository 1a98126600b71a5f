"""The Pulumi program under mocks: every resource's inputs, the ordering that matters, config errors, exports."""

from __future__ import annotations

import json

import pytest
import yaml

from infra.cloud_init import READINESS_COMMAND
from infra.spec import LETSENCRYPT_PRODUCTION, LETSENCRYPT_STAGING, TRAEFIK_VERSION
from tests.pulumi_harness import HOST_KEY, PROJECT_DIR, VALID_CONFIG, Deployment, run_program

SERVER = "hcloud:index/server:Server"
FIREWALL = "hcloud:index/firewall:Firewall"
VOLUME = "hcloud:index/volume:Volume"
ATTACHMENT = "hcloud:index/volumeAttachment:VolumeAttachment"
DNS = "cloudflare:index/dnsRecord:DnsRecord"
CONTAINER = "docker:index/container:Container"
REMOTE = "command:remote:Command"
LOCAL = "command:local:Command"
PROVIDER = "pulumi:providers:docker"


@pytest.fixture(scope="module")
def deployment() -> Deployment:
    return run_program({**VALID_CONFIG, "sshAllowedCidrs": '["198.51.100.0/24", "2001:db8:1::/48"]'})


def labels_of(container) -> dict[str, str]:
    return {item["label"]: item["value"] for item in container.inputs.get("labels", [])}


def test_firewall_rules_exactly(deployment: Deployment) -> None:
    firewall = deployment.one(FIREWALL)
    rules = sorted(
        (r["direction"], r["protocol"], r.get("port"), tuple(r["sourceIps"])) for r in firewall.inputs["rules"]
    )
    world = ("0.0.0.0/0", "::/0")
    assert rules == sorted(
        [
            ("in", "tcp", "80", world),
            ("in", "tcp", "443", world),
            ("in", "tcp", "22", ("198.51.100.0/24", "2001:db8:1::/48")),
            ("in", "icmp", None, world),
        ]
    )


def test_firewall_is_attached_by_numeric_id(deployment: Deployment) -> None:
    [firewall_id] = deployment.one(SERVER).inputs["firewallIds"]
    assert firewall_id == int(deployment.one(FIREWALL).id)  # a number on the wire, not the id string


def test_ssh_world_default_warns(deployment: Deployment) -> None:
    assert deployment.warnings == []
    defaulted = run_program(VALID_CONFIG)
    rule = next(r for r in defaulted.one(FIREWALL).inputs["rules"] if r.get("port") == "22")
    assert rule["sourceIps"] == ["0.0.0.0/0", "::/0"]
    assert any("sshAllowedCidrs" in w and "Narrow" in w for w in defaulted.warnings)


def test_server_inputs_and_user_data(deployment: Deployment) -> None:
    server = deployment.one(SERVER)
    assert server.inputs["serverType"] == "cx23"
    assert server.inputs["image"] == "ubuntu-24.04"
    assert server.inputs["location"] == "nbg1"
    assert server.inputs["publicNets"] == [{"ipv4Enabled": True, "ipv6Enabled": True}]
    assert server.inputs["sshKeys"] == [deployment.one("hcloud:index/sshKey:SshKey").id]
    assert server.opts.delete_before_replace is True
    user_data = server.inputs["userData"]
    assert user_data.startswith("#cloud-config\n")
    document = yaml.safe_load(user_data)
    assert "docker-ce" in document["packages"]
    assert "download.docker.com" in document["apt"]["sources"]["docker.list"]["source"]
    volume_id = deployment.one(ATTACHMENT).inputs["volumeId"]
    assert f"scsi-0HC_Volume_{int(volume_id)}" in user_data
    assert VALID_CONFIG["sshPublicKey"] in document["ssh_authorized_keys"]
    assert document["ssh_pwauth"] is False
    cron = next(f for f in document["write_files"] if f["path"] == "/etc/cron.d/mlapi-retrain")["content"]
    assert "0 * * * * root docker exec mlapi-model python -m app retrain" in cron


def test_no_secret_in_user_data(deployment: Deployment) -> None:
    user_data = deployment.one(SERVER).inputs["userData"].lower()
    for word in ("token", "private key", "-----begin", "secret", "mlapi_admin"):
        assert word not in user_data


def test_volume_is_kept_on_destroy_unless_opted_out(deployment: Deployment) -> None:
    volume = deployment.one(VOLUME)
    assert volume.inputs["format"] == "ext4" and volume.inputs["size"] == 10
    assert volume.inputs["location"] == "nbg1"
    assert volume.opts.retain_on_delete is True
    attachment = deployment.one(ATTACHMENT)
    assert attachment.inputs["serverId"] == int(deployment.one(SERVER).id)
    assert attachment.inputs["volumeId"] == int(volume.id)
    assert attachment.inputs["automount"] is False
    opted_out = run_program({**VALID_CONFIG, "keepDataVolume": "false"})
    assert not opted_out.one(VOLUME).opts.retain_on_delete


def test_existing_volume_is_attached_instead_of_created() -> None:
    adopted = run_program({**VALID_CONFIG, "dataVolumeId": "4242"})
    assert adopted.of_type(VOLUME) == []
    assert int(adopted.one(ATTACHMENT).inputs["volumeId"]) == 4242
    assert "scsi-0HC_Volume_4242" in adopted.one(SERVER).inputs["userData"]


def test_dns_points_at_the_server_unproxied(deployment: Deployment) -> None:
    a = deployment.one(DNS, "dns-a")
    aaaa = deployment.one(DNS, "dns-aaaa")
    assert (a.inputs["type"], a.inputs["content"], a.inputs["name"]) == ("A", "203.0.113.10", "api.example.com")
    assert (aaaa.inputs["type"], aaaa.inputs["content"]) == ("AAAA", "2001:db8::1")
    for record in (a, aaaa):
        assert record.inputs["proxied"] is False
        assert record.inputs["zoneId"] == VALID_CONFIG["cloudflareZoneId"]


def test_wait_for_cloud_init_before_docker(deployment: Deployment) -> None:
    ready = deployment.one(REMOTE)
    assert ready.inputs["create"] == READINESS_COMMAND
    assert "cloud-init status --wait" in READINESS_COMMAND and "-ne 2" in READINESS_COMMAND
    assert ready.inputs["connection"]["host"] == "203.0.113.10"
    assert ready.inputs["connection"]["user"] == "root"
    known_hosts = deployment.one(LOCAL, "known-hosts")
    assert known_hosts.inputs["environment"]["HOST_KEY"] == HOST_KEY  # the readiness output, stripped
    provider = deployment.one(PROVIDER)
    assert provider.inputs["host"] == "ssh://root@203.0.113.10"
    opts = provider.inputs["sshOpts"]
    opts = json.loads(opts) if isinstance(opts, str) else opts  # provider config travels JSON-encoded
    assert "StrictHostKeyChecking=yes" in opts
    assert f"UserKnownHostsFile={known_hosts.inputs['environment']['KNOWN_HOSTS']}" in opts
    assert not any("StrictHostKeyChecking=no" in o for o in opts)


def test_provider_host_is_unknown_until_the_wait_has_run() -> None:
    """In a preview the readiness output is unknown, so the provider's host is too: it cannot run ahead of it."""
    preview = run_program(VALID_CONFIG, preview=True)
    host = preview.one(PROVIDER).inputs.get("host")
    assert not isinstance(host, str), f"provider host known before the wait ran: {host!r}"
    assert "ssh://root@" in run_program(VALID_CONFIG).one(PROVIDER).inputs["host"]


def test_docker_resources_use_the_remote_provider(deployment: Deployment) -> None:
    for typ in (
        CONTAINER,
        "docker:index/network:Network",
        "docker:index/remoteImage:RemoteImage",
        "docker:index/image:Image",
    ):
        for resource in deployment.of_type(typ):
            assert resource.provider and "mlapi-dev-docker" in resource.provider, (typ, resource.provider)


def test_traefik_container(deployment: Deployment) -> None:
    traefik = deployment.one(CONTAINER, "-traefik")
    assert (
        deployment.one("docker:index/remoteImage:RemoteImage", "traefik-image").inputs["name"]
        == f"traefik:v{TRAEFIK_VERSION}"
    )
    flags = traefik.inputs["command"]
    assert "--providers.docker.exposedbydefault=false" in flags
    assert "--entrypoints.web.http.redirections.entrypoint.to=websecure" in flags
    assert "--entrypoints.web.http.redirections.entrypoint.scheme=https" in flags
    assert "--certificatesresolvers.letsencrypt.acme.storage=/acme/acme.json" in flags
    assert f"--certificatesresolvers.letsencrypt.acme.caserver={LETSENCRYPT_PRODUCTION}" in flags
    assert "--certificatesresolvers.letsencrypt.acme.email=ops@example.com" in flags
    assert not any(flag.startswith("--api") for flag in flags), "no dashboard/API"
    mounts = {m["target"]: m for m in traefik.inputs["mounts"]}
    assert mounts["/var/run/docker.sock"]["readOnly"] is True
    assert mounts["/acme"]["source"] == "/srv/mlapi/traefik"
    ports = sorted((p["internal"], p["external"], p["ip"]) for p in traefik.inputs["ports"])
    assert ports == [(80, 80, "0.0.0.0"), (80, 80, "::"), (443, 443, "0.0.0.0"), (443, 443, "::")]
    assert traefik.inputs["restart"] == "unless-stopped"
    assert traefik.inputs["healthcheck"]["tests"] == ["CMD", "traefik", "healthcheck", "--ping"]


def test_model_container(deployment: Deployment) -> None:
    model = deployment.one(CONTAINER, "-model")
    assert not model.inputs.get("ports"), "the model publishes no port"
    labels = labels_of(model)
    assert labels["traefik.enable"] == "true"
    assert labels["traefik.http.routers.mlapi.rule"] == "Host(`api.example.com`) && !PathPrefix(`/admin`)"
    assert labels["traefik.http.routers.mlapi.entrypoints"] == "websecure"
    assert labels["traefik.http.routers.mlapi.tls.certresolver"] == "letsencrypt"
    assert labels["traefik.http.middlewares.mlapi-headers.headers.stsseconds"] == "31536000"
    assert labels["traefik.http.services.mlapi.loadbalancer.server.port"] == "8000"
    assert model.inputs["mounts"] == [
        {"type": "bind", "source": "/srv/mlapi/model", "target": "/data", "readOnly": False}
    ]
    assert model.inputs["restart"] == "unless-stopped"
    assert "/ready" in " ".join(model.inputs["healthcheck"]["tests"])
    network = deployment.one("docker:index/network:Network")
    assert model.inputs["networksAdvanced"][0]["name"] == network.inputs["name"] == "mlapi"
    image = deployment.one("docker:index/image:Image")
    assert image.inputs["skipPush"] is True
    assert image.inputs["build"]["context"] == "app"  # relative: no machine-specific path in the inputs
    assert image.inputs["build"]["dockerfile"] == "app/Dockerfile"
    assert image.inputs["imageName"].startswith("mlapi-model:")
    assert model.inputs["image"] == image.inputs["imageName"]


def test_model_image_from_registry_skips_the_build() -> None:
    remote = run_program({**VALID_CONFIG, "modelImage": "ghcr.io/acme/model:1.2"})
    assert remote.of_type("docker:index/image:Image") == []
    images = {r.inputs["name"] for r in remote.of_type("docker:index/remoteImage:RemoteImage")}
    assert "ghcr.io/acme/model:1.2" in images


def test_staging_switch() -> None:
    staging = run_program({**VALID_CONFIG, "acmeStaging": "true"})
    flags = staging.one(CONTAINER, "-traefik").inputs["command"]
    assert f"--certificatesresolvers.letsencrypt.acme.caserver={LETSENCRYPT_STAGING}" in flags
    assert "--insecure" in staging.one(LOCAL, "smoke-check").inputs["create"]


def test_smoke_check_runs_after_the_stack(deployment: Deployment) -> None:
    smoke = deployment.one(LOCAL, "smoke-check")
    assert smoke.inputs["create"].startswith("python3 -m infra.smoke --url https://api.example.com/health")
    assert "--insecure" not in smoke.inputs["create"]
    depends = {d._name for d in smoke.opts.depends_on}
    assert {"mlapi-dev-traefik", "mlapi-dev-model", "mlapi-dev-dns-a"} <= depends


def test_exports(deployment: Deployment) -> None:
    assert deployment.exports == {
        "url": "https://api.example.com",
        "ipv4": "203.0.113.10",
        "ipv6": "2001:db8::1",
        "sshCommand": "ssh root@203.0.113.10",
        "serverId": deployment.exports["serverId"],
    }
    assert int(deployment.exports["serverId"]) > 0


def test_other_project_stack_and_config_evaluate_cleanly() -> None:
    other = run_program(
        {
            **VALID_CONFIG,
            "domain": "Models.Example.ORG.",
            "serverType": "cax11",
            "location": "hel1",
            "image": "ubuntu-22.04",
            "retrainSchedule": "@daily",
            "volumeSize": "50",
            "sshAllowedCidrs": "192.0.2.1/32, 192.0.2.2/32",
        },
        stack="prod-eu",
        project="mlapi",
    )
    server = other.one(SERVER)
    assert server.name == "mlapi-prod-eu-server"
    assert (server.inputs["serverType"], server.inputs["location"]) == ("cax11", "hel1")
    assert other.one(VOLUME).inputs["size"] == 50
    assert other.one(DNS, "dns-a").inputs["name"] == "models.example.org"
    assert "@daily root docker exec" in server.inputs["userData"]
    assert other.exports["url"] == "https://models.example.org"


@pytest.mark.parametrize(
    ("missing", "command"),
    [
        ("domain", "pulumi config set domain"),
        ("acmeEmail", "pulumi config set acmeEmail"),
        ("cloudflareZoneId", "pulumi config set cloudflareZoneId"),
        ("sshPublicKey", "pulumi config set sshPublicKey"),
    ],
)
def test_missing_required_config_names_the_key(missing: str, command: str) -> None:
    config = {k: v for k, v in VALID_CONFIG.items() if k != missing}
    with pytest.raises(Exception, match=f"'{missing}'.*{command}") as raised:
        run_program(config)
    assert "is required" in str(raised.value)


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("domain", "not a domain", "fully-qualified"),
        ("acmeEmail", "nobody", "email"),
        ("cloudflareZoneId", "zone-1", "32-character"),
        ("sshPublicKey", "ssh-dss AAAAB3NzaC1kc3M=", "ssh-ed25519"),
        ("sshPublicKey", "ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQ==", "does not encode"),
        ("sshAllowedCidrs", '["10.0.0.1/8"]', "not a CIDR"),
        ("sshAllowedCidrs", "[]", "at least one"),
        ("serverType", "big", "Hetzner type"),
        ("location", "mars1", "Hetzner location"),
        ("acmeStaging", "maybe", "true or false"),
        ("retrainSchedule", "61 * * * *", "minute"),
        ("retrainSchedule", "hourly", "5 fields"),
        ("volumeSize", "5", "10-10240"),
        ("modelImage", "Bad Image", "image reference"),
    ],
)
def test_invalid_config_names_the_key(key: str, value: str, says: str) -> None:
    with pytest.raises(Exception, match=f"'{key}'") as raised:
        run_program({**VALID_CONFIG, key: value})
    assert says in str(raised.value)
    assert f"pulumi config set {key}" in str(raised.value)


def test_example_stack_file_is_complete() -> None:
    """Pulumi.dev.yaml evaluates as-is (placeholders), so an operator can copy it and replace values."""
    stack_file = yaml.safe_load((PROJECT_DIR / "Pulumi.dev.yaml").read_text())["config"]
    config = {
        key.split(":", 1)[1]: value if isinstance(value, str) else json.dumps(value)
        for key, value in stack_file.items()
    }
    dev = run_program(config)
    assert dev.exports["url"] == "https://api.example.com"


def test_dns_proxied_opt_in_uses_automatic_ttl() -> None:
    proxied = run_program({**VALID_CONFIG, "dnsProxied": "true"})
    for suffix in ("dns-a", "dns-aaaa"):
        record = proxied.one(DNS, suffix).inputs
        assert (record["proxied"], record["ttl"]) == (True, 1)
