"""mlapi: a scikit-learn model as an HTTPS API on one Hetzner VM.

config → spec (what runs on the VM) → Host (server, host key, firewall, volume, DNS)
       → ModelStack (deploy step, swarm: Traefik + the model service) → exports
"""

from pathlib import Path

import pulumi

from infra.components import ModelStack
from infra.config import WORLD, ConfigError, load_config
from infra.deploy import server_memory_mb
from infra.host import Host
from infra.spec import StackInputs, build_stack, source_tag

PROJECT_DIR = Path(__file__).parent
APP_DIR = PROJECT_DIR / "app"

try:
    cfg = load_config(pulumi.Config().get)
except ConfigError as error:
    raise pulumi.RunError(str(error)) from None

if cfg.backup is None:
    pulumi.log.warn(
        "backups are off: the data volume is not backed up. Turn them on with "
        "`pulumi config set backupRepository <restic URL>` and `pulumi config set --secret backupPassword <password>`."
    )
if set(WORLD) & set(cfg.ssh_allowed_cidrs):
    pulumi.log.warn("sshAllowedCidrs opens port 22 to the whole internet (key-only login), as configured.")

inputs = StackInputs(
    domain=cfg.domain,
    acme_email=cfg.acme_email,
    acme_staging=cfg.acme_staging,
    retrain_schedule=cfg.retrain_schedule,
    model_replicas=cfg.model_replicas,
    server_memory_mb=server_memory_mb(cfg.server_type),
    public_docs=cfg.public_docs,
    hsts_preload=cfg.hsts_preload,
    rate_limit_per_s=cfg.rate_limit_per_s,
    rate_limit_burst=cfg.rate_limit_burst,
    in_flight_per_client=cfg.in_flight_per_client,
    model_image=cfg.model_image or f"mlapi-model:{source_tag(APP_DIR)}",
)
spec = build_stack(inputs)
name = f"mlapi-{pulumi.get_stack()}"
try:
    host = Host(name, cfg, spec, data_root=inputs.data_root)
except ConfigError as error:  # a check against what already exists in the project (e.g. the volume's location)
    raise pulumi.RunError(str(error)) from None
stack = ModelStack(name, cfg, spec, host, app_dir=APP_DIR, data_root=inputs.data_root)

pulumi.export("url", f"https://{spec.domain}")
pulumi.export("ipv4", host.ipv4)
pulumi.export("ipv6", host.ipv6)
pulumi.export("sshCommand", host.ipv4.apply(lambda ip: f"ssh root@{ip}"))
pulumi.export("serverId", host.server.id)
# The bearer token of POST /observations: `pulumi stack output ingestToken --show-secrets` (a secret output).
pulumi.export("ingestToken", pulumi.Output.secret(stack.ingest_token.result))
