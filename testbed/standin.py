"""A container that behaves like a freshly booted VM ("VM stand-in"), to run our cloud-init for real.

Debian bookworm with cloud-init (NoCloud datasource), sshd, cron; no systemd, so a small boot script plays init:
it runs cloud-init's stages, starts sshd and cron, and on later boots the Docker engine our user-data installed.
The image is cached by a hash of its inputs.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import re
import shlex
import socket
import ssl
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker

from infra.host.backup import INSTALL_CREDENTIALS, host_setup_parts
from infra.host.cloud_init import READINESS_COMMAND, HostKey
from infra.host.setup import INSTALL_HEARTBEAT_URL, render_graceful_stop, render_host_setup
from infra.local.engine import deploy_stack
from infra.local.images import SUITE, content_hash, debootstrap_image, has_image, run_step
from infra.local.pebble import fetch_pebble_root, pebble_files, run_pebble
from infra.local.stack import LOCAL_IN_FLIGHT, LOCAL_RATE_LIMIT
from infra.ops.smoke import wait_healthy
from infra.spec.inputs import StackInputs
from infra.spec.monitoring import ALERTMANAGER_CONFIG_SECRET, AlertRoutes
from infra.spec.stack import MODEL_SERVICE, SECRETS, TRAEFIK_CONTAINER
from infra.spec.types import StackSpec
from testbed.stack import wait_until

PACKAGES = (
    "cloud-init",
    "python3-cffi-backend",
    "openssh-server",
    "sudo",
    "cron",
    "iproute2",
    "ca-certificates",
    "locales",
    "curl",
)
BOOT = "/usr/local/sbin/standin-boot"

BOOT_SCRIPT = """#!/bin/sh
# Plays init for the VM stand-in: what systemd would start on a cloud VM, in boot order.
mount -o remount,rw /sys 2>/dev/null || true
# The Docker engine our user-data installs needs writable cgroups. cgroup2: remount read-write. cgroup v1: each
# read-only hierarchy is mounted afresh (a remount answers "busy"); with a private cgroup namespace that is ours.
mount -o remount,rw /sys/fs/cgroup 2>/dev/null || true
grep ' cgroup ' /proc/self/mounts | while read -r _ dir _ opts _; do
  case "$opts" in ro,*) ;; *) continue ;; esac
  controllers=$(echo "$opts" | tr ',' '\n' | grep -vE '^(ro|rw|nosuid|nodev|noexec|relatime)$' | paste -sd, -)
  umount "$dir" && mount -t cgroup -o "$controllers" cgroup "$dir"
done
start_dockerd() {
  if [ -x /usr/sbin/dockerd ] && ! [ -S /var/run/docker.sock ]; then
    nohup /usr/sbin/dockerd >/var/log/dockerd.log 2>&1 &
  fi
}
start_dockerd
cloud-init init --local
cloud-init init
service ssh start
service cron start
cloud-init modules --mode config
cloud-init modules --mode final
exec sleep infinity
"""

# Without an init system, installing docker.io starts nothing: start the engine after dpkg has run, as a VM would.
APT_HOOK = (
    'DPkg::Post-Invoke { "if [ -x /usr/sbin/dockerd ] && ! [ -S /var/run/docker.sock ]; then '
    'nohup /usr/sbin/dockerd >/var/log/dockerd.log 2>&1 & sleep 2; fi"; };\n'
)
CLOUD_CFG = "datasource_list: [NoCloud, None]\nnetwork: {config: disabled}\n"


def _prepare_rootfs(root: Path) -> None:
    """What a cloud image has that debootstrap does not: a locale, NoCloud config, a boot script, fresh identity."""
    (root / "etc/locale.gen").write_text("en_US.UTF-8 UTF-8\n")
    run_step(["chroot", str(root), "locale-gen"], "locale-gen in the stand-in")  # else cloud-init's locale module errs
    (root / "etc/default/locale").write_text("LANG=en_US.UTF-8\n")
    (root / "etc/cloud/cloud.cfg.d/99-standin.cfg").write_text(CLOUD_CFG)
    (root / "etc/apt/apt.conf.d/99-standin-start-dockerd").write_text(APT_HOOK)
    boot = root / BOOT.lstrip("/")
    boot.write_text(BOOT_SCRIPT)
    boot.chmod(0o755)
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # made fresh at first boot, like a VM image
    (root / "etc/machine-id").write_text("")


def build_standin_image(client: docker.DockerClient) -> str:
    tag = f"mlapi-standin:{content_hash(SUITE, *PACKAGES, BOOT_SCRIPT, APT_HOOK, CLOUD_CFG)}"
    if not has_image(client, tag):
        debootstrap_image(tag, PACKAGES, f'["{BOOT}"]', customize=_prepare_rootfs)
    return tag


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@dataclass
class StandIn:
    container: docker.models.containers.Container
    instance_id: str

    @property
    def ip(self) -> str:
        self.container.reload()
        return next(iter(self.container.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]

    def exec(self, command: str) -> tuple[int, str]:
        code, output = self.container.exec_run(["sh", "-c", command], demux=False)
        return code, output.decode(errors="replace")

    def host_key(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, output = self.exec("cat /etc/ssh/ssh_host_ed25519_key.pub")
            if code == 0 and output.startswith("ssh-ed25519"):
                return output.strip()
            time.sleep(0.5)
        raise AssertionError("the stand-in made no SSH host key (cloud-init init did not run?)")


def boot_standin(
    client: docker.DockerClient,
    image: str,
    *,
    name: str,
    network: str,
    aliases: list[str],
    user_data: str,
    data_volume: str,
    docker_volume: str,
) -> StandIn:
    """Boot a stand-in with a NoCloud seed, like a VM created with this user-data and this data volume."""
    instance_id = f"i-{uuid.uuid4().hex[:12]}"
    api = client.api
    host_config = api.create_host_config(
        init=True,
        cap_add=["ALL"],
        cap_drop=["SYS_RESOURCE"],  # not in this host's bounding set, so --privileged is refused here
        security_opt=["seccomp=unconfined", "apparmor=unconfined"],
        cgroupns="private",
        tmpfs={"/run": "exec,mode=755", "/run/lock": ""},
        sysctls={"net.ipv6.conf.all.disable_ipv6": "0"},  # a VM has IPv6; Traefik also binds [::]:80/443
        binds={
            data_volume: {"bind": "/srv/mlapi", "mode": "rw"},
            docker_volume: {"bind": "/var/lib/docker", "mode": "rw"},
        },
        network_mode=network,
    )
    # `--security-opt systempaths=unconfined` is a CLI spelling: on the API it is empty masked/read-only path lists,
    # which the inner Docker engine needs to write /proc/sys.
    host_config["MaskedPaths"] = []
    host_config["ReadonlyPaths"] = []
    created = api.create_container(
        image,
        name=name,
        hostname=name,
        detach=True,
        host_config=host_config,
        networking_config=api.create_networking_config({network: api.create_endpoint_config(aliases=aliases)}),
    )
    container = client.containers.get(created["Id"])
    seed = _tar(
        {"user-data": user_data.encode(), "meta-data": f"instance-id: {instance_id}\nlocal-hostname: {name}\n".encode()}
    )
    # The seed is in place before the first boot, as a NoCloud seed disk would be.
    container.put_archive("/", _seed_dir_tar())
    container.put_archive("/var/lib/cloud/seed/nocloud", seed)
    container.start()
    return StandIn(container, instance_id)


def _seed_dir_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for directory in ("var/lib/cloud", "var/lib/cloud/seed", "var/lib/cloud/seed/nocloud"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            archive.addfile(info)
    return buffer.getvalue()


# -- what every stand-in test sets up around its stand-ins -------------------------------------------------------
def new_key(path: Path) -> HostKey:
    """An ed25519 key pair without passphrase (ssh-keygen), as the program's tls.PrivateKey makes a host key."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)], check=True)
    return HostKey(path.read_text(), Path(f"{path}.pub").read_text().strip())


@contextlib.contextmanager
def ssh_on_path(directory: Path, options: list[str]) -> Iterator[None]:
    """docker's ssh:// transport runs plain `ssh` and takes no options: a wrapper first on PATH supplies them (the
    options the Pulumi Docker provider gets, or a test's own known_hosts)."""
    directory.mkdir()
    (directory / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh {shlex.join(options)} "$@"\n')
    (directory / "ssh").chmod(0o755)
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{directory}:{old_path}"
    try:
        yield
    finally:
        os.environ["PATH"] = old_path


def remove_volume(client: docker.DockerClient, name: str) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        client.volumes.get(name).remove(force=True)


def free_subnet(client: docker.DockerClient) -> ipaddress.IPv4Network:
    used = [
        ipaddress.ip_network(config["Subnet"])
        for network in client.networks.list(greedy=True)
        for config in (network.attrs.get("IPAM", {}).get("Config") or [])
        if "Subnet" in config
    ]
    for third in range(200, 250):
        candidate = ipaddress.ip_network(f"10.231.{third}.0/24")
        if not any(candidate.overlaps(existing) for existing in used):
            return candidate
    raise AssertionError("no free /24 for the stand-in test network")


@dataclass(frozen=True)
class PebbleNetwork:
    """A bridge network of the test's own (the VM's public side, or the private network) with Pebble on it."""

    name: str
    pebble_ip: str
    pebble_dir: Path  # its configuration and CA (ca.pem: what Traefik trusts for ACME)
    pebble_root: Path  # the root its certificates chain to (what clients verify against)


def standin_inputs(domain: str, network: PebbleNetwork, built: dict[str, str], **more: Any) -> StackInputs:
    """What a stand-in stack is given: the images built here, Pebble as the CA, and the local limits (the load
    tests' clients all come from this machine's one address, as locally: infra/local/stack.py)."""
    return StackInputs(
        domain=domain,
        acme_email="ops@mlapi.test",
        acme_ca_server=f"https://{network.pebble_ip}:14000/dir",
        acme_ca_bundle=CA_ON_HOST,
        model_image=built["model"],
        traefik_image=built["traefik"],
        docker_api_image=built["docker_api"],
        prometheus_image=built["monitoring"],
        alertmanager_image=built["monitoring"],
        node_exporter_image=built["monitoring"],
        postgres_exporter_image=built["monitoring"],
        rate_limit_per_s=LOCAL_RATE_LIMIT,
        rate_limit_burst=LOCAL_RATE_LIMIT,
        in_flight_per_client=LOCAL_IN_FLIGHT,
        **more,
    )


def standin_tokens(spec: StackSpec) -> dict[str, str]:
    """The swarm secrets' values, as the program makes them: random bearer tokens; Alertmanager's configuration
    (no webhook: the monitoring tests run on the local stack)."""
    tokens = {base: uuid.uuid4().hex for base in SECRETS}
    if spec.monitoring is not None:
        tokens[ALERTMANAGER_CONFIG_SECRET] = spec.monitoring.alertmanager_config(AlertRoutes())
    return tokens


def load_images(local: docker.DockerClient, remote: docker.DockerClient, tags: set[str]) -> None:
    """The images onto a stand-in's engine over ssh:// (from a registry in production); those it has are kept."""
    for tag in sorted(tags):
        try:
            remote.images.get(tag)
        except docker.errors.ImageNotFound:
            remote.images.load(local.images.get(tag).save(named=tag))


@contextlib.contextmanager
def network_with_pebble(
    client: docker.DockerClient, tmp: Path, prefix: str, pebble_image: str, pebble_name: str
) -> Iterator[PebbleNetwork]:
    """Create the network and start Pebble on it, validating on the VM's ports (80/443, as Let's Encrypt dials);
    remove both afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    subnet = free_subnet(client)
    hosts = list(subnet.hosts())
    pebble_ip = str(hosts[-1])
    client.networks.create(
        name,
        driver="bridge",
        ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=str(subnet), gateway=str(hosts[0]))]),
    )
    try:
        pebble_dir = pebble_files(tmp, (80, 443), extra_ips=(pebble_ip,))
        run_pebble(client, pebble_image, pebble_dir, name, name=pebble_name, ip=pebble_ip)
        try:
            yield PebbleNetwork(
                name,
                pebble_ip,
                pebble_dir,
                fetch_pebble_root(client, pebble_dir, tmp / "pebble-root.pem", name=pebble_name),
            )
        finally:
            with contextlib.suppress(docker.errors.NotFound):
                client.containers.get(pebble_name).remove(force=True)
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            client.networks.get(name).remove()


def https(
    address: str, domain: str, cafile: Path, request: str, body: bytes = b""
) -> tuple[int, dict[str, str], bytes, dict]:
    """One HTTPS request to ``address``:443 with the domain as SNI and Host, verified against ``cafile``.
    ``request``: the request line and any extra header lines. Returns status, headers (lower-case names), body and
    the peer certificate."""
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection((address, 443), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=domain) as tls,
    ):
        head = f"{request.rstrip()}\r\nHost: {domain}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
        tls.sendall(head.encode() + body)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        certificate = tls.getpeercert()
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode().split("\r\n")
    headers = {key.lower(): value for key, _, value in (line.partition(": ") for line in lines[1:] if ": " in line)}
    return int(lines[0].split()[1]), headers, payload, certificate


DOMAIN = "vm.mlapi.test"


STANDIN = "mlapi-standin"


PEBBLE = "mlapi-standin-pebble"


CA_ON_HOST = "/etc/mlapi-test/pebble-ca.pem"  # where the stand-in keeps the test CA Traefik must trust


# A heartbeat checker on the stand-in (what healthchecks.io is to a VM): each GET's path and User-Agent, a line each.
HEARTBEAT_CHECKER = """
import http.server, sys
class Checker(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(sys.argv[1], "a") as seen:
            seen.write(f"{self.path} {self.headers['User-Agent']}\\n")
        self.send_response(200)
        self.end_headers()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[2])), Checker).serve_forever()
"""
HEARTBEAT_PINGS = "/root/heartbeats"  # on the stand-in


@dataclass
class Environment:
    client: docker.DockerClient
    network: str
    pebble_root: Path
    spec: StackSpec
    user_data: str
    key: Path
    host_key: str
    ssh_options: list[str]
    data_volume: str
    standin_image: str
    tokens: dict[str, str]
    standin: StandIn | None = None
    docker_volume: str = ""
    backup: tuple | None = None  # (BackupSettings, credentials bundle): the program's backup steps, when on

    # -- the transport `pulumi up` uses --------------------------------------------------------------------------
    def ssh(self, command: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["ssh", *self.ssh_options, f"root@{self.standin.ip}", command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"ssh {command!r} exited {result.returncode}: {result.stdout}{result.stderr}")
        return result

    def ssh_stdin(self, command: str, stdin: str, timeout: float = 600) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["ssh", *self.ssh_options, f"root@{self.standin.ip}", command],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise AssertionError(f"ssh {command[:60]!r} exited {result.returncode}: {result.stdout}{result.stderr}")
        return result

    def remote_docker(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=f"ssh://root@{self.standin.ip}", use_ssh_client=True, timeout=600)

    def heartbeat_checker(self, port: int = 8999) -> str:
        """Start a heartbeat checker on the stand-in (again: a fresh record) and configure its URL as the program's
        heartbeat command does; returns the URL. `heartbeats()` reads what it received."""
        self.ssh(f"pkill -f '[C]hecker' || true; rm -f {HEARTBEAT_PINGS}")  # [C]: not this shell's command line
        checker = shlex.quote(HEARTBEAT_CHECKER)
        self.ssh(f"(setsid python3 -c {checker} {HEARTBEAT_PINGS} {port} >/dev/null 2>&1 &)")
        url = f"http://127.0.0.1:{port}/ping/{uuid.uuid4()}"
        self.ssh_stdin(INSTALL_HEARTBEAT_URL, url + "\n")
        wait_until(lambda: self.ssh(f"curl -fs http://127.0.0.1:{port}/ready", check=False).returncode == 0, 30,
                   "the heartbeat checker to listen")  # fmt: skip
        self.ssh(f"rm -f {HEARTBEAT_PINGS}")  # not the readiness probe
        return url

    def heartbeats(self) -> list[str]:
        return self.ssh(f"cat {HEARTBEAT_PINGS} 2>/dev/null || true").stdout.splitlines()

    def https(self, path: str) -> tuple[int, dict, bytes, dict]:
        return https(self.standin.ip, DOMAIN, self.pebble_root, f"GET {path} HTTP/1.1")

    def serial(self) -> str:
        return self.https("/health")[3]["serialNumber"]

    def pebble_orders(self) -> int:
        return len(re.findall(r"Added order", self.client.containers.get(PEBBLE).logs().decode(errors="replace")))

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def boot(self) -> float:
        """Create a "server": a new stand-in with the user-data and the (kept) data volume; wait like pulumi up."""
        started = time.monotonic()
        self.docker_volume = f"mlapi-standin-docker-{uuid.uuid4().hex[:8]}"
        self.standin = boot_standin(
            self.client,
            self.standin_image,
            name=STANDIN,
            network=self.network,
            aliases=[DOMAIN],
            user_data=self.user_data,
            data_volume=self.data_volume,
            docker_volume=self.docker_volume,
        )
        # The very first connection already pins the key the "program" generated and put into user-data.
        wait_until(lambda: self.ssh("true", timeout=20, check=False).returncode == 0, 120, "sshd on the stand-in")
        assert self.standin.host_key() == self.host_key, "cloud-init installed the generated host key"
        # The exact command of the program's wait step. cloud-init may restart sshd meanwhile: like the command
        # provider, which retries its dial, a refused connection (ssh exits 255) is tried again.
        for _ in range(30):
            ready = self.ssh(READINESS_COMMAND, check=False)
            if ready.returncode != 255:
                break
            time.sleep(2)
        assert ready.returncode == 0, f"readiness: exit {ready.returncode}: {ready.stdout}{ready.stderr}"
        return time.monotonic() - started

    def deploy(self) -> float:
        """What ModelStack does: the deploy step over SSH, images onto the host over ssh://, then the stack."""
        started = time.monotonic()
        settings, bundle = self.backup or (None, "")
        self.ssh(render_host_setup(self.spec, *host_setup_parts(settings, "/srv/mlapi")))  # the host-setup command
        if settings is not None:  # the backup-credentials command: stdin only, then restore onto an empty volume
            restored = self.ssh_stdin(INSTALL_CREDENTIALS, bundle)
            self.restore_output = restored.stdout
        ca = (self.pebble_root.parent / "pebble" / "ca.pem").read_bytes()
        subprocess.run(
            [
                "ssh",
                *self.ssh_options,
                f"root@{self.standin.ip}",
                f"mkdir -p {Path(CA_ON_HOST).parent} && cat > {CA_ON_HOST}",
            ],
            input=ca,
            check=True,
            timeout=60,
        )
        remote = self.remote_docker()
        try:
            load_images(
                self.client,
                remote,
                {service.image for service in self.spec.services}
                | {self.spec.traefik.image, self.spec.docker_api.image},
            )
            deploy_stack(remote, self.spec, self.tokens)
        finally:
            remote.close()
        ok, message = wait_healthy(
            f"https://{DOMAIN}/health",
            attempts=240,
            delay=0.5,
            cacert=str(self.pebble_root),
            connect_to=self.standin.ip,
        )
        if not ok:
            logs = self.ssh(f"docker logs --tail 40 {TRAEFIK_CONTAINER} 2>&1", check=False).stdout
            raise AssertionError(f"{message}\n--- Traefik on the stand-in ---\n{logs}")
        return time.monotonic() - started

    def remove_server(self, *, graceful: bool = False) -> None:
        if graceful and self.standin is not None:
            self.ssh(render_graceful_stop("/srv/mlapi"))  # the data guard's delete, before the volume goes
        if self.standin is not None:
            self.standin.container.remove(force=True)
            self.standin = None
        if self.docker_volume:
            remove_volume(self.client, self.docker_volume)
            self.docker_volume = ""


TASK = f"$(docker ps -q --filter label=com.docker.swarm.service.name={MODEL_SERVICE} | head -n 1)"
