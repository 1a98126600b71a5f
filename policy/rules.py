"""The CrossGuard rules this product's safety depends on. Each validate function takes the resource's inputs as the
engine sends them (camelCase names) and reports a violation with a message that says what to change.

Mandatory: a violation stops `pulumi preview`/`up` (an open port, a published model, the Docker socket in a routed
container, a data volume replaced delete-first, an unpinned image, a proxied record without DNS-01 certificates,
a secret in plain sight).
Advisory: SSH open to the world when the operator said so explicitly is reported, not blocked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import yaml
from pulumi_policy import EnforcementLevel, ResourceValidationArgs, ResourceValidationPolicy

Report = Callable[[str, str | None], None]
WORLD = {"0.0.0.0/0", "::/0"}
PUBLIC_PORTS = {"80", "443"}
EDGE_CONTAINER = "mlapi-traefik"  # the only container that publishes ports
WORLD_SSH_LABEL = "ssh-world-explicit"  # set by the program only when sshAllowedCidrs names the world itself
DOCKER_SOCKET = "docker.sock"
SECRET_NAME = re.compile(r"(TOKEN|PASSWORD|PASSWD|SECRET|PRIVATE_KEY|ACCESS_KEY)", re.IGNORECASE)
SECRET_TEXT = re.compile(
    r"(RESTIC_PASSWORD=|AWS_SECRET_ACCESS_KEY=|MLAPI_ADMIN_TOKEN=|BEGIN [A-Z ]*PRIVATE KEY)", re.IGNORECASE
)

FIREWALL = "hcloud:index/firewall:Firewall"
SERVER = "hcloud:index/server:Server"
VOLUME = "hcloud:index/volume:Volume"
CONTAINER = "docker:index/container:Container"
SERVICE = "docker:index/service:Service"
REMOTE_IMAGE = "docker:index/remoteImage:RemoteImage"
BUILT_IMAGE = "docker:index/image:Image"
DNS_RECORD = "cloudflare:index/dnsRecord:DnsRecord"


def firewall_opens_only_the_edge(args: ResourceValidationArgs, report: Report) -> None:
    if args.resource_type != FIREWALL:
        return
    for rule in args.props.get("rules") or []:
        if rule.get("direction", "in") != "in" or not WORLD & set(rule.get("sourceIps") or []):
            continue
        protocol, port = rule.get("protocol"), str(rule.get("port") or "")
        if protocol == "icmp" or (protocol == "tcp" and port in PUBLIC_PORTS):
            continue
        if protocol == "tcp" and port == "22" and (args.props.get("labels") or {}).get(WORLD_SSH_LABEL) == "true":
            continue  # the operator typed 0.0.0.0/0 into sshAllowedCidrs: the advisory rule below says so
        report(
            f"firewall rule {protocol}/{port or 'any'} is open to {sorted(WORLD & set(rule['sourceIps']))}: only "
            "80/443 and ICMP may be. For SSH set sshAllowedCidrs to your admin networks "
            "(`pulumi config set sshAllowedCidrs '[\"203.0.113.7/32\"]'`).",
            None,
        )


def ssh_open_to_the_world(args: ResourceValidationArgs, report: Report) -> None:
    if args.resource_type == FIREWALL and (args.props.get("labels") or {}).get(WORLD_SSH_LABEL) == "true":
        report("SSH is open to the whole internet because sshAllowedCidrs says so (key-only login).", None)


def only_the_edge_publishes_ports(args: ResourceValidationArgs, report: Report) -> None:
    if args.resource_type == CONTAINER and args.props.get("ports") and args.props.get("name") != EDGE_CONTAINER:
        report(f"container {args.props.get('name')!r} publishes ports: only {EDGE_CONTAINER} may; route it.", None)
    if args.resource_type == SERVICE and ((args.props.get("endpointSpec") or {}).get("ports")):
        report("a swarm service publishes ports: services are reached through Traefik on the overlay only.", None)


def _labels(props: Mapping[str, Any]) -> dict[str, str]:
    labels = props.get("labels") or []
    if isinstance(labels, Mapping):
        return dict(labels)
    return {item.get("label"): item.get("value") for item in labels}


def _mount_sources(args: ResourceValidationArgs) -> Iterator[str]:
    props = args.props
    if args.resource_type == SERVICE:
        props = (props.get("taskSpec") or {}).get("containerSpec") or {}
    for mount in props.get("mounts") or []:
        yield str(mount.get("source") or "")
    for volume in props.get("volumes") or []:
        yield str(volume.get("hostPath") or volume.get("volumeName") or "")


def no_docker_socket_in_routed_containers(args: ResourceValidationArgs, report: Report) -> None:
    if args.resource_type not in (CONTAINER, SERVICE):
        return
    if _labels(args.props).get("traefik.enable") != "true":
        return
    if any(source.endswith(DOCKER_SOCKET) for source in _mount_sources(args)):
        report("a container Traefik routes internet traffic to mounts the Docker socket (root on the host).", None)


def data_volume_is_never_deleted_first(args: ResourceValidationArgs, report: Report) -> None:
    if args.resource_type != VOLUME:
        return
    if args.opts.delete_before_replace:
        report(
            "the data volume is replaced delete-first: a change that needs a new volume would destroy models, logs "
            "and certificates before anything else exists. Remove delete_before_replace.",
            None,
        )


def _unpinned(reference: str) -> bool:
    if not reference or reference.startswith("sha256:") or "@sha256:" in reference:
        return False
    name = reference.rsplit("/", 1)[-1]
    return ":" not in name or name.endswith(":latest")


def images_are_pinned(args: ResourceValidationArgs, report: Report) -> None:
    references = {
        REMOTE_IMAGE: lambda p: p.get("name"),
        BUILT_IMAGE: lambda p: p.get("imageName"),
        CONTAINER: lambda p: p.get("image"),
        SERVICE: lambda p: ((p.get("taskSpec") or {}).get("containerSpec") or {}).get("image"),
    }
    if args.resource_type in references:
        reference = references[args.resource_type](args.props) or ""
        if _unpinned(reference):
            report(f"image {reference!r} is not pinned: give a version tag or a digest, never `latest`.", None)


DNS01_COMMENT = "certificates by DNS-01"  # the program says so on records it proxies (acmeChallenge=dns)


def dns_is_not_proxied(args: ResourceValidationArgs, report: Report) -> None:
    if args.resource_type != DNS_RECORD or not args.props.get("proxied"):
        return
    if DNS01_COMMENT not in str(args.props.get("comment") or ""):
        report(
            "the DNS record is proxied by Cloudflare: certificate validation (TLS-ALPN) needs a direct connection, "
            "so renewals would fail. Keep proxied false, or use DNS-01 certificates (`pulumi config set acmeChallenge "
            "dns`).",
            None,
        )


def _plain_secrets_in_env(env: Any) -> list[str]:
    pairs = env.items() if isinstance(env, Mapping) else (item.split("=", 1) for item in env or [] if "=" in item)
    return [
        key
        for key, value in pairs
        if SECRET_NAME.search(key) and not key.endswith("_FILE") and value and not str(value).startswith("/")
    ]


def _user_data_leaks(user_data: str) -> list[str]:
    """Secrets in user-data other than the server's own host key (which cloud-init needs, in `ssh_keys`)."""
    try:
        document = yaml.safe_load(user_data) or {}
    except yaml.YAMLError:
        document = {}
    if isinstance(document, dict):
        document = {key: value for key, value in document.items() if key != "ssh_keys"}
        text = yaml.safe_dump(document)
    else:
        text = user_data
    return sorted({match.group(1) for match in SECRET_TEXT.finditer(text)})


def no_plaintext_secrets(args: ResourceValidationArgs, report: Report) -> None:
    props = args.props
    if args.resource_type == SERVER and isinstance(props.get("userData"), str):
        leaks = _user_data_leaks(props["userData"])
        if leaks:
            report(f"user-data holds secrets ({', '.join(leaks)}): deliver them with the deploy step instead.", None)
    if args.resource_type in (CONTAINER, SERVICE):
        spec = props if args.resource_type == CONTAINER else (props.get("taskSpec") or {}).get("containerSpec") or {}
        leaked = _plain_secrets_in_env(spec.get("env") or spec.get("envs"))
        if leaked:
            report(f"secrets in plain environment variables ({', '.join(leaked)}): use a swarm secret file.", None)
        labelled = [key for key, value in _labels(props).items() if value and SECRET_TEXT.search(str(value))]
        if labelled:
            report(f"labels hold secret material ({', '.join(labelled)}): labels are readable by anyone.", None)


MANDATORY = EnforcementLevel.MANDATORY
POLICIES = [
    ResourceValidationPolicy(
        name="firewall-opens-only-the-edge",
        description="Only 80/443 and ICMP open to the internet; SSH only from sshAllowedCidrs.",
        validate=firewall_opens_only_the_edge,
        enforcement_level=MANDATORY,
    ),
    ResourceValidationPolicy(
        name="ssh-open-to-the-world",
        description="SSH from anywhere, because the operator set sshAllowedCidrs to the world explicitly.",
        validate=ssh_open_to_the_world,
        enforcement_level=EnforcementLevel.ADVISORY,
    ),
    ResourceValidationPolicy(
        name="only-the-edge-publishes-ports",
        description="Only the Traefik container publishes host ports.",
        validate=only_the_edge_publishes_ports,
        enforcement_level=MANDATORY,
    ),
    ResourceValidationPolicy(
        name="no-docker-socket-in-routed-containers",
        description="No container that Traefik routes to mounts the Docker socket.",
        validate=no_docker_socket_in_routed_containers,
        enforcement_level=MANDATORY,
    ),
    ResourceValidationPolicy(
        name="data-volume-is-never-deleted-first",
        description="The data volume is never replaced delete-first.",
        validate=data_volume_is_never_deleted_first,
        enforcement_level=MANDATORY,
    ),
    ResourceValidationPolicy(
        name="images-are-pinned",
        description="Every image has a version tag or digest, never latest.",
        validate=images_are_pinned,
        enforcement_level=MANDATORY,
    ),
    ResourceValidationPolicy(
        name="dns-is-not-proxied",
        description="DNS records are not proxied while certificates use TLS-ALPN validation.",
        validate=dns_is_not_proxied,
        enforcement_level=MANDATORY,
    ),
    ResourceValidationPolicy(
        name="no-plaintext-secrets",
        description="No secret in user-data, plain environment variables or labels.",
        validate=no_plaintext_secrets,
        enforcement_level=MANDATORY,
    ),
]
