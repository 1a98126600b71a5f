"""Run __main__.py under pulumi.runtime.set_mocks and record every resource's inputs and options.

Mocks answer like the real providers do on the wire: camelCase names, numeric hcloud ids, and a remote command
whose stdout is a host key. Tests may pass other configs to prove the program does not depend on ours.
"""

from __future__ import annotations

import hashlib
import os
import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi

PROJECT_DIR = Path(__file__).resolve().parents[2]
MAIN = PROJECT_DIR / "__main__.py"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyOfTheMockServer0000000000000"
HOST_PRIVATE_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nbW9jayBob3N0IGtleQ==\n-----END OPENSSH PRIVATE KEY-----\n"
CLOUDFLARE_TOKEN = "MockScopedCloudflareToken0123456789abcdef"
LOAD_BALANCER_IPS = ("203.0.113.250", "2001:db8::250")

VALID_CONFIG = {
    "domain": "api.fjord-ml.net",
    "acmeEmail": "ops@fjord-ml.net",
    "cloudflareZoneId": "5f3c9e2a7b1d4c6e8f0a2b4c6d8e0f1a",
    "sshPublicKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIb4Y9q/Nz5zFEZmJDwjNS0aRkNhVymP/oNtGvPEGGUY operator@laptop",
    "sshAllowedCidrs": '["84.17.50.3/32"]',
}


@dataclass
class Recorded:
    typ: str
    name: str
    inputs: dict[str, Any]
    provider: str | None
    id: str = ""
    opts: pulumi.ResourceOptions | None = None
    wire: dict[str, Any] = field(default_factory=dict)  # the inputs as sent, secrets still marked


def mock_secret(name: str) -> str:
    """What the mocks give a generated secret (RandomPassword) named ``name``: distinct per resource and recognisable,
    so a test can tell the admin token from the ingest token and find either wherever it leaks."""
    return f"MockSecret{hashlib.sha256(name.encode()).hexdigest()[:24]}{''.join(c for c in name if c.isalnum())}"


def plaintext_strings(value: Any) -> list[str]:
    """Every string in wire-form inputs that is not inside a secret marker: what a state file or preview shows."""
    if isinstance(value, dict):
        if value.get(SIGNATURE_KEY) == SECRET_SIGNATURE:
            return []
        return [text for item in value.values() for text in plaintext_strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in plaintext_strings(item)]
    return [value] if isinstance(value, str) else []


@dataclass
class Deployment:
    resources: list[Recorded] = field(default_factory=list)
    exports: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def of_type(self, typ: str) -> list[Recorded]:
        return [r for r in self.resources if r.typ == typ]

    def secret_of(self, name_suffix: str) -> str:
        """The generated value of the one RandomPassword named *``name_suffix``."""
        return mock_secret(self.one("random:index/randomPassword:RandomPassword", name_suffix).name)

    def generated_secrets(self) -> list[str]:
        values = [mock_secret(r.name) for r in self.of_type("random:index/randomPassword:RandomPassword")]
        assert len(set(values)) == len(values), "every generated secret is distinct"
        return values

    def one(self, typ: str, name_suffix: str = "") -> Recorded:
        found = [r for r in self.of_type(typ) if r.name.endswith(name_suffix)]
        assert len(found) == 1, f"expected one {typ} named *{name_suffix}, found {[r.name for r in found]}"
        return found[0]


SIGNATURE_KEY = "4dabf18193072939515e22adb298388d"  # Pulumi's wire marker for secrets and other special values
SECRET_SIGNATURE = "1b47061264138c4ac30d75fd1eb44270"


def unwrap(value: Any) -> Any:
    """Inputs as the program meant them: secrets (marked on the wire) replaced by their plain value."""
    if isinstance(value, dict):
        if SIGNATURE_KEY in value and "value" in value:
            return unwrap(value["value"])
        return {key: unwrap(item) for key, item in value.items()}
    if isinstance(value, list):
        return [unwrap(item) for item in value]
    return value


class RecordingMocks(pulumi.runtime.Mocks):
    def __init__(
        self, deployment: Deployment, preview: bool, invokes: dict[str, dict] | None = None, first_id: int = 1000001
    ) -> None:
        self.deployment = deployment
        self.preview = preview
        self.invokes = invokes or {}
        self.first_id = first_id

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        state = dict(args.inputs)
        # hcloud ids are numbers on the wire; others are opaque strings. A function of the resource, not of the order
        # in which resources register (that order is asynchronous, and ids drawn from a counter made runs differ).
        digest = int(hashlib.sha256(f"{args.typ}/{args.name}".encode()).hexdigest()[:8], 16)
        resource_id = str(self.first_id + digest % 900_000) if args.typ.startswith("hcloud:") else f"{args.name}-id"
        self.deployment.resources.append(
            Recorded(args.typ, args.name, unwrap(dict(args.inputs)), args.provider, resource_id, wire=dict(args.inputs))
        )
        if args.typ == "hcloud:index/server:Server":
            # Another server (another id) gets another address, as a replacement does.
            octet = 10 + int(resource_id) % 199
            state.update(ipv4Address=f"203.0.113.{octet}", ipv6Address=f"2001:db8::{octet}", status="running")
        if args.typ == "hcloud:index/loadBalancer:LoadBalancer":
            state.update(ipv4=LOAD_BALANCER_IPS[0], ipv6=LOAD_BALANCER_IPS[1])
        if args.typ == "cloudflare:index/apiToken:ApiToken":
            state["value"] = CLOUDFLARE_TOKEN  # the provider marks it secret itself; the program must keep it so
        if self.preview and args.typ.startswith("command:"):
            return resource_id, state  # a command's output is unknown until it has run, as in a real preview
        if args.typ == "command:remote:Command":
            # A worker's join prints its swarm node ID; other steps print a line of their own.
            joined = args.name.endswith("-join")
            state["stdout"] = f"{hashlib.sha256(args.name.encode()).hexdigest()[:25]}\n" if joined else "host ready\n"
        if args.typ == "command:local:Command":
            state["stdout"] = "healthy\n"
        if args.typ == "tls:index/privateKey:PrivateKey":
            state.update(privateKeyOpenssh=HOST_PRIVATE_KEY, publicKeyOpenssh=HOST_KEY + "\n")
        if args.typ == "random:index/randomPassword:RandomPassword":
            state["result"] = mock_secret(args.name)
        if args.typ == "docker:index/remoteImage:RemoteImage":
            state["imageId"] = "sha256:" + "ab" * 32
        if args.typ == "docker:index/image:Image":
            state["repoDigest"] = ""
        return resource_id, state

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict:
        """Invokes (hcloud look-ups) answer what a test put in ``invokes`` by token, else nothing found."""
        return self.invokes.get(args.token, {})


def run_program(
    config: dict[str, str],
    *,
    stack: str = "dev",
    project: str = "mlapi",
    preview: bool = False,
    invokes: dict[str, dict] | None = None,
    first_id: int = 1000001,
) -> Deployment:
    deployment = Deployment()
    mocks = RecordingMocks(deployment, preview, invokes, first_id)
    pulumi.runtime.set_mocks(mocks, project=project, stack=stack, preview=preview)
    pulumi.runtime.set_all_config({f"{project}:{key}": value for key, value in config.items()})
    options: dict[tuple[str, str], pulumi.ResourceOptions] = {}

    def capture(args: pulumi.ResourceTransformationArgs) -> None:
        options[(args.type_, args.name)] = args.opts
        return None

    original_warn = pulumi.log.warn

    def warn(message: str, *args: Any, **kwargs: Any) -> None:
        deployment.warnings.append(message)
        original_warn(message, *args, **kwargs)

    @pulumi.runtime.test
    def program() -> pulumi.Output:
        pulumi.runtime.register_stack_transformation(capture)
        pulumi.log.warn = warn
        root = pulumi.runtime.get_root_resource()
        if root is not None:  # one root for every run in this process: a run exports only what its program does
            root.outputs = {}
        cwd = os.getcwd()
        os.chdir(PROJECT_DIR)  # Pulumi runs the program from the project directory
        try:
            runpy.run_path(str(MAIN), run_name="__main__")
        finally:
            os.chdir(cwd)
            pulumi.log.warn = original_warn
        root = pulumi.runtime.get_root_resource()
        exported = dict(root.outputs) if root is not None else {}
        return pulumi.Output.all(**exported).apply(deployment.exports.update)

    program()
    for recorded in deployment.resources:
        recorded.opts = options.get((recorded.typ, recorded.name))
    return deployment
