"""What a host script takes from elsewhere is data, never code: a worker's printed node ID, the database dump's mode,
and the text of a storage error stay where they belong."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from app.predlog import StorageFull
from infra.host.cluster_plan import render_node_drain, render_node_ready, render_worker_join
from infra.host.setup import SCRIPTS
from tests.support.service import ingest_headers, record
from tests.support.shims import shim_dir

NODE_ID = "k3j9x0q2m5v8b1n4c7z6w0e2r"
PLANTED = [
    "x'; touch {victim}; echo '",
    "$(touch {victim})",
    "abc\ntouch {victim}",
    "",
    "K3J9X0Q2M5V8B1N4C7Z6W0E2R",  # upper case: not what docker prints
]


@pytest.mark.parametrize("printed", PLANTED)
@pytest.mark.parametrize("render", [lambda node: render_node_ready(node, "worker-1"), render_node_drain])
def test_a_node_id_that_is_not_one_runs_nothing(printed: str, render, tmp_path: Path) -> None:
    victim = tmp_path / "pwned"
    calls = tmp_path / "docker-calls"
    bin_dir = shim_dir(tmp_path / "bin", {"docker": f'echo "$@" >> {calls}'})
    script = render(printed.format(victim=victim))
    result = subprocess.run(["sh", "-c", script], env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert result.returncode == 1 and "where a swarm node ID ([a-z0-9]{25}) belongs" in result.stderr
    assert not victim.exists() and not calls.exists()


def test_a_node_id_is_used_as_printed() -> None:
    ready, drain = render_node_ready(NODE_ID, "worker-1"), render_node_drain(NODE_ID)
    assert f"NODE={NODE_ID}\nLABEL=worker-1\n" in ready
    assert 'docker node update --availability active --label-add "$NODE_LABEL=$LABEL" "$NODE"' in ready
    assert f"NODE={NODE_ID}\n" in drain and 'docker node rm --force "$NODE"' in drain


def test_the_database_dump_is_staged_readable_by_root_only(tmp_path: Path) -> None:
    bin_dir = shim_dir(tmp_path / "bin", {"docker": "case $1 in ps) echo 0123abcd ;; exec) echo PGDMP-bytes ;; esac"})
    stage = tmp_path / "stage"
    stage.mkdir()
    credentials = tmp_path / "env"
    credentials.write_text("")
    result = subprocess.run(  # the backup's own function, from the file the installed script is made of
        ["sh", "-c", f"umask 022\n. {SCRIPTS / 'backup-common.sh'}\ndump_postgres"],
        env={
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "STAGE": str(stage),
            "ENV_FILE": str(credentials),
            "POSTGRES_SERVICE": "mlapi-postgres",
            "POSTGRES_USER": "mlapi",
            "POSTGRES_DB": "mlapi",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    dump = stage / "postgres.dump"
    assert dump.read_text() == "PGDMP-bytes\n"
    assert stat.S_IMODE(os.stat(dump).st_mode) == 0o600


def test_a_storage_error_is_not_echoed_to_the_client(client, monkeypatch: pytest.MonkeyPatch) -> None:
    internal = 'psycopg.errors.DiskFull: could not extend file "base/16384/16397": No space left on device'

    def full(rows: list) -> int:
        raise StorageFull(f"the log store's disk is full: nothing was stored ({internal})")

    monkeypatch.setattr(client.app.state.service.prediction_log, "add_observations", full)
    refused = client.post(
        "/observations", headers=ingest_headers(), json={"observations": [{"features": record(), "target": 1.0}]}
    )
    assert refused.status_code == 507
    assert refused.json() == {"detail": "the data volume is below its free-space floor; nothing was stored"}


def test_the_join_token_is_on_no_command_line(tmp_path: Path) -> None:
    """The worker joins through the engine's API with the request on stdin: no process shows the token."""
    token = "SWMTKN-1-3pu6hszjas19xyp7ghgosyx9k8atbfcr8p2is99znpy26u2lkl-1awxwuwd3z9j1z3puu7rcgdbx"
    argv_log, stdin_log = tmp_path / "argv", tmp_path / "stdin"
    shims = {
        "ip": "echo '2: eth1    inet 10.0.1.11/32 scope global eth1'",
        "docker": 'echo "docker $*" >> ' + str(argv_log) + '\ncase "$*" in *LocalNodeState*) echo inactive ;; '
        f"*NodeID*) echo {NODE_ID} ;; esac",
        "curl": 'echo "curl $*" >> ' + str(argv_log) + f"\ncat > {stdin_log}",
    }
    bin_dir = shim_dir(tmp_path / "bin", shims)
    script = render_worker_join("10.0.1.11").replace("/var/lib/mlapi", str(tmp_path / "state"))
    result = subprocess.run(["sh", "-c", script], input=token, env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == NODE_ID
    assert token not in argv_log.read_text() and "--unix-socket /var/run/docker.sock" in argv_log.read_text()
    request = json.loads(stdin_log.read_text())
    assert request == {
        "ListenAddr": "10.0.1.11:2377",
        "AdvertiseAddr": "10.0.1.11",
        "DataPathAddr": "10.0.1.11",
        "RemoteAddrs": ["10.44.1.2:2377"],
        "JoinToken": token,
    }


@pytest.mark.parametrize("stdin", ["", "not-a-token", 'SWMTKN-1-abc","JoinToken":"x', "SWMTKN-1-a b"])
def test_a_join_without_a_swarm_token_joins_nothing(stdin: str, tmp_path: Path) -> None:
    script = render_worker_join("10.0.1.11").split("digest=", 1)[0].split("token=$(cat)\n", 1)[1]
    result = subprocess.run(["sh", "-c", f"token=$(cat)\n{script}echo reached"], input=stdin, capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert result.returncode == 1 and "reached" not in result.stdout and "token" in result.stderr
