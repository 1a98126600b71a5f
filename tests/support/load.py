"""A bounded load generator for the real-stack tests: N clients with keep-alive HTTPS connections (verified against
the stack's CA, SNI = the domain, dialing 127.0.0.1 or a test host), alternating single and batch predictions, every
outcome recorded. A failed request is anything but a 200: an error status, a reset, a timeout.

Bounded twice: it stops when `stop()` is called or after ``max_seconds``, and each client sends at most
``max_requests``. With ``rate`` the clients together send at most that many requests per second (paced, never in
bursts to catch up); without it, as fast as the service answers. Because it can stop by itself, "0 failed
requests" proves nothing alone: `LoadReport.covers` checks that requests were answered before, during and after
the event, and that the load had not ended early.
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

from tests.support.service import record

# The rate at which the tests watch a rollout, a crash, a backup or a drain: on 8 connections, a request on each every
# 200 ms, inside every drain and start window (seconds long). Unpaced, the load took the two cores from the replicas
# it watched: a two-replica rollout took 70 s instead of 24 s idle.
WATCHING_RATE = 40

SINGLE = json.dumps({"features": record()}).encode()
BATCH = json.dumps({"records": [record(age=0.01 * i) for i in range(20)]}).encode()


@dataclass
class Outcome:
    at: float
    path: str
    status: int  # 0 for a connection-level failure
    detail: str = ""
    seconds: float = 0.0
    via: str = ""  # a replica of another generation answered (app/handover.py): the answer's Via header


@dataclass
class LoadReport:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    started_at: float = 0.0
    ended_by_itself_at: float | None = None  # a client hit max_seconds or max_requests before stop()

    def covers(self, began: float, converged: float) -> int:
        """Fails unless the load saw the whole event: requests answered before ``began``, between it and
        ``converged`` (the service whole again), and after; and no client stopped by itself before the end.
        Returns the number of requests answered during the event."""
        assert self.started_at and self.started_at < began, "the load started after the event"
        assert any(o.at < began for o in self.outcomes), f"no request answered before the event: {self.summary()}"
        during = sum(began <= o.at <= converged for o in self.outcomes)
        assert during, f"no request answered during the event ({converged - began:.1f} s): {self.summary()}"
        assert any(o.at > converged for o in self.outcomes), f"no request after the event: {self.summary()}"
        ended = self.ended_by_itself_at
        assert ended is None or ended > converged, (
            f"the load stopped by itself {converged - ended:.1f} s before the event converged: raise max_seconds"
        )
        return during

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
        rate: float | None = None,
        single: tuple[str, bytes] = ("/predict", SINGLE),
        batch: tuple[str, bytes] | None = ("/predict/batch", BATCH),
    ) -> None:
        """``single`` and ``batch``: the (path, JSON body) a client sends; every fourth request is the batch, if any."""
        self.domain, self.port, self.address = domain, port, address
        self.single, self.batch = single, batch
        self.rate = rate
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
        interval = self.clients / self.rate if self.rate else 0.0
        next_at = self._started + interval * index / self.clients  # staggered, not all at once
        for sent in range(self.max_requests):
            if interval:
                self._stop.wait(max(0.0, next_at - time.monotonic()))
                next_at = max(next_at + interval, time.monotonic())  # late: no burst to catch up
            if self._stop.is_set():
                break
            if time.monotonic() > deadline:
                self._ended_by_itself()
                break
            path, body = self.single if (sent + index) % 4 or self.batch is None else self.batch
            began = time.monotonic()
            try:
                connection = connection or self._connect()
                connection.request(
                    "POST", path, body=body, headers={"Host": self.domain, "Content-Type": "application/json"}
                )
                response = connection.getresponse()
                payload = response.read()
                now = time.monotonic()
                outcome = Outcome(
                    now,
                    path,
                    response.status,
                    payload[:120].decode(errors="replace"),
                    now - began,
                    response.getheader("Via", ""),
                )
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
        else:
            self._ended_by_itself()  # max_requests sent
        if connection is not None:
            connection.close()

    def _ended_by_itself(self) -> None:
        with self._lock:
            if self.report.ended_by_itself_at is None:
                self.report.ended_by_itself_at = time.monotonic()

    def answered_after(self, moment: float) -> int:
        with self._lock:
            return sum(o.at > moment for o in self.report.outcomes)

    def wait_for_answers_after(self, moment: float, count: int = 20, timeout: float = 60) -> None:
        """Polls until ``count`` requests were answered after ``moment`` (instead of sleeping and hoping)."""
        deadline = time.monotonic() + timeout
        while self.answered_after(moment) < count:
            assert time.monotonic() < deadline, f"fewer than {count} requests answered within {timeout} s"
            assert self.report.ended_by_itself_at is None, "the load stopped by itself"
            time.sleep(0.05)

    def start(self) -> Load:
        self._started = self.report.started_at = time.monotonic()
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
