"""The alert rules, as code: what a Prometheus on the manager evaluates against the replicas' /metrics. Each rule has a
runbook line: what it means and the first thing to do. Rendered as a Prometheus rules file (``rules_document``);
`promtool check rules` and `promtool test rules` run against it in `make test` (tests/unit/test_alert_rules.py).

Metric names are the app's (app/metrics.py); the replicas are scraped as job ``mlapi-model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MODEL_JOB = "mlapi-model"
BACKUP_MAX_AGE_S = 26 * 3600
DRIFT_PSI = 0.2
DRIFT_MIN_WINDOW = 100  # fewer recent predictions than this: PSI is noise
DISK_MIN_FREE = 0.15
MEMORY_MAX_USED = 0.9
RETRAIN_FAILURES = 3


@dataclass(frozen=True)
class AlertRule:
    name: str
    expr: str
    wait: str  # Prometheus' `for`: how long the condition holds before the alert fires
    summary: str
    runbook: str
    severity: str = "page"  # page: someone acts now; ticket: within a working day

    def as_rule(self) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.wait,
            "labels": {"severity": self.severity},
            "annotations": {"summary": self.summary, "runbook": self.runbook},
        }


def alert_rules(replicas: int, backups: bool) -> tuple[AlertRule, ...]:
    """The rules for a stack of ``replicas`` model replicas; the backup rules only where backups are configured."""
    rules = [
        AlertRule(
            "ModelReplicaMissing",
            f'count(up{{job="{MODEL_JOB}"}} == 1) < {replicas} or absent(up{{job="{MODEL_JOB}"}} == 1)',
            "2m",
            f"fewer than {replicas} model replicas answer their metrics",
            "`mlapi status` shows which task is not running and why; `mlapi logs model --since 15m` has its last words",
        ),
        AlertRule(
            "RetrainFailing",
            f"max(mlapi_retrain_consecutive_failures) >= {RETRAIN_FAILURES}",
            "5m",
            f"the last {RETRAIN_FAILURES} or more retrains failed",
            "`mlapi versions` lists each failed retrain's reason (data, a schema change, memory); the served model "
            "is unchanged",
            "ticket",
        ),
        AlertRule(
            "FeatureDrift",
            f"max by (feature) (mlapi_feature_psi) > {DRIFT_PSI} "
            f"and on() max(mlapi_drift_window_predictions) >= {DRIFT_MIN_WINDOW}",
            "1h",
            f"the inputs of {{{{ $labels.feature }}}} have drifted from the training data (PSI above {DRIFT_PSI})",
            "`mlapi drift` and `mlapi predictions --since 24h` show what changed; send ground truth to /observations "
            "and `mlapi retrain`",
            "ticket",
        ),
        AlertRule(
            "DataVolumeLow",
            f"min(mlapi_data_volume_free_bytes / mlapi_data_volume_size_bytes) < {DISK_MIN_FREE}",
            "10m",
            f"less than {DISK_MIN_FREE:.0%} free on the data volume",
            "grow it (`pulumi config set volumeSize`, then `pulumi up`) or lower the prediction log's retention",
        ),
        AlertRule(
            "MemoryNearLimit",
            f"max(mlapi_memory_usage_bytes / mlapi_memory_limit_bytes) > {MEMORY_MAX_USED}",
            "10m",
            f"a model replica uses more than {MEMORY_MAX_USED:.0%} of its memory limit",
            "a larger serverType raises the limit; `mlapi status` shows the model, whose size sets the use",
            "ticket",
        ),
    ]
    if backups:
        success = "max(mlapi_backup_last_success_timestamp_seconds)"
        rules += [
            AlertRule(
                "BackupFailed",
                f"max(mlapi_backup_last_failure_timestamp_seconds) > {success}",
                "5m",
                "the last backup run failed",
                "`mlapi logs backup` names the cause (repository, password, space); the next run retries",
            ),
            AlertRule(
                "BackupStale",
                f"{success} > 0 and time() - {success} > {BACKUP_MAX_AGE_S}",
                "5m",
                f"no successful backup for {BACKUP_MAX_AGE_S // 3600} h",
                "`mlapi logs backup`: is the cron job running, does the repository answer?",
            ),
            AlertRule(
                "BackupNeverSucceeded",
                f"{success} == 0",
                f"{BACKUP_MAX_AGE_S // 3600}h",
                f"backups are configured but none has succeeded in {BACKUP_MAX_AGE_S // 3600} h",
                "`mlapi logs backup`; run one now with `mlapi ssh` then `mlapi-backup`",
            ),
        ]
    return tuple(rules)


def rules_document(rules: tuple[AlertRule, ...]) -> dict[str, Any]:
    """A Prometheus rules file."""
    return {"groups": [{"name": "mlapi", "rules": [rule.as_rule() for rule in rules]}]}
