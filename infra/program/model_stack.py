"""Pulumi components: they only map the spec (infra/spec/stack.py) and the config (infra/config/keys.py) to resources.

Lifecycle rules that make every later `pulumi up` safe (README: "Changing things later"):
- everything on the VM is bound to the server: `replace_with=[server]` recreates it on a new server, and
  `deleted_with=server` skips deleting it from a server that is going away anyway;
- the SSH host key is generated with the server (infra/program/host.py) and pinned by every connection, from the
  first one;
- settings that change are applied by the deploy step on every `up`, never through user-data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pulumi
import pulumi_command as command
import pulumi_docker as docker
import pulumi_random as random

from infra.config.keys import DeployConfig, error
from infra.config.project import PROJECT_DOCKERFILE
from infra.host.backup import INSTALL_CREDENTIALS, credentials_bundle, host_setup_parts, load_pending_dump
from infra.host.deploy import docker_ssh_options, platform_for, smoke_command
from infra.host.jobs import run_job_command
from infra.host.setup import (
    INSTALL_HEARTBEAT_URL,
    REMOVE_HEARTBEAT_URL,
    render_graceful_stop,
    render_host_setup,
    render_platform_check,
)
from infra.program.cluster import Cluster
from infra.program.dns_challenge import install_token_command, scoped_token
from infra.program.docker_resources import container, service, swarm_secret, swarm_token
from infra.program.host import Host
from infra.spec.data_access import DATA_CREDENTIALS_SECRET, FIRST_TRAINING_TIMEOUT_S
from infra.spec.monitoring import ALERTMANAGER_CONFIG_SECRET
from infra.spec.postgres import database_url
from infra.spec.stack import (
    ADMIN_SECRET,
    DATABASE_URL_SECRET,
    INGEST_SECRET,
    POSTGRES_PASSWORD_SECRET,
    project_tag,
)
from infra.spec.types import ServiceSpec, StackSpec


class ModelStack(pulumi.ComponentResource):
    """The deploy step, then Traefik and the model's swarm service on the VM's engine over ssh:// (pinned key)."""

    def __init__(
        self,
        name: str,
        cfg: DeployConfig,
        spec: StackSpec,
        host: Host,
        app_dir: Path,
        data_root: str,
        cluster: Cluster | None = None,
        model_project: Path | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        """``cluster``: the private network's nodes; the model service is placed once they have joined.
        ``model_project``: the operator's model project (checked by the caller), baked into the model image."""
        super().__init__("mlapi:infra:ModelStack", name, None, opts)
        nodes_ready = cluster.ready if cluster is not None else []
        after_boot = pulumi.ResourceOptions(parent=self, depends_on=[host.ready, *nodes_ready])
        backup_files, backup_commands = host_setup_parts(cfg.backup, data_root)
        # Runs at every `up` whose host files, layout or server changed; never replaces the server.
        self.host_setup = command.remote.Command(
            f"{name}-host-setup",
            connection=host.connection,
            create=render_host_setup(spec, backup_files, backup_commands),
            triggers=[host.server.id],
            opts=after_boot,
        )
        ready_for_docker: pulumi.Output[str] = self.host_setup.stdout
        if cfg.backup is not None:
            # The repository's credentials travel on stdin into root-only files (never in a command line or in
            # user-data); then an empty volume (a new stack after a loss) is restored before anything starts on it.
            bundle = credentials_bundle(
                cfg.backup,
                cfg.backup_password.get_secret_value(),
                {key: value.get_secret_value() for key, value in cfg.backup_environment.items()},
                cfg.backup_ssh_key.get_secret_value() if cfg.backup_ssh_key else None,
                cfg.backup_ssh_known_hosts,
            )
            self.backup_credentials = command.remote.Command(
                f"{name}-backup-credentials",
                connection=host.connection,
                create=INSTALL_CREDENTIALS,
                stdin=pulumi.Output.secret(bundle),
                triggers=[host.server.id],
                opts=pulumi.ResourceOptions(parent=self, depends_on=[self.host_setup]),
            )
            ready_for_docker = self.backup_credentials.stdout
        if cfg.heartbeat_url is not None:
            # The checker's URL (it holds its token) travels on stdin into a root-only file; without the key the
            # file is removed and the installed heartbeat does nothing.
            self.heartbeat = command.remote.Command(
                f"{name}-heartbeat",
                connection=host.connection,
                create=INSTALL_HEARTBEAT_URL,
                delete=REMOVE_HEARTBEAT_URL,
                stdin=pulumi.Output.secret(cfg.heartbeat_url.get_secret_value() + "\n"),
                triggers=[host.server.id],
                opts=pulumi.ResourceOptions(parent=self, depends_on=[self.host_setup]),
            )
        # Nothing to do on create; on delete (destroy, or the server being replaced) it stops the stack gracefully and
        # unmounts the volume before the volume is detached. Its inputs change only with the server.
        self.data_guard = command.remote.Command(
            f"{name}-data-guard",
            connection=host.connection,
            create="true",
            delete=render_graceful_stop(data_root),
            triggers=[host.server.id],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[host.ready, host.attachment]),
        )
        # Derived from the deploy step's output: the provider cannot connect before the host is set up, even where
        # providers ignore depends_on.
        docker_host = pulumi.Output.all(host.ipv4, ready_for_docker).apply(lambda v: f"ssh://root@{v[0]}")
        self.provider = docker.Provider(
            f"{name}-docker",
            host=docker_host,
            ssh_opts=host.host_public_key.apply(lambda key: docker_ssh_options(key, cfg.ssh_private_key_path)),
            opts=pulumi.ResourceOptions(parent=self),
        )
        on_host = pulumi.ResourceOptions(
            parent=self,
            provider=self.provider,
            replace_with=[host.server],
            deleted_with=host.server,
            depends_on=[self.data_guard],
        )
        platform = platform_for(cfg.server_type)

        self.network = docker.Network(
            f"{name}-network", name=spec.network, driver="overlay", attachable=True, opts=on_host
        )
        # The Docker API proxy's socket, shared with Traefik only (infra/spec/docker_api.py).
        self.volumes = [docker.Volume(f"{name}-volume-{volume}", name=volume, opts=on_host) for volume in spec.volumes]
        self.traefik_image = docker.RemoteImage(
            f"{name}-traefik-image", name=spec.traefik.image, platform=platform, keep_locally=True, opts=on_host
        )
        self.docker_api_image = docker.RemoteImage(
            f"{name}-docker-api-image", name=spec.docker_api.image, platform=platform, keep_locally=True, opts=on_host
        )
        if cfg.model_image:
            # Pulled for the server's platform: an image without it fails here, naming the platform.
            self.model_image = docker.RemoteImage(
                f"{name}-model-image", name=spec.model.image, platform=platform, keep_locally=True, opts=on_host
            )
            model_image_ref = self.model_image.image_id
            self.platform_check = command.remote.Command(
                f"{name}-model-image-platform",
                connection=host.connection,
                create=render_platform_check(spec.model.image, platform, cfg.server_type),
                triggers=[self.model_image.image_id],
                opts=pulumi.ResourceOptions(parent=self, depends_on=[self.model_image]),
            )
            model_dependencies: list[pulumi.Resource] = [self.platform_check]
        else:
            self.model_image = docker.Image(
                f"{name}-model-image",
                image_name=spec.model.image,
                # Relative to the project directory (Pulumi's working directory), so that previews made on
                # different machines (an operator's laptop, CI) do not differ by an absolute path.
                build=docker.DockerBuildArgs(
                    context=os.path.relpath(app_dir),
                    dockerfile=os.path.relpath(app_dir / "Dockerfile"),
                    platform=platform,
                ),
                skip_push=True,
                opts=on_host,
            )
            model_image_ref = self.model_image.image_name
            model_dependencies = []
        if model_project is not None:
            # The same Dockerfile `make local-up MODEL=` builds, FROM the model image by name (on this engine). The
            # tag changes with the project's files and with the base image (its ID when pulled), so either change
            # rolls the service.
            base_ref = model_image_ref
            self.project_image = docker.Image(
                f"{name}-model-project-image",
                image_name=pulumi.Output.from_input(base_ref).apply(
                    lambda ref: f"mlapi-model-project:{project_tag(ref, model_project)}"
                ),
                build=docker.DockerBuildArgs(
                    context=os.path.relpath(model_project),
                    dockerfile=os.path.relpath(PROJECT_DOCKERFILE),
                    args={"MODEL_IMAGE": spec.model.image},
                    platform=platform,
                ),
                skip_push=True,
                opts=pulumi.ResourceOptions.merge(on_host, pulumi.ResourceOptions(depends_on=[self.model_image])),
            )
            model_image_ref = self.project_image.image_name
        # Two bearer tokens, each a swarm secret: /admin (the host's cron and operators) and POST /observations
        # (whoever sends ground truth; `pulumi stack output ingestToken --show-secrets`).
        self.admin_token, self.admin_secret = swarm_token(f"{name}-admin", ADMIN_SECRET, self, on_host)
        self.ingest_token, self.ingest_secret = swarm_token(f"{name}-ingest", INGEST_SECRET, self, on_host)
        with_volumes = pulumi.ResourceOptions.merge(on_host, pulumi.ResourceOptions(depends_on=self.volumes))
        edge_dependencies: list[pulumi.Resource] = list(self.volumes)
        if cfg.acme_challenge == "dns":
            self.dns_token = scoped_token(
                name, cfg.cloudflare_zone_id, spec.domain, pulumi.ResourceOptions(parent=self)
            )
            self.dns_token_file = command.remote.Command(
                f"{name}-dns-token",
                connection=host.connection,
                create=install_token_command(data_root),
                stdin=pulumi.Output.secret(self.dns_token.value),
                triggers=[host.server.id, self.dns_token.id],
                opts=pulumi.ResourceOptions(parent=self, depends_on=[self.host_setup]),
            )
            edge_dependencies.append(self.dns_token_file)
        with_edge_files = pulumi.ResourceOptions.merge(on_host, pulumi.ResourceOptions(depends_on=edge_dependencies))
        self.docker_api = container(
            f"{name}-docker-api", spec.docker_api, self.docker_api_image.image_id, None, with_volumes
        )
        self.traefik = container(
            f"{name}-traefik",
            spec.traefik,
            self.traefik_image.image_id,
            self.network,
            pulumi.ResourceOptions.merge(with_edge_files, pulumi.ResourceOptions(depends_on=[self.docker_api])),
        )
        secrets = {ADMIN_SECRET: self.admin_secret, INGEST_SECRET: self.ingest_secret}
        if spec.postgres is not None:
            postgres = self._postgres(name, spec, platform, on_host, secrets)
            # A database snapshot restored before PostgreSQL existed (a new stack after a loss) is loaded first.
            self.pending_dump = command.remote.Command(
                f"{name}-postgres-pending-dump",
                connection=host.connection,
                create=load_pending_dump(data_root),
                triggers=[host.server.id, postgres.id],
                opts=pulumi.ResourceOptions(parent=self, depends_on=[postgres]),
            )
            model_dependencies.append(self.pending_dump)
        if spec.first_training is not None:
            model_dependencies.append(
                self._first_training(name, cfg, spec, host, model_image_ref, secrets, on_host, model_dependencies)
            )
        self.model = service(
            f"{name}-model",
            spec.model,
            model_image_ref,
            self.network,
            secrets,
            pulumi.ResourceOptions.merge(
                on_host, pulumi.ResourceOptions(depends_on=[self.traefik, *model_dependencies])
            ),
        )
        if spec.monitoring is not None:
            self._monitoring(name, cfg, spec, platform, on_host)
        self.smoke = command.local.Command(
            f"{name}-smoke-check",
            # The address clients reach: the server's, or the load balancer's in front of it.
            create=host.front_ipv4.apply(lambda ip: smoke_command(spec.domain, ip, staging=cfg.acme_staging)),
            triggers=[host.server.id, self.traefik.id, self.model.id],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.traefik, self.model, host.dns_a, host.dns_aaaa]),
        )
        self.register_outputs({})

    def _first_training(
        self,
        name: str,
        cfg: DeployConfig,
        spec: StackSpec,
        host: Host,
        image: pulumi.Input[str],
        secrets: dict[str, docker.Secret],
        on_host: pulumi.ResourceOptions,
        after: Sequence[pulumi.Resource],
    ) -> command.remote.Command:
        """A project whose data needs credentials: the credentials as a swarm secret (added to ``secrets``, the
        replicas mount it), and the job that trains the first version onto the data volume with it, run again for
        each new image (it keeps a registry that has a version)."""
        job = spec.first_training
        assert job is not None
        credentials = cfg.data_credentials
        if credentials is None:
            raise error("dataAccessKeyId", "is required: the model project's data is an s3:// object")
        self.data_secret = swarm_secret(
            f"{name}-data-credentials", DATA_CREDENTIALS_SECRET, pulumi.Output.secret(credentials), on_host
        )
        secrets[DATA_CREDENTIALS_SECRET] = self.data_secret
        self.first_training = command.remote.Command(
            f"{name}-first-training",
            connection=host.connection,
            create=pulumi.Output.all(image, self.data_secret.name).apply(
                lambda resolved: run_job_command(
                    job, resolved[0], spec.network, {DATA_CREDENTIALS_SECRET: resolved[1]}, FIRST_TRAINING_TIMEOUT_S
                )
            ),
            triggers=[image, self.data_secret.name],
            opts=pulumi.ResourceOptions(
                parent=self, depends_on=[self.host_setup, self.network, self.data_secret, *after]
            ),
        )
        return self.first_training

    def _monitoring(
        self, name: str, cfg: DeployConfig, spec: StackSpec, platform: str, on_host: pulumi.ResourceOptions
    ) -> None:
        """Prometheus and Alertmanager, a node exporter on every node and, with workers, PostgreSQL's exporter;
        Alertmanager's configuration (the webhook URL, the SMTP password) as a swarm secret. Workers pull the node
        exporter's image by its reference themselves."""
        assert spec.monitoring is not None
        watch = spec.monitoring
        config = pulumi.Output.secret(watch.alertmanager_config(cfg.alert_routes(spec.domain)))
        secret = swarm_secret(f"{name}-alertmanager-config", ALERTMANAGER_CONFIG_SECRET, config, on_host)

        def pulled(part: str, workload: ServiceSpec, secrets: dict[str, docker.Secret], *, by_reference: bool = False,
                   after: Sequence[pulumi.Resource] = ()) -> docker.Service:  # fmt: skip
            """The part's official image pulled on the manager, and its service. ``by_reference``: the service names
            the image, not the manager's image ID, so that each worker pulls it (swarm pins the digest it
            resolved)."""
            image = docker.RemoteImage(
                f"{name}-{part}-image", name=workload.image, platform=platform, keep_locally=True, opts=on_host
            )
            return service(
                f"{name}-{part}", workload, workload.image if by_reference else image.image_id, self.network, secrets,
                pulumi.ResourceOptions.merge(on_host, pulumi.ResourceOptions(depends_on=[image, *after])),
            )  # fmt: skip

        self.node_exporter = pulled("node-exporter", watch.node_exporter, {}, by_reference=True)
        if watch.postgres_exporter is not None:
            self.postgres_exporter = pulled(
                "postgres-exporter", watch.postgres_exporter, {POSTGRES_PASSWORD_SECRET: self.postgres_password_secret}
            )
        self.alertmanager = pulled("alertmanager", watch.alertmanager, {ALERTMANAGER_CONFIG_SECRET: secret})
        self.prometheus = pulled("prometheus", watch.prometheus, {}, after=[self.alertmanager])

    def _postgres(
        self,
        name: str,
        spec: StackSpec,
        platform: str,
        on_host: pulumi.ResourceOptions,
        secrets: dict[str, docker.Secret],
    ) -> docker.Service:
        """With workers: PostgreSQL on the manager; its password and the replicas' URL as two swarm secrets of one
        random value (no URL-unsafe characters). Adds the URL's secret to ``secrets``."""
        assert spec.postgres is not None
        self.postgres_password = random.RandomPassword(
            f"{name}-postgres-password", length=40, special=False, opts=pulumi.ResourceOptions(parent=self)
        )
        password = self.postgres_password.result
        password_secret = swarm_secret(f"{name}-postgres-password-secret", POSTGRES_PASSWORD_SECRET, password, on_host)
        self.postgres_password_secret = password_secret  # PostgreSQL's exporter reads it too
        secrets[DATABASE_URL_SECRET] = swarm_secret(
            f"{name}-database-url-secret", DATABASE_URL_SECRET, password.apply(database_url), on_host
        )
        self.postgres_image = docker.RemoteImage(
            f"{name}-postgres-image", name=spec.postgres.image, platform=platform, keep_locally=True, opts=on_host
        )
        return service(
            f"{name}-postgres",
            spec.postgres,
            self.postgres_image.image_id,
            self.network,
            {POSTGRES_PASSWORD_SECRET: password_secret},
            on_host,
        )
