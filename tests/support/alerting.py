"""What tests of alert delivery share: Debian's Alertmanager run with the configuration the program renders."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from infra.spec.monitoring import AlertRoutes, alertmanager_config
from testbed.stack import wait_until
from tests.support.service import free_port
from tests.support.shims import installed_tool


@contextlib.contextmanager
def running_alertmanager(
    tmp_path: Path, routes: AlertRoutes, ca_file: Path | None = None
) -> Iterator[tuple[str, Path]]:
    """Debian's Alertmanager on 127.0.0.1 with the rendered configuration (interval 1 s: alerts grouped within 2 s;
    the resolve notice's group interval cut to 2 s); yields its API's base URL and its log."""
    binary = installed_tool("prometheus-alertmanager", "prometheus-alertmanager")
    config, log, web = tmp_path / "alertmanager.yml", tmp_path / "alertmanager.log", free_port()
    rendered = yaml.safe_load(alertmanager_config(routes, interval_s=1))
    rendered["route"]["group_interval"] = "2s"  # the resolve notice within seconds, not 20 (only timing changes)
    config.write_text(yaml.safe_dump(rendered, sort_keys=False))
    manager = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web}",
            "--cluster.listen-address=",
        ],
        env={**os.environ, **({"SSL_CERT_FILE": str(ca_file)} if ca_file else {})},
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    api = f"http://127.0.0.1:{web}"
    try:
        wait_for(lambda: urllib.request.urlopen(f"{api}/-/ready", timeout=2).status == 200, 30, "ready", log)
        yield api, log
    finally:
        manager.send_signal(signal.SIGTERM)
        manager.wait(timeout=30)


def wait_for(condition: Callable[[], bool], seconds: float, what: str, log: Path) -> None:
    """testbed's wait_until, with Alertmanager's own last words when it times out."""
    try:
        wait_until(condition, seconds, what, interval=0.2)
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}; Alertmanager's log ends: {log.read_text()[-3000:]}") from None
