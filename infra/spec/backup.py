"""What the operator's backup settings decide: the restic repository, the schedule, the retention. The config builds
it, the host's backup scripts render from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackupSettings:
    repository: str
    schedule: str
    keep_daily: int = 7
    keep_weekly: int = 4
    keep_monthly: int = 6
    sftp_host: str | None = None  # for the ssh client settings of an sftp: repository
    sftp_port: int | None = None
