"""Post-deploy smoke check: retry until ``https://<domain>/health`` answers 200 over a verified TLS chain.

Run by `pulumi up` (a local command) and by the local stack's tests, so the check itself is exercised for real:
``python3 -m infra.ops.smoke --url https://api.example.com/health [--cacert root.pem] [--resolve host:port:ip]``.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import ssl
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit

HINTS = (
    "check: DNS (does the name resolve to the server's IP?), the cloud firewall (80/443 open?), "
    "and the ACME log: ssh root@<ip> docker logs mlapi-traefik"
)


def check_once(url: str, context: ssl.SSLContext, connect_to: str | None, timeout: float) -> tuple[bool, str]:
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    address = connect_to or host
    connection = http.client.HTTPSConnection(address, port, timeout=timeout, context=context)
    try:
        if connect_to:  # like curl --resolve: dial the IP, but verify and send SNI for the name
            connection.sock = context.wrap_socket(
                socket.create_connection((address, port), timeout=timeout), server_hostname=host
            )
        connection.request("GET", parts.path or "/", headers={"Host": host})
        response = connection.getresponse()
        return response.status == 200, f"HTTP {response.status}"
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()


def wait_healthy(
    url: str,
    *,
    attempts: int,
    delay: float,
    cacert: str | None = None,
    insecure: bool = False,
    connect_to: str | None = None,
    timeout: float = 10.0,
    progress: Callable[[str], None] | None = None,
) -> tuple[bool, str]:
    """``progress``: told about each failed attempt (which, when, why), so a long wait is not a silent one."""
    context = ssl.create_default_context(cafile=cacert)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    last = "not tried"
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        ok, last = check_once(url, context, connect_to, timeout)
        if ok:
            return True, f"{url} healthy after {attempt} attempt(s)"
        if progress is not None:
            elapsed = time.monotonic() - started
            then = f"; next in {delay:g} s" if attempt < attempts else ""
            progress(f"smoke check {attempt}/{attempts} after {elapsed:.0f} s: {last}{then}")
        if attempt < attempts:
            time.sleep(delay)
    return False, f"{url} not healthy after {attempts} attempts (last: {last}); {HINTS}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m infra.ops.smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--attempts", type=int, default=60)
    parser.add_argument("--delay", type=float, default=10.0)
    parser.add_argument("--cacert", help="trust this CA bundle instead of the system's")
    parser.add_argument("--insecure", action="store_true", help="skip verification (Let's Encrypt staging)")
    parser.add_argument("--connect-to", help="dial this IP instead of resolving the URL's host")
    args = parser.parse_args(argv)
    ok, message = wait_healthy(
        args.url,
        attempts=args.attempts,
        delay=args.delay,
        cacert=args.cacert,
        insecure=args.insecure,
        connect_to=args.connect_to,
        progress=lambda line: print(line, flush=True),  # streamed into `pulumi up`'s output
    )
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
