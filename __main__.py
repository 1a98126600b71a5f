"""mlapi: a scikit-learn model as an HTTPS API on a Hetzner VM, and on worker VMs when one is not enough.

config (+ the model project, checked by the app) → spec (what runs on the VMs)
       → [PrivateNetwork → LoadBalancerFront] (only with workers or loadBalancer)
       → Host (manager: server, host key, firewall, volume, DNS) → [Cluster (workers joined to its swarm)]
       → ModelStack (deploy step, swarm: Traefik + the model service with the project) → exports
"""

from pathlib import Path

import pulumi

from infra.config.keys import ConfigError, load_config
from infra.config.keys import error as key_error
from infra.config.project import ProjectRefused, check_project, data_needs_credentials, resolve_project
from infra.host.cluster_plan import LOAD_BALANCER_PRIVATE_IP
from infra.host.deploy import server_memory_mb
from infra.program.cluster import Cluster, LoadBalancerFront, PrivateNetwork
from infra.program.host import Host
from infra.program.model_stack import ModelStack
from infra.spec.inputs import WORLD, StackInputs
from infra.spec.stack import build_stack, source_tag

PROJECT_DIR = Path(__file__).parent
APP_DIR = PROJECT_DIR / "app"

try:
    cfg = load_config(pulumi.Config().get)
except ConfigError as error:
    raise pulumi.RunError(str(error)) from None

model_project = resolve_project(cfg.model_project) if cfg.model_project else None
data_credentials = model_project is not None and data_needs_credentials(model_project)
if data_credentials and cfg.data_credentials is None:
    raise pulumi.RunError(
        str(key_error("dataAccessKeyId", "is required: the model project's data is an s3:// object"))
        + " and: pulumi config set --secret dataSecretAccessKey <secret access key>"
    )
if model_project is not None:
    try:  # the app's own check (with the stack's data credentials), before anything is built or deployed
        check_project(model_project, cfg.data_credentials if data_credentials else None)
    except ProjectRefused as error:
        raise pulumi.RunError(
            f"modelProject: {error} (fix the project, or `pulumi config rm modelProject` for the bundled model)"
        ) from None

if cfg.backup is None:
    pulumi.log.warn(
        "backups are off: the data volume is not backed up. Turn them on with "
        "`pulumi config set backupRepository <restic URL>` and `pulumi config set --secret backupPassword <password>`."
    )
if cfg.alert_webhook_url is None and cfg.alert_email is None:
    pulumi.log.warn(
        "alerts reach no one: Prometheus evaluates them on the VM, but no webhook or e-mail is set. Send them to "
        "Slack, Discord or ntfy with `pulumi config set --secret alertWebhookUrl <URL>`, or by e-mail with "
        "`pulumi config set alertEmail <address>` and `pulumi config set --secret alertSmtpUrl smtp://…`."
    )
if set(WORLD) & set(cfg.ssh_allowed_cidrs):
    pulumi.log.warn("sshAllowedCidrs opens port 22 to the whole internet (key-only login), as configured.")

inputs = StackInputs(
    domain=cfg.domain,
    acme_email=cfg.acme_email,
    acme_staging=cfg.acme_staging,
    retrain_schedule=cfg.retrain_schedule,
    model_replicas=cfg.model_replicas,
    nodes=1 + cfg.workers,
    server_memory_mb=min(
        server_memory_mb(cfg.server_type), server_memory_mb(cfg.worker_server_type or cfg.server_type)
    ),
    acme_challenge=cfg.acme_challenge,
    data_credentials=data_credentials,
    proxy_protocol_ips=(f"{LOAD_BALANCER_PRIVATE_IP}/32",) if cfg.load_balancer else (),
    public_docs=cfg.public_docs,
    hsts_preload=cfg.hsts_preload,
    rate_limit_per_s=cfg.rate_limit_per_s,
    rate_limit_burst=cfg.rate_limit_burst,
    in_flight_per_client=cfg.in_flight_per_client,
    backups=cfg.backup is not None,
    monitoring_retention=cfg.monitoring_retention,
    latency_objective_ms=cfg.latency_objective_ms,
    model_image=cfg.model_image or f"mlapi-model:{source_tag(APP_DIR)}",
)
spec = build_stack(inputs)
name = f"mlapi-{pulumi.get_stack()}"
network = PrivateNetwork(name, cfg) if cfg.workers or cfg.load_balancer else None
front = LoadBalancerFront(name, cfg, network) if cfg.load_balancer and network else None
try:
    host = Host(name, cfg, spec, data_root=inputs.data_root, front=(front.ipv4, front.ipv6) if front else None)
except ConfigError as error:  # a check against what already exists in the project (e.g. the volume's location)
    raise pulumi.RunError(str(error)) from None
cluster = Cluster(name, cfg, spec, host, network, front, data_root=inputs.data_root) if network else None
stack = ModelStack(
    name, cfg, spec, host, app_dir=APP_DIR, data_root=inputs.data_root, cluster=cluster, model_project=model_project
)

pulumi.export("url", f"https://{spec.domain}")
pulumi.export("ipv4", host.ipv4)
pulumi.export("ipv6", host.ipv6)
pulumi.export("sshCommand", host.ipv4.apply(lambda ip: f"ssh root@{ip}"))
pulumi.export("serverId", host.server.id)
# What `mlapi` (infra/ops) needs to reach the host: the server's own SSH key, pinned (never trusted on first use), and
# where the data lives.
pulumi.export("hostKey", host.host_public_key)
pulumi.export("dataRoot", inputs.data_root)
if cluster is not None and cfg.workers:
    pulumi.export("workerIpv4s", [worker.server.ipv4_address for worker in cluster.workers])
if front is not None:
    pulumi.export("loadBalancerIpv4", front.ipv4)
# The bearer token of POST /observations: `pulumi stack output ingestToken --show-secrets` (a secret output).
pulumi.export("ingestToken", pulumi.Output.secret(stack.ingest_token.result))
