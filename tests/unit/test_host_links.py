"""Root on the VM never follows a link a container planted: the deploy step's layout and generated files, the DNS-01
token and the seed marker are rendered as on the VM and run for real, as root, against a data root whose container-
owned directories hold links to a file only root may change. (The backup status file: tests/stack/test_stack_backup.py.)

Needs root, as the deploy step does (chown, setpriv): the ``host_root`` fixture.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from infra.host.cluster_plan import LOOPBACK, render_swarm_address, seed_marker_path
from infra.host.setup import layout_script
from infra.program.dns_challenge import install_token_command
from infra.spec.inputs import StackInputs
from infra.spec.stack import MODEL_UID, SWARM_ADVERTISE_ADDR, TRAEFIK_UID, build_stack
from infra.spec.traefik import DNS_TOKEN_FILE, TLS_FILE, tls_options_yaml
from infra.spec.types import StackSpec
from tests.support.shims import shim_dir

VICTIM_TEXT = "root's own file: no container may change it\n"


@pytest.fixture
def data_root(host_root: Path) -> Path:
    """The data root, beside a root-owned victim file and directory."""
    (host_root / "victim").write_text(VICTIM_TEXT)
    (host_root / "victim").chmod(0o644)
    (host_root / "victim-dir").mkdir(mode=0o755)
    root = host_root / "data"
    root.mkdir()
    return root


def owned_dir(path: Path, uid: int) -> Path:
    """A directory as a previous deploy left it: owned by the container's uid."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    return path


def plant(link: Path, target: Path, uid: int) -> None:
    """What a compromised container does in a directory it owns."""
    link.symlink_to(target)
    os.chown(link, uid, uid, follow_symlinks=False)


def untouched(victim: Path, mode: int = 0o644, is_dir: bool = False) -> None:
    info = victim.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, mode), f"{victim} changed owner or mode"
    if not is_dir:
        assert victim.read_text() == VICTIM_TEXT, f"{victim} was written through a planted link"


def run(script: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], input=stdin, capture_output=True, text=True, env=env, check=False)


def spec_for(root: Path) -> StackSpec:
    return build_stack(StackInputs(domain="api.example.com", acme_email="ops@example.com", data_root=str(root)))


def layout_for(root: Path) -> str:
    return layout_script(spec_for(root))


def test_the_tls_options_file_is_written_as_traefik_not_through_its_link(data_root: Path) -> None:
    dynamic = owned_dir(data_root / "traefik" / "dynamic", TRAEFIK_UID)
    owned_dir(data_root / "traefik", TRAEFIK_UID)
    victim = data_root.parent / "victim"
    plant(dynamic / f"{TLS_FILE}.new", victim, TRAEFIK_UID)

    done = run(layout_for(data_root))

    assert done.returncode == 0, done.stderr
    untouched(victim)
    written = dynamic / TLS_FILE
    assert written.read_text() == tls_options_yaml() and not written.is_symlink()
    info = written.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (TRAEFIK_UID, 0o600)


def test_a_directory_replaced_by_a_link_is_refused_by_name(data_root: Path) -> None:
    traefik = owned_dir(data_root / "traefik", TRAEFIK_UID)
    victim_dir = data_root.parent / "victim-dir"
    plant(traefik / "dynamic", victim_dir, TRAEFIK_UID)

    done = run(layout_for(data_root))

    assert done.returncode != 0
    assert f"{traefik / 'dynamic'} is a symbolic link; refusing to follow it" in done.stderr
    untouched(victim_dir, 0o755, is_dir=True)


def test_a_fresh_layout_has_the_owners_and_modes_of_the_spec(data_root: Path) -> None:
    spec = spec_for(data_root)
    done = run(layout_script(spec))
    assert done.returncode == 0, done.stderr
    assert spec.host_directories, "the spec names the data directories"
    for directory in spec.host_directories:
        info = Path(directory.path).stat()
        assert (info.st_uid, oct(stat.S_IMODE(info.st_mode))) == (directory.owner_uid, oct(int(directory.mode, 8)))
    assert spec.config_files, "the spec names the generated files"
    for item in spec.config_files:  # e.g. Traefik's TLS options and the Docker API proxy's allow-list
        info = Path(item.path).stat()
        assert Path(item.path).read_text() == item.content
        assert (info.st_uid, oct(stat.S_IMODE(info.st_mode))) == (item.owner_uid, oct(int(item.mode, 8)))


def test_the_dns_token_is_written_as_traefik_not_through_its_link(data_root: Path) -> None:
    traefik = owned_dir(data_root / "traefik", TRAEFIK_UID)
    victim = data_root.parent / "victim"
    plant(traefik / f"{DNS_TOKEN_FILE}.new", victim, TRAEFIK_UID)

    done = run(install_token_command(str(data_root)), stdin="a-zone-scoped-token")

    assert done.returncode == 0, done.stderr
    untouched(victim)
    token = traefik / DNS_TOKEN_FILE
    info = token.stat()
    assert token.read_text() == "a-zone-scoped-token"
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (TRAEFIK_UID, 0o400)
    assert run(install_token_command(str(data_root)), stdin="").returncode != 0, "an empty token is refused"


@pytest.fixture
def docker_shim(tmp_path: Path) -> dict[str, str]:
    """A swarm manager that is already where it should be: only the marker part of the step does anything."""
    docker = (
        'case "$*" in\n'
        "  *LocalNodeState*) echo active ;;\n"
        f"  *NodeAddr*) echo {SWARM_ADVERTISE_ADDR} ;;\n"
        "  *NodeID*) echo nodeid ;;\n"
        "esac"
    )
    shim = shim_dir(tmp_path / "bin", {"docker": docker})
    return {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}


def test_the_seed_marker_is_made_as_the_model_user_and_a_planted_link_is_refused(
    data_root: Path, docker_shim: dict[str, str]
) -> None:
    model = owned_dir(data_root / "model", MODEL_UID)
    marker = Path(seed_marker_path(str(data_root)))
    script = render_swarm_address(LOOPBACK, seed_marker=str(marker))

    done = run(script, env=docker_shim)
    assert done.returncode == 0, done.stderr
    assert marker.stat().st_uid == MODEL_UID

    marker.unlink()
    victim = data_root.parent / "victim"
    before = victim.stat().st_mtime_ns
    plant(model / marker.name, victim, MODEL_UID)
    done = run(script, env=docker_shim)
    assert done.returncode != 0
    assert f"{marker} is a symbolic link; refusing to follow it" in done.stderr
    untouched(victim)
    assert victim.stat().st_mtime_ns == before
