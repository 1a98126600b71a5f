"""`mlapi ui`: a port on this machine's loopback that reaches a service on the stack's overlay network (Prometheus,
Alertmanager), whose ports are published nowhere. Each connection runs infra/ops/relay.py in a model replica
(``docker exec -i``, over SSH for a Pulumi stack) and carries the bytes both ways over its stdin and stdout."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

RELAY_SOURCE = (Path(__file__).with_name("relay.py")).read_text()
CHUNK = 65536


def relay_command(container: str, host: str, port: int) -> list[str]:
    """The command, on the manager, that carries one connection to ``host:port`` from inside ``container``."""
    return ["docker", "exec", "-i", container, "python", "-c", RELAY_SOURCE, host, str(port)]


class Forwarder(socketserver.ThreadingTCPServer):
    """Listens on 127.0.0.1:``port``; each connection is piped through the process ``connect()`` returns the argv
    of (asked anew for each connection). ``failed``: told why a connection could not be carried: what ``connect``
    raised, or what a relay process said when it ended with an error."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, connect: Callable[[], list[str]], failed: Callable[[str], None]) -> None:
        self.connect = connect
        self.failed = failed
        super().__init__(("127.0.0.1", port), _Connection)


class _Connection(socketserver.BaseRequestHandler):
    server: Forwarder

    def handle(self) -> None:
        try:
            command = self.server.connect()
        except Exception as exc:  # said, and this connection closed; the forward keeps listening
            self.server.failed(str(exc))
            return
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        client: socket.socket = self.request

        def upstream() -> None:  # the browser -> the relay; its end (or a dead relay) closes the relay's stdin
            with contextlib.suppress(OSError), process.stdin:
                while chunk := client.recv(CHUNK):
                    process.stdin.write(chunk)
                    process.stdin.flush()

        threading.Thread(target=upstream, daemon=True).start()
        try:
            while chunk := process.stdout.read1(CHUNK):
                client.sendall(chunk)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            process.kill()
        said = process.stderr.read().decode(errors="replace").strip()
        if process.wait() != 0 and said:
            self.server.failed(said.splitlines()[-1])


def serve(port: int, connect: Callable[[], list[str]], ready: Callable[[str], None]) -> None:
    """Forward 127.0.0.1:``port`` until interrupted; ``ready`` is told the URL once it listens."""
    try:
        server = Forwarder(port, connect, lambda said: print(f"a connection failed: {said}", file=sys.stderr))
    except OSError as exc:
        raise OSError(f"127.0.0.1:{port} cannot be listened on ({exc.strerror}): choose another with --port") from exc
    with server:
        ready(f"http://127.0.0.1:{server.server_address[1]}/")
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
