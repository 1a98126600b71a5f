"""Backup and restore of the local stack with a 100k-row prediction log (not a test; prints numbers).

    python -m benchmarks.bench_restore [--rows 100000]

Starts its own local stack (own ports, data and repository in a temporary directory), fills the prediction log
through the real service (batch predictions over verified HTTPS), then times with the VM's own scripts:
1. a plain `cp -a` of the data directory in the same tool container: the baseline;
2. the first backup (everything new) and a second one (nothing changed);
3. `mlapi-restore latest` as `make local-restore` runs it: stop, fetch, copy, swap, start, until /ready answers.
Each figure is also given as a ratio against the baseline copy.
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import tempfile
import time
from pathlib import Path

from infra.local import backup as local_backup
from infra.local import stack as local
from testbed.stack import free_port, https

BATCH = 10_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mlapi-bench-restore-") as tmp:
        root = Path(tmp)
        options = local.LocalOptions.isolated(root, free_port(), free_port())
        local.down(quiet=True)
        stack = local.up(options, quiet=True)
        try:
            return run(stack, args.rows)
        finally:
            local.down(options, delete_data=True, quiet=True)


def run(stack: local.LocalStack, rows: int) -> int:
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    names = data.feature_names
    records = [dict(zip(names, row.tolist(), strict=True)) for row in data.data]
    sent = 0
    while sent < rows:
        size = min(BATCH, rows - sent)
        batch = [records[(sent + i) % len(records)] for i in range(size)]
        status, _, body = https(stack, "POST", "/predict/batch", {"records": batch}, timeout=300)
        assert status == 200, body[:300]
        sent += size
    database = stack.options.data_root / "model" / "predictions.sqlite3"
    deadline = time.monotonic() + 120
    while logged(database) < rows and time.monotonic() < deadline:
        time.sleep(0.5)
    count = logged(database)
    if count < rows:
        raise SystemExit(f"bench_restore: {count} of {rows} predictions reached the log within 120 s")
    size_mb = sum(p.stat().st_size for p in stack.options.data_root.rglob("*") if p.is_file()) / 1e6

    client = local.engine()
    backups = local_backup.LocalBackupOptions(stack.options.backup_dir)
    o = stack.options
    copy_script = f"set -e; cp -a {o.data_root} /tmp/copy"
    timings: dict[str, float] = {}
    started = time.monotonic()
    local_backup.run_script(client, backups, o.data_root, o.state_dir, copy_script, [])
    timings["baseline: cp -a of the data directory (tool container)"] = time.monotonic() - started
    for what in ("first backup (all new)", "second backup (nothing changed)"):
        started = time.monotonic()
        local_backup.backup(client, backups, o.data_root, o.state_dir)
        timings[what] = time.monotonic() - started
    started = time.monotonic()
    local_backup.restore_and_check(
        client, backups, o.data_root, o.state_dir, "latest", f"https://{o.domain}:{o.https_port}/ready"
    )
    timings["restore latest: stop, fetch, copy, swap, start, /ready 200"] = time.monotonic() - started
    assert logged(database) == count, "the restore brought back every row"

    baseline = next(iter(timings.values()))
    print(
        f"# backup and restore, {time.strftime('%Y-%m-%d')}, {platform.machine()}, `python -m benchmarks.bench_restore`"
    )
    print(f"prediction log: {count} rows; data directory {size_mb:.1f} MB; replicas {stack.spec.model.replicas}")
    print("| step | seconds | ÷ baseline copy |")
    print("|---|---|---|")
    for what, seconds in timings.items():
        print(f"| {what} | {seconds:.2f} | {seconds / baseline:.1f} |")
    print(json.dumps({k: round(v, 2) for k, v in timings.items()}))
    return 0


def logged(database: Path) -> int:
    """The rows in the prediction log. A database that cannot be read fails the benchmark, naming it: a count of 0
    would let the restore check below pass on a log that is not there."""
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as db:
            return db.execute("select count(*) from predictions").fetchone()[0]
    except sqlite3.Error as error:
        raise SystemExit(f"bench_restore: cannot count the rows of {database}: {error}") from error


if __name__ == "__main__":
    raise SystemExit(main())
