"""The VM stand-in, booted once for the run and shared by the modules that ask for ``env`` (a boot and a deploy cost
about 80 s): our cloud-init on a fresh Debian container, then a deploy over ssh://, as `pulumi up` does to a new
server. A test that replaces the server or its volume leaves ``env`` pointing at the new ones, serving."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator

import pytest

from infra.host.cloud_init import hcloud_volume_device, render_user_data
from infra.host.deploy import docker_ssh_options
from infra.local import images
from infra.local.postgres import build_postgres
from infra.spec.stack import build_stack
from testbed.stack import TIMINGS, docker_engine
from testbed.standin import (
    DOMAIN,
    PEBBLE,
    Environment,
    build_standin_image,
    network_with_pebble,
    new_key,
    remove_volume,
    ssh_on_path,
    standin_inputs,
    standin_tokens,
)


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Environment]:
    client = docker_engine()
    tmp = tmp_path_factory.mktemp("standin")
    started = time.monotonic()
    # Its own images first (the cluster's PostgreSQL too): the stack images may be building in the stack lane
    # meanwhile, and a lock makes this lane wait for them.
    built = {"standin": build_standin_image(client), "postgres": build_postgres(client)}
    built.update(images.build_stack_images(client))
    images_s = time.monotonic() - started

    key = tmp / "id_ed25519"
    new_key(key)
    host_key = new_key(tmp / "host_ed25519")  # the server's, made before the server exists, as the program does
    ssh_options = [
        *docker_ssh_options(host_key.public_openssh, str(key)),
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
    ]
    data_volume = f"mlapi-standin-data-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as teardown:
        # The ssh wrapper supplies exactly the options the Pulumi Docker provider gets (docker_ssh_options).
        teardown.enter_context(ssh_on_path(tmp / "bin", ssh_options))
        network = teardown.enter_context(network_with_pebble(client, tmp, "mlapi-standin", built["pebble"], PEBBLE))
        client.volumes.create(data_volume)

        inputs = standin_inputs(DOMAIN, network, built)
        spec = build_stack(inputs)
        user_data = render_user_data(
            spec,
            ssh_public_key=(tmp / "id_ed25519.pub").read_text().strip(),
            data_root=inputs.data_root,
            volume_device=hcloud_volume_device(4242),
            docker_source="debian",
            host_key=host_key,
        )
        environment = Environment(
            client,
            network.name,
            network.pebble_root,
            spec,
            user_data,
            key,
            host_key.public_openssh,
            ssh_options,
            data_volume,
            built["standin"],
            tokens=standin_tokens(spec),
        )
        # The server first, then whichever volume it holds by then (a disaster test swaps in a new one).
        teardown.callback(lambda: remove_volume(client, environment.data_volume))
        teardown.callback(environment.remove_server)
        boot_s = environment.boot()
        deploy_s = environment.deploy()
        TIMINGS.append(
            f"VM stand-in: images {images_s:.1f} s, boot + cloud-init (installs docker.io) "
            f"{boot_s:.1f} s, deploy over ssh:// to first verified HTTPS 200 {deploy_s:.1f} s"
        )
        yield environment
