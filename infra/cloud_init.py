"""Render the cloud-init user-data that turns a fresh Ubuntu VM into the stack's Docker host.

No secret may appear here: user-data is readable from the instance metadata service.
"""

from __future__ import annotations

import shlex
from typing import Literal

import yaml

from infra.spec import RETRAIN_LOG, StackSpec

DockerSource = Literal["docker-ce", "debian"]
# Docker's release signing key (https://docs.docker.com/engine/install/ubuntu/), fetched by fingerprint.
DOCKER_KEY_FINGERPRINT = "9DC858229FC7DD38854AE2D88D81803C0EBFCD88"
DOCKER_CE_PACKAGES = ["docker-ce", "docker-ce-cli", "containerd.io", "docker-buildx-plugin"]
PREPARE_SCRIPT = "/usr/local/sbin/mlapi-prepare-host"
VOLUME_WAIT_SECONDS = 300

# The wait step of `pulumi up` (and of the VM stand-in test) runs exactly this. cloud-init >= 23.4 exits 2 on
# recoverable errors (e.g. a deprecated key), which still means "finished": accept it. It prints the host's
# ed25519 key so the Docker provider can pin it.
READINESS_COMMAND = (
    "cloud-init status --wait >/dev/null; rc=$?; "
    'if [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ]; then cloud-init status --long >&2; exit "$rc"; fi; '
    "docker info >/dev/null && cat /etc/ssh/ssh_host_ed25519_key.pub"
)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so the files in user-data read as files."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def hcloud_volume_device(volume_id: int | str) -> str:
    return f"/dev/disk/by-id/scsi-0HC_Volume_{volume_id}"


def _prepare_host_script(spec: StackSpec, data_root: str, volume_device: str | None) -> str:
    """Mount the data volume (once, then via fstab on every boot) and lay out the directories."""
    lines = [
        "#!/bin/sh",
        "# Written by cloud-init (infra/cloud_init.py). Idempotent.",
        "set -eu",
        f"DATA={shlex.quote(data_root)}",
        'mkdir -p "$DATA"',
    ]
    if volume_device:
        lines += [
            f"DEVICE={shlex.quote(volume_device)}",
            'if ! mountpoint -q "$DATA"; then',
            f'  i=0; while [ ! -e "$DEVICE" ] && [ $i -lt {VOLUME_WAIT_SECONDS} ]; do sleep 1; i=$((i+1)); done',
            '  [ -e "$DEVICE" ] || { echo "data volume $DEVICE did not appear" >&2; exit 1; }',
            '  grep -q " $DATA " /etc/fstab || echo "$DEVICE $DATA ext4 discard,nofail,defaults 0 2" >> /etc/fstab',
            '  mount "$DATA"',
            "fi",
        ]
    for directory in spec.host_directories:
        path = shlex.quote(directory.path)
        lines += [
            f"mkdir -p {path}",
            f"chown {directory.owner_uid}:{directory.owner_uid} {path}",
            f"chmod {directory.mode} {path}",
        ]
    return "\n".join(lines) + "\n"


def user_data_document(
    spec: StackSpec,
    *,
    ssh_public_key: str,
    data_root: str,
    volume_device: str | None,
    docker_source: DockerSource = "docker-ce",
) -> dict:
    """The cloud-config as a dict. ``docker_source='debian'`` swaps Docker's repository for Debian's docker.io:
    the one permitted difference for the VM stand-in, which cannot reach Docker's repository."""
    document: dict = {
        "package_update": True,
        "packages": [
            *(DOCKER_CE_PACKAGES if docker_source == "docker-ce" else ["docker.io"]),
            "unattended-upgrades",
            "cron",
            "logrotate",
        ],
        "ssh_pwauth": False,
        "disable_root": False,  # Pulumi's remote command and Docker provider log in as root, with the key only
        "ssh_authorized_keys": [ssh_public_key],
        "write_files": [
            {
                "path": "/etc/docker/daemon.json",
                "permissions": "0644",
                "content": '{\n  "log-driver": "json-file",\n  "log-opts": {"max-size": "10m", "max-file": "5"}\n}\n',
            },
            {
                "path": "/etc/ssh/sshd_config.d/10-mlapi.conf",
                "permissions": "0644",
                "content": "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "PermitRootLogin prohibit-password\n",
            },
            {
                "path": "/etc/apt/apt.conf.d/20auto-upgrades",
                "permissions": "0644",
                "content": 'APT::Periodic::Update-Package-Lists "1";\nAPT::Periodic::Unattended-Upgrade "1";\n',
            },
            {
                "path": "/etc/cron.d/mlapi-retrain",
                "permissions": "0644",
                "content": "# Scheduled retraining through the model's private route (never the public proxy).\n"
                f"SHELL=/bin/sh\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
                f"{spec.retrain_cron}\n",
            },
            {
                "path": "/etc/logrotate.d/mlapi-retrain",
                "permissions": "0644",
                "content": f"{RETRAIN_LOG} {{\n  weekly\n  rotate 8\n  compress\n  missingok\n  notifempty\n}}\n",
            },
            {
                "path": PREPARE_SCRIPT,
                "permissions": "0755",
                "content": _prepare_host_script(spec, data_root, volume_device),
            },
        ],
        "runcmd": [[PREPARE_SCRIPT]],
    }
    if volume_device:
        # The volume's fstab entry is `nofail` (the VM stays reachable if it is missing), and systemd does not
        # wait for nofail mounts: without this, Docker could start the containers on an empty directory of the
        # root disk after a reboot. With it, Docker waits for the mount, and does not start without it.
        document["write_files"].append(
            {
                "path": "/etc/systemd/system/docker.service.d/10-mlapi-data-volume.conf",
                "permissions": "0644",
                "content": f"[Unit]\nRequiresMountsFor={data_root}\n",
            }
        )
    if docker_source == "docker-ce":
        document["apt"] = {
            "sources": {
                "docker.list": {
                    "source": "deb [signed-by=$KEY_FILE] https://download.docker.com/linux/ubuntu $RELEASE stable",
                    "keyid": DOCKER_KEY_FINGERPRINT,
                }
            }
        }
    return document


def render_user_data(
    spec: StackSpec,
    *,
    ssh_public_key: str,
    data_root: str,
    volume_device: str | None,
    docker_source: DockerSource = "docker-ce",
) -> str:
    document = user_data_document(
        spec,
        ssh_public_key=ssh_public_key,
        data_root=data_root,
        volume_device=volume_device,
        docker_source=docker_source,
    )
    return "#cloud-config\n" + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=1000)
