"""What the program tests share: the resource types they look up, a backup configuration, the worker settings, and
how a refused configuration is asserted."""

from __future__ import annotations

import re

import pytest

from tests.support.pulumi_harness import VALID_CONFIG, run_program

SERVER = "hcloud:index/server:Server"
FIREWALL = "hcloud:index/firewall:Firewall"
VOLUME = "hcloud:index/volume:Volume"
ATTACHMENT = "hcloud:index/volumeAttachment:VolumeAttachment"
DNS = "cloudflare:index/dnsRecord:DnsRecord"
CONTAINER = "docker:index/container:Container"
SERVICE = "docker:index/service:Service"
SECRET = "docker:index/secret:Secret"
REMOTE = "command:remote:Command"
LOCAL = "command:local:Command"
PROVIDER = "pulumi:providers:docker"


def assert_config_refused(config: dict[str, str], key: str, says: str) -> None:
    """The program fails, naming the key, what is wrong, and the command that sets it."""
    with pytest.raises(Exception, match=f"'{key}'") as raised:
        run_program(config)
    assert says in str(raised.value)
    assert f"pulumi config set {key}" in str(raised.value)


def parse_go_duration(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert "".join(n + u for n, u in parts) == text, f"not a Go duration: {text}"
    return sum(float(n) * units[u] for n, u in parts)


BACKUP_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nYmFja3VwIGtleQ==\n-----END OPENSSH PRIVATE KEY-----\n"

BACKUP_CONFIG = {
    **VALID_CONFIG,
    "backupRepository": "sftp:u123@u123.your-storagebox.de:/mlapi",
    "backupPassword": "correct horse battery staple",
    "backupSshKey": BACKUP_KEY,
    "backupEnvironment": '{"AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}',
    "backupSchedule": "15 1 * * *",
    "backupKeep": "daily=3,weekly=2,monthly=1",
}


WORKERS = {**VALID_CONFIG, "workers": "2", "workerServerType": "cx33", "modelImage": "ghcr.io/acme/model:1.2"}
