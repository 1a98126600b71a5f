"""A bounded load generator for the real-stack tests: N clients with keep-alive HTTPS connections (verified against
the stack's CA, SNI = the domain, dialing 127.0.0.1 or a test host), alternating single and batch predictions, every
outcome recorded. A failed request is anything but a 200: an error status, a reset, a timeout.

Bounded twice: it stops when `stop()` is called or after ``max_seconds``, and each client sends at most
``max_requests``.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from tests.conftest import record

SINGLE = json.dumps({"features": record()}).encode()
BATCH = json.dumps({"records": [record(age=0.01 * i) for i in range(20)]}).encode()


@dataclass
class Outcome:
    at: float
    path: str
    status: int  # 0 for a connection-level failure
    detail: str = ""
    seconds: float = 0.0


@dataclass
class LoadReport:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]

    def latency_ms(self, start: float = 0.0, end: float = float("inf"), quantile: float = 0.5) -> float:
        """A latency quantile of the successful single predictions answered between ``start`` and ``end``."""
        times = sorted(
            o.seconds for o in self.outcomes if o.status == 200 and o.path == "/predict" and start <= o.at <= end
        )
        return round(times[min(len(times) - 1, int(quantile * len(times)))] * 1000, 2) if times else float("nan")

    def summary(self) -> str:
        statuses = Counter(o.status for o in self.outcomes)
        rate = len(self.outcomes) / self.seconds if self.seconds else 0.0
        details = Counter(o.detail for o in self.failed).most_common(3)
        return (
            f"{len(self.outcomes)} requests in {self.seconds:.1f} s ({rate:.0f}/s), {len(self.failed)} failed; "
            f"statuses {dict(statuses)}" + (f"; failures: {details}" if details else "")
        )


class Load:
    def __init__(
        self,
        domain: str,
        port: int,
        cafile: str,
        *,
        address: str = "127.0.0.1",
        clients: int = 8,
        max_seconds: float = 120,
        max_requests: int = 20_000,
    ) -> None:
        self.domain, self.port, self.address = domain, port, address
        self.context = ssl.create_default_context(cafile=cafile)
        self.clients, self.max_seconds, self.max_requests = clients, max_seconds, max_requests
        self.report = LoadReport()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._started = 0.0

    def _connect(self) -> http.client.HTTPSConnection:
        raw = socket.create_connection((self.address, self.port), timeout=10)
        connection = http.client.HTTPSConnection(self.domain, self.port, timeout=10, context=self.context)
        connection.sock = self.context.wrap_socket(raw, server_hostname=self.domain)
        return connection

    def _client(self, index: int) -> None:
        connection: http.client.HTTPSConnection | None = None
        deadline = self._started + self.max_seconds
        for sent in range(self.max_requests):
            if self._stop.is_set() or time.monotonic() > deadline:
                break
            path, body = ("/predict", SINGLE) if (sent + index) % 4 else ("/predict/batch", BATCH)
            began = time.monotonic()
            try:
                connection = connection or self._connect()
                connection.request(
                    "POST", path, body=body, headers={"Host": self.domain, "Content-Type": "application/json"}
                )
                response = connection.getresponse()
                payload = response.read()
                now = time.monotonic()
                outcome = Outcome(now, path, response.status, payload[:120].decode(errors="replace"), now - began)
                if response.getheader("Connection", "").lower() == "close":
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as exc:
                outcome = Outcome(time.monotonic(), path, 0, f"{type(exc).__name__}: {exc}")
                if connection is not None:
                    connection.close()
                connection = None
            with self._lock:
                self.report.outcomes.append(outcome)
        if connection is not None:
            connection.close()

    def start(self) -> Load:
        self._started = time.monotonic()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> LoadReport:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.report.seconds = time.monotonic() - self._started
        return self.report

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
