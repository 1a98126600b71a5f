"""Command line of the model service: ``python -m app <command>`` (``--help`` lists them).

``retrain``, ``versions``, ``rollback``, ``drift`` and ``predictions`` talk to the running service's private /admin
routes on the loopback address, so the serving process is the one that swaps models. The host's cron runs
``docker exec <model container> python -m app retrain``: it never goes through the public proxy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from app.settings import get_settings

if TYPE_CHECKING:
    from app.data import Dataset


def _admin_request(method: str, path: str, body: dict | None = None) -> urllib.request.Request:
    from app.stores import load_token

    settings = get_settings()
    token = load_token(settings, "admin")
    return urllib.request.Request(
        f"http://127.0.0.1:{settings.port}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )


def _admin_exchange(request: urllib.request.Request, answer: Callable[[Any], int], timeout: float = 600) -> int:
    """Send an admin request and hand the response to ``answer``; an HTTP error or no service is one line on stderr."""
    what = f"{request.get_method()} {urllib.parse.urlsplit(request.full_url).path}"
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return answer(response)
    except urllib.error.HTTPError as exc:
        print(f"{what}: HTTP {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
    except OSError as exc:
        print(f"{what}: cannot reach the service at {request.full_url}: {exc}", file=sys.stderr)
    return 1


def _printed(payload: dict) -> int:
    """An admin answer on stdout; exit 1 when it is a failed retrain."""
    print(json.dumps(payload, indent=2, sort_keys=True))
    return 1 if payload.get("outcome") == "failed" else 0


def _admin_call(method: str, path: str, body: dict | None = None) -> int:
    return _admin_exchange(_admin_request(method, path, body), lambda response: _printed(json.load(response)))


def _retrain() -> int:
    """Retrain, each phase on stderr as it happens (with the seconds since the start), the outcome on stdout."""
    started = time.monotonic()

    def streamed(response: Any) -> int:
        for line in response:
            said = json.loads(line)
            if "phase" in said:
                print(f"retrain [{time.monotonic() - started:5.1f} s] {said['phase']}", file=sys.stderr, flush=True)
            elif "error" in said:
                print(f"POST /admin/retrain: HTTP {said['status']}: {said['error']}", file=sys.stderr)
                return 1
            else:
                return _printed(said)
        print("POST /admin/retrain: the service ended the answer without an outcome", file=sys.stderr)
        return 1

    return _admin_exchange(_admin_request("POST", "/admin/retrain?progress=true"), streamed, timeout=3600)


def _predictions(since_seconds: float, fmt: str) -> int:
    """The prediction log streamed to stdout (a million rows never sit in memory here or in the service)."""
    since = max(0.0, time.time() - since_seconds)  # "30000d" means everything, not a time before 1970

    def streamed(response: Any) -> int:
        shutil.copyfileobj(response, sys.stdout.buffer, length=1 << 16)
        sys.stdout.flush()
        return 0

    return _admin_exchange(_admin_request("GET", f"/admin/predictions?since={since:.3f}&format={fmt}"), streamed)


def _metrics() -> int:
    """The Prometheus exposition, read on the replica itself: /metrics is not routed from the internet."""
    url = f"http://127.0.0.1:{get_settings().port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            sys.stdout.write(response.read().decode())
    except OSError as exc:
        print(f"GET /metrics: cannot reach the service at {url}: {exc}", file=sys.stderr)
        return 1
    return 0


def _train(dataset: Dataset, into: str | None) -> int:
    """Train the configured data's first version into a file registry (the image build's step: replicas then start
    from it, app.service.ModelService.start), unless that registry has one already."""
    from pathlib import Path

    from app.registry import Registry
    from app.training import train_first_version

    settings = get_settings()
    directory = Path(into) if into else settings.first_version_dir or settings.data_dir
    registry = Registry(directory / dataset.store, dataset.trusted_types)
    version = registry.current()
    if version is None:
        try:
            version = train_first_version(settings, dataset, registry)
        except Exception as exc:  # the project's own code, or its data, failed to train: say so, no traceback
            print(f"error: training {dataset.name}'s first version failed: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(registry.metadata(version).model_dump(include={"version", "metrics"}), indent=2))
    return 0


def _data_needs_credentials() -> bool:
    """Whether the configured project's data is an s3:// URL (read from mlapi.toml alone, nothing fetched)."""
    from app.datasource import needs_credentials
    from app.project import ProjectError, read_project_file

    directory = get_settings().model_project
    if directory is None:
        return False
    try:
        return needs_credentials(read_project_file(directory).model.data)
    except ProjectError:
        return False  # the training that follows names what is wrong


def _install_requirements(into: str) -> int:
    """The image build's step: the configured project's extra packages, checked, installed into ``into`` (offline from
    the project's .wheels directory when the local stack put one there), and its Debian packages listed there, one a
    line, for the build's system stage (app/Dockerfile.project)."""
    from pathlib import Path

    from app.project import SYSTEM_PACKAGES_LIST, ProjectError, project_pins, read_project_file
    from app.requirements import WHEELS_DIR, RequirementsError, install

    directory = get_settings().model_project
    if directory is None:
        print("error: MLAPI_MODEL_PROJECT is not set: only a model project has extra packages", file=sys.stderr)
        return 2
    try:  # mlapi.toml alone: the data is read (or fetched) when the build trains, not here
        model = read_project_file(directory).model
        pins = project_pins(directory, model)
        wheels = directory / WHEELS_DIR
        install(pins, Path(into), wheels if wheels.is_dir() else None, f"{directory} model.requirements")
    except (ProjectError, RequirementsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (Path(into) / SYSTEM_PACKAGES_LIST).write_text("".join(f"{name}\n" for name in model.system_packages))
    print(f"installed {[pin.text for pin in pins]} into {into}" if pins else "no extra packages")
    return 0


def _init(args: argparse.Namespace) -> int:
    """Write ``mlapi.toml`` with the schema inferred from the data, for the user to review."""
    from pathlib import Path

    from app.datasource import is_url
    from app.project import PARQUET_READER, PARQUET_REQUIREMENTS, PROJECT_FILE, ProjectError, data_format, init_project

    data, project = args.data, args.project
    if is_url(data) and not project:
        print("error: --project: name the directory mlapi.toml goes to (the data is a URL)", file=sys.stderr)
        return 1
    directory = Path(project) if project else Path(data).parent
    destination = directory / PROJECT_FILE
    if destination.exists():
        print(f"{destination} exists; nothing written (remove it to infer the schema again)", file=sys.stderr)
        return 1
    try:
        text = init_project(
            directory, data, args.target, args.task, args.name, args.ignore, args.data_endpoint, args.data_region
        )
    except ProjectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    directory.mkdir(parents=True, exist_ok=True)  # a new project for data from a URL
    destination.write_text(text)
    print(f"wrote {destination}: review the feature types, then: MLAPI_MODEL_PROJECT={directory} python -m app serve")
    if data_format(data) == "parquet":  # the model image reads Parquet only with the project's own pyarrow
        requirements = directory / PARQUET_REQUIREMENTS
        if not requirements.exists():
            requirements.write_text(f"{PARQUET_READER}  # reads the Parquet data\n")
            print(f"wrote {requirements}: {PARQUET_READER}, which reads the Parquet data in the model image")
        elif "pyarrow" not in requirements.read_text().lower():
            print(f"add {PARQUET_READER} to {requirements}: the model image reads the Parquet data with it")
    return 0


def _import_model(source: str, project: str, name: str) -> int:
    """Convert a pickle into the project's skops file, on the operator's machine: the service never unpickles."""
    from pathlib import Path

    from app.project import ProjectError, import_pickle, load_project

    print(
        f"warning: reading {source} runs whatever code the pickle holds: import only a file you trust",
        file=sys.stderr,
    )
    try:
        written = import_pickle(Path(source), load_project(Path(project)), name)
    except ProjectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {written} (and {written.name}.json, the scikit-learn version); mlapi.toml: model_file = {name!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the HTTP service (uvicorn)")
    init = commands.add_parser(
        "init", help="write mlapi.toml for a CSV or Parquet file, with the schema inferred from it"
    )
    init.add_argument(
        "data", help="the training data (CSV or Parquet): a file in the project directory, or an https:// or s3:// URL"
    )
    init.add_argument("--project", help="the project directory (default: the data file's directory)")
    init.add_argument("--data-endpoint", help="s3:// data in an S3-compatible store: its https endpoint")
    init.add_argument("--data-region", help="s3:// data: the bucket's region")
    init.add_argument("--target", required=True, help="the column to predict")
    init.add_argument("--task", choices=("regression", "classification"), help="default: from the target's values")
    init.add_argument("--name", help="the model's name in the API (default: the directory's name)")
    init.add_argument("--ignore", action="append", default=[], help="a column that is neither feature nor target")
    imported = commands.add_parser(
        "import-model",
        help="convert a joblib/pickle model into the project's skops file (unpickles: trusted files only)",
    )
    imported.add_argument("source", help="the fitted pipeline, a joblib or pickle file")
    imported.add_argument("--project", required=True, help="the project directory (its mlapi.toml gets model_file)")
    imported.add_argument("--name", default="model.skops", help="the skops file to write in the project")
    commands.add_parser("check", help="check the configured model project (or dataset) can be served; print it")
    train = commands.add_parser(
        "train", help="train the first version into a file registry, unless it has one (the image build runs it)"
    )
    train.add_argument("--into", help="the registries' directory (default: MLAPI_FIRST_VERSION_DIR, else the data dir)")
    train.add_argument(
        "--at-build",
        action="store_true",
        help="the image build's run: a project whose data needs credentials (s3://) is left to the deploy's "
        "training job, which has them",
    )
    commands.add_parser("retrain", help="ask the running service to retrain and promote only if better")
    commands.add_parser("versions", help="list model versions and retrain history")
    commands.add_parser("metrics", help="print the Prometheus metrics (not routed from the internet)")
    rollback = commands.add_parser("rollback", help="serve an earlier version")
    rollback.add_argument("version", help="e.g. v0001")
    drift = commands.add_parser("drift", help="population stability per feature over recent predictions")
    drift.add_argument("--window", type=int, default=1000)
    export = commands.add_parser("predictions", help="the prediction log with its observations, as CSV or JSON lines")
    export.add_argument("--since-seconds", type=float, default=86400, help="how far back (default: one day)")
    export.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    commands.add_parser("reference", help="the training data as JSON lines, its schema first (for `mlapi report`)")
    packages = commands.add_parser(
        "requirements", help="install the project's model.requirements beside the service's packages (image build)"
    )
    packages.add_argument("--into", required=True, help="the directory the packages go to")
    args = parser.parse_args(argv)

    if args.command == "requirements":
        return _install_requirements(args.into)

    if args.command == "train" and args.at_build and _data_needs_credentials():
        print(
            "the first version is not trained in the image: s3:// data needs credentials, which an image must never "
            "hold; the deploy's training job trains it onto the data volume before the replicas start",
            file=sys.stderr,
        )
        return 0
    if args.command in ("train", "check", "reference"):
        from app.data import DatasetError, load_configured

        try:  # a project or dataset that cannot be served stops here, with the reason, not in a traceback
            dataset = load_configured(get_settings(), check_only=args.command == "check")
        except DatasetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.command == "check":
            schema = dataset.schema
            task = f"classification into {list(schema.classes)}" if schema.classes else "regression"
            typed = ", ".join(f"{c.name} ({c.type}{', nullable' if c.nullable else ''})" for c in schema.columns)
            print(f"{dataset.name}: {task}, {len(dataset)} rows; features: {typed}")
            return 0
        if args.command == "reference":
            from app.export import reference_lines

            sys.stdout.writelines(reference_lines(dataset.name, dataset.schema, dataset.X, dataset.y))
            return 0
        return _train(dataset, args.into)
    if args.command == "serve":
        import logging

        import uvicorn

        from app.lifecycle import DrainingServer

        logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s:%(message)s")
        settings = get_settings()
        if settings.process_limit is not None:
            import resource

            # Lowered for good: without CAP_SYS_RESOURCE (the task has no capability) nothing can raise it again.
            resource.setrlimit(resource.RLIMIT_NPROC, (settings.process_limit, settings.process_limit))
        from app.data import DatasetError

        try:  # the app, built once (its data loaded once); one that cannot be served stops here, with the reason
            from app.main import app
        except DatasetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            proxy_headers=True,
            forwarded_allow_ips="*",
            timeout_keep_alive=settings.keep_alive_s,
            timeout_graceful_shutdown=settings.graceful_timeout_s,
            server_header=False,
            # Traefik's access log has every public request (client, status, duration); the replica's own would
            # repeat it, with the health checks, at a sixth of a single prediction's CPU (docs/benchmarks.md).
            access_log=False,
        )
        DrainingServer(config, drain_seconds=settings.drain_seconds).run()
        return 0
    if args.command == "import-model":
        return _import_model(args.source, args.project, args.name)
    if args.command == "init":
        return _init(args)
    if args.command == "retrain":
        return _retrain()
    if args.command == "metrics":
        return _metrics()
    if args.command == "versions":
        return _admin_call("GET", "/admin/versions")
    if args.command == "rollback":
        return _admin_call("POST", "/admin/rollback", {"version": args.version})
    if args.command == "predictions":
        return _predictions(args.since_seconds, args.format)
    return _admin_call("GET", f"/admin/drift?window={args.window}")


if __name__ == "__main__":
    sys.exit(main())
