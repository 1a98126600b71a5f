"""`mlapi ui`'s forwarder without Docker: 127.0.0.1:<port> here, each connection carried by infra/ops/relay.py run
as its own process (on a stack: in a model replica, over SSH) to an HTTP server. Keep-alive, concurrent connections,
large bodies both ways, a service that refuses; the real path through the local stack is in
tests/stack/test_stack_backup.py."""

from __future__ import annotations

import hashlib
import http.server
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest

from infra.ops.forward import RELAY_SOURCE, Forwarder, relay_command


class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: several requests on one relayed connection

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        answer = hashlib.sha256(body).hexdigest().encode() + b"\n" + body[::-1]
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def service() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def forwarding(port: int, failures: list[str]) -> Forwarder:
    forwarder = Forwarder(0, lambda: [sys.executable, "-c", RELAY_SOURCE, "127.0.0.1", str(port)], failures.append)
    threading.Thread(target=forwarder.serve_forever, daemon=True).start()
    return forwarder


def test_requests_and_large_bodies_cross_both_ways_on_kept_alive_connections(service: int) -> None:
    failures: list[str] = []
    forwarder = forwarding(service, failures)
    url = f"http://127.0.0.1:{forwarder.server_address[1]}/"
    bodies = [bytes(range(256)) * 4096 * (i + 1) for i in range(4)]  # 1-4 MiB
    try:
        with httpx.Client(timeout=30) as client:
            for body in bodies:  # one connection, reused
                answer = client.post(url, content=body)
                assert answer.content == hashlib.sha256(body).hexdigest().encode() + b"\n" + body[::-1]

        def one(i: int) -> bool:
            with httpx.Client(timeout=30) as client:
                body = str(i).encode() * 1000
                return client.post(url, content=body).content.endswith(body[::-1])

        results = [False] * 8
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, one(i))) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert results == [True] * 8
    finally:
        forwarder.shutdown()
        forwarder.server_close()
    assert failures == []


def test_a_service_that_refuses_is_said_and_the_connection_closes(service: int) -> None:
    failures: list[str] = []
    forwarder = forwarding(1, failures)  # nothing listens on port 1
    try:
        with pytest.raises(httpx.HTTPError), httpx.Client(timeout=30) as client:
            client.get(f"http://127.0.0.1:{forwarder.server_address[1]}/")
    finally:
        forwarder.shutdown()
        forwarder.server_close()
    assert len(failures) == 1 and "ConnectionRefusedError" in failures[0], failures


def test_a_connection_that_cannot_be_made_is_said_and_the_next_one_is_carried(service: int) -> None:
    """``connect`` is asked for each connection (`mlapi ui` finds a replica of now): when it fails, that connection
    closes with the reason said, and the forward keeps serving."""
    failures: list[str] = []
    attempts = iter([RuntimeError("no running mlapi-model replica on the local stack: gone")])

    def connect() -> list[str]:
        for failure in attempts:
            raise failure
        return [sys.executable, "-c", RELAY_SOURCE, "127.0.0.1", str(service)]

    forwarder = Forwarder(0, connect, failures.append)
    threading.Thread(target=forwarder.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{forwarder.server_address[1]}/"
    try:
        with pytest.raises(httpx.HTTPError), httpx.Client(timeout=30) as client:
            client.post(url, content=b"first")
        with httpx.Client(timeout=30) as client:
            assert client.post(url, content=b"second").content.endswith(b"dnoces")
    finally:
        forwarder.shutdown()
        forwarder.server_close()
    assert failures == ["no running mlapi-model replica on the local stack: gone"]


def test_a_port_in_use_names_the_option(service: int) -> None:
    from infra.ops.forward import serve

    with pytest.raises(OSError, match=rf"127.0.0.1:{service} cannot be listened on .*choose another with --port"):
        serve(service, lambda: [], lambda url: None)


def test_the_relay_runs_in_the_replica_with_docker_exec() -> None:
    command = relay_command("abc123", "mlapi-prometheus", 9090)
    assert command[:6] == ["docker", "exec", "-i", "abc123", "python", "-c"]
    assert command[6] == RELAY_SOURCE and command[7:] == ["mlapi-prometheus", "9090"]
    assert "import infra" not in RELAY_SOURCE and "from infra" not in RELAY_SOURCE  # runs where the project is not
