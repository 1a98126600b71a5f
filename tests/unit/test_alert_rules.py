"""The alert rules (infra/spec/monitoring.py) through Prometheus' own promtool: the file is valid, and every alert
fires on synthetic series where it should and stays quiet where it should not (`promtool test rules`)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.spec.monitoring import AlertRule, alert_rules, rules_document
from tests.support.shims import installed_tool

REPLICAS = 2
RULES = alert_rules(REPLICAS, backups=True)
BY_NAME = {rule.name: rule for rule in RULES}


def expected(name: str, **labels: str) -> list[dict[str, Any]]:
    """The alert as promtool must see it: its labels, and its annotations with the templates expanded."""
    rule: AlertRule = BY_NAME[name]
    summary = rule.summary
    for key, value in labels.items():
        summary = summary.replace(f"{{{{ $labels.{key} }}}}", value)
    return [
        {
            "exp_labels": {"severity": rule.severity, **labels},
            "exp_annotations": {"summary": summary, "runbook": rule.runbook},
        }
    ]


def case(series: dict[str, str], checks: list[tuple[str, str, list]]) -> dict[str, Any]:
    return {
        "interval": "1m",
        "input_series": [{"series": name, "values": values} for name, values in series.items()],
        "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": alerts} for name, at, alerts in checks],
    }


def latencies(fast: int, slow: int) -> dict[str, str]:
    """Traefik's duration histogram at the HTTPS entry point: per minute, ``fast`` requests under 0.5 s and ``slow``
    ones between 1 and 2.5 s (above the 1 s objective)."""
    name = 'traefik_entrypoint_request_duration_seconds_bucket{entrypoint="websecure", le="%s"}'
    total = fast + slow
    return {name % le: f"0+{count}x40" for le, count in (("0.5", fast), ("1", fast), ("2.5", total), ("+Inf", total))}


DAY = 27 * 60  # samples of a minute in 27 hours
CASES = {
    "a missing replica fires, two up stay quiet": case(
        {'up{job="mlapi-model", instance="a"}': "1x20", 'up{job="mlapi-model", instance="b"}': "1 1 0x18"},
        [
            ("ModelReplicaMissing", "1m", []),
            ("ModelReplicaMissing", "10m", expected("ModelReplicaMissing")),
        ],
    ),
    "no replica at all fires": case(
        {'up{job="mlapi-model", instance="a"}': "0x20"},
        [("ModelReplicaMissing", "10m", expected("ModelReplicaMissing"))],
    ),
    "three failed retrains in a row fire, two do not": case(
        {'mlapi_retrain_consecutive_failures{instance="a"}': "0 1 2 3x15", 'other{instance="a"}': "0x20"},
        [("RetrainFailing", "4m", []), ("RetrainFailing", "12m", expected("RetrainFailing"))],
    ),
    "drift for an hour fires for that feature only": case(
        {
            'mlapi_feature_psi{feature="bmi", instance="a"}': "0.31x90",
            'mlapi_feature_psi{feature="age", instance="a"}': "0.05x90",
            'mlapi_drift_window_predictions{instance="a"}': "1000x90",
        },
        [("FeatureDrift", "30m", []), ("FeatureDrift", "75m", expected("FeatureDrift", feature="bmi"))],
    ),
    "drift over a few predictions stays quiet": case(
        {
            'mlapi_feature_psi{feature="bmi", instance="a"}': "0.9x90",
            'mlapi_drift_window_predictions{instance="a"}': "50x90",
        },
        [("FeatureDrift", "75m", [])],
    ),
    "a filling volume fires, a roomy one does not": case(
        {
            'mlapi_data_volume_free_bytes{instance="a"}': "30 30 10x30",
            'mlapi_data_volume_size_bytes{instance="a"}': "100x32",
        },
        [("DataVolumeLow", "8m", []), ("DataVolumeLow", "20m", expected("DataVolumeLow"))],
    ),
    "memory near the limit fires, below it does not": case(
        {
            'mlapi_memory_usage_bytes{instance="a"}': "80 80 95x30",
            'mlapi_memory_limit_bytes{instance="a"}': "100x32",
        },
        [("MemoryNearLimit", "8m", []), ("MemoryNearLimit", "20m", expected("MemoryNearLimit"))],
    ),
    "a failed backup after a good one fires": case(
        {
            'mlapi_backup_last_success_timestamp_seconds{instance="a"}': "100x20",
            'mlapi_backup_last_failure_timestamp_seconds{instance="a"}': "50 50 200x18",
        },
        [("BackupFailed", "3m", []), ("BackupFailed", "12m", expected("BackupFailed"))],
    ),
    "a backup older than 26 h fires; a day-old one does not": case(
        {'mlapi_backup_last_success_timestamp_seconds{instance="a"}': f"1000x{DAY}"},
        [("BackupStale", "20h", []), ("BackupStale", "27h", expected("BackupStale"))],
    ),
    "backups that never succeeded fire after 26 h": case(
        {
            'mlapi_backup_last_success_timestamp_seconds{instance="a"}': f"0x{DAY}",
            'mlapi_backup_last_success_timestamp_seconds{instance="b"}': f"0x{DAY}",
        },
        [("BackupNeverSucceeded", "25h", []), ("BackupNeverSucceeded", "27h", expected("BackupNeverSucceeded"))],
    ),
    "5xx above 1 % of the edge's answers fires; none, or a handful at low traffic, does not": case(
        {
            'traefik_entrypoint_requests_total{entrypoint="websecure", code="200"}': "0+100x40",
            'traefik_entrypoint_requests_total{entrypoint="websecure", code="502"}': "0x10 5+5x30",
            'traefik_entrypoint_requests_total{entrypoint="metrics", code="500"}': "0+100x40",  # not the API's
        },
        [("EdgeErrors", "8m", []), ("EdgeErrors", "25m", expected("EdgeErrors"))],
    ),
    "a few 5xx among a few requests stay quiet": case(
        {
            'traefik_entrypoint_requests_total{entrypoint="websecure", code="200"}': "0+10x40",
            'traefik_entrypoint_requests_total{entrypoint="websecure", code="502"}': "0+2x40",
        },
        [("EdgeErrors", "25m", [])],
    ),
    "a p99 above the objective for 10 min fires": case(
        {
            **latencies(fast=95, slow=5),
            'traefik_entrypoint_requests_total{entrypoint="websecure", code="200"}': "0+100x40",
        },
        [("EdgeSlow", "5m", []), ("EdgeSlow", "25m", expected("EdgeSlow"))],
    ),
    "a p99 within the objective stays quiet": case(
        {
            **latencies(fast=100, slow=0),
            'traefik_entrypoint_requests_total{entrypoint="websecure", code="200"}': "0+100x40",
        },
        [("EdgeSlow", "25m", [])],
    ),
    "a certificate 10 days from expiry fires; one with 60 days left does not": case(
        {
            'traefik_tls_certs_not_after{cn="api.example.org", serial="1"}': f"{10 * 86400}x90",
            'traefik_tls_certs_not_after{cn="other.example.org", serial="2"}': f"{60 * 86400}x90",
        },
        [
            ("CertificateExpiring", "30m", []),
            ("CertificateExpiring", "75m", expected("CertificateExpiring", cn="api.example.org")),
        ],
    ),
    "a backup that succeeded once is not 'never'": case(
        {'mlapi_backup_last_success_timestamp_seconds{instance="a"}': f"0 5000x{DAY - 1}"},
        [("BackupNeverSucceeded", "27h", [])],
    ),
}


@pytest.fixture(scope="module")
def promtool() -> str:
    return installed_tool("promtool", "prometheus")


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules_document(RULES), sort_keys=False))
    return path


def test_the_rules_file_is_valid(promtool: str, rules_file: Path) -> None:
    result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULES)} rules found" in result.stdout


def test_every_alert_fires_and_stays_quiet_where_it_should(promtool: str, rules_file: Path) -> None:
    tested = {check["alertname"] for c in CASES.values() for check in c["alert_rule_test"]}
    firing = {check["alertname"] for c in CASES.values() for check in c["alert_rule_test"] if check["exp_alerts"]}
    assert tested == firing == set(BY_NAME), "each rule needs a case where it fires and one where it does not"
    tests = rules_file.with_name("tests.yml")
    tests.write_text(
        yaml.safe_dump({"rule_files": [rules_file.name], "evaluation_interval": "1m", "tests": list(CASES.values())})
    )
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_says_what_to_do() -> None:
    for rule in RULES:
        assert rule.runbook and rule.summary and rule.severity in ("page", "ticket"), rule.name


def test_without_backups_no_backup_rule_can_fire() -> None:
    names = {rule.name for rule in alert_rules(REPLICAS, backups=False)}
    assert not {name for name in names if name.startswith("Backup")}
    assert "ModelReplicaMissing" in names
