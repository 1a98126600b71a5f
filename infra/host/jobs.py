"""A one-shot job of the spec (``ServiceSpec.job``) as the deploy runs it on the host: `docker service create
--mode replicated-job` with every field from the spec, the same fields infra/local/engine.py gives the local engine,
waited for by infra/host/scripts/run-job.sh."""

from __future__ import annotations

from infra.host.setup import installed_script
from infra.spec.types import ServiceSpec


def job_arguments(job: ServiceSpec, image: str, network: str, secret_names: dict[str, str]) -> list[str]:
    """`docker service create` arguments (after the name and mode): ``secret_names`` maps each secret's base name to
    the swarm secret's actual name."""
    confinement = job.confinement
    arguments = [
        "--network", network,
        "--restart-condition", job.restart.condition,
        "--limit-memory", f"{confinement.memory_bytes}b",
        "--mount", f"type=tmpfs,destination={confinement.tmpfs_path},tmpfs-size={confinement.tmpfs_bytes}",
    ]  # fmt: skip
    if confinement.read_only_root:
        arguments.append("--read-only")
    arguments += [option for cap in confinement.cap_drop for option in ("--cap-drop", cap)]
    arguments += [option for cap in confinement.cap_add for option in ("--cap-add", cap)]
    if job.user:
        arguments += ["--user", job.user]
    if job.init:
        arguments.append("--init")
    arguments += [option for constraint in job.constraints for option in ("--constraint", constraint)]
    for mount in job.mounts:
        read_only = ",readonly" if mount.read_only else ""
        arguments += ["--mount", f"type={mount.kind},source={mount.source},target={mount.target}{read_only}"]
    for item in job.secrets:
        arguments += [
            "--secret",
            f"source={secret_names[item.secret]},target={item.file_name},uid={item.uid},gid={item.uid},"
            f"mode={item.mode:04o}",
        ]
    arguments += [option for key, value in job.env.items() for option in ("--env", f"{key}={value}")]
    return [*arguments, image, *job.command]


def run_job_command(job: ServiceSpec, image: str, network: str, secret_names: dict[str, str], timeout_s: int) -> str:
    """The deploy step that runs ``job`` to completion on the manager."""
    arguments = job_arguments(job, image, network, secret_names)
    if any("\n" in argument for argument in arguments):
        raise ValueError(f"{job.name}: an argument holds a newline, which run-job.sh cannot pass")
    settings = {"JOB": job.name, "TIMEOUT_S": str(timeout_s), "JOB_ARGS": "\n".join(arguments)}
    return installed_script(job.name, settings, "run-job.sh")
