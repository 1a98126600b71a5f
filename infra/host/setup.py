"""What the deploy step runs on the host at every `pulumi up` whose inputs changed (a remote command), and what it
runs before the data volume is detached (its delete). Pure renderers: the stand-in test runs the same scripts.

Settings that change (the retrain schedule, host scripts, the directory layout) live here and not in user-data:
cloud-init runs once, and a change to user-data replaces the server.
"""

from __future__ import annotations

import base64
import shlex
from dataclasses import dataclass
from pathlib import Path

from infra.spec.stack import (
    APP_COMMAND,
    MODEL_SERVICE,
    NETWORK,
    RETRAIN_LOG,
    SWARM_ADVERTISE_ADDR,
    SWARM_LISTEN_ADDR,
    TRAEFIK_CONTAINER,
)
from infra.spec.types import StackSpec

CRON_FILE = "/etc/cron.d/mlapi-retrain"
BOOT_CRON_FILE = "/etc/cron.d/mlapi-boot"
LOGROTATE_FILE = "/etc/logrotate.d/mlapi-retrain"
START_EDGE = "/usr/local/sbin/mlapi-start-edge"
BOOT_LOG = "/var/log/mlapi-boot.log"
EDGE_WAIT_S = 300
# Heartbeats to a checker outside the VM (heartbeatUrl): the script and its cron entry are always installed and do
# nothing without the URL file, which only the heartbeat command (the URL is a secret, on stdin) writes.
HEARTBEAT_COMMAND = "/usr/local/sbin/mlapi-heartbeat"
HEARTBEAT_URL_FILE = "/etc/mlapi/heartbeat-url"
HEARTBEAT_CRON_FILE = "/etc/cron.d/mlapi-heartbeat"
HEARTBEAT_LOG = "/var/log/mlapi-heartbeat.log"
HEARTBEAT_EVERY_MIN = 5
INSTALL_HEARTBEAT_URL = (
    f"set -eu\numask 077\nmkdir -p {Path(HEARTBEAT_URL_FILE).parent}\n"
    f"cat > {HEARTBEAT_URL_FILE}.new\nmv -f {HEARTBEAT_URL_FILE}.new {HEARTBEAT_URL_FILE}\n"
)
REMOVE_HEARTBEAT_URL = f"rm -f {HEARTBEAT_URL_FILE}\n"
SCRIPTS = Path(__file__).parent / "scripts"


def installed_script(title: str, settings: dict[str, str], *files: str) -> str:
    """A host script as installed: its settings as quoted shell assignments, then ``files`` of infra/host/scripts/
    as they are there (shellchecked as files), without their own shebangs. Values are data, never spliced into code."""
    assignments = "".join(f"{key}={shlex.quote(value)}\n" for key, value in settings.items())
    parts = [(SCRIPTS / name).read_text() for name in files]
    bodies = "".join(text.split("\n", 1)[1] if text.startswith("#!") else text for text in parts)
    sources = " and ".join(f"infra/host/scripts/{name}" for name in files)
    return f"#!/bin/sh\n# {title}: {sources} after these settings (infra/host).\n{assignments}{bodies}"


def start_edge_script() -> str:
    """At boot, Docker restores the Traefik container before swarm mode has brought the overlay network back, and a
    container that fails to attach then is not retried by its restart policy. Wait for both, then start it."""
    settings = {"TRAEFIK_CONTAINER": TRAEFIK_CONTAINER, "NETWORK": NETWORK, "EDGE_WAIT_S": str(EDGE_WAIT_S)}
    return installed_script("mlapi-start-edge", settings, "mlapi-start-edge.sh")


def heartbeat_script(domain: str, https_port: int = 443) -> str:
    settings = {"DOMAIN": domain, "HTTPS_PORT": str(https_port), "URL_FILE": HEARTBEAT_URL_FILE}
    return installed_script("mlapi-heartbeat", settings, "mlapi-heartbeat.sh")


@dataclass(frozen=True)
class HostFile:
    path: str
    content: str
    mode: str = "0644"


def host_files(spec: StackSpec) -> tuple[HostFile, ...]:
    return (
        HostFile(APP_COMMAND, spec.app_script, "0755"),
        HostFile(
            CRON_FILE,
            "# Scheduled retraining through the model's private route (never the public proxy).\n"
            "SHELL=/bin/sh\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
            # A retrain that succeeded (promoted or kept the served model) pings the heartbeat.
            f"{spec.retrain_cron} && {HEARTBEAT_COMMAND} retrain >> {HEARTBEAT_LOG} 2>&1\n",
        ),
        HostFile(HEARTBEAT_COMMAND, heartbeat_script(spec.domain), "0755"),
        HostFile(
            HEARTBEAT_CRON_FILE,
            "# A ping to the heartbeat URL (heartbeatUrl) while the edge answers: a checker outside the VM notices\n"
            "# when they stop. Nothing without the URL.\n"
            "SHELL=/bin/sh\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
            f"*/{HEARTBEAT_EVERY_MIN} * * * * root {HEARTBEAT_COMMAND} edge >> {HEARTBEAT_LOG} 2>&1\n",
        ),
        HostFile(START_EDGE, start_edge_script(), "0755"),
        HostFile(BOOT_CRON_FILE, f"@reboot root {START_EDGE} >> {BOOT_LOG} 2>&1\n"),
        HostFile(
            LOGROTATE_FILE,
            f"{RETRAIN_LOG} {BOOT_LOG} {HEARTBEAT_LOG} "
            "{\n  weekly\n  rotate 8\n  compress\n  missingok\n  notifempty\n}\n",
        ),
    )


def as_owner(uid: int, command: str) -> str:
    """``command`` run as ``uid`` with no groups. In a directory a container owns, root never writes, renames or
    changes modes itself: a link planted there then reaches only what that uid could already touch."""
    return command if uid == 0 else f"setpriv --reuid={uid} --regid={uid} --clear-groups {command}"


def write_as_owner(path: str, uid: int, mode: str) -> str:
    """A command that writes its stdin to ``path`` whole, as ``uid``: beside the target, then renamed over it, so a
    reader (Traefik watches its directory, cron its files) never sees half a file."""
    script = 'umask 077; rm -f "$1.new" && cat > "$1.new" && chmod "$2" "$1.new" && mv -fT "$1.new" "$1"'
    return as_owner(uid, f"sh -c {shlex.quote(script)} sh {shlex.quote(path)} {mode}")


def refuse_link(path: str) -> str:
    """Fail the step, naming the path, where a directory root is about to manage has been replaced by a link."""
    quoted = shlex.quote(path)
    message = shlex.quote(f"{path} is a symbolic link; refusing to follow it (remove it, then deploy again)")
    return f"if [ -L {quoted} ]; then echo {message} >&2; exit 1; fi"


def layout_script(spec: StackSpec, *, at_boot: bool = False) -> str:
    """The data directories with their owners and modes, and the generated configuration files (idempotent).
    ``chown -h`` never follows a link; modes and files are set as the directory's owner (``as_owner``).
    ``at_boot``: user-data's copy, without the files that follow settings which change later (Prometheus' follow
    the replica count): a change there would replace the server."""
    lines = []
    later = spec.monitoring if spec.monitoring and not at_boot else None
    for directory in (*spec.host_directories, *(later.directories if later else ())):
        path = shlex.quote(directory.path)
        owner = f"{directory.owner_uid}:{directory.owner_uid}"
        lines += [
            refuse_link(directory.path),
            f"mkdir -p {path}",
            f"chown -h {'-R ' if directory.recursive else ''}{owner} {path}",
            as_owner(directory.owner_uid, f"chmod {directory.mode} {path}"),
        ]
    for item in (*spec.config_files, *(later.files if later else ())):
        blob = base64.b64encode(item.content.encode()).decode()
        lines.append(f"echo {blob} | base64 -d | {write_as_owner(item.path, item.owner_uid, item.mode)}")
    return "\n".join(lines) + "\n"


SWARM_INIT = (
    'if [ "$(docker info --format "{{.Swarm.LocalNodeState}}")" != active ]; then\n'
    f"  docker swarm init --advertise-addr {SWARM_ADVERTISE_ADDR} --listen-addr {SWARM_LISTEN_ADDR} >/dev/null\n"
    "  echo 'joined swarm mode (single-node manager)'\n"
    "fi\n"
)


def render_host_setup(spec: StackSpec, extra_files: tuple[HostFile, ...] = (), extra_commands: str = "") -> str:
    """The deploy step: install the host files, lay out the data directories, join swarm mode. Idempotent.
    ``extra_*``: what an optional part adds (backups: infra/host/backup.py)."""
    lines = ["set -eu", "umask 022"]
    for item in (*host_files(spec), *extra_files):
        encoded = base64.b64encode(item.content.encode()).decode()
        path = shlex.quote(item.path)
        lines += [  # written beside, then renamed: cron never reads a half-written file
            f"mkdir -p {shlex.quote(item.path.rsplit('/', 1)[0])}",
            f"printf %s {encoded} | base64 -d > {path}.new",
            f"chmod {item.mode} {path}.new && mv {path}.new {path}",
        ]
    return "\n".join(lines) + "\n" + layout_script(spec) + extra_commands + SWARM_INIT + "echo host ready\n"


def render_graceful_stop(data_root: str) -> str:
    """Before the volume is detached (`pulumi destroy`, or a server replacement): stop the model's tasks with their
    grace period (the prediction log is closed and checkpointed), stop Traefik, flush and unmount the volume."""
    settings = {"MODEL_SERVICE": MODEL_SERVICE, "TRAEFIK_CONTAINER": TRAEFIK_CONTAINER, "DATA_ROOT": data_root}
    return installed_script("graceful stop", settings, "graceful-stop.sh")


def render_platform_check(image: str, platform: str, server_type: str) -> str:
    """After the pull: the image must be built for the server's platform, or the deploy stops here, saying what to do
    (instead of every replica failing with `exec format error`). The image name is data (it is operator config)."""
    settings = {"IMAGE": image, "PLATFORM": platform, "SERVER_TYPE": server_type}
    return installed_script("platform check", settings, "platform-check.sh")
