"""`mlapi`: operate a running stack from the laptop: status, logs, versions, retrain, rollback, drift, the prediction
log, a command in a replica. It targets a Pulumi stack (its outputs, SSH with the host key pinned from them) or the
local stack (``--local``); every command runs the same host commands either way (infra/ops/target.py).

Examples::

    mlapi status                      # the selected Pulumi stack; exit 1 and the reasons when something is wrong
    mlapi --local status --json
    mlapi logs model -f --since 10m
    mlapi predictions --since 24h -o yesterday.csv
    mlapi report --since 7d -o week.html  # Evidently: drift, quality on the ground truth, interval coverage
    mlapi exec -- python -m app check
    mlapi ui prometheus               # Prometheus' own UI at http://127.0.0.1:9090/, published nowhere on the VM
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from infra.host.backup import BACKUP_LOG
from infra.host.setup import HEARTBEAT_LOG
from infra.ops import status as stack_status
from infra.ops.forward import relay_command, serve
from infra.ops.parquet import jsonl_to_parquet
from infra.ops.target import Target, TargetError, pulumi_identity_file, pulumi_outputs, stack_target
from infra.spec.monitoring import ALERTMANAGER_PORT, ALERTMANAGER_SERVICE, PROMETHEUS_PORT, PROMETHEUS_SERVICE
from infra.spec.postgres import POSTGRES_SERVICE
from infra.spec.stack import MODEL_SERVICE, RETRAIN_LOG, TRAEFIK_CONTAINER

PROJECT_DIR = Path(__file__).resolve().parents[2]
AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

app = typer.Typer(
    help=__doc__.split("\n\n")[0],
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)  # an error line is never broken inside a path


class LogSource(StrEnum):
    model = "model"
    edge = "edge"
    retrain = "retrain"
    backup = "backup"
    heartbeat = "heartbeat"
    postgres = "postgres"


class MonitoringUI(StrEnum):
    prometheus = "prometheus"
    alertmanager = "alertmanager"


# Each UI's service on the overlay and its port (also the default local port).
MONITORING_UIS = {
    MonitoringUI.prometheus: (PROMETHEUS_SERVICE, PROMETHEUS_PORT),
    MonitoringUI.alertmanager: (ALERTMANAGER_SERVICE, ALERTMANAGER_PORT),
}


class ExportFormat(StrEnum):
    csv = "csv"
    jsonl = "jsonl"
    parquet = "parquet"  # made here from the replica's JSON lines (infra/ops/parquet.py)


def parse_age(text: str, option: str) -> float:
    """'90s', '10m', '24h', '7d' as seconds."""
    match = AGE.match(text.strip())
    if not match:
        raise typer.BadParameter(f"{text!r}: a number and a unit, s, m, h or d (e.g. 10m, 24h, 7d)", param_hint=option)
    return float(match.group(1)) * UNIT_SECONDS[match.group(2)]


def local_target() -> Target:
    from infra.local.stack import LocalOptions  # the local stack's code only where it is used

    options = LocalOptions.from_environment()
    return Target(
        name="the local stack",
        url=f"https://{options.domain}:{options.https_port}",
        edge_address="127.0.0.1",
        edge_port=options.https_port,
        data_root=str(options.data_root),
    )


@dataclass
class Choice:
    """The target as the global options name it; resolved on first use, so `--help` needs no stack."""

    local: bool
    stack: str | None
    outputs: Path | None
    identity: str | None
    resolved: Target | None = None


def target_of(ctx: typer.Context) -> Target:
    choice: Choice = ctx.obj
    if choice.resolved is None:
        choice.resolved = resolve(choice)
    return choice.resolved


def resolve(choice: Choice) -> Target:
    if choice.local:
        return local_target()
    if choice.outputs is not None:
        try:
            values = json.loads(choice.outputs.read_text())
        except (OSError, ValueError) as exc:
            raise TargetError(
                f"--outputs {choice.outputs}: not a readable `pulumi stack output --json`: {exc}"
            ) from exc
        name = choice.stack or choice.outputs.stem
    else:
        name, values = pulumi_outputs(choice.stack, PROJECT_DIR)
    return stack_target(values, choice.identity or pulumi_identity_file(choice.stack, PROJECT_DIR), name)


@app.callback()
def choose_target(
    ctx: typer.Context,
    local: Annotated[bool, typer.Option("--local", help="the local stack (`make local-up`) on this machine")] = False,
    stack: Annotated[str | None, typer.Option(help="the Pulumi stack (default: the selected one)")] = None,
    outputs: Annotated[
        Path | None, typer.Option(help="a saved `pulumi stack output --json` instead of asking the Pulumi CLI")
    ] = None,
    identity: Annotated[
        str | None, typer.Option(help="your SSH private key (default: the stack's sshPrivateKeyPath, else ssh's)")
    ] = None,
) -> None:
    """Operate the model API stack: locally (--local) or a Pulumi stack over SSH."""
    ctx.obj = Choice(local, stack, outputs, identity)


def app_command(container: str, *args: str) -> list[str]:
    """``python -m app <args>`` in the model container ``container`` (on the manager)."""
    return ["docker", "exec", container, "python", "-m", "app", *args]


def in_replica(ctx: typer.Context, command: list[str]) -> int:
    """Run ``command`` in a model replica on the manager, its output to ours; its exit code."""
    target = target_of(ctx)
    container = target.model_container()
    result = target.run(["docker", "exec", container, *command], timeout=900)
    sys.stdout.write(result.stdout.decode(errors="replace"))
    sys.stderr.write(result.stderr.decode(errors="replace"))
    return result.returncode


def app_json(ctx: typer.Context, command: list[str]) -> dict:
    """A `python -m app` admin command's JSON answer, from a replica."""
    target = target_of(ctx)
    result = target.run(app_command(target.model_container(), *command), timeout=900)
    if result.returncode != 0:
        said = result.stderr.decode(errors="replace").strip()
        raise TargetError(f"python -m app {command[0]} in a replica failed (exit {result.returncode}): {said}")
    return json.loads(result.stdout)


@app.command()
def status(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="one JSON document")] = False
) -> None:
    """Is it healthy: certificate, replicas and their model versions, last retrain and backup, disk, drift, the
    edge's 5xx answers over the last hour and the alerts firing (from the stack's Prometheus).

    Exit code 1 when something is wrong, with each reason printed. Example: mlapi status --json
    """
    found = stack_status.collect(target_of(ctx))
    wrong = stack_status.problems(found)
    if as_json:
        out.print_json(json.dumps(found.as_json()))
    else:
        print_status(found, wrong)
    raise typer.Exit(1 if wrong else 0)


def print_status(found: stack_status.Status, wrong: list[str]) -> None:
    out.print(f"[bold]{found.url}[/]  ({found.target})")
    certificate = found.certificate or {}
    if "days_left" in certificate:
        expiry = f"{certificate['not_after']} ({certificate['days_left']} days)"
        out.print(f"certificate: {certificate['issuer']}, expires {expiry}", markup=False)
    replicas = Table("node", "state", "version", "metrics", title=f"{MODEL_SERVICE}: {found.desired} desired")
    for replica in found.replicas:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(replica.metrics.items()) if isinstance(v, int | float))
        answered = replica.version or ("(no answer)" if replica.error else "(on another node)")
        replicas.add_row(replica.node, replica.state, answered, metrics)
    out.print(replicas)
    out.print(f"serving: {found.current_version} of {found.versions} version(s)")
    retrain = found.last_retrain
    out.print(
        f"last retrain: {retrain['outcome']} at {retrain.get('finished_at')}: {retrain.get('reason', '')}"
        if retrain
        else "last retrain: none yet",
        markup=False,
    )
    backup = found.backup or {}
    success, failure = backup.get("last_success_unixtime"), backup.get("last_failure_unixtime")
    if success:
        out.print(f"last backup: {stack_status.stamp(success)}, {backup.get('snapshots', 0)} snapshot(s)")
    if failure and failure > (success or 0):
        out.print(f"last backup run: FAILED at {stack_status.stamp(failure)}")
    if not success and not failure:
        out.print("last backup: never (backups off, or none has run)")
    if found.disk:
        out.print(f"data volume: {found.disk['free'] / 2**30:.1f} GiB free of {found.disk['size'] / 2**30:.1f} GiB")
    drift = found.drift or {}
    if drift.get("psi"):
        worst = max(drift["psi"].items(), key=lambda item: item[1])
        out.print(f"drift: worst PSI {worst[1]:.3f} ({worst[0]}) over the last {drift['window']} predictions")
    if found.edge is not None:
        edge = found.edge
        out.print(f"edge, last hour: {edge['requests_1h']} HTTPS requests, {edge['errors_5xx_1h']} answered 5xx")
    if found.alerts is not None:
        out.print(f"alerts firing: {len(found.alerts)}" + (" (listed below)" if found.alerts else ""))
    for problem in wrong:
        out.print(f"[red]problem:[/] {problem}", highlight=False)
    if not wrong:
        out.print("[green]healthy[/]")


@app.command()
def logs(
    ctx: typer.Context,
    source: Annotated[LogSource, typer.Argument(help="whose log")] = LogSource.model,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")] = False,
    since: Annotated[str, typer.Option(help="how far back: 10m, 1h, 7d")] = "1h",
    tail: Annotated[
        int, typer.Option(help="at most this many lines (of the file logs: retrain, backup, heartbeat)")
    ] = 200,
) -> None:
    """Print a log: the model replicas, the edge (Traefik), retrains, backups, heartbeats or PostgreSQL.

    Example: mlapi logs edge -f --since 5m
    """
    seconds = f"{parse_age(since, '--since'):.0f}s"
    follows = ["--follow"] if follow else []
    files = {LogSource.retrain: RETRAIN_LOG, LogSource.backup: BACKUP_LOG, LogSource.heartbeat: HEARTBEAT_LOG}
    if source in files:
        path = files[source]
        command = ["tail", "-n", str(tail), *(["-F"] if follow else []), path]
    elif source is LogSource.edge:
        command = ["docker", "logs", "--timestamps", "--since", seconds, *follows, TRAEFIK_CONTAINER]
    else:
        service = MODEL_SERVICE if source is LogSource.model else POSTGRES_SERVICE
        command = ["docker", "service", "logs", "--timestamps", "--since", seconds, *follows, service]
    raise typer.Exit(target_of(ctx).attach(command))


@app.command()
def versions(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="the service's JSON")] = False
) -> None:
    """The model versions, the one serving, and the last retrains. Example: mlapi versions"""
    found = app_json(ctx, ["versions"])
    if as_json:
        out.print_json(json.dumps(found))
        return
    table = Table("", "version", "parent", "created", "holdout metrics", "observations")
    for version in found["versions"]:
        metrics = ", ".join(
            f"{k}={v:.4g}" for k, v in sorted(version.get("metrics", {}).items()) if isinstance(v, int | float)
        )
        table.add_row(
            "*" if version["version"] == found["current"] else "",
            version["version"],
            version.get("parent") or "",
            str(version.get("created_at", "")),
            metrics,
            str(version.get("n_observations", "")),
        )
    out.print(table)
    history = Table("finished", "outcome", "candidate", "reason", title="retrains")
    for entry in found.get("history", [])[-10:]:
        history.add_row(
            entry.get("finished_at", ""),
            entry["outcome"],
            entry.get("candidate_version") or "",
            entry.get("reason", ""),
        )
    out.print(history)


@app.command()
def retrain(ctx: typer.Context) -> None:
    """Retrain now on the data and the observations; promoted only if better. Each phase is shown as it happens.
    Example: mlapi retrain"""
    target = target_of(ctx)
    raise typer.Exit(target.attach(app_command(target.model_container(), "retrain")))


@app.command()
def rollback(ctx: typer.Context, version: Annotated[str, typer.Argument(help="e.g. v0001")]) -> None:
    """Serve an earlier version (every replica follows). Example: mlapi rollback v0001"""
    raise typer.Exit(in_replica(ctx, ["python", "-m", "app", "rollback", version]))


@app.command()
def promote(ctx: typer.Context, version: Annotated[str, typer.Argument(help="e.g. v0003")]) -> None:
    """Serve a version by hand: the newest after a rollback, or one a retrain kept. Example: mlapi promote v0003"""
    raise typer.Exit(in_replica(ctx, ["python", "-m", "app", "rollback", version]))


@app.command()
def drift(ctx: typer.Context, window: Annotated[int, typer.Option(help="how many recent predictions")] = 1000) -> None:
    """Population stability per feature: recent predictions against the training data. Example: mlapi drift"""
    raise typer.Exit(in_replica(ctx, ["python", "-m", "app", "drift", "--window", str(window)]))


@app.command()
def predictions(
    ctx: typer.Context,
    since: Annotated[str, typer.Option(help="how far back: 30m, 24h, 7d")] = "24h",
    format: Annotated[ExportFormat, typer.Option("--format", help="csv, jsonl or parquet")] = ExportFormat.csv,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write here (default: standard output)")] = None,
) -> None:
    """The prediction log: features as sent, the answer, the model version, OOD, and the ground truth that arrived.

    Streamed from a replica (never through the public edge). Example: mlapi predictions --since 24h -o day.csv
    (parquet: -o is required; the features become columns features.<name>)
    """
    seconds = parse_age(since, "--since")
    if format is ExportFormat.parquet and output is None:
        err.print("error: --format parquet needs --output FILE (a Parquet file is not a stream)", markup=False)
        raise typer.Exit(2)
    target = target_of(ctx)
    command = app_command(target.model_container(), "predictions")
    command += ["--since-seconds", f"{seconds:.0f}"]
    if format is ExportFormat.parquet:
        assert output is not None
        spool = output.with_name(output.name + ".jsonl.part")  # beside the file: same disk, removed after
        try:
            with spool.open("wb") as sink, growing(spool):
                result = target.run([*command, "--format", "jsonl"], stdout=sink, timeout=3600)
            if result.returncode == 0:
                rows = jsonl_to_parquet(spool, output)
                err.print(f"{rows} rows written to {output}", markup=False)
        finally:
            spool.unlink(missing_ok=True)
    elif output is not None:
        with output.open("wb") as sink, growing(output):
            result = target.run([*command, "--format", format.value], stdout=sink, timeout=3600)
    else:
        with open(sys.stdout.fileno(), "wb", closefd=False) as sink:
            result = target.run([*command, "--format", format.value], stdout=sink, timeout=3600)
    if result.returncode != 0:
        err.print(f"error: {result.stderr.decode(errors='replace').strip()}", markup=False)
        raise typer.Exit(1)


REPORT_PYTHON = PROJECT_DIR / ".venv-report" / "bin" / "python"


@app.command()
def report(
    ctx: typer.Context,
    since: Annotated[str, typer.Option(help="how far back in the prediction log: 24h, 7d")] = "7d",
    output: Annotated[Path, typer.Option("--output", "-o", help="the HTML file to write")] = Path("model-report.html"),
) -> None:
    """The model report (Evidently), rendered here: drift of each feature and of the answers against the training
    data, and quality on the predictions whose ground truth arrived (a regression's interval coverage among it).

    Needs `make .venv-report` once (Evidently has a venv of its own). Example: mlapi report --since 7d -o week.html
    """
    seconds = parse_age(since, "--since")
    if not REPORT_PYTHON.exists():
        err.print(f"error: the report's venv is missing: run `make .venv-report` in {PROJECT_DIR}", markup=False)
        raise typer.Exit(2)
    target = target_of(ctx)
    container = target.model_container()
    with tempfile.TemporaryDirectory(prefix="mlapi-report-") as spool:
        reference, predictions = Path(spool) / "reference.jsonl", Path(spool) / "predictions.jsonl"
        for path, command in (
            (reference, ["reference"]),
            (predictions, ["predictions", "--since-seconds", f"{seconds:.0f}", "--format", "jsonl"]),
        ):
            with path.open("wb") as sink:
                result = target.run(app_command(container, *command), stdout=sink, timeout=3600)
            if result.returncode != 0:
                err.print(f"error: python -m app {command[0]}: {result.stderr.decode(errors='replace').strip()}",
                          markup=False)  # fmt: skip
                raise typer.Exit(1)
        err.print(f"rendering the report of {predictions.stat().st_size / 2**20:.1f} MiB of predictions", markup=False)
        rendered = subprocess.run(
            [str(REPORT_PYTHON), "-m", "infra.ops.report", str(reference), str(predictions), str(output.resolve())],
            cwd=PROJECT_DIR, capture_output=True, text=True, check=False,
        )  # fmt: skip
    if rendered.returncode != 0:
        err.print(rendered.stderr.strip().splitlines()[-1] if rendered.stderr.strip() else "error", markup=False)
        raise typer.Exit(1)
    found = json.loads(rendered.stdout)
    coverage = f"; interval coverage {found['coverage']:.1%}" if found["coverage"] is not None else ""
    out.print(
        f"{output}: {found['model']}, {found['predictions']} predictions ({found['with_ground_truth']} with ground "
        f"truth) against {found['training_rows']} training rows; drift in {', '.join(found['drifted']) or 'nothing'}"
        f"{coverage}",
        highlight=False,
        soft_wrap=True,
    )


@contextlib.contextmanager
def growing(path: Path, every_s: float = 5.0) -> Iterator[None]:
    """While a long export is written to ``path``: every few seconds, how much has arrived (on stderr)."""
    done = threading.Event()
    started = time.monotonic()

    def tell() -> None:
        while not done.wait(every_s):
            size = path.stat().st_size if path.exists() else 0
            err.print(f"{size / 2**20:.1f} MiB received after {time.monotonic() - started:.0f} s", markup=False)

    watcher = threading.Thread(target=tell, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


@app.command("exec", context_settings={"ignore_unknown_options": True})
def exec_in_replica(
    ctx: typer.Context, command: Annotated[list[str], typer.Argument(help="the command and its arguments")]
) -> None:
    """Run a command in a model replica as its own user. Example: mlapi exec -- python -m app check"""
    target = target_of(ctx)
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    interactive = ["-it"] if tty else ["-i"]
    raise typer.Exit(target.attach(["docker", "exec", *interactive, target.model_container(), *command], tty=tty))


@app.command()
def ui(
    ctx: typer.Context,
    which: Annotated[MonitoringUI, typer.Argument(help="whose web UI")] = MonitoringUI.prometheus,
    port: Annotated[int | None, typer.Option(help="the port on this machine (default: the service's own)")] = None,
) -> None:
    """Prometheus' (or Alertmanager's) own web UI on this machine's loopback, until Ctrl-C. Their ports are published
    nowhere: each connection goes over SSH into a model replica, which is on their network. Example: mlapi ui"""
    target = target_of(ctx)
    service, service_port = MONITORING_UIS[which]
    target.model_container()  # a stack with no replica running is said now, not at the first connection

    def connect() -> list[str]:
        # A replica of now: a rolling update replaces them while the forward runs.
        return target.argv(relay_command(target.model_container(), service, service_port))

    def ready(url: str) -> None:
        out.print(f"{which.value} of {target.name}: {url}  (Ctrl-C stops)", markup=False, highlight=False)

    try:
        serve(service_port if port is None else port, connect, ready)
    except OSError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(2) from None


@app.command()
def ssh(ctx: typer.Context) -> None:
    """A root shell on the stack's manager, the host key pinned. Example: mlapi ssh"""
    target = target_of(ctx)
    if not target.ssh:
        err.print("error: --local runs on this machine: there is no host to ssh into", markup=False)
        raise typer.Exit(2)
    raise typer.Exit(target.attach(["bash", "-l"], tty=True))


def main() -> None:
    try:
        app(prog_name="mlapi")
    except TargetError as exc:
        err.print(f"error: {exc}", markup=False)
        sys.exit(2)
