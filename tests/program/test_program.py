"""The Pulumi program under mocks: every resource's inputs, the ordering that matters, config errors, exports."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from app.settings import Settings
from infra.host.cloud_init import READINESS_COMMAND
from infra.host.setup import render_graceful_stop
from infra.program.host import md5_fingerprint
from infra.spec.acme import LETSENCRYPT_PRODUCTION, LETSENCRYPT_STAGING
from infra.spec.durations import go_duration
from infra.spec.inputs import TRAEFIK_VERSION
from tests.support.program import (
    ATTACHMENT,
    BACKUP_CONFIG,
    BACKUP_KEY,
    CONTAINER,
    DNS,
    FIREWALL,
    LOCAL,
    PROVIDER,
    REMOTE,
    SECRET,
    SERVER,
    SERVICE,
    VOLUME,
    assert_config_refused,
    parse_go_duration,
)
from tests.support.pulumi_harness import (
    HOST_KEY,
    HOST_PRIVATE_KEY,
    PROJECT_DIR,
    VALID_CONFIG,
    Deployment,
    plaintext_strings,
    run_program,
)
from tests.support.s3 import S3Server, penguins_in_s3, s3_server


@pytest.fixture(scope="module")
def deployment() -> Deployment:
    return run_program({**VALID_CONFIG, "sshAllowedCidrs": '["84.17.50.0/24", "2a01:4f8:1::/48"]'})


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
            ("in", "tcp", "22", ("84.17.50.0/24", "2a01:4f8:1::/48")),
            ("in", "icmp", None, world),
        ]
    )


def test_firewall_is_attached_by_numeric_id(deployment: Deployment) -> None:
    [firewall_id] = deployment.one(SERVER).inputs["firewallIds"]
    assert firewall_id == int(deployment.one(FIREWALL).id)  # a number on the wire, not the id string


def test_ssh_open_to_the_world_only_when_typed_and_then_said(deployment: Deployment) -> None:
    assert [w for w in deployment.warnings if "sshAllowedCidrs" in w] == []
    assert "ssh-world-explicit" not in deployment.one(FIREWALL).inputs["labels"]
    world = run_program({**VALID_CONFIG, "sshAllowedCidrs": '["0.0.0.0/0", "::/0"]'})
    rule = next(r for r in world.one(FIREWALL).inputs["rules"] if r.get("port") == "22")
    assert rule["sourceIps"] == ["0.0.0.0/0", "::/0"]
    assert world.one(FIREWALL).inputs["labels"]["ssh-world-explicit"] == "true"  # the policy pack reads it
    assert any("sshAllowedCidrs opens port 22 to the whole internet" in w for w in world.warnings)


def test_server_inputs_and_user_data(deployment: Deployment) -> None:
    server = deployment.one(SERVER)
    assert server.inputs["serverType"] == "cx23"
    assert server.inputs["image"] == "ubuntu-24.04"
    assert server.inputs["location"] == "nbg1"
    assert server.inputs["publicNets"] == [{"ipv4Enabled": True, "ipv6Enabled": True}]
    assert server.inputs["backups"] is False  # Hetzner's server backups cost +20 % and skip the volume: opt-in
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
    # The host key the program generated is the server's only host key.
    assert document["ssh_keys"] == {"ed25519_private": HOST_PRIVATE_KEY, "ed25519_public": HOST_KEY}
    assert not any(f["path"] == "/etc/cron.d/mlapi-retrain" for f in document["write_files"])


def test_user_data_holds_no_secret_but_the_host_key(deployment: Deployment) -> None:
    user_data = deployment.one(SERVER).inputs["userData"]
    assert all(secret not in user_data for secret in deployment.generated_secrets())
    without_host_key = user_data.replace(HOST_PRIVATE_KEY.replace("\n", "\n    ").strip(), "")
    for word in ("token", "-----begin", "secret", "mlapi_admin"):
        assert word not in without_host_key.lower()


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
    assert (a.inputs["type"], a.inputs["content"], a.inputs["name"]) == (
        "A",
        deployment.exports["ipv4"],
        "api.fjord-ml.net",
    )
    assert (aaaa.inputs["type"], aaaa.inputs["content"]) == ("AAAA", deployment.exports["ipv6"])
    for record in (a, aaaa):
        assert record.inputs["proxied"] is False
        assert record.inputs["zoneId"] == VALID_CONFIG["cloudflareZoneId"]


def test_every_connection_pins_the_generated_host_key(deployment: Deployment) -> None:
    ip = deployment.exports["ipv4"]
    for command in deployment.of_type(REMOTE):
        assert command.inputs["connection"]["hostKey"] == HOST_KEY, command.name
        assert command.inputs["connection"]["host"] == ip and command.inputs["connection"]["user"] == "root"
    ready = deployment.one(REMOTE, "cloud-init-ready")
    assert ready.inputs["create"] == READINESS_COMMAND
    assert "cloud-init status --wait" in READINESS_COMMAND and "-ne 2" in READINESS_COMMAND
    provider = deployment.one(PROVIDER)
    assert provider.inputs["host"] == f"ssh://root@{ip}"
    opts = provider.inputs["sshOpts"]
    opts = json.loads(opts) if isinstance(opts, str) else opts  # provider config travels JSON-encoded
    assert "StrictHostKeyChecking=yes" in opts and "UserKnownHostsFile=/dev/null" in opts
    assert f"KnownHostsCommand=/bin/echo %H {HOST_KEY}" in opts
    assert not any("StrictHostKeyChecking=no" in o for o in opts)


def test_no_path_of_this_machine_in_any_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second operator or CI must see no diff: no home directory, no absolute path of the checkout."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "mlapi_test_key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    deployment = run_program({**VALID_CONFIG, "sshPrivateKeyPath": "~/.ssh/mlapi_test_key"})
    text = json.dumps([r.inputs for r in deployment.resources])
    assert str(Path.home()) not in text and str(PROJECT_DIR) not in text
    opts = deployment.one(PROVIDER).inputs["sshOpts"]
    assert "~/.ssh/mlapi_test_key" in (opts if isinstance(opts, str) else json.dumps(opts))


def test_missing_private_key_file_is_a_config_error() -> None:
    with pytest.raises(
        Exception, match=r"'sshPrivateKeyPath'.*not a readable file.*pulumi config set sshPrivateKeyPath"
    ):
        run_program({**VALID_CONFIG, "sshPrivateKeyPath": "~/.ssh/does-not-exist-mlapi"})


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
    image = deployment.one("docker:index/remoteImage:RemoteImage", "traefik-image").inputs
    assert (image["name"], image["platform"]) == (f"traefik:v{TRAEFIK_VERSION}", "linux/amd64")
    flags = traefik.inputs["command"]
    for flag in (
        "--providers.swarm=true",
        "--providers.swarm.exposedbydefault=false",
        "--providers.swarm.network=mlapi",
        "--providers.swarm.refreshseconds=2s",
        "--providers.swarm.allowemptyservices=true",
        "--entrypoints.web.http.redirections.entrypoint.to=:443",
        "--entrypoints.web.http.redirections.entrypoint.scheme=https",
        "--certificatesresolvers.letsencrypt.acme.storage=/acme/letsencrypt.json",
        f"--certificatesresolvers.letsencrypt.acme.caserver={LETSENCRYPT_PRODUCTION}",
        "--certificatesresolvers.letsencrypt.acme.email=ops@fjord-ml.net",
    ):
        assert flag in flags
    assert not any(flag.startswith(("--api", "--providers.docker")) for flag in flags), (
        "no dashboard, no docker provider"
    )
    assert "--providers.swarm.endpoint=unix:///run/mlapi-docker-api/docker.sock" in flags
    mounts = {m["target"]: m for m in traefik.inputs["mounts"]}
    assert set(mounts) == {"/acme", "/run/mlapi-docker-api"}  # no Docker socket: the proxy's, read-only
    assert mounts["/acme"]["source"] == "/srv/mlapi/traefik"
    assert (mounts["/run/mlapi-docker-api"]["type"], mounts["/run/mlapi-docker-api"]["readOnly"]) == ("volume", True)
    ports = sorted((p["internal"], p["external"], p["ip"]) for p in traefik.inputs["ports"])
    assert ports == [(8443, 443, "0.0.0.0"), (8443, 443, "::"), (8880, 80, "0.0.0.0"), (8880, 80, "::")]
    assert traefik.inputs["restart"] == "unless-stopped" and traefik.inputs["user"] == "10002:10002"
    assert traefik.inputs["healthcheck"]["tests"] == ["CMD", "traefik", "healthcheck", "--ping"]
    assert [n["name"] for n in traefik.inputs["networksAdvanced"]] == ["mlapi"]
    network = deployment.one("docker:index/network:Network", "dev-network").inputs
    assert (network["name"], network["driver"], network["attachable"]) == ("mlapi", "overlay", True)


def test_only_the_docker_api_proxy_holds_the_socket(deployment: Deployment) -> None:
    """Traefik reads the swarm through a proxy that allows GET/HEAD of a few endpoints (infra/spec/docker_api.py)."""
    holders = [
        r.name
        for r in deployment.of_type(CONTAINER)
        if any(m["source"] == "/var/run/docker.sock" for m in r.inputs.get("mounts", []))
    ]
    assert holders == ["mlapi-dev-docker-api"]
    proxy = deployment.one(CONTAINER, "-docker-api").inputs
    image = deployment.one("docker:index/remoteImage:RemoteImage", "docker-api-image").inputs
    assert image["name"] == "haproxy:3.2" and proxy["command"] == ["-f", "/usr/local/etc/haproxy/haproxy.cfg"]
    mounts = {m["target"]: (m["source"], m["readOnly"]) for m in proxy["mounts"]}
    assert mounts["/usr/local/etc/haproxy/haproxy.cfg"] == ("/srv/mlapi/docker-api/docker-api.cfg", True)
    assert proxy["networkMode"] == "none" and not proxy.get("networksAdvanced") and not proxy.get("ports")
    assert proxy["capabilities"] == {"drops": ["ALL"], "adds": []} and proxy["readOnly"] is True
    assert proxy["securityOpts"] == ["no-new-privileges:true"] and proxy["memory"] == 64
    assert mounts["/run/mlapi-docker-api"] == ("mlapi-docker-api", False)  # its socket, in the volume Traefik shares
    assert deployment.one("docker:index/volume:Volume").inputs["name"] == "mlapi-docker-api"


def service_labels(service) -> dict[str, str]:
    return {item["label"]: item["value"] for item in service.inputs.get("labels", [])}


def test_model_service(deployment: Deployment) -> None:
    model = deployment.one(SERVICE, "-model")
    inputs = model.inputs
    assert inputs["name"] == "mlapi-model"
    assert inputs["mode"] == {"replicated": {"replicas": 2}}
    assert inputs["endpointSpec"] == {"mode": "dnsrr"}  # Traefik balances across task IPs; no IPVS needed
    assert inputs["updateConfig"] == {
        "parallelism": 1,
        "delay": "0s",
        "failureAction": "rollback",
        "monitor": "10s",
        "maxFailureRatio": "0",
        "order": "start-first",
    }
    assert inputs["rollbackConfig"]["order"] == "start-first" and inputs["rollbackConfig"]["failureAction"] == "pause"
    assert inputs["convergeConfig"] == {"delay": "5s", "timeout": "10m0s"}
    container = inputs["taskSpec"]["containerSpec"]
    assert container["commands"] == ["python", "-m", "app", "serve"]
    assert container["init"] is True
    assert container["stopGracePeriod"] == "20s"
    assert "/ready" in " ".join(container["healthcheck"]["tests"])
    assert container["mounts"] == [
        {"type": "bind", "source": "/srv/mlapi/model", "target": "/data", "readOnly": False},
        {"type": "tmpfs", "target": "/tmp", "tmpfsOptions": {"sizeBytes": 64 * 2**20}},
    ]
    # Least privilege: no capabilities, a read-only root, a memory limit (the image runs as a non-root user).
    assert container["readOnly"] is True and container["capDrops"] == ["ALL"] and "capAdds" not in container
    # cx23, 4 GB: what is left after the host (512 MiB), Traefik (256) and the proxy (64), over 2 replicas + 1
    assert inputs["taskSpec"]["resources"] == {"limits": {"memoryBytes": 994 * 2**20}}
    assert container["env"]["MLAPI_PROCESS_LIMIT"] == str(512 * 3)
    assert container["env"]["MLAPI_ADMIN_TOKEN_FILE"] == "/run/secrets/admin_token"
    assert container["env"]["MLAPI_INGEST_TOKEN_FILE"] == "/run/secrets/ingest_token"
    assert not any("TOKEN=" in f"{k}={v}" for k, v in container["env"].items() if not k.endswith("_TOKEN_FILE"))
    secrets = {kind: deployment.one(SECRET, f"{kind}-secret") for kind in ("admin", "ingest")}
    assert container["secrets"] == [
        {
            "secretId": secrets[kind].id,
            "secretName": secrets[kind].inputs["name"],
            "fileName": f"{kind}_token",
            "fileUid": "10001",
            "fileGid": "10001",
            "fileMode": 0o400,
        }
        for kind in ("admin", "ingest")
    ]
    tokens = {kind: deployment.secret_of(f"{kind}-token") for kind in ("admin", "ingest")}
    assert tokens["admin"] != tokens["ingest"]
    for kind, secret in secrets.items():
        assert secret.inputs["name"].startswith(f"mlapi-{kind}-token-") and tokens[kind] not in secret.inputs["name"]
        assert base64.urlsafe_b64decode(secret.inputs["data"]).decode() == tokens[kind]  # each its own value
    # For whoever sends ground truth (a secret output): the ingest token, never the admin token.
    assert deployment.exports["ingestToken"] == tokens["ingest"]
    assert tokens["admin"] not in repr(deployment.exports)
    assert inputs["taskSpec"]["restartPolicy"]["condition"] == "any"
    assert inputs["taskSpec"]["networksAdvanceds"] == [
        {"id": deployment.one("docker:index/network:Network", "dev-network").id}
    ]
    labels = service_labels(model)
    assert labels["traefik.enable"] == "true" and labels["traefik.swarm.network"] == "mlapi"
    assert labels["traefik.http.routers.mlapi.rule"] == (
        "Host(`api.fjord-ml.net`) && !PathPrefix(`/admin`) && !PathPrefix(`/metrics`)"  # private: host and overlay
    )
    for router, retry in (("mlapi", "mlapi-retry"), ("mlapi-predict", "mlapi-predict-retry")):
        assert labels[f"traefik.http.routers.{router}.middlewares"] == (
            f"mlapi-ratelimit,mlapi-inflight,mlapi-limit,{retry},mlapi-headers"
        )
    assert labels["traefik.http.middlewares.mlapi-ratelimit.ratelimit.average"] == "100"  # per client address
    assert labels["traefik.http.middlewares.mlapi-ratelimit.ratelimit.burst"] == "200"
    assert labels["traefik.http.middlewares.mlapi-ratelimit.ratelimit.period"] == "1s"
    assert labels["traefik.http.middlewares.mlapi-inflight.inflightreq.amount"] == "32"
    for limit in ("mlapi-ratelimit.ratelimit", "mlapi-inflight.inflightreq"):  # an IPv6 client is its /64
        assert labels[f"traefik.http.middlewares.{limit}.sourcecriterion.ipstrategy.ipv6subnet"] == "64"
    assert labels["traefik.http.middlewares.mlapi-limit.buffering.maxrequestbodybytes"] == str(
        Settings().max_body_bytes
    )  # the edge and the app refuse the same sizes
    headers = {k.rsplit(".", 1)[1]: v for k, v in labels.items() if ".mlapi-headers.headers." in k}
    assert headers == {
        "stsseconds": "31536000",
        "stsincludesubdomains": "true",
        "contenttypenosniff": "true",
        "framedeny": "true",
        "referrerpolicy": "no-referrer",
        "contentsecuritypolicy": "frame-ancestors 'none'",
    }
    assert labels["traefik.http.routers.mlapi-predict.rule"] == (
        "Host(`api.fjord-ml.net`) && (PathPrefix(`/predict`) || "
        "PathRegexp(`^/v2/models/[^/]+(/versions/[^/]+)?/infer$`))"
    )
    for router in ("mlapi", "mlapi-predict"):
        assert labels[f"traefik.http.routers.{router}.entrypoints"] == "websecure"
        assert labels[f"traefik.http.routers.{router}.tls.certresolver"] == "letsencrypt"
    assert labels["traefik.http.middlewares.mlapi-predict-retry.retry.status"] == "502-504"
    assert labels["traefik.http.middlewares.mlapi-predict-retry.retry.retrynonidempotentmethod"] == "true"
    assert "retrynonidempotentmethod" not in " ".join(k for k in labels if "mlapi-retry" in k)
    assert labels["traefik.http.services.mlapi.loadbalancer.healthcheck.path"] == "/health"
    assert labels["traefik.http.services.mlapi.loadbalancer.passivehealthcheck.maxfailedattempts"] == "1"
    assert labels["traefik.http.services.mlapi.loadbalancer.server.port"] == "8000"
    image = deployment.one("docker:index/image:Image")
    assert image.inputs["skipPush"] is True
    assert image.inputs["build"] == {"context": "app", "dockerfile": "app/Dockerfile", "platform": "linux/amd64"}
    assert image.inputs["imageName"].startswith("mlapi-model:")
    assert container["image"] == image.inputs["imageName"]


def test_traefik_runs_confined(deployment: Deployment) -> None:
    traefik = deployment.one(CONTAINER, "traefik").inputs
    assert traefik["capabilities"] == {"drops": ["ALL"], "adds": []}  # unprivileged ports, its own user
    assert traefik["readOnly"] is True and traefik["tmpfs"] == {"/tmp": f"size={64 * 2**20}"}
    assert traefik["securityOpts"] == ["no-new-privileges:true"] and traefik["memory"] == 256


def test_only_traefik_publishes_ports(deployment: Deployment) -> None:
    published = [r.name for r in deployment.of_type(CONTAINER) if r.inputs.get("ports")]
    assert published == ["mlapi-dev-traefik"]
    assert "ports" not in deployment.one(SERVICE, "-model").inputs.get("endpointSpec", {})


def test_edge_limits_follow_config() -> None:
    tuned = run_program({**VALID_CONFIG, "rateLimitPerSecond": "20", "rateLimitBurst": "40", "inFlightPerClient": "8"})
    labels = service_labels(tuned.one(SERVICE, "-model"))
    assert labels["traefik.http.middlewares.mlapi-ratelimit.ratelimit.average"] == "20"
    assert labels["traefik.http.middlewares.mlapi-ratelimit.ratelimit.burst"] == "40"
    assert labels["traefik.http.middlewares.mlapi-inflight.inflightreq.amount"] == "8"
    assert_config_refused({**VALID_CONFIG, "rateLimitPerSecond": "0"}, "rateLimitPerSecond", "1-100000")


def test_public_docs_can_be_turned_off() -> None:
    private = run_program({**VALID_CONFIG, "publicDocs": "false"})
    rule = service_labels(private.one(SERVICE, "-model"))["traefik.http.routers.mlapi.rule"]
    for path in ("/admin", "/metrics", "/docs", "/redoc", "/openapi.json"):
        assert f"!PathPrefix(`{path}`)" in rule
    assert_config_refused({**VALID_CONFIG, "publicDocs": "sometimes"}, "publicDocs", "true or false")


@pytest.mark.parametrize(
    ("server_type", "replicas", "replica_mb"),
    [("cx23", "2", 994), ("cpx11", "2", 384), ("cx53", "2", 2048), ("cx23", "8", 384), ("cx99", "2", 384)],
)
def test_memory_limits_follow_the_server_size(server_type: str, replicas: str, replica_mb: int) -> None:
    """Unknown types are sized as the smallest (2 GB): limits can be lower than the server allows, never higher."""
    deployment = run_program({**VALID_CONFIG, "serverType": server_type, "modelReplicas": replicas})
    limits = deployment.one(SERVICE, "-model").inputs["taskSpec"]["resources"]["limits"]
    assert limits["memoryBytes"] == replica_mb * 2**20
    traefik = deployment.one(CONTAINER, "-traefik").inputs
    assert traefik["memory"] == 256 and traefik["ulimits"] == [{"name": "nproc", "soft": 1024, "hard": 1024}]
    assert not deployment.one(CONTAINER, "-docker-api").inputs.get("ulimits")  # root: RLIMIT_NPROC does not apply


def test_hsts_preload_is_opt_in() -> None:
    headers = "traefik.http.middlewares.mlapi-headers.headers"
    default = service_labels(run_program(VALID_CONFIG).one(SERVICE, "-model"))
    assert default[f"{headers}.stsseconds"] == "31536000" and f"{headers}.stspreload" not in default
    preload = service_labels(run_program({**VALID_CONFIG, "hstsPreload": "true"}).one(SERVICE, "-model"))
    assert preload[f"{headers}.stsseconds"] == "63072000" and preload[f"{headers}.stspreload"] == "true"
    assert preload[f"{headers}.stsincludesubdomains"] == "true"
    assert_config_refused({**VALID_CONFIG, "hstsPreload": "maybe"}, "hstsPreload", "true or false")


def test_model_replicas_config() -> None:
    five = run_program({**VALID_CONFIG, "modelReplicas": "5"})
    assert five.one(SERVICE, "-model").inputs["mode"] == {"replicated": {"replicas": 5}}


def test_model_image_from_registry_skips_the_build() -> None:
    remote = run_program({**VALID_CONFIG, "modelImage": "ghcr.io/acme/model:1.2"})
    assert remote.of_type("docker:index/image:Image") == []
    images = {r.inputs["name"]: r.inputs["platform"] for r in remote.of_type("docker:index/remoteImage:RemoteImage")}
    assert images["ghcr.io/acme/model:1.2"] == "linux/amd64"


def test_a_registry_model_image_is_checked_for_the_servers_platform() -> None:
    pulled = run_program({**VALID_CONFIG, "serverType": "cax21", "modelImage": "ghcr.io/acme/model:1.2"})
    check = pulled.one(REMOTE, "model-image-platform")
    assert "ghcr.io/acme/model:1.2" in check.inputs["create"] and "linux/arm64" in check.inputs["create"]
    assert "mlapi-dev-model-image-platform" in {d._name for d in pulled.one(SERVICE, "-model").opts.depends_on}
    assert run_program(VALID_CONFIG).of_type(REMOTE) and not [
        r for r in run_program(VALID_CONFIG).of_type(REMOTE) if r.name.endswith("model-image-platform")
    ]


def test_arm_servers_get_arm_images() -> None:
    arm = run_program({**VALID_CONFIG, "serverType": "cax11"})
    assert arm.one("docker:index/image:Image").inputs["build"]["platform"] == "linux/arm64"
    assert {r.inputs["platform"] for r in arm.of_type("docker:index/remoteImage:RemoteImage")} == {"linux/arm64"}
    pulled = run_program({**VALID_CONFIG, "serverType": "cax21", "modelImage": "ghcr.io/acme/model:1.2"})
    assert {r.inputs["platform"] for r in pulled.of_type("docker:index/remoteImage:RemoteImage")} == {"linux/arm64"}


def test_staging_switch_uses_its_own_certificate_store() -> None:
    staging = run_program({**VALID_CONFIG, "acmeStaging": "true"})
    flags = staging.one(CONTAINER, "-traefik").inputs["command"]
    assert f"--certificatesresolvers.letsencrypt.acme.caserver={LETSENCRYPT_STAGING}" in flags
    assert "--certificatesresolvers.letsencrypt.acme.storage=/acme/letsencrypt-staging.json" in flags
    assert "--insecure" in staging.one(LOCAL, "smoke-check").inputs["create"]


def test_smoke_check_runs_after_the_stack_against_the_servers_ip(deployment: Deployment) -> None:
    smoke = deployment.one(LOCAL, "smoke-check")
    ip = deployment.exports["ipv4"]
    assert smoke.inputs["create"].startswith(
        f"python3 -m infra.ops.smoke --url https://api.fjord-ml.net/health --connect-to {ip} "
    )
    assert "--insecure" not in smoke.inputs["create"]
    depends = {d._name for d in smoke.opts.depends_on}
    assert {"mlapi-dev-traefik", "mlapi-dev-model", "mlapi-dev-dns-a"} <= depends


def test_exports(deployment: Deployment) -> None:
    ip = deployment.exports["ipv4"]
    assert deployment.exports == {
        "url": "https://api.fjord-ml.net",
        "ipv4": ip,
        "ipv6": deployment.exports["ipv6"],
        "sshCommand": f"ssh root@{ip}",
        "serverId": deployment.exports["serverId"],
        "hostKey": HOST_KEY,  # the key the server is given, not one read back from it
        "dataRoot": "/srv/mlapi",
        "ingestToken": deployment.secret_of("ingest-token"),  # a secret output; never the admin token
    }
    assert int(deployment.exports["serverId"]) > 0 and ip.startswith("203.0.113.")


def test_other_project_stack_and_config_evaluate_cleanly() -> None:
    other = run_program(
        {
            **VALID_CONFIG,
            "domain": "Models.Fjord-ML.ORG.",
            "serverType": "cax11",
            "location": "hel1",
            "image": "ubuntu-22.04",
            "retrainSchedule": "@daily",
            "volumeSize": "50",
            "sshAllowedCidrs": "84.17.50.1/32, 84.17.50.2/32",
            "serverBackups": "yes",
        },
        stack="prod-eu",
        project="mlapi",
    )
    server = other.one(SERVER)
    assert server.name == "mlapi-prod-eu-server"
    assert (server.inputs["serverType"], server.inputs["location"]) == ("cax11", "hel1")
    assert server.inputs["backups"] is True
    assert other.one(VOLUME).inputs["size"] == 50
    assert other.one(DNS, "dns-a").inputs["name"] == "models.fjord-ml.org"
    host_setup = other.one(REMOTE, "host-setup").inputs["create"]
    cron = next(f for f in host_files_of(host_setup) if "@daily" in f)
    assert "@daily root /usr/local/bin/mlapi-app retrain" in cron
    assert other.exports["url"] == "https://models.fjord-ml.org"


@pytest.mark.parametrize(
    ("missing", "command"),
    [
        ("domain", "pulumi config set domain"),
        ("acmeEmail", "pulumi config set acmeEmail"),
        ("cloudflareZoneId", "pulumi config set cloudflareZoneId"),
        ("sshPublicKey", "pulumi config set sshPublicKey"),
        ("sshAllowedCidrs", "pulumi config set sshAllowedCidrs"),
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
        ("serverBackups", "daily", "true or false"),
        ("retrainSchedule", "61 * * * *", "minute"),
        ("retrainSchedule", "hourly", "5 fields"),
        ("volumeSize", "5", "10-10240"),
        ("modelReplicas", "0", "1-64"),
        ("modelReplicas", "two", "1-64"),
        ("modelImage", "Bad Image", "image reference"),
        ("domain", "api.example.org", "example value"),  # the placeholders of Pulumi.dev.yaml and their kin
        ("acmeEmail", "me@example.net", "example value"),
        ("sshAllowedCidrs", '["192.0.2.10/32"]', "documentation range"),
        ("sshAllowedCidrs", '["2001:db8::/64"]', "documentation range"),
        ("backupSchedule", "\u0663 2 * * *", "numbers"),  # an Arabic-Indic three: isdigit(), yet cron refuses it
        ("modelReplicas", "\u0663", "whole number"),
        ("image", "ubuntu-24.04\nProxyCommand sh", "control character"),
    ],
)
def test_invalid_config_names_the_key(key: str, value: str, says: str) -> None:
    assert_config_refused({**VALID_CONFIG, key: value}, key, says)


def example_stack_config() -> dict[str, str]:
    stack_file = yaml.safe_load((PROJECT_DIR / "Pulumi.dev.yaml").read_text())["config"]
    return {
        key.split(":", 1)[1]: value if isinstance(value, str) else json.dumps(value)
        for key, value in stack_file.items()
    }


def test_the_example_stack_file_is_refused_until_its_placeholders_are_replaced() -> None:
    """Pulumi.dev.yaml's values are documentation values: a stack that kept one would create a server nobody can reach.
    Each is refused naming the key; with every placeholder replaced, the file evaluates."""
    config = example_stack_config()
    real = {key: VALID_CONFIG[key] for key in ("domain", "acmeEmail", "cloudflareZoneId", "sshPublicKey")}
    real["sshAllowedCidrs"] = VALID_CONFIG["sshAllowedCidrs"]
    for key in real:
        assert key in config, f"Pulumi.dev.yaml shows {key}"
        assert_config_refused({**config, **{k: v for k, v in real.items() if k != key}}, key, "example")
    assert run_program({**config, **real}).exports["url"] == f"https://{VALID_CONFIG['domain']}"


def test_every_key_is_one_row_and_the_docs_are_generated_from_the_table() -> None:
    from infra.config.keys import KEYS, DeployConfig, reference_table

    assert [key.field for key in KEYS] == list(DeployConfig.model_fields)
    assert len({key.name for key in KEYS}) == len(KEYS)
    assert set(example_stack_config()) <= {key.name for key in KEYS}, "Pulumi.dev.yaml sets only known keys"
    document = (PROJECT_DIR / "docs" / "configuration.md").read_text()
    assert reference_table() in document, (
        "docs/configuration.md: regenerate the table with `python -m infra.config --write`"
    )


def test_dns_proxied_is_refused_with_the_reason() -> None:
    with pytest.raises(Exception, match=r"'dnsProxied'.*renewals would fail silently"):
        run_program({**VALID_CONFIG, "dnsProxied": "true"})
    assert run_program({**VALID_CONFIG, "dnsProxied": "false"}).one(DNS, "dns-a").inputs["proxied"] is False


def host_files_of(script: str) -> list[str]:
    """The files the deploy step writes (base64 in the script), decoded."""
    return [base64.b64decode(blob).decode() for blob in re.findall(r"printf %s (\S+) \| base64 -d", script)]


def test_changing_settings_never_replaces_the_server() -> None:
    """retrainSchedule and modelReplicas change the deploy step and the service, not the user-data."""
    before = run_program(VALID_CONFIG)
    after = run_program({**VALID_CONFIG, "retrainSchedule": "15 4 * * *", "modelReplicas": "3"})
    assert before.one(SERVER).inputs == after.one(SERVER).inputs
    setup_before = before.one(REMOTE, "host-setup").inputs["create"]
    setup_after = after.one(REMOTE, "host-setup").inputs["create"]
    assert setup_before != setup_after
    assert any("15 4 * * * root /usr/local/bin/mlapi-app retrain" in f for f in host_files_of(setup_after))


ON_THE_HOST = (
    "docker:index/network:Network",
    "docker:index/remoteImage:RemoteImage",
    "docker:index/image:Image",
    SECRET,
    CONTAINER,
    SERVICE,
)


def test_everything_on_the_host_is_bound_to_the_server(deployment: Deployment) -> None:
    """A server replacement recreates every Docker resource on the new server (replace_with), and none of them is
    deleted through a connection to a server that is going away (deleted_with)."""
    server_name = deployment.one(SERVER).name
    for typ in ON_THE_HOST:
        for resource in deployment.of_type(typ):
            assert [r._name for r in resource.opts.replace_with] == [server_name], resource.name
            assert resource.opts.deleted_with._name == server_name, resource.name
    for suffix in ("host-setup", "data-guard", "cloud-init-ready"):
        assert deployment.one(REMOTE, suffix).inputs["triggers"] == [deployment.exports["serverId"]]


def test_a_new_server_gets_a_new_connection_and_deploy_step() -> None:
    """Evaluated against two different servers (ids and addresses), what connects to the host follows."""
    first, second = run_program(VALID_CONFIG), run_program(VALID_CONFIG, first_id=2000001)
    assert first.exports["serverId"] != second.exports["serverId"]
    assert first.one(PROVIDER).inputs["host"] != second.one(PROVIDER).inputs["host"]
    for suffix in ("host-setup", "data-guard"):
        a, b = first.one(REMOTE, suffix).inputs, second.one(REMOTE, suffix).inputs
        assert a["triggers"] != b["triggers"] and a["connection"]["host"] != b["connection"]["host"]
        assert a["create"] == b["create"]
    assert first.one(LOCAL, "smoke-check").inputs["create"] != second.one(LOCAL, "smoke-check").inputs["create"]


def test_data_guard_stops_the_stack_before_the_volume_is_detached(deployment: Deployment) -> None:
    guard = deployment.one(REMOTE, "data-guard")
    assert guard.inputs["create"] == "true"
    assert guard.inputs["delete"] == render_graceful_stop("/srv/mlapi")  # service removed, Traefik stopped, unmounted
    assert {d._name for d in guard.opts.depends_on} >= {"mlapi-dev-data-attachment"}  # deleted before it
    for typ in ON_THE_HOST:
        for resource in deployment.of_type(typ):
            assert "mlapi-dev-data-guard" in {d._name for d in resource.opts.depends_on}, resource.name


DURATION_KEYS = {"interval", "timeout", "startPeriod", "delay", "monitor", "window", "stopGracePeriod"}


def durations(value, path=""):
    if isinstance(value, dict):
        for key, item in value.items():
            if key in DURATION_KEYS and isinstance(item, str):
                yield f"{path}.{key}", item
            yield from durations(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from durations(item, f"{path}[{index}]")


def test_durations_are_written_as_the_provider_reads_them_back(deployment: Deployment) -> None:
    """'60s' would read back as '1m0s' and show as a diff on every `pulumi up`."""
    found = [
        (r.name, *item)
        for r in deployment.of_type(CONTAINER) + deployment.of_type(SERVICE)
        for item in durations(r.inputs)
    ]
    assert len(found) >= 15
    for name, path, text in found:
        assert go_duration(parse_go_duration(text)) == text, f"{name}{path}: {text!r}"


def test_an_existing_ssh_key_with_the_same_fingerprint_is_reused() -> None:
    fingerprint = md5_fingerprint(VALID_CONFIG["sshPublicKey"])
    found = {"sshKeys": [{"fingerprint": fingerprint, "id": 4711, "labels": {}, "name": "laptop", "publicKey": "x"}]}
    reused = run_program(VALID_CONFIG, invokes={"hcloud:index/getSshKeys:getSshKeys": found})
    assert reused.of_type("hcloud:index/sshKey:SshKey") == []
    assert reused.one(SERVER).inputs["sshKeys"] == ["4711"]
    other = {"sshKeys": [{"fingerprint": "00:11", "id": 1, "labels": {}, "name": "other", "publicKey": "y"}]}
    assert (
        len(
            run_program(VALID_CONFIG, invokes={"hcloud:index/getSshKeys:getSshKeys": other}).of_type(
                "hcloud:index/sshKey:SshKey"
            )
        )
        == 1
    )


def volume_answer(volume_id: int) -> dict:
    return {
        "volumes": [
            {
                "id": volume_id,
                "name": "mlapi-dev-data",
                "location": "nbg1",
                "size": 10,
                "labels": {},
                "linuxDevice": "",
                "serverId": 0,
                "deleteProtection": False,
            }
        ]
    }


def test_moving_the_stack_away_from_its_volume_is_refused() -> None:
    """Volumes are bound to a location: a location change would strand the data on the old volume."""
    with pytest.raises(Exception, match=r"'location'.*'hel1'.*is in 'nbg1'.*pulumi config set location nbg1"):
        run_program(
            {**VALID_CONFIG, "location": "hel1"}, invokes={"hcloud:index/getVolumes:getVolumes": volume_answer(777)}
        )


def test_a_kept_volume_is_adopted_after_destroy() -> None:
    kept = run_program(VALID_CONFIG, invokes={"hcloud:index/getVolumes:getVolumes": volume_answer(777)})
    assert kept.one(VOLUME).opts.import_ == "777"
    server_exists = {"servers": [{"id": 5, "name": "mlapi-dev"}]}
    ordinary = run_program(
        VALID_CONFIG,
        invokes={
            "hcloud:index/getVolumes:getVolumes": volume_answer(777),
            "hcloud:index/getServers:getServers": server_exists,
        },
    )
    assert ordinary.one(VOLUME).opts.import_ is None  # a second `up` of a live stack imports nothing


def test_backups_off_say_so_once(deployment: Deployment) -> None:
    assert [w for w in deployment.warnings if "backups are off" in w] == [deployment.warnings[0]]
    setup = deployment.one(REMOTE, "host-setup").inputs["create"]
    assert "rm -f /etc/cron.d/mlapi-backup /etc/mlapi/backup/env" in setup  # turning them off stops the job
    assert not [r for r in deployment.of_type(REMOTE) if r.name.endswith("backup-credentials")]


def test_backups_on_install_scripts_and_pass_credentials_on_stdin_only() -> None:
    on = run_program(BACKUP_CONFIG)
    assert not any("backups are off" in w for w in on.warnings)
    setup = on.one(REMOTE, "host-setup").inputs["create"]
    assert "apt-get install -y -qq restic" in setup
    files = host_files_of(setup)
    cron = next(f for f in files if "mlapi-backup >>" in f)
    assert "15 1 * * * root /usr/local/sbin/mlapi-backup >> /var/log/mlapi-backup.log 2>&1" in cron
    assert "@weekly root /usr/local/sbin/mlapi-backup check" in cron
    backup = next(f for f in files if f.startswith("#!/bin/sh\n# mlapi-backup"))
    assert "--keep-daily 3 --keep-weekly 2 --keep-monthly 1" in backup
    credentials = on.one(REMOTE, "backup-credentials")
    bundle = credentials.inputs["stdin"]
    decoded = {line.split()[0]: base64.b64decode(line.split()[2]).decode() for line in bundle.splitlines()}
    assert "RESTIC_PASSWORD='correct horse battery staple'" in decoded["/etc/mlapi/backup/env"]
    assert "AWS_SECRET_ACCESS_KEY=s3cr3t-value" in decoded["/etc/mlapi/backup/env"]
    assert decoded["/etc/mlapi/backup/ssh_key"] == BACKUP_KEY
    assert "Host u123.your-storagebox.de" in decoded["/etc/ssh/ssh_config.d/60-mlapi-backup.conf"]
    everything_else = json.dumps([r.inputs for r in on.resources if r is not credentials])
    everything_else += credentials.inputs["create"]
    for secret in ("correct horse battery staple", "s3cr3t-value", "YmFja3VwIGtleQ=="):
        assert secret not in everything_else, secret
    assert "mlapi-restore --if-empty latest" in credentials.inputs["create"]
    assert credentials.inputs["triggers"] == [on.exports["serverId"]]


HEARTBEAT = "https://hc-ping.com/0f3e9c1a-5b7d-4e2a-9c8b-h34rtb34tt0k"


def test_heartbeats_are_installed_always_and_the_url_reaches_the_host_only_on_stdin(deployment: Deployment) -> None:
    files = host_files_of(deployment.one(REMOTE, "host-setup").inputs["create"])
    script = next(f for f in files if f.startswith("#!/bin/sh\n# mlapi-heartbeat"))
    assert "DOMAIN=api.fjord-ml.net\n" in script and "URL_FILE=/etc/mlapi/heartbeat-url\n" in script
    assert any(
        "*/5 * * * * root /usr/local/sbin/mlapi-heartbeat edge >> /var/log/mlapi-heartbeat.log" in f for f in files
    )
    retrain = next(f for f in files if "root /usr/local/bin/mlapi-app retrain" in f)
    assert "retrain >> /var/log/mlapi-retrain.log 2>&1 && /usr/local/sbin/mlapi-heartbeat retrain" in retrain
    assert not [r for r in deployment.of_type(REMOTE) if r.name.endswith("-heartbeat")]  # no key: no URL file

    on = run_program({**VALID_CONFIG, "heartbeatUrl": HEARTBEAT})
    installer = on.one(REMOTE, "-heartbeat")
    assert installer.inputs["stdin"] == HEARTBEAT + "\n"
    assert plaintext_strings(installer.wire["stdin"]) == []
    assert (
        "cat > /etc/mlapi/heartbeat-url.new" in installer.inputs["create"] and "umask 077" in installer.inputs["create"]
    )
    assert installer.inputs["delete"] == "rm -f /etc/mlapi/heartbeat-url\n"  # the key removed: the pings stop
    assert installer.inputs["triggers"] == [on.exports["serverId"]]
    for resource in on.resources:
        assert all("h34rtb34tt0k" not in text for text in plaintext_strings(resource.wire)), resource.name


def test_every_secret_is_marked_secret_on_the_wire() -> None:
    """What the engine would store in the state file or print in a preview: no secret outside a secret marker."""
    on = run_program(BACKUP_CONFIG)
    secrets = [
        "correct horse battery staple",
        "s3cr3t-value",
        "YmFja3VwIGtleQ==",  # the backup key's body, also inside the base64 bundle
        base64.b64encode(BACKUP_KEY.encode()).decode()[:40],
        *on.generated_secrets(),  # the admin and ingest tokens
        "bW9jayBob3N0IGtleQ==",  # the host's private key
    ]
    for resource in on.resources:
        shown = "\n".join(plaintext_strings(resource.wire))
        for secret in secrets:
            assert secret not in shown, f"{resource.typ} {resource.name} shows a secret in plaintext"
    marked = {
        (REMOTE, "backup-credentials"): "stdin",
        (SERVER, ""): "userData",  # holds the host's private key
        (SECRET, "admin-secret"): "data",
        (SECRET, "ingest-secret"): "data",
    }
    for (typ, suffix), key in marked.items():
        carrier = on.one(typ, suffix)
        assert carrier.inputs[key], f"{typ}.{key} is empty"
        assert plaintext_strings(carrier.wire[key]) == [], f"{typ}.{key} is not marked secret"


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("backupRepository", "ftp://example.com/x", "not a restic repository URL"),
        ("backupRepository", "sftp::/path", "names no host"),
        ("backupPassword", "", "is required when backupRepository is set"),
        ("backupEnvironment", "[1]", "environment variable names"),
        ("backupEnvironment", '{"lower": "x"}', "not a variable restic's backends read"),
        ("backupEnvironment", '{"PATH": "/tmp/evil"}', "not a variable restic's backends read"),
        ("backupEnvironment", '{"LD_PRELOAD": "/tmp/x.so"}', "not a variable restic's backends read"),
        ("backupEnvironment", '{"RESTIC_PASSWORD_COMMAND": "sh -c id"}', "not a variable restic's backends read"),
        ("backupRepository", "sftp:u@box:/m\nProxyCommand sh -c id", "control character"),
        ("backupEnvironment", "{", "not a JSON object"),
        ("backupSshKey", "ssh-ed25519 AAAA", "not an OpenSSH private key"),
        ("backupSchedule", "99 * * * *", "minute"),
        ("backupKeep", "yearly=3", "daily=N"),
    ],
)
def test_invalid_backup_config_names_the_key(key: str, value: str, says: str) -> None:
    assert_config_refused({**BACKUP_CONFIG, key: value}, key, says)


def test_a_refused_repository_url_never_shows_its_credentials() -> None:
    with pytest.raises(Exception, match="'backupRepository'") as raised:
        run_program({**BACKUP_CONFIG, "backupRepository": "ftp://backup:hunter2-secret@files.fjord-ml.net/x"})
    assert "hunter2-secret" not in str(raised.value) and "backup:***@" in str(raised.value)


# A change of user-data replaces the server on the next `pulumi up` (the volume is kept, the VM is rebuilt): it must
# only ever happen on purpose. Changing this digest is that decision; say it in the commit message.
USER_DATA_SHA256 = "f2af8a0a7268a6807892a46d5decf05c5ff470bc642a5d7e6f2baa2b80a69087"


def test_user_data_changes_only_on_purpose() -> None:
    user_data = run_program(VALID_CONFIG).one(SERVER).inputs["userData"]
    assert hashlib.sha256(user_data.encode()).hexdigest() == USER_DATA_SHA256, (
        "user-data changed: every server is replaced on the next `pulumi up`. If that is intended, update "
        "USER_DATA_SHA256 and say so in the commit message; if not, keep the rendered text as it was"
    )


# -- the operator's model project ----------------------------------------------------------------------------------
IMAGE = "docker:index/image:Image"


def test_a_model_project_is_baked_into_the_model_image_the_service_runs() -> None:
    """modelProject: the project checked by the app, built on the host from app/Dockerfile.project (the file `make
    local-up MODEL=` builds) on top of the model image, and the service runs that image; paths relative, so a
    preview from CI equals one from the operator's laptop."""
    served = run_program({**VALID_CONFIG, "modelProject": "examples/penguins"})
    base, project = (served.one(IMAGE, suffix) for suffix in ("-model-image", "-model-project-image"))
    assert project.inputs["build"] == {
        "context": "examples/penguins",
        "dockerfile": "app/Dockerfile.project",
        "args": {"MODEL_IMAGE": base.inputs["imageName"]},  # by name: the image the engine has
        "platform": "linux/amd64",
    }
    assert project.inputs["imageName"].startswith("mlapi-model-project:") and project.inputs["skipPush"] is True
    assert served.one(SERVICE, "-model").inputs["taskSpec"]["containerSpec"]["image"] == project.inputs["imageName"]
    assert "mlapi-dev-model-image" in {d._name for d in project.opts.depends_on}
    pulled = run_program({**VALID_CONFIG, "modelProject": "examples/penguins", "modelImage": "ghcr.io/acme/model:1.2"})
    assert pulled.one(IMAGE).inputs["build"]["args"] == {"MODEL_IMAGE": "ghcr.io/acme/model:1.2"}
    assert run_program(VALID_CONFIG).one(IMAGE).name.endswith("-model-image")  # none: the bundled model


def test_a_project_that_cannot_be_served_fails_the_program_before_anything_is_deployed(tmp_path: Path) -> None:
    project = tmp_path / "penguins"
    project.mkdir()
    (project / "mlapi.toml").write_text(
        (PROJECT_DIR / "examples" / "penguins" / "mlapi.toml").read_text().replace('"data/', '"missing/')
    )
    with pytest.raises(Exception, match=r"modelProject: MLAPI_MODEL_PROJECT: .*missing/penguins.csv: the data file"):
        run_program({**VALID_CONFIG, "modelProject": str(project)})
    with pytest.raises(Exception, match=r"modelProject: .*no mlapi.toml here"):
        run_program({**VALID_CONFIG, "modelProject": "examples"})


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


def test_a_project_with_s3_data_gets_its_credentials_as_a_secret_and_a_first_training_job(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s3:// data: the app's check fetches it with the configured key (a wrong key fails the program), the key
    becomes a swarm secret the replicas mount, and a job run on the host before the service trains the first version
    with it (the image build cannot: an image never holds credentials)."""
    monkeypatch.setenv("AWS_CA_BUNDLE", str(s3.certificate))
    project = penguins_in_s3(tmp_path / "penguins", s3)
    config = {**VALID_CONFIG, "modelProject": str(project)}
    with pytest.raises(Exception, match=r"configuration 'dataAccessKeyId' .*is required: the model project's data is"):
        run_program(config)
    assert_config_refused({**VALID_CONFIG, "dataAccessKeyId": "AKIAEXAMPLE1"}, "dataSecretAccessKey", "is required")
    keys = {"dataAccessKeyId": s3.reader_keys["aws_access_key_id"]}
    with pytest.raises(Exception, match=r"modelProject: .*penguins/penguins.csv answered HTTP 403"):
        run_program({**config, **keys, "dataSecretAccessKey": "not-the-secret"})

    secret_key = s3.reader_keys["aws_secret_access_key"]
    served = run_program({**config, **keys, "dataSecretAccessKey": secret_key})
    secret = served.one(SECRET, "-data-credentials")
    assert base64.urlsafe_b64decode(secret.inputs["data"]).decode() == s3.credentials_text()
    assert secret.inputs["name"].startswith("mlapi-data-credentials-")
    model = served.one(SERVICE, "-model").inputs["taskSpec"]["containerSpec"]
    assert {"fileName": "data_credentials", "secretId": secret.id, "secretName": secret.inputs["name"]}.items() <= {
        **next(s for s in model["secrets"] if s["secretName"] == secret.inputs["name"]),
        "fileName": "data_credentials",
    }.items()
    assert model["env"]["MLAPI_DATA_CREDENTIALS_FILE"] == "/run/secrets/data_credentials"
    assert model["env"]["AWS_EC2_METADATA_DISABLED"] == "true"

    job = served.one(REMOTE, "-first-training")
    script = job.inputs["create"]
    image = served.one(IMAGE, "-model-project-image").inputs["imageName"]
    arguments = script.split("JOB_ARGS='", 1)[1].split("'\n", 1)[0].splitlines()
    assert arguments[-7:] == [image, "python", "-m", "app", "train", "--into", "/data"]
    for expected in (
        "--network", "mlapi", "--restart-condition", "none", "--read-only", "--init",
        "--constraint", "node.role==manager", "type=bind,source=/srv/mlapi/model,target=/data",
        f"source={secret.inputs['name']},target=data_credentials,uid=10001,gid=10001,mode=0400",
        "MLAPI_DATA_CREDENTIALS_FILE=/run/secrets/data_credentials",
    ):  # fmt: skip
        assert expected in arguments, expected
    assert not any("TOKEN_FILE" in argument or "DATABASE" in argument for argument in arguments)  # nothing else
    assert 'docker service create --quiet --detach --name "$JOB" --mode replicated-job' in script
    assert all(secret_key not in text for text in plaintext_strings(job.wire))
    assert all(secret_key not in text for text in plaintext_strings(secret.wire))
    assert "mlapi-dev-first-training" in {d._name for d in served.one(SERVICE, "-model").opts.depends_on}
    assert not [r for r in run_program(VALID_CONFIG).of_type(REMOTE) if r.name.endswith("-first-training")]


# -- monitoring ------------------------------------------------------------------------------------------------------
WEBHOOK = "https://hooks.slack.com/services/T0FJORD/B0ALERTS/s3cr3tw3bh00kt0k3n"


def alertmanager_config(deployment: Deployment) -> dict:
    """Alertmanager's configuration, as the swarm secret carries it."""
    return yaml.safe_load(base64.urlsafe_b64decode(deployment.one(SECRET, "-alertmanager-config").inputs["data"]))


def test_a_node_exporter_runs_on_every_node_reading_the_host_read_only(deployment: Deployment) -> None:
    exporter = deployment.one(SERVICE, "-node-exporter").inputs
    assert exporter["mode"] == {"global": True}  # one task on each node, workers included
    task = exporter["taskSpec"]
    container = task["containerSpec"]
    # By reference: a worker pulls it itself (the manager's image ID means nothing there).
    assert container["image"] == "prom/node-exporter:v1.9.1"
    assert "prom/node-exporter:v1.9.1" in {
        i.inputs["name"] for i in deployment.of_type("docker:index/remoteImage:RemoteImage")
    }
    assert [(m["source"], m["target"], m.get("readOnly")) for m in container["mounts"] if m["type"] == "bind"] == [
        ("/proc", "/host/proc", True), ("/sys", "/host/sys", True), ("/", "/host/root", True),
    ]  # fmt: skip
    assert {"--path.procfs=/host/proc", "--path.sysfs=/host/sys", "--path.rootfs=/host/root"} <= set(
        container["commands"]
    )
    assert container["user"] == "65534:65534" and container["readOnly"] is True and container["capDrops"] == ["ALL"]
    assert container["healthcheck"]["tests"] == ["CMD", "wget", "--spider", "-q", "http://127.0.0.1:9100/metrics"]
    assert task["resources"] == {"limits": {"memoryBytes": 32 * 2**20}} and "placement" not in task
    assert "ports" not in exporter.get("endpointSpec", {})  # Prometheus reaches it over the overlay only


def rules_in(setup: str) -> str:
    """The alert rules file the deploy step writes (each file is echoed base64 into its place)."""
    [line] = [line for line in setup.splitlines() if "/prometheus/config/rules.yml" in line and "base64 -d" in line]
    return base64.b64decode(line.split()[1]).decode()


def test_prometheus_and_alertmanager_run_on_the_manager_unpublished(deployment: Deployment) -> None:
    prometheus = deployment.one(SERVICE, "-prometheus").inputs
    alertmanager = deployment.one(SERVICE, "-alertmanager").inputs
    for service, memory_mb, port in ((prometheus, 200, 9090), (alertmanager, 50, 9093)):
        task = service["taskSpec"]
        assert task["placement"] == {"constraints": ["node.role==manager"]}  # their data is on the manager's volume
        assert task["resources"] == {"limits": {"memoryBytes": memory_mb * 2**20}}
        assert task["containerSpec"]["user"] == "65534:65534" and task["containerSpec"]["readOnly"] is True
        # The official images' busybox wget asks their own health endpoint: swarm replaces one that hangs.
        health = task["containerSpec"]["healthcheck"]
        assert health["tests"] == ["CMD", "wget", "--spider", "-q", f"http://127.0.0.1:{port}/-/healthy"]
        assert (health["interval"], health["timeout"], health["retries"]) == ("5s", "5s", 3)
        assert "ports" not in service.get("endpointSpec", {})  # reached over the overlay, `mlapi` or a tunnel only
        assert service["updateConfig"]["order"] == "stop-first" and service["mode"]["replicated"]["replicas"] == 1
    container = prometheus["taskSpec"]["containerSpec"]
    pulled = {image.inputs["name"] for image in deployment.of_type("docker:index/remoteImage:RemoteImage")}
    assert {"prom/prometheus:v3.5.0", "prom/alertmanager:v0.28.1"} <= pulled
    assert "--storage.tsdb.retention.time=15d" in container["commands"]
    assert "--storage.tsdb.retention.size=1GB" in container["commands"]
    assert {m["source"] for m in container["mounts"] if m["type"] == "bind"} == {
        "/srv/mlapi/prometheus/data",
        "/srv/mlapi/prometheus/config",
    }
    assert {s["fileName"] for s in alertmanager["taskSpec"]["containerSpec"]["secrets"]} == {"alertmanager.yml"}
    assert "--cluster.listen-address=" in alertmanager["taskSpec"]["containerSpec"]["commands"]
    # The deploy step writes the rules and the scrape configuration; Traefik exposes its metrics on the overlay.
    setup = deployment.one(REMOTE, "-host-setup").inputs["create"]
    assert "/srv/mlapi/prometheus/config/rules.yml" in setup
    traefik = deployment.one(CONTAINER, "-traefik").inputs
    assert "--metrics.prometheus.entrypoint=metrics" in traefik["command"]
    assert {p["internal"] for p in traefik["ports"]} == {8880, 8443}


def test_no_webhook_warns_once_and_alertmanager_sends_nothing(deployment: Deployment) -> None:
    assert any("alertWebhookUrl" in warning and "alerts reach no one" in warning for warning in deployment.warnings)
    config = alertmanager_config(deployment)
    assert config["receivers"] == [{"name": "operator"}]


def test_alert_e_mail_reaches_alertmanager_with_its_password_only_as_a_secret() -> None:
    mailing = run_program(
        {**VALID_CONFIG, "alertEmail": "oncall@fjord-ml.net", "alertSmtpUrl": "smtps://ops:m41lp4ss@mx.fjord-ml.net"}
    )
    assert not any("alerts reach no one" in warning for warning in mailing.warnings)
    [receiver] = alertmanager_config(mailing)["receivers"]
    assert receiver["email_configs"] == [
        {"to": "oncall@fjord-ml.net", "from": "mlapi-alerts@api.fjord-ml.net", "smarthost": "mx.fjord-ml.net:465",
         "require_tls": True, "send_resolved": True, "auth_username": "ops", "auth_password": "m41lp4ss"}
    ]  # fmt: skip
    for resource in mailing.resources:
        assert all("m41lp4ss" not in text for text in plaintext_strings(resource.wire)), resource.name


def test_the_webhook_url_reaches_alertmanager_only_as_a_secret() -> None:
    alerting = run_program(
        {**VALID_CONFIG, "alertWebhookUrl": WEBHOOK, "monitoringRetention": "30d", "latencyObjectiveMs": "300"}
    )
    assert not any("alertWebhookUrl" in warning for warning in alerting.warnings)
    carrier = alerting.one(SECRET, "-alertmanager-config")
    assert plaintext_strings(carrier.wire["data"]) == [] and plaintext_strings(carrier.wire["name"]) == []
    config = alertmanager_config(alerting)
    [receiver] = config["receivers"]
    assert receiver["slack_configs"][0]["api_url"] == WEBHOOK and receiver["slack_configs"][0]["send_resolved"]
    for resource in alerting.resources:
        assert all("s3cr3tw3bh00k" not in text for text in plaintext_strings(resource.wire)), resource.name
    prometheus = alerting.one(SERVICE, "-prometheus").inputs["taskSpec"]["containerSpec"]
    assert "--storage.tsdb.retention.time=30d" in prometheus["commands"]
    # The latency objective is a bucket bound of Traefik's histogram and the p99 alert's threshold.
    traefik = alerting.one(CONTAINER, "-traefik").inputs["command"]
    assert "--metrics.prometheus.buckets=0.01,0.025,0.05,0.1,0.25,0.3,0.5,1,2.5,5,10" in traefik
    rules = yaml.safe_load(rules_in(alerting.one(REMOTE, "-host-setup").inputs["create"]))
    [slow] = [rule for rule in rules["groups"][0]["rules"] if rule["alert"] == "EdgeSlow"]
    assert "> 0.3 and" in slow["expr"] and "300 ms" in slow["annotations"]["summary"]
