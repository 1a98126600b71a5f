"""A small HTTPS file server on 127.0.0.1 with its own certificate (openssl), for data fetched from a URL: what it
serves, what it answers and how slowly can be changed while it runs, and it counts the requests."""

from __future__ import annotations

import http.server
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Served:
    """What the server answers for each path: a body, or a status (and a Location for a redirect)."""

    files: dict[str, bytes] = field(default_factory=dict)
    status: dict[str, tuple[int, str]] = field(default_factory=dict)  # path -> (code, Location or "")
    delay_s: float = 0.0  # between chunks of a body: a slow server
    requests: list[str] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    served: Served

    def do_GET(self) -> None:
        served = self.served
        served.requests.append(self.path)
        path = self.path.split("?", 1)[0]
        if path in served.status:
            code, location = served.status[path]
            self.send_response(code)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = served.files.get(path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/csv")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for start in range(0, len(body), 4096):
            self.wfile.write(body[start : start + 4096])
            time.sleep(served.delay_s)

    def log_message(self, format: str, *args: object) -> None:
        pass


def self_signed(directory: Path, names: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """(key, certificate) for 127.0.0.1 (and the DNS ``names``), valid for a day: a server's own CA for a test to
    trust."""
    directory.mkdir(parents=True, exist_ok=True)
    key, certificate = directory / "key.pem", directory / "cert.pem"
    alternatives = ",".join(["IP:127.0.0.1", *(f"DNS:{name}" for name in names)])
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", f"subjectAltName={alternatives}",
         "-keyout", str(key), "-out", str(certificate)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, certificate


@contextmanager
def https_files(directory: Path) -> Iterator[tuple[str, Served, Path]]:
    """(base URL, what it serves, the certificate to trust, e.g. as SSL_CERT_FILE)."""
    key, certificate = self_signed(directory)
    served = Served()
    handler = type("Handler", (_Handler,), {"served": served})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", served, certificate
    finally:
        server.shutdown()
        server.server_close()
