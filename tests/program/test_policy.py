"""The CrossGuard policy pack (policy/): every rule's validate function run against the inputs the program declares
under mocks. The good configuration passes every rule; crafted bad ones are rejected with the expected message.
No Pulumi CLI needed: constructing the PolicyPack would start its server, so the tests call the rules directly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pulumi_policy import EnforcementLevel, PolicyResourceOptions, ResourceValidationArgs

from policy import rules
from tests.support.program import BACKUP_CONFIG
from tests.support.pulumi_harness import PROJECT_DIR, VALID_CONFIG, Deployment, Recorded, run_program

GOOD_CONFIG = {**BACKUP_CONFIG, "sshAllowedCidrs": '["84.17.50.3/32"]'}


def policy_args(resource: Recorded, **props_changes: object) -> ResourceValidationArgs:
    props = copy.deepcopy(resource.inputs)
    props.update(props_changes)
    opts = resource.opts
    return ResourceValidationArgs(
        resource_type=resource.typ,
        props=props,
        urn=f"urn:pulumi:dev::mlapi::{resource.typ}::{resource.name}",
        name=resource.name,
        opts=PolicyResourceOptions(
            protect=bool(opts and opts.protect),
            ignore_changes=list((opts and opts.ignore_changes) or []),
            delete_before_replace=opts.delete_before_replace if opts else None,
            aliases=[],
            custom_timeouts=None,
            additional_secret_outputs=[],
        ),
        provider=None,
    )


def violations(args: ResourceValidationArgs, level: EnforcementLevel | None = None) -> list[str]:
    found: list[str] = []
    for policy in rules.POLICIES:
        if level is not None and policy.enforcement_level != level:
            continue
        policy.validate(args, lambda message, urn=None, name=policy.name: found.append(f"{name}: {message}"))
    return found


def all_violations(deployment: Deployment, level: EnforcementLevel | None = None) -> list[str]:
    return [v for resource in deployment.resources for v in violations(policy_args(resource), level)]


@pytest.fixture(scope="module")
def good() -> Deployment:
    return run_program(GOOD_CONFIG)


def test_the_good_configuration_passes_every_rule(good: Deployment) -> None:
    assert all_violations(good) == []
    checked = {r.typ for r in good.resources}
    for typ in (rules.FIREWALL, rules.SERVER, rules.VOLUME, rules.CONTAINER, rules.SERVICE, rules.DNS_RECORD):
        assert typ in checked  # the rules saw the resource types they are about


def test_levels_are_chosen_deliberately() -> None:
    levels = {policy.name: policy.enforcement_level for policy in rules.POLICIES}
    assert levels.pop("ssh-open-to-the-world") == EnforcementLevel.ADVISORY
    assert set(levels.values()) == {EnforcementLevel.MANDATORY}
    assert len(levels) == 7


def test_ssh_open_to_the_world_unlabelled_is_blocked_and_by_choice_only_reported(good: Deployment) -> None:
    firewall = good.one(rules.FIREWALL)
    world_ssh = [
        {**rule, "sourceIps": ["0.0.0.0/0", "::/0"]} if rule.get("port") == "22" else rule
        for rule in firewall.inputs["rules"]
    ]
    [blocked] = violations(policy_args(firewall, rules=world_ssh), EnforcementLevel.MANDATORY)
    assert blocked.startswith("firewall-opens-only-the-edge: firewall rule tcp/22 is open to ['0.0.0.0/0', '::/0']")
    assert "pulumi config set sshAllowedCidrs" in blocked
    chosen = run_program({**VALID_CONFIG, "sshAllowedCidrs": '["0.0.0.0/0", "::/0"]'})
    assert all_violations(chosen, EnforcementLevel.MANDATORY) == []
    assert all_violations(chosen, EnforcementLevel.ADVISORY) == [
        "ssh-open-to-the-world: SSH is open to the whole internet because sshAllowedCidrs says so (key-only login)."
    ]


def test_any_other_port_open_to_the_world_is_blocked(good: Deployment) -> None:
    firewall = good.one(rules.FIREWALL)
    database = {"direction": "in", "protocol": "tcp", "port": "5432", "sourceIps": ["::/0"]}
    found = violations(policy_args(firewall, rules=[*firewall.inputs["rules"], database]))
    assert found == [
        "firewall-opens-only-the-edge: firewall rule tcp/5432 is open to ['::/0']: only 80/443 and ICMP may be. "
        "For SSH set sshAllowedCidrs to your admin networks "
        "(`pulumi config set sshAllowedCidrs '[\"203.0.113.7/32\"]'`)."
    ]
    udp_everything = {"direction": "in", "protocol": "udp", "sourceIps": ["0.0.0.0/0"]}
    assert "udp/any" in violations(policy_args(firewall, rules=[udp_everything]))[0]


def test_only_traefik_publishes_ports(good: Deployment) -> None:
    traefik = good.one(rules.CONTAINER, "traefik")
    other = policy_args(traefik, name="mlapi-debug")
    assert violations(other) == [
        "only-the-edge-publishes-ports: container 'mlapi-debug' publishes ports: only mlapi-traefik may; route it."
    ]
    model = good.one(rules.SERVICE, "-model")
    published = policy_args(model, endpointSpec={"mode": "vip", "ports": [{"targetPort": 8000, "publishedPort": 8000}]})
    assert violations(published) == [
        "only-the-edge-publishes-ports: a swarm service publishes ports: services are reached through Traefik on the "
        "overlay only."
    ]


def test_the_docker_socket_never_reaches_a_routed_container(good: Deployment) -> None:
    model = good.one(rules.SERVICE, "-model")
    spec = copy.deepcopy(model.inputs["taskSpec"])
    spec["containerSpec"]["mounts"].append({"type": "bind", "source": "/var/run/docker.sock", "target": "/sock"})
    assert violations(policy_args(model, taskSpec=spec)) == [
        "no-docker-socket-in-routed-containers: a container Traefik routes internet traffic to mounts the Docker "
        "socket (root on the host)."
    ]


def test_the_data_volume_is_never_replaced_delete_first(good: Deployment) -> None:
    volume = good.one(rules.VOLUME)
    args = policy_args(volume)
    args.opts.delete_before_replace = True
    [found] = violations(args)
    assert found.startswith("data-volume-is-never-deleted-first: the data volume is replaced delete-first")


@pytest.mark.parametrize("image", ["ghcr.io/acme/model:latest", "ghcr.io/acme/model", "registry:5000/model"])
def test_an_unpinned_model_image_is_blocked(image: str) -> None:
    pulled = run_program({**GOOD_CONFIG, "modelImage": image})
    message = f"images-are-pinned: image {image!r} is not pinned: give a version tag or a digest, never `latest`."
    flagged = {r.typ for r in pulled.resources if violations(policy_args(r))}
    assert flagged == {rules.REMOTE_IMAGE}  # the service then runs the pulled image by its digest
    assert set(all_violations(pulled)) == {message}


def test_pinned_references_pass() -> None:
    for reference in ("ghcr.io/acme/model:1.2", "registry:5000/model:3", "model@sha256:" + "a" * 64, "sha256:ab"):
        assert not rules._unpinned(reference), reference


def test_a_proxied_record_is_blocked(good: Deployment) -> None:
    record = good.of_type(rules.DNS_RECORD)[0]
    [found] = violations(policy_args(record, proxied=True))
    assert found.startswith("dns-is-not-proxied: the DNS record is proxied by Cloudflare")


def test_a_proxied_record_passes_with_dns01_certificates() -> None:
    from infra.program.dns_challenge import DNS01_COMMENT

    assert DNS01_COMMENT == rules.DNS01_COMMENT  # the program's comment is the one the pack looks for
    deployment = run_program({**GOOD_CONFIG, "acmeChallenge": "dns", "dnsProxied": "true"})
    assert all(r.inputs["proxied"] for r in deployment.of_type(rules.DNS_RECORD))
    assert all_violations(deployment) == []


def test_the_cluster_configuration_passes_every_rule() -> None:
    from tests.support.program import WORKERS

    deployment = run_program({**GOOD_CONFIG, **WORKERS, "loadBalancer": "true", "acmeChallenge": "dns"})
    assert all_violations(deployment) == []


def test_secrets_in_plain_sight_are_blocked(good: Deployment) -> None:
    model = good.one(rules.SERVICE, "-model")
    spec = copy.deepcopy(model.inputs["taskSpec"])
    spec["containerSpec"]["env"]["MLAPI_ADMIN_TOKEN"] = "hunter2-hunter2"
    assert violations(policy_args(model, taskSpec=spec)) == [
        "no-plaintext-secrets: secrets in plain environment variables (MLAPI_ADMIN_TOKEN): use a swarm secret file."
    ]
    labels = [*model.inputs["labels"], {"label": "backup", "value": "RESTIC_PASSWORD=x"}]
    assert "labels hold secret material (backup)" in violations(policy_args(model, labels=labels))[0]
    server = good.one(rules.SERVER)
    document = yaml.safe_load(server.inputs["userData"])
    assert "ssh_keys" in document  # the host's own key is allowed there, and only there
    document["write_files"].append({"path": "/etc/mlapi/backup/env", "content": "RESTIC_PASSWORD=x\n"})
    leaked = "#cloud-config\n" + yaml.safe_dump(document)
    assert violations(policy_args(server, userData=leaked)) == [
        "no-plaintext-secrets: user-data holds secrets (RESTIC_PASSWORD=): deliver them with the deploy step instead."
    ]


def test_the_pack_is_wired_to_these_rules() -> None:
    pack = PROJECT_DIR / "policy"
    assert yaml.safe_load((pack / "PulumiPolicy.yaml").read_text())["runtime"] == "python"
    main = (pack / "__main__.py").read_text()
    assert "from rules import POLICIES" in main and "PolicyPack(name=" in main
    assert "pulumi-policy==" in (pack / "requirements.txt").read_text()
    assert Path(rules.__file__).parent == pack
