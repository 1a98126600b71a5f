"""`mlapi` without a stack: reading the host's status sections, judging them, the target's SSH command line, and the
command line's errors. The same commands run against the local stack (tests/stack/test_stack_backup.py) and the VM
stand-in over SSH (tests/standin/test_standin.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer

from infra.ops.cli import parse_age
from infra.ops.status import Replica, Status, parse_sections, problems, read_status
from infra.ops.target import Target, TargetError, stack_target

PROJECT_DIR = Path(__file__).resolve().parents[2]
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyOfTheServer000000000000000000"
OUTPUTS = {"url": "https://api.example.org", "ipv4": "203.0.113.7", "hostKey": HOST_KEY, "dataRoot": "/srv/mlapi"}
TASK = {"CurrentState": "Running 3 minutes ago", "DesiredState": "Running", "Error": "", "Image": "mlapi-model:x"}
# What infra/ops/scripts/status.sh prints, in the Docker CLI's own formats.
HOST_OUTPUT = "\n".join(
    [
        "### tasks",
        json.dumps({**TASK, "ID": "task1", "Name": "mlapi-model.1", "Node": "manager"}),
        json.dumps({**TASK, "ID": "task2", "Name": "mlapi-model.2", "Node": "worker-1"}),
        "### addresses",
        "task1 10.0.1.5/24 ",
        "task2 10.0.1.6/24 ",
        "### desired",
        '{"Replicated":{"Replicas":2}}',
        "### replicas",
        'task1 {"version": "v0003", "metrics": {"rmse": 53.2, "coverage_0.9": 0.91}, "served_by": "c1"}',
        "### versions",
        json.dumps(
            {
                "current": "v0003",
                "versions": [{"version": f"v000{i}"} for i in (1, 2, 3)],
                "history": [{"outcome": "promoted", "reason": "rmse 53.2 < 54.0", "finished_at": "2026-12-01T02:00"}],
            },
            indent=2,
        ),
        "### drift",
        '{"model_version": "v0003", "window": 1000, "psi": {"age": 0.03, "bmi": 0.05}}',
        "### backup",
        json.dumps({"last_success_unixtime": time.time() - 3600, "snapshots": 12}),
        "### disk",
        "/dev/sdb 10501771264 1190133760 9311637504 12% /srv/mlapi",
        "### monitoring",
        json.dumps(
            {
                "alerts": [],
                "versions": {"10.0.1.5:8000": "v0003", "10.0.1.6:8000": "v0003"},
                "edge": {"requests_1h": 5400, "errors_5xx_1h": 3},
            }
        ),
    ]
)
TARGET = Target("stack dev", "https://api.example.org", "203.0.113.7", 443, "/srv/mlapi")
CERTIFICATE = {"issuer": "R11", "not_after": "2027-02-01T00:00:00+00:00", "days_left": 59}


def healthy() -> Status:
    return read_status(TARGET, HOST_OUTPUT, dict(CERTIFICATE))


def test_the_host_sections_become_a_status() -> None:
    assert set(parse_sections(HOST_OUTPUT)) == {
        "tasks", "addresses", "desired", "replicas", "versions", "drift", "backup", "disk", "monitoring"
    }  # fmt: skip
    status = healthy()
    assert status.desired == 2 and status.current_version == "v0003" and status.versions == 3
    assert status.replicas == [
        Replica("manager", "Running 3 minutes ago", "v0003", {"rmse": 53.2, "coverage_0.9": 0.91}),
        # On another node: no docker exec reaches it from the manager; its version is what Prometheus scraped.
        Replica("worker-1", "Running 3 minutes ago", "v0003"),
    ]
    assert status.last_retrain["outcome"] == "promoted" and status.backup["snapshots"] == 12
    assert status.disk == {"size": 10501771264, "free": 9311637504}
    assert status.alerts == [] and status.edge == {"requests_1h": 5400, "errors_5xx_1h": 3}
    assert problems(status) == [] and status.errors == []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            lambda s: setattr(s.replicas[1], "state", "Pending 2 minutes ago"),
            "replicas: 1/2 running (worker-1: Pending",
        ),
        (lambda s: setattr(s, "desired", None), "the mlapi-model service is missing"),
        (lambda s: setattr(s, "current_version", None), "no model version is being served"),
        (lambda s: setattr(s.replicas[0], "version", "v0002"), "replicas still serve v0002, not v0003"),
        (lambda s: setattr(s.replicas[1], "version", "v0002"), "replicas still serve v0002, not v0003"),
        (lambda s: s.certificate.update(days_left=9), "certificate expires in 9 days"),
        (lambda s: setattr(s, "certificate", {"error": "no TLS answer"}), "certificate: no TLS answer"),
        (lambda s: s.last_retrain.update(outcome="failed", reason="data: 3 rows"), "last retrain failed: data: 3 rows"),
        (lambda s: s.backup.update(last_failure_unixtime=time.time()), "last backup failed at"),
        (lambda s: s.backup.update(last_success_unixtime=time.time() - 30 * 3600), "no successful backup for 30 h"),
        (lambda s: s.disk.update(free=10**9), "data volume: 10% free"),
        (lambda s: s.drift["psi"].update(bmi=0.31), "drift: PSI above 0.2 for bmi"),
        (lambda s: s.edge.update(errors_5xx_1h=60), "edge: 1.1% of the last hour's 5400 requests answered 5xx"),
        (
            lambda s: s.alerts.append(
                {
                    "name": "BackupStale",
                    "severity": "page",
                    "summary": "no successful backup for 26 h",
                    "since": "2026-12-04T03:00:12.5Z",
                }
            ),
            "alert BackupStale firing since 2026-12-04T03:00:12: no successful backup for 26 h",
        ),
    ],
)
def test_each_kind_of_trouble_is_named(change, named: str) -> None:
    status = healthy()
    change(status)
    found = problems(status)
    assert len(found) == 1 and found[0].startswith(named), found


def test_drift_over_a_few_predictions_is_not_trouble() -> None:
    status = healthy()
    status.drift = {"window": 20, "psi": {"bmi": 0.9}}
    assert problems(status) == []


def test_a_few_5xx_over_a_quiet_hour_are_not_trouble() -> None:
    status = healthy()
    status.edge = {"requests_1h": 40, "errors_5xx_1h": 5}
    assert problems(status) == []


def test_the_status_script_asks_prometheus_for_alerts_and_the_edge(tmp_path: Path) -> None:
    """The script's Python, run for real against a stand-in for Prometheus' API (an HTTP server of the test)."""
    import re
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked: list[str] = []

    class Prometheus(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            if self.path.startswith("/api/v1/alerts"):
                alert = {"labels": {"alertname": "FeatureDrift", "severity": "ticket"}, "state": "firing",
                         "annotations": {"summary": "bmi drifted"}, "activeAt": "2026-12-04T09:00:00Z"}  # fmt: skip
                data = {"alerts": [alert, {**alert, "state": "pending"}]}
            elif "mlapi_model_info" in self.path:
                data = {"result": [{"metric": {"instance": "10.0.1.6:8000", "version": "v0004"}, "value": [0, "1"]}]}
            else:
                data = {"result": [{"value": [0, "7.9" if "5.." in self.path else "1200.2"]}]}
            body = json.dumps({"status": "success", "data": data}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Prometheus)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = (PROJECT_DIR / "infra/ops/scripts/status.sh").read_text()
    query = re.search(r"^query='(.*?)^'$", script, re.S | re.M).group(1)
    try:
        answer = subprocess.run([sys.executable, "-c", query, f"127.0.0.1:{server.server_port}"],
                                capture_output=True, text=True, check=True)  # fmt: skip
    finally:
        server.shutdown()
    assert json.loads(answer.stdout) == {
        "alerts": [{"name": "FeatureDrift", "severity": "ticket", "summary": "bmi drifted",
                    "since": "2026-12-04T09:00:00Z"}],
        "versions": {"10.0.1.6:8000": "v0004"},
        "edge": {"requests_1h": 1200, "errors_5xx_1h": 8},
    }  # fmt: skip
    queries = [p for p in asked if p.startswith("/api/v1/query")]
    assert any("websecure" in q and "5.." in q for q in queries) and len(queries) == 3


def test_what_the_host_could_not_answer_is_reported() -> None:
    broken = HOST_OUTPUT.replace('task1 {"version"', "task1 Traceback: {").replace(
        '{"model_version": "v0003", "window"', 'Error response from daemon: {"x'
    )
    status = read_status(TARGET, broken, dict(CERTIFICATE))
    found = problems(status)
    assert any(p.startswith("replica on manager: Traceback") for p in found), found
    assert any(p.startswith("drift: Error response from daemon") for p in found), found


def test_a_stack_target_pins_the_host_key_from_the_outputs() -> None:
    target = stack_target(OUTPUTS, "~/.ssh/deploy", "dev")
    argv = target.argv(["docker", "exec", "c1", "python", "-m", "app", "drift", "--window", "10"])
    assert argv[0] == "ssh" and argv[-2] == "root@203.0.113.7"
    assert f"KnownHostsCommand=/bin/echo %H {HOST_KEY}" in argv and "StrictHostKeyChecking=yes" in argv
    assert "UserKnownHostsFile=/dev/null" in argv and argv[argv.index("-i") + 1] == "~/.ssh/deploy"
    assert argv[-1] == "docker exec c1 python -m app drift --window 10"  # one word for the remote shell, quoted
    assert target.argv(["echo", "a b; rm -rf /"])[-1] == "echo 'a b; rm -rf /'"
    assert target.edge_address == "203.0.113.7" and target.domain == "api.example.org"


def test_outputs_of_an_older_program_are_named() -> None:
    with pytest.raises(TargetError, match=r"outputs hostKey, dataRoot are missing; run `pulumi up`"):
        stack_target({"url": OUTPUTS["url"], "ipv4": OUTPUTS["ipv4"]}, None, "dev")


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("10m", 600), ("24h", 86400), ("1.5d", 129600)])
def test_ages(text: str, seconds: float) -> None:
    assert parse_age(text, "--since") == seconds


def test_an_age_without_a_unit_is_refused_saying_what_is_allowed() -> None:
    with pytest.raises(typer.BadParameter, match="a number and a unit, s, m, h or d"):
        parse_age("24", "--since")


def mlapi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "infra.ops", *args], capture_output=True, text=True, cwd=PROJECT_DIR, timeout=120
    )


def test_the_command_line_names_a_missing_outputs_file_and_a_bad_age(tmp_path: Path) -> None:
    missing = mlapi("--outputs", str(tmp_path / "nope.json"), "status")
    assert missing.returncode == 2 and "nope.json" in missing.stderr
    outputs = tmp_path / "dev.json"
    outputs.write_text(json.dumps(OUTPUTS))
    bad = mlapi("--outputs", str(outputs), "logs", "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr and "a number and a unit" in bad.stderr


def test_every_command_has_help_with_an_example() -> None:
    listed = mlapi("--help")
    assert listed.returncode == 0
    commands = ("status", "logs", "versions", "retrain", "rollback", "promote", "drift", "predictions", "report")
    for command in (*commands, "exec", "ssh"):
        assert command in listed.stdout
        helped = mlapi(command, "--help")
        assert helped.returncode == 0 and "Example: mlapi" in " ".join(helped.stdout.split()), command


def test_json_lines_become_one_parquet_file_batch_by_batch(tmp_path: Path) -> None:
    """Batches that disagree (a column null at first and a number later, an int and then a float, a key some
    rows lack) still make one file with one schema; the features are columns of their own."""
    import pyarrow.parquet as pq

    from infra.ops.parquet import jsonl_to_parquet

    rows = [
        {"id": f"p{i}", "model_version": "v0001", "prediction": i if i < 5 else i + 0.5,
         "observed": None if i < 7 else 100.0 + i, "features": {"age": 0.01 * i, "sex": None if i % 2 else "F"}}
        for i in range(10)
    ]  # fmt: skip
    rows[8].pop("observed")
    source = tmp_path / "log.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert jsonl_to_parquet(source, tmp_path / "log.parquet", rows=3) == 10
    table = pq.read_table(tmp_path / "log.parquet")
    assert pq.ParquetFile(tmp_path / "log.parquet").num_row_groups == 4  # 3 + 3 + 3 + 1: never all in memory
    assert table.column_names == ["id", "model_version", "prediction", "observed", "features.age", "features.sex"]
    back = table.to_pylist()
    assert [r["prediction"] for r in back] == [0, 1, 2, 3, 4, 5.5, 6.5, 7.5, 8.5, 9.5]
    assert [r["observed"] for r in back] == [None] * 7 + [107.0, None, 109.0]
    assert [r["features.sex"] for r in back] == [None if i % 2 else "F" for i in range(10)]


def test_parquet_needs_a_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from infra.ops.cli import app

    result = CliRunner().invoke(app, ["--local", "predictions", "--format", "parquet"])
    assert result.exit_code == 2 and "--format parquet needs --output FILE" in result.output


def test_a_long_export_tells_how_much_has_arrived(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from infra.ops.cli import growing

    path = tmp_path / "day.csv"
    with growing(path, every_s=0.05):
        for _ in range(4):
            with path.open("ab") as sink:
                sink.write(b"x" * 2**19)
            time.sleep(0.08)
    said = capsys.readouterr().err.splitlines()
    assert said and all(re.fullmatch(r"\d+\.\d MiB received after \d+ s", line) for line in said), said
    assert said[-1].startswith(("1.5 MiB", "2.0 MiB")), said
